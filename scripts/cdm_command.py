"""How the scripts run ``cdm``: ``python -m cascaded_diffusion.cli`` in a child process of this interpreter (the
library's own environment, whatever ``cdm`` is on PATH), so a script runs exactly what a user's command does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CDM = [sys.executable, "-m", "cascaded_diffusion.cli"]


def cdm_command(*args: str) -> list[str]:
    """The argv of ``cdm ARGS...``."""
    return [*CDM, *(str(a) for a in args)]


def cdm(*args: str, echo: bool = False, log: Path | None = None) -> None:
    """Run ``cdm ARGS...`` to the end; a failure raises ``CalledProcessError``. ``echo``: print the command first;
    ``log``: append its output (stdout and stderr) to that file instead of showing it."""
    if echo:
        print("+ cdm", " ".join(str(a) for a in args), flush=True)
    if log is None:
        subprocess.run(cdm_command(*args), check=True)
        return
    with open(log, "a") as f:
        subprocess.run(cdm_command(*args), check=True, stdout=f, stderr=subprocess.STDOUT)


def cdm_background(*args: str, **popen) -> subprocess.Popen:
    """Start ``cdm ARGS...`` without waiting (a server, a training to watch); ``popen``: ``subprocess.Popen``'s
    keyword arguments (stdout, stderr, text, ...)."""
    return subprocess.Popen(cdm_command(*args), **popen)
