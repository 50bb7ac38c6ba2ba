"""A training run directory's own files besides its checkpoints (:mod:`.checkpoint`): its lock (:class:`RunLock`,
``.lock``), the resolved config the trainer writes (``config.toml``, marked by :data:`CONFIG_HEADER`), whether a
directory is a run at all, and the append-only log ``log.jsonl`` (:func:`append_log_event`, :func:`json_line`,
:func:`read_log`)."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import RunLockedError, UserError, naming
from .fileio import FileLock, LockBusy

__all__ = ["LOCK_FILE", "RunLock", "CONFIG_HEADER", "is_run_dir", "check_run_dir_is_ours", "append_log_event", "json_line", "read_log"]


LOCK_FILE = ".lock"


class RunLock:
    """The run directory's :class:`~cascaded_diffusion.fileio.FileLock` (``RUN/.lock``), held while a trainer writes
    the run directory. A stale lock never blocks a resume; the file stays and records the last holder. A second
    trainer is refused with :class:`~cascaded_diffusion.errors.RunLockedError` naming the holder's pid and host.
    On a network file system the lock is as good as its ``flock`` support (Linux NFS emulates it with byte-range
    locks, which work across hosts)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._lock = FileLock(self.path)

    def acquire(self) -> "RunLock":
        try:
            self._lock.acquire()
        except LockBusy as busy:
            raise naming(RunLockedError,
                         "{run_dir} is in use by another trainer ({holder}). Two trainers on one run directory would "
                         "overwrite each other's checkpoints: wait for it to finish or stop it, or train into another "
                         "{option} directory.", {"option": "run_dir"}, run_dir=self.run_dir,
                         holder=busy.holder or f"holder unknown: {self.path} has no readable pid yet") from None
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def json_line(record: dict) -> str:
    """One log line of strict JSON: a non-finite number (a diverged loss) becomes null, since the bare NaN that
    json.dumps writes is not JSON and breaks every other reader of the log."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


CONFIG_HEADER = "# Written by `cdm train`: the resolved config of this run, rewritten on every start."


def is_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` is recognisably a run of this library: a ``.lock`` holding a trainer's record, a
    complete (or set-aside) checkpoint, or a ``config.toml`` / ``config.resolved.toml`` we wrote."""
    try:
        lock = run_dir / LOCK_FILE
        if lock.is_file() and not lock.is_symlink():
            record = json.loads(lock.read_text() or "{}")
            if isinstance(record, dict) and {"pid", "host"} <= set(record):
                return True
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir() and any(p.name.startswith("corrupt-step_") or (p / "state.json").is_file()
                                        for p in checkpoints.iterdir()):
            return True
        for name in ("config.toml", "config.resolved.toml"):
            path = run_dir / name
            if path.is_file():
                with open(path, "rb") as f:
                    if f.read(len(CONFIG_HEADER)).decode(errors="replace") == CONFIG_HEADER:
                        return True
    except (OSError, ValueError):
        pass
    return False


def check_run_dir_is_ours(run_dir: Path, config_path: Path | None = None) -> None:
    """Refuse a non-empty directory that is not a run of this library, as ``cdm prepare`` does: cleaning an
    interrupted run's leftovers (``checkpoints/step_*`` without ``state.json``, ``.NAME.tmp-*``) must never delete
    another tool's files. A new directory may already hold the user's config file and a ``log.jsonl`` (ours
    is only ever appended to it)."""
    if not run_dir.is_dir() or is_run_dir(run_dir):
        return
    allowed = {LOCK_FILE, "log.jsonl"}  # a planted .lock is refused by the lock itself, naming the problem
    if config_path is not None and config_path.parent.resolve() == run_dir.resolve():
        allowed.add(config_path.name)
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in allowed)
    if foreign:
        raise naming(UserError, "{option} {run_dir} is not empty and is not a run directory of `cdm train` (it holds "
                     "{foreign}); give a new or empty directory", {"option": "run_dir"}, run_dir=run_dir,
                     foreign=", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else ""))


def append_log_event(path: Path, event: str, step: int) -> None:
    """Append ``{"event": "start"|"resume", "step": N, ...}`` to the log. The log is only ever appended to:
    records of steps after N written before this line belong to work lost to an interruption, and
    :func:`read_log` drops them; nothing is deleted from the file."""
    record = {"event": event, "step": step, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    with open(path, "ab") as f:
        if f.tell() > 0:  # a line cut by a kill must not swallow this one
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged records of a run (``RUN/log.jsonl``, or the path of a log itself) as they stand after every
    resume: an ``{"event": "start"|"resume", "step": N}`` line voids the records above it with a step after N
    (work lost to an interruption and redone after it), so each step keeps its last record. Event lines are
    not returned; a line cut by a kill is skipped."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "log.jsonl"
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "event" in record:
            step = record.get("step", 0)
            records = [r for r in records if r.get("step", 0) <= step]
        else:
            records.append(record)
    return records
