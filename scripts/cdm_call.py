"""How the scripts run `cdm`: in the calling process by default, so that a study of twenty sampling commands does
not start twenty interpreters that each import torch (that import was most of the study scripts' test time), or
in a child process when a command's output should go to a log file of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def cdm(*args: str, echo: bool = False, log: Path | None = None) -> None:
    """``cdm ARGS``; raises ``SystemExit`` with the command line when it fails. ``echo`` prints ``+ cdm ARGS`` first
    (the study scripts' trace, which their tests read); ``log`` appends the command's output to that file."""
    if echo:
        print("+ cdm", " ".join(args), flush=True)
    if log is not None:
        with open(log, "a") as f:
            subprocess.run([sys.executable, "-m", "cascaded_diffusion.cli", *args], check=True, stdout=f,
                           stderr=subprocess.STDOUT)
        return
    from cascaded_diffusion.cli import main

    status = main(list(args))
    if status:
        raise SystemExit(f"`cdm {' '.join(args)}` failed with exit status {status}")
