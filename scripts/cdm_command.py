"""How the scripts run ``cdm``: in the calling process by default (``cascaded_diffusion.cli.main``, what a user's
command runs, minus the start-up: a study of twenty sampling commands must not start twenty interpreters that each
import torch, which was most of the study scripts' test time), in a child process of this interpreter when the
output should go to a log file of its own, or in the background."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CDM = [sys.executable, "-m", "cascaded_diffusion.cli"]


def cdm_command(*args: str) -> list[str]:
    """The argv of ``cdm ARGS...``."""
    return [*CDM, *(str(a) for a in args)]


def cdm(*args: str, echo: bool = False, log: Path | None = None) -> None:
    """Run ``cdm ARGS...`` to the end; a failure raises ``SystemExit`` naming the command (``CalledProcessError``
    with ``log``). ``echo``: print ``+ cdm ARGS`` first (the study scripts' trace, which their tests read); ``log``:
    append its output (stdout and stderr) to that file, from a child process."""
    args = tuple(str(a) for a in args)
    if echo:
        print("+ cdm", " ".join(args), flush=True)
    if log is not None:
        with open(log, "a") as f:
            subprocess.run(cdm_command(*args), check=True, stdout=f, stderr=subprocess.STDOUT)
        return
    from cascaded_diffusion.cli import main

    status = main(list(args))
    if status:
        raise SystemExit(f"`cdm {' '.join(args)}` failed with exit status {status}")


def cdm_background(*args: str, **popen) -> subprocess.Popen:
    """Start ``cdm ARGS...`` without waiting (a server, a training to watch); ``popen``: ``subprocess.Popen``'s
    keyword arguments (stdout, stderr, text, ...)."""
    return subprocess.Popen(cdm_command(*args), **popen)
