"""Sampling many images over many processes, resumable, into one ``.npz``: the library behind ``cdm sample``.

:func:`sample_sharded` splits the sample indices ``0..num-1`` over the ranks of ``torch.distributed`` (one
process when it is not initialised). Each sample's noise depends on (seed, index) only
(:mod:`cascaded_diffusion.rng`), so the result is **byte-identical for any number of processes and any batch
size** on the same kind of device at the same number of threads per process (on a CPU the networks run on fixed
micro-batches, :data:`cascaded_diffusion.stage.CPU_NETWORK_BATCH`).

As it goes, every rank writes chunks of finished samples to ``OUT.shards/`` (``chunk-*.npz``: ``indices``,
``labels`` and one uint8 NHWC array per stage run), each atomically (temporary file, fsync, rename). The
directory's ``manifest.json`` records what is being sampled (seed, number, a hash of the labels and of any
given low-resolution inputs, the stages, the sampler settings); a rerun with the same settings resumes from
the chunks already written, whatever its number of processes or batch size, and a rerun with different ones
is refused before any compute. When every index is done, rank 0 merges the chunks in index order into
``OUT`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels, as guided-diffusion's evaluator reads), streaming it
to a temporary file that is renamed into place, and removes the shards.
"""

# Longer than ~400 lines: the shard manifest, the per-rank chunk writer with its resume, the progress over all
# ranks and the streaming byte-deterministic merge are one protocol; split, each half would check the other's files.
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import cascade as _cascade
from .cascade import Cascade
from .fileio import atomic_write_bytes, atomic_write_text, fsync_dir as _fsync_dir, TMP_INFIX, make_temp_file, open_lock_file, open_no_follow, unlink_quietly
from .distributed import distributed_context, distributed_from_env  # noqa: F401 (re-exported)
from .errors import UserError
from .hardware import check_sampling_memory

__all__ = [
    "ShardManifestError",
    "distributed_from_env",
    "ShardedSamplingResult",
    "distributed_context",
    "shard_dir_for",
    "sample_sharded",
    "write_npz_streaming",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same arrays always give the same bytes


class ShardManifestError(UserError):
    """``OUT.shards/`` holds the shards of a different sampling job."""


@dataclass
class ShardedSamplingResult:
    path: Path  # the merged npz (written by rank 0)
    num: int  # samples in it
    resumed: int  # samples found in the shards at the start (not recomputed)
    new: int  # samples computed by this run, all ranks together
    sampling_seconds: float  # from the start of sampling until every rank was done
    seconds: float  # including the merge
    world_size: int
    stage_paths: list[Path] = field(default_factory=list)
    # rank 0, with ``select``: every stage's images of the selected indices, in the order given
    selected: list[np.ndarray] | None = None

    @property
    def rate(self) -> float:
        """Samples per second of this run (all processes together, the merge excluded)."""
        return self.new / max(self.sampling_seconds, 1e-9)


def shard_dir_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".shards")


# --- the npz writer ---------------------------------------------------------------------------------------


class _NpyMember:
    """One ``.npy`` member of a zip being written, filled block by block."""

    def __init__(self, archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype):
        info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self._handle = archive.open(info, "w", force_zip64=True)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._handle, header)
        self._rows = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not fit an array of shape {self.shape}")
        self._handle.write(block.tobytes())
        self._rows += block.shape[0]

    def close(self) -> None:
        if self._rows != self.shape[0]:
            raise ValueError(f"wrote {self._rows} rows of an array of {self.shape[0]}")
        self._handle.close()


def write_npz_streaming(path: str | os.PathLike, arrays: dict[str, tuple[tuple[int, ...], Any, Callable]]) -> None:
    """Write an uncompressed ``.npz`` (what ``np.savez`` writes, with fixed member timestamps, so equal arrays
    give equal bytes) atomically: into a temporary file in the same directory, fsynced, then renamed.

    ``arrays``: name → (shape, dtype, fill) where ``fill(member)`` calls ``member.write(block)`` with
    consecutive blocks of rows. Members are written in the order given."""
    path = Path(path)
    tmp = None
    try:
        tmp = make_temp_file(path)  # exclusive, unpredictable: never a planted link or file
        with open_no_follow(tmp) as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, (shape, dtype, fill) in arrays.items():
                    member = _NpyMember(archive, f"{name}.npy", shape, dtype)
                    fill(member)
                    member.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            unlink_quietly(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not write it ({e.strerror or e}); any previous version is untouched",
                          str(path)) from e
        raise


# --- the shard directory's lock ---------------------------------------------------------------------------

LOCK = ".lock"


class _ShardLock:
    """An exclusive ``flock`` on ``OUT.shards/.lock``, held by rank 0 from before it reads the directory until the
    shards are merged and removed: a second ``cdm sample`` on the same ``--out`` is refused at once, naming the
    first, instead of sampling everything again and failing at the merge. The kernel drops it however the holder
    dies. The file is removed with the directory; a process that locked it just before (an unlinked file) sees
    that its inode is no longer at the path and tries again."""

    def __init__(self, shard_dir: Path, out: Path):
        self.path, self.out, self._fd = shard_dir / LOCK, out, None

    def acquire(self) -> "_ShardLock":
        import fcntl
        import socket
        import sys

        for _ in range(10):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UserError(
                    f"{self.out} is being sampled by another `cdm sample` ({self._holder()}); wait for it to finish "
                    f"(it writes {self.out}), or sample into another --out"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                     "argv": sys.argv}).encode()
                os.pwrite(fd, record, 0)
                os.ftruncate(fd, len(record))
                self._fd = fd
                return self
            os.close(fd)  # the holder removed the directory as we locked: lock the new file
        raise UserError(f"{self.path}: could not be locked (it kept being removed); retry")

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"pid {info['pid']} on host {info['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"its lock {self.path} is held"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- shards -----------------------------------------------------------------------------------------------


def _sha256(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _absolute(source: str) -> str:
    """A stage's directory as an absolute path (a resume from another working directory is the same job)."""
    return str(Path(source).resolve()) if source and Path(source).exists() else source


def _chunk_name(indices: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
    return f"chunk-{int(indices[0]):08d}-n{len(indices):06d}-{digest}.npz"


def _chunk_count(name: str) -> int:
    return int(name.split("-n", 1)[1].split("-", 1)[0])


def _list_chunks(shard_dir: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(shard_dir) if n.startswith("chunk-") and n.endswith(".npz"))
    except FileNotFoundError:
        return []


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


def _prepare_shard_dir(shard_dir: Path, manifest: dict, num: int, info: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """Rank 0: check (or write) the manifest, drop temporaries and unreadable chunks; returns the indices
    already done and the chunk names present."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = shard_dir / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            old.pop("info", None)
        except (OSError, ValueError, AttributeError) as e:
            raise ShardManifestError(f"{path} is unreadable ({e}); delete {shard_dir} to start over") from None
        if old != manifest:
            raise ShardManifestError(
                f"{shard_dir} holds the shards of a different sampling job ({_describe_mismatch(old, manifest)}); "
                f"rerun with the same settings to resume it, or delete {shard_dir} to start over"
            )
    else:
        atomic_write_text(path, json.dumps({**manifest, "info": info or {}}, indent=2, sort_keys=True))
    for name in os.listdir(shard_dir):
        if name.startswith(".") and TMP_INFIX in name:  # an interrupted write (the lock keeps out a live one)
            (shard_dir / name).unlink(missing_ok=True)
    done: list[np.ndarray] = []
    names = []
    for name in _list_chunks(shard_dir):
        try:
            indices = _read_chunk_indices(shard_dir / name)
            if indices.min() < 0 or indices.max() >= num:
                raise ValueError(f"indices outside [0, {num})")
        except Exception:  # noqa: BLE001 - a damaged chunk is recomputed, never trusted
            (shard_dir / name).unlink(missing_ok=True)
            continue
        done.append(indices)
        names.append(name)
    done_set = np.unique(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)
    return done_set, names


def _broadcast(payload: list, world_size: int) -> list:
    if world_size > 1:
        torch.distributed.broadcast_object_list(payload, src=0)
    return payload


# --- the sampling job -------------------------------------------------------------------------------------


def sample_sharded(
    cascade: Cascade,
    labels: torch.Tensor | np.ndarray,
    out: str | os.PathLike,
    *,
    seed: int,
    batch_size: int,
    chunk_size: int | None = None,
    low_res: np.ndarray | None = None,
    start_stage: int = 0,
    stage_paths: Sequence[str | os.PathLike] | None = None,
    select: Sequence[int] | None = None,
    settings: dict | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    noise_device: str | torch.device | None = None,
    progress: bool = False,
    on_chunk: Callable[[Path, np.ndarray], None] | None = None,
    poll_seconds: float = 0.5,
    **sample_kwargs,
) -> ShardedSamplingResult:
    """Sample ``labels`` (sample i gets ``labels[i]``) through ``cascade`` on every rank, into ``out``.

    Args:
        seed: with the index, all the randomness of a sample.
        batch_size: samples per network batch (does not change the result).
        chunk_size: samples per shard chunk (default ``batch_size``): what an interruption can lose.
        low_res, start_stage: given clean inputs of stage ``start_stage`` (uint8 NHWC, one per label).
        stage_paths: also write every stage's output, one npz per stage run (rank 0, streamed like ``out``).
        select: indices whose images of every stage rank 0 returns in ``result.selected`` (e.g. for a grid).
        settings: anything else that defines the job, recorded in the manifest (a resume must match it).
        rank, world_size: default from ``torch.distributed`` (0 and 1 when it is not initialised).
        noise_device: where per-sample noise is drawn (default: the cascade's device).
        progress: rank 0 shows one progress bar of all ranks' samples.
        on_chunk: called as ``on_chunk(path, indices)`` after each chunk is durably written.
        sample_kwargs: go to :meth:`Cascade.sample` (steps, sampler, guidance, eta, truncated, aug_levels,
            autocast); they are recorded in the manifest.

    Every rank returns a result; the files exist when it returns (a final barrier waits for the merge).
    """
    start = time.time()
    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    labels_np = (labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    num = len(labels_np)
    if num == 0:
        raise ValueError("nothing to sample (no labels)")
    if low_res is not None and len(low_res) != num:
        raise ValueError(f"low_res holds {len(low_res)} images for {num} labels")
    chunk_size = int(chunk_size or batch_size)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    check_sampling_memory(cascade, num, batch_size, start_stage=start_stage, world_size=world_size,
                          labels_allocated=True)  # before a batch grows until the kernel kills us
    out = Path(out)
    shard_dir = shard_dir_for(out)
    stages_run = cascade.stages[start_stage:]
    manifest = _jsonable({
        "format": FORMAT_VERSION,
        "seed": int(seed),
        "num": num,
        "labels_sha256": _sha256(labels_np),
        "low_res_sha256": _sha256(low_res),
        "start_stage": start_stage,
        "stages": [{"source": _absolute(s.source), "step": s.step, "resolution": s.resolution,
                    "channels": s.channels} for s in cascade.stages],
        "sampling": {k: v for k, v in sorted(sample_kwargs.items())},
        "noise_device": str(torch.device(noise_device).type if noise_device is not None
                            else cascade.stages[0].device.type),
        "settings": settings or {},
        # what the byte-identity covers (docs/sampling.md): on a CPU the networks run on micro-batches of this
        # many samples whatever --batch-size and a rank's share are; None where the sampler's batch is used
        "network_batch": cascade.stages[0].network_batch,
    })
    # Informational, not part of the job's identity (a resume on more processes has fewer threads each): the
    # kernels' summation order can depend on the thread count, so bytes are guaranteed at equal threads per process.
    manifest_info = {"threads_per_process": torch.get_num_threads()}

    # rank 0 checks the directory and finds the finished indices; every rank gets the same answer
    payload: list = [None, None, None]
    lock = _ShardLock(shard_dir, out) if rank == 0 else None
    if rank == 0:
        try:
            lock.acquire()
            done, present = _prepare_shard_dir(shard_dir, manifest, num, manifest_info)
            payload = [None, done, present]
        except Exception as e:  # noqa: BLE001 - sent to every rank, raised everywhere
            payload = [e if isinstance(e, UserError) else UserError(f"{shard_dir}: {e}"), None, None]
    try:
        return _sample_locked(cascade, labels_np, out, shard_dir, payload, start, rank, world_size,
                              seed=seed, batch_size=batch_size, chunk_size=chunk_size, low_res=low_res,
                              start_stage=start_stage, stage_paths=stage_paths, select=select,
                              noise_device=noise_device, progress=progress, on_chunk=on_chunk,
                              poll_seconds=poll_seconds, sample_kwargs=sample_kwargs)
    finally:
        if lock is not None:
            lock.release()


def _sample_locked(cascade, labels_np, out, shard_dir, payload, start, rank, world_size, *, seed,
                   batch_size, chunk_size, low_res, start_stage, stage_paths, select, noise_device, progress,
                   on_chunk, poll_seconds, sample_kwargs) -> ShardedSamplingResult:
    """The rest of :func:`sample_sharded`, while rank 0 holds the shard directory's lock."""
    num = len(labels_np)
    stages_run = cascade.stages[start_stage:]
    error, done, present = _broadcast(payload, world_size)
    if error is not None:
        raise error
    resumed = int(len(done))
    present = set(present)
    todo = np.setdiff1d(np.arange(num, dtype=np.int64), done, assume_unique=True)
    mine = todo[rank::world_size]  # round-robin over what is left: balanced, whatever was done before

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num, initial=resumed, desc=f"sampling ({world_size} process{'es' * (world_size > 1)})",
                   unit="img", dynamic_ncols=True, smoothing=0.1)

    def finished() -> int:  # samples done by every rank, read from the shard directory
        return resumed + sum(_chunk_count(n) for n in _list_chunks(shard_dir) if n not in present)

    def show(count: int) -> None:
        if bar is not None and count > bar.n:
            bar.update(count - bar.n)

    labels_t = torch.from_numpy(labels_np)
    wrote_any = False
    try:
        for lo in range(0, len(mine), chunk_size):
            idx = mine[lo : lo + chunk_size]
            stages, _ = _cascade.sample_in_batches(  # looked up at call time (tests replace it)
                cascade, labels_t[idx], batch_size=batch_size, seed=seed, indices=idx.tolist(),
                low_res=None if low_res is None else np.asarray(low_res[idx]), start_stage=start_stage,
                noise_device=noise_device, **sample_kwargs,
            )
            buf = io.BytesIO()
            np.savez(buf, indices=idx, labels=labels_np[idx], **{f"stage_{k}": a for k, a in enumerate(stages)})
            path = shard_dir / _chunk_name(idx)
            atomic_write_bytes(path, buf.getvalue())
            wrote_any = True
            if on_chunk is not None:
                on_chunk(path, idx)
            if bar is not None:
                show(finished())
        # wait (on the files, not a collective with a timeout) until every rank has written its share
        count = finished()
        while count < num:
            time.sleep(poll_seconds)
            count = finished()
            show(count)
    except BaseException:
        if world_size == 1 and not wrote_any and resumed == 0:  # nothing to resume: leave no directory behind
            _remove_shards(shard_dir)
        raise
    finally:
        if bar is not None:
            bar.close()
    sampling_seconds = time.time() - start
    if world_size > 1:
        torch.distributed.barrier()

    result = ShardedSamplingResult(
        path=out, num=num, resumed=resumed, new=num - resumed, sampling_seconds=sampling_seconds, seconds=0.0,
        world_size=world_size, stage_paths=[Path(p) for p in (stage_paths or [])],
    )
    error = None
    if rank == 0:
        try:
            result.selected = _merge(shard_dir, out, labels_np, len(stages_run), result.stage_paths, select)
        except Exception as e:  # noqa: BLE001
            error = e
    if world_size > 1:
        failed = _broadcast([error is not None], world_size)[0]
        if failed and error is None:
            raise UserError(f"rank 0 could not merge the shards in {shard_dir} into {out}")
    if error is not None:
        raise error
    result.seconds = time.time() - start
    return result


def _merge(shard_dir: Path, out: Path, labels: np.ndarray, num_stages: int, stage_paths: list[Path],
           select: Sequence[int] | None, block: int = 1024) -> list[np.ndarray] | None:
    """Merge every chunk in index order into ``out`` (and ``stage_paths``); then remove the shards."""
    num = len(labels)
    owner = np.full(num, -1, dtype=np.int64)  # chunk number of each index
    row = np.zeros(num, dtype=np.int64)
    names = _list_chunks(shard_dir)
    for c, name in enumerate(names):
        try:
            indices = _read_chunk_indices(shard_dir / name)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{shard_dir / name} is unreadable ({e}); delete it and rerun to recompute it") from None
        owner[indices] = c
        row[indices] = np.arange(len(indices))
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        raise UserError(f"{shard_dir} lacks {len(missing)} of {num} samples (first: index {missing[0]}); rerun to finish")
    remaining = np.bincount(owner, minlength=len(names))
    cache: dict[int, dict[str, np.ndarray]] = {}

    def load(c: int) -> dict[str, np.ndarray]:
        if c not in cache:
            path = shard_dir / names[c]
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{path} is unreadable ({e}); delete it and rerun to recompute it") from None
            if not np.array_equal(arrays["labels"], labels[arrays["indices"]]):
                raise UserError(f"{path} was sampled for other labels; delete {shard_dir} and rerun")
            cache[c] = arrays
        return cache[c]

    first = load(int(owner[0]))
    shapes = [first[f"stage_{k}"].shape[1:] for k in range(num_stages)]
    outputs = [(out, num_stages - 1)] + [(Path(p), k) for k, p in enumerate(stage_paths)]
    if len(stage_paths) not in (0, num_stages):
        raise ValueError(f"stage_paths: got {len(stage_paths)} paths for {num_stages} stages")
    select = None if select is None else np.asarray(select, dtype=np.int64)
    selected = [np.zeros((0 if select is None else len(select), *s), dtype=np.uint8) for s in shapes]

    # every output file is filled in the same pass over the chunks, one block of indices at a time
    blocks = [(lo, min(lo + block, num)) for lo in range(0, num, block)]
    gathered: dict[int, list[np.ndarray]] = {}

    def gather(lo: int, hi: int) -> list[np.ndarray]:
        if lo not in gathered:
            arrays = [np.empty((hi - lo, *s), dtype=np.uint8) for s in shapes]
            for i in range(lo, hi):
                c = int(owner[i])
                chunk = load(c)
                for k in range(num_stages):
                    arrays[k][i - lo] = chunk[f"stage_{k}"][row[i]]
                remaining[c] -= 1
                if remaining[c] == 0:
                    cache.pop(c, None)
            if select is not None:
                hit = np.flatnonzero((select >= lo) & (select < hi))
                for k in range(num_stages):
                    selected[k][hit] = arrays[k][select[hit] - lo]
            gathered.clear()
            gathered[lo] = arrays
        return gathered[lo]

    # the files are written one after the other; each re-reads the chunks only if there are several outputs
    for n, (path, k) in enumerate(outputs):
        if n > 0:  # reset the bookkeeping for another pass
            remaining[:] = np.bincount(owner, minlength=len(names))
            cache.clear()
            gathered.clear()

        def fill(member, k=k):
            for lo, hi in blocks:
                member.write(gather(lo, hi)[k])

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_npz_streaming(path, {
                "arr_0": ((num, *shapes[k]), np.uint8, fill),
                "arr_1": ((num,), np.int64, lambda member: member.write(labels)),
            })
        except OSError as e:
            from .errors import describe_os_error

            raise UserError(
                f"{describe_os_error(e)}; the {num} samples are kept in {shard_dir}: "
                "rerun the same command to write the file without sampling again"
            ) from None
    _remove_shards(shard_dir)
    return selected if select is not None else None


def _remove_shards(shard_dir: Path) -> None:
    for name in _list_chunks(shard_dir):
        (shard_dir / name).unlink(missing_ok=True)
    (shard_dir / MANIFEST).unlink(missing_ok=True)
    (shard_dir / LOCK).unlink(missing_ok=True)  # still held by us: a waiter notices (see _ShardLock)
    try:
        shard_dir.rmdir()
    except OSError:
        pass
