"""The shard directory of a sampling job, ``OUT.shards/``: its files, their checks and their merge.

``manifest.json`` records what is being sampled (:func:`~cascaded_diffusion.sharded_sampling.sample_sharded`
decides what: seed, number, hashes of the labels and inputs, stages, sampler settings); ``chunk-*.npz`` files
hold finished samples (``indices``, ``labels`` and one uint8 NHWC array per stage run), each written
atomically; ``.lock`` is held by the process that owns the directory. :class:`ShardDirectory` claims the
directory (lock, manifest check, leftovers and damaged chunks removed), writes and counts chunks, merges them
and removes them; :class:`ShardReader` reads the chunks back in index order, a block of indices at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserError, describe_os_error, naming
from .fileio import TMP_INFIX, FileLock, LockBusy, atomic_write_bytes, atomic_write_text, write_npz_streaming

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT_VERSION = 1


class ShardManifestError(UserError):
    """``OUT.shards/`` holds the shards of a different sampling job."""


def shard_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


def array_sha256(array: np.ndarray | None) -> str | None:
    """A hash of an array's dtype, shape and bytes (None for None): what a manifest records of its inputs."""
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def _chunk_name(indices: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"chunk-{int(indices[0]):08d}-n{len(indices):06d}-{digest}.npz"


def _chunk_count(name: str) -> int:
    return int(name.split("-n", 1)[1].split("-", 1)[0])


def _read_chunk_indices(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as f:
        indices = f["indices"]
    if indices.ndim != 1 or indices.dtype != np.int64 or not len(indices):
        raise ValueError("bad indices array")
    return indices


def _describe_mismatch(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for k in keys[:4]:
        a, b = json.dumps(old.get(k), sort_keys=True), json.dumps(new.get(k), sort_keys=True)
        parts.append(f"{k}: {a[:80]} then, {b[:80]} now")
    return "; ".join(parts)


class ShardDirectory:
    """``OUT.shards/`` of the sampling job that writes ``out``."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = shard_dir_for(self.out)
        self._lock = FileLock(self.path / LOCK)

    # --- the claim ----------------------------------------------------------------------------------------
    def lock(self) -> "ShardDirectory":
        """Hold ``.lock`` from before the directory is read until the shards are merged and removed: a second
        ``cdm sample`` on the same output is refused at once, naming the first, instead of sampling everything
        again and failing at the merge."""
        try:
            self._lock.acquire()
        except LockBusy as busy:
            raise naming(UserError, "{out} is being sampled by another `cdm sample` ({holder}); wait for it to "
                         "finish (it writes {out}), or sample into another {option}", {"option": "out"},
                         out=self.out, holder=busy.holder or f"its lock {busy.path} is held") from None
        return self

    def release(self) -> None:
        self._lock.release()

    def claim(self, manifest: dict, num: int, info: dict | None = None) -> tuple[np.ndarray, list[str]]:
        """Lock the directory, check its manifest against ``manifest`` (or write it, with ``info`` beside it),
        drop interrupted writes and unreadable chunks; returns the indices already done and the chunks present."""
        self.lock()
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_manifest(manifest, info)
        for name in os.listdir(self.path):
            if name.startswith(".") and TMP_INFIX in name:  # an interrupted write (the lock keeps out a live one)
                (self.path / name).unlink(missing_ok=True)
        done: list[np.ndarray] = []
        names = []
        for name in self.chunks():
            try:
                indices = _read_chunk_indices(self.path / name)
                if indices.min() < 0 or indices.max() >= num:
                    raise ValueError(f"indices outside [0, {num})")
            except Exception:  # noqa: BLE001 - a damaged chunk is recomputed, never trusted
                (self.path / name).unlink(missing_ok=True)
                continue
            done.append(indices)
            names.append(name)
        done_set = np.unique(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)
        return done_set, names

    def _check_manifest(self, manifest: dict, info: dict | None) -> None:
        path = self.path / MANIFEST
        if not path.is_file():
            atomic_write_text(path, json.dumps({**manifest, "info": info or {}}, indent=2, sort_keys=True))
            return
        try:
            old = json.loads(path.read_text())
            old.pop("info", None)
        except (OSError, ValueError, AttributeError) as e:
            raise ShardManifestError(f"{path} is unreadable ({e}); delete {self.path} to start over") from None
        if old != manifest:
            raise ShardManifestError(
                f"{self.path} holds the shards of a different sampling job ({_describe_mismatch(old, manifest)}); "
                f"rerun with the same settings to resume it, or delete {self.path} to start over"
            )

    # --- chunks -------------------------------------------------------------------------------------------
    @staticmethod
    def list_chunks(path: Path) -> list[str]:
        try:
            return sorted(n for n in os.listdir(path) if n.startswith("chunk-") and n.endswith(".npz"))
        except FileNotFoundError:
            return []

    def chunks(self) -> list[str]:
        return self.list_chunks(self.path)

    def write_chunk(self, indices: np.ndarray, labels: np.ndarray, stages: Sequence[np.ndarray]) -> Path:
        """One chunk of finished samples, written atomically: from here on they are never sampled again."""
        buf = io.BytesIO()
        np.savez(buf, indices=indices, labels=labels, **{f"stage_{k}": a for k, a in enumerate(stages)})
        path = self.path / _chunk_name(indices)
        atomic_write_bytes(path, buf.getvalue())
        return path

    def count_new(self, present: set[str]) -> int:
        """Samples in the chunks written since the claim (by every process), read from the directory."""
        return sum(_chunk_count(n) for n in self.chunks() if n not in present)

    # --- the merge ----------------------------------------------------------------------------------------
    def merge(self, labels: np.ndarray, outputs: Sequence[tuple[Path, int]], select: Sequence[int] | None = None,
              block: int = 1024) -> list[np.ndarray] | None:
        """Write every ``(path, stage k)`` of ``outputs`` from the chunks in index order (``arr_0``: stage k's
        images, ``arr_1``: ``labels``), streamed and atomically; then remove the shards. Returns, with
        ``select``, every stage's images of those indices (in that order)."""
        reader = ShardReader(self.path, labels, block=block, select=select)
        for n, (path, k) in enumerate(outputs):
            if n > 0:
                reader.rewind()  # each further file re-reads the chunks

            def fill(member, k=k):
                for rows in reader.blocks():
                    member.write(rows[k])

            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_npz_streaming(path, {
                    "arr_0": ((reader.num, *reader.shapes[k]), np.uint8, fill),
                    "arr_1": ((reader.num,), np.int64, lambda member: member.write(labels)),
                })
            except OSError as e:
                raise UserError(
                    f"{describe_os_error(e)}; the {reader.num} samples are kept in {self.path}: "
                    "rerun the same command to write the file without sampling again"
                ) from None
        self.remove()
        return reader.selected

    def remove(self) -> None:
        for name in self.chunks():
            (self.path / name).unlink(missing_ok=True)
        (self.path / MANIFEST).unlink(missing_ok=True)
        (self.path / LOCK).unlink(missing_ok=True)  # still held by us: a waiter notices (see FileLock)
        try:
            self.path.rmdir()
        except OSError:
            pass


class ShardReader:
    """The samples of a shard directory in index order, ``block`` indices at a time: which chunk and row hold
    each index is read first (every index must be somewhere); a chunk is then read when its first index is
    reached and dropped once its last one was taken, so memory holds a few chunks, not the job."""

    def __init__(self, shard_dir: Path, labels: np.ndarray, block: int = 1024, select: Sequence[int] | None = None):
        self.path, self.labels, self.block = shard_dir, labels, block
        self.num = len(labels)
        self.names = ShardDirectory.list_chunks(shard_dir)
        self.owner = np.full(self.num, -1, dtype=np.int64)  # the chunk of each index
        self.row = np.zeros(self.num, dtype=np.int64)  # its row there
        for c, name in enumerate(self.names):
            try:
                indices = _read_chunk_indices(shard_dir / name)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{shard_dir / name} is unreadable ({e}); delete it and rerun to recompute it") from None
            self.owner[indices] = c
            self.row[indices] = np.arange(len(indices))
        missing = np.flatnonzero(self.owner < 0)
        if len(missing):
            raise UserError(f"{shard_dir} lacks {len(missing)} of {self.num} samples (first: index {missing[0]}); "
                            "rerun to finish")
        self.rewind()
        first = self._chunk(int(self.owner[0]))
        self.num_stages = sum(1 for key in first if key.startswith("stage_"))
        self.shapes = [first[f"stage_{k}"].shape[1:] for k in range(self.num_stages)]
        # with ``select``: every stage's images of those indices, in that order, filled by a pass of blocks()
        self.select = None if select is None else np.asarray(select, dtype=np.int64)
        self.selected = None if select is None else [np.zeros((len(self.select), *s), dtype=np.uint8)
                                                     for s in self.shapes]

    def rewind(self) -> None:
        """Start another pass over the chunks."""
        self._remaining = np.bincount(self.owner, minlength=len(self.names))
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _chunk(self, c: int) -> dict[str, np.ndarray]:
        if c not in self._cache:
            path = self.path / self.names[c]
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{path} is unreadable ({e}); delete it and rerun to recompute it") from None
            if not np.array_equal(arrays["labels"], self.labels[arrays["indices"]]):
                raise UserError(f"{path} was sampled for other labels; delete {self.path} and rerun")
            self._cache[c] = arrays
        return self._cache[c]

    def rows(self, lo: int, hi: int) -> list[np.ndarray]:
        """Every stage's images of indices ``lo .. hi-1`` (call in increasing order within a pass)."""
        arrays = [np.empty((hi - lo, *s), dtype=np.uint8) for s in self.shapes]
        for i in range(lo, hi):
            c = int(self.owner[i])
            chunk = self._chunk(c)
            for k in range(self.num_stages):
                arrays[k][i - lo] = chunk[f"stage_{k}"][self.row[i]]
            self._remaining[c] -= 1
            if self._remaining[c] == 0:
                self._cache.pop(c, None)
        return arrays

    def blocks(self):
        """:meth:`rows` of every block of indices, in order (one pass); the selected indices' rows are kept."""
        for lo in range(0, self.num, self.block):
            hi = min(lo + self.block, self.num)
            rows = self.rows(lo, hi)
            if self.select is not None:
                hit = np.flatnonzero((self.select >= lo) & (self.select < hi))
                for k in range(self.num_stages):
                    self.selected[k][hit] = rows[k][self.select[hit] - lo]
            yield rows
