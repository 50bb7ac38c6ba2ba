"""Shared test settings.

The suite runs tiny models whose ops are dominated by per-op overhead; one intra-op thread is faster for
them than two and immune to the pathological slow-downs of spinning OpenMP threads on a busy machine.
"""

import torch

torch.set_num_threads(1)


import contextlib  # noqa: E402
import io  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def run_script(monkeypatch):
    """``run_script("emoji_study.py", *args) -> (exit status, stdout)``: a script of scripts/ run as ``__main__`` in
    this process (its `cdm` calls too, through scripts/cdm_call.py), not in a fresh interpreter that imports torch
    again: what a user's `python scripts/NAME.py ARGS` does, minus the start-up."""

    def run(name: str, *args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *map(str, args)])
        monkeypatch.syspath_prepend(str(SCRIPTS))
        out = io.StringIO()
        status = 0
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_path(str(SCRIPTS / name), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if status:
                    print(e.code, file=sys.stderr)
        return status, out.getvalue()

    return run
