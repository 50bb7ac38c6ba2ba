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

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .cascade import Cascade, sample_in_batches
from .distributed import distributed_context
from .errors import UserError
from .hardware import check_sampling_memory
from .shards import FORMAT_VERSION, ShardDirectory, ShardManifestError, array_sha256, shard_dir_for

__all__ = ["ShardManifestError", "ShardedSamplingResult", "SampleFn", "shard_dir_for", "sample_sharded"]

# what samples the indices of a chunk: ``sample_in_batches``'s signature; returns one uint8 NHWC array per stage run
SampleFn = Callable[..., tuple[list[np.ndarray], np.ndarray]]


@dataclass
class ShardedSamplingResult:
    path: Path  # the merged npz (written by rank 0)
    num: int  # samples in it
    resumed: int  # samples found in the shards at the start (not recomputed)
    new: int  # samples computed by this run, all ranks together
    sampling_seconds: float  # from the start of sampling until every rank was done
    seconds: float  # including the merge
    world_size: int
    stage_paths: list[Path | None] = field(default_factory=list)
    # rank 0, with ``select``: every stage's images of the selected indices, in the order given
    selected: list[np.ndarray] | None = None

    @property
    def rate(self) -> float:
        """Samples per second of this run (all processes together, the merge excluded)."""
        return self.new / max(self.sampling_seconds, 1e-9)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _absolute(source: str) -> str:
    """A stage's directory as an absolute path (a resume from another working directory is the same job)."""
    return str(Path(source).resolve()) if source and Path(source).exists() else source


def job_manifest(cascade: Cascade, labels: np.ndarray, *, seed: int, low_res: np.ndarray | None, start_stage: int,
                 noise_device, settings: dict | None, sample_kwargs: dict) -> dict:
    """What defines a sampling job: a resume must match it exactly."""
    return _jsonable({
        "format": FORMAT_VERSION,
        "seed": int(seed),
        "num": len(labels),
        "labels_sha256": array_sha256(labels),
        "low_res_sha256": array_sha256(low_res),
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


class ShardedJob:
    """One rank's part of a sampling job: claim the shard directory (rank 0 locks and checks it; every rank
    learns what is done), sample this rank's share of the rest into chunks, wait on the files until every rank
    is done, merge (rank 0)."""

    def __init__(self, out: str | os.PathLike, labels: np.ndarray, rank: int, world_size: int):
        self.directory = ShardDirectory(out)
        self.out, self.labels, self.num = Path(out), labels, len(labels)
        self.rank, self.world_size = rank, world_size
        self.resumed, self.present, self.wrote_any = 0, set(), False

    def _broadcast(self, payload: list) -> list:
        if self.world_size > 1:
            torch.distributed.broadcast_object_list(payload, src=0)
        return payload

    def claim(self, manifest: dict, info: dict) -> np.ndarray:
        """Every rank: the indices this rank samples (round-robin over what is not done: balanced, whatever was
        done before). Rank 0 holds the directory's lock from here until :meth:`release`."""
        payload: list = [None, None, None]
        if self.rank == 0:
            try:
                done, present = self.directory.claim(manifest, self.num, info)
                payload = [None, done, present]
            except Exception as e:  # noqa: BLE001 - sent to every rank, raised everywhere
                path = self.directory.path
                payload = [e if isinstance(e, UserError) else UserError(f"{path}: {e}"), None, None]
        error, done, present = self._broadcast(payload)
        if error is not None:
            raise error
        self.resumed, self.present = int(len(done)), set(present)
        todo = np.setdiff1d(np.arange(self.num, dtype=np.int64), done, assume_unique=True)
        return todo[self.rank :: self.world_size]

    def release(self) -> None:
        self.directory.release()

    def write(self, indices: np.ndarray, stages: Sequence[np.ndarray]) -> Path:
        path = self.directory.write_chunk(indices, self.labels[indices], stages)
        self.wrote_any = True
        return path

    def finished(self) -> int:
        """Samples done by every rank, read from the shard directory."""
        return self.resumed + self.directory.count_new(self.present)

    def wait(self, poll_seconds: float, show: Callable[[int], None]) -> None:
        """Until every rank has written its share (on the files, not a collective with a timeout)."""
        count = self.finished()
        while count < self.num:
            time.sleep(poll_seconds)
            count = self.finished()
            show(count)

    def sample(self, mine: np.ndarray, sample_chunk: Callable[[np.ndarray], Sequence[np.ndarray]], *, chunk_size: int,
               progress: bool, on_chunk: Callable[[Path, np.ndarray], None] | None, poll_seconds: float) -> None:
        """Sample this rank's indices ``mine`` ``chunk_size`` at a time (``sample_chunk(indices)``: one uint8 array
        per stage run), each chunk written as it is done, then wait until every rank is; rank 0 shows one progress
        bar of all of them. After a failure with nothing to resume, no directory is left behind."""
        bar = _progress_bar(self.num, self.resumed, self.world_size) if progress and self.rank == 0 else None

        def show(count: int) -> None:
            if bar is not None and count > bar.n:
                bar.update(count - bar.n)

        try:
            for lo in range(0, len(mine), chunk_size):
                idx = mine[lo : lo + chunk_size]
                path = self.write(idx, sample_chunk(idx))
                if on_chunk is not None:
                    on_chunk(path, idx)
                if bar is not None:
                    show(self.finished())
            self.wait(poll_seconds, show)
        except BaseException:
            self.abandon()
            raise
        finally:
            if bar is not None:
                bar.close()

    def abandon(self) -> None:
        """After a failure: in one process with nothing to resume, leave no directory behind."""
        if self.world_size == 1 and not self.wrote_any and self.resumed == 0:
            self.directory.remove()

    def merge(self, outputs: list[tuple[Path, int]], select: Sequence[int] | None) -> list[np.ndarray] | None:
        """Rank 0 merges; its failure is raised on every rank."""
        if self.world_size > 1:
            torch.distributed.barrier()
        error, selected = None, None
        if self.rank == 0:
            try:
                selected = self.directory.merge(self.labels, outputs, select)
            except Exception as e:  # noqa: BLE001
                error = e
        if self.world_size > 1:
            failed = self._broadcast([error is not None])[0]
            if failed and error is None:
                raise UserError(f"rank 0 could not merge the shards in {self.directory.path} into {self.out}")
        if error is not None:
            raise error
        return selected


def _progress_bar(num: int, resumed: int, world_size: int):
    from tqdm.auto import tqdm

    return tqdm(total=num, initial=resumed, desc=f"sampling ({world_size} process{'es' * (world_size > 1)})",
                unit="img", dynamic_ncols=True, smoothing=0.1)


def _checked_inputs(cascade: Cascade, labels: torch.Tensor | np.ndarray, low_res: np.ndarray | None,
                    batch_size: int, chunk_size: int | None, start_stage: int,
                    stage_paths: Sequence[str | os.PathLike | None] | None
                    ) -> tuple[np.ndarray, int, list[Path | None]]:
    """``labels`` as int64 numpy, the chunk size, and ``stage_paths`` as Paths, once they make a job."""
    labels_np = (labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)).astype(np.int64)
    num = len(labels_np)
    if num == 0:
        raise ValueError("nothing to sample (no labels)")
    if low_res is not None and len(low_res) != num:
        raise ValueError(f"low_res holds {len(low_res)} images for {num} labels")
    chunk_size = int(chunk_size or batch_size)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError("batch_size and chunk_size must be >= 1")
    num_stages = len(cascade.stages) - start_stage
    paths = [None if p is None else Path(p) for p in (stage_paths or [])]
    if len(paths) not in (0, num_stages):
        raise ValueError(f"stage_paths: got {len(paths)} paths for {num_stages} stages")
    return labels_np, chunk_size, paths


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
    stage_paths: Sequence[str | os.PathLike | None] | None = None,
    select: Sequence[int] | None = None,
    settings: dict | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    noise_device: str | torch.device | None = None,
    progress: bool = False,
    on_chunk: Callable[[Path, np.ndarray], None] | None = None,
    poll_seconds: float = 0.5,
    sample_fn: SampleFn = sample_in_batches,
    **sample_kwargs,
) -> ShardedSamplingResult:
    """Sample ``labels`` (sample i gets ``labels[i]``) through ``cascade`` on every rank, into ``out``.

    Args:
        seed: with the index, all the randomness of a sample.
        batch_size: samples per network batch (does not change the result).
        chunk_size: samples per shard chunk (default ``batch_size``): what an interruption can lose.
        low_res, start_stage: given clean inputs of stage ``start_stage`` (uint8 NHWC, one per label).
        stage_paths: also write every stage's output, one npz per stage run (rank 0, streamed like ``out``);
            None skips a stage.
        select: indices whose images of every stage rank 0 returns in ``result.selected`` (e.g. for a grid).
        settings: anything else that defines the job, recorded in the manifest (a resume must match it).
        rank, world_size: default from ``torch.distributed`` (0 and 1 when it is not initialised).
        noise_device: where per-sample noise is drawn (default: the cascade's device).
        progress: rank 0 shows one progress bar of all ranks' samples.
        on_chunk: called as ``on_chunk(path, indices)`` after each chunk is durably written.
        sample_fn: samples the indices of one chunk (:func:`~cascaded_diffusion.cascade.sample_in_batches`).
        sample_kwargs: go to :meth:`Cascade.sample` (steps, sampler, guidance, eta, truncated, aug_levels,
            autocast); they are recorded in the manifest.

    Every rank returns a result; the files exist when it returns (a final barrier waits for the merge).
    """
    start = time.time()
    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    labels_np, chunk_size, stage_paths = _checked_inputs(cascade, labels, low_res, batch_size, chunk_size,
                                                         start_stage, stage_paths)
    num, num_stages = len(labels_np), len(cascade.stages) - start_stage
    check_sampling_memory(cascade, num, batch_size, start_stage=start_stage, world_size=world_size,
                          labels_allocated=True)  # before a batch grows until the kernel kills us
    manifest = job_manifest(cascade, labels_np, seed=seed, low_res=low_res, start_stage=start_stage,
                            noise_device=noise_device, settings=settings, sample_kwargs=sample_kwargs)
    # Informational, not part of the job's identity (a resume on more processes has fewer threads each): the
    # kernels' summation order can depend on the thread count, so bytes are guaranteed at equal threads per process.
    info = {"threads_per_process": torch.get_num_threads()}

    labels_t = torch.from_numpy(labels_np)

    def sample_chunk(idx: np.ndarray) -> list[np.ndarray]:
        return sample_fn(cascade, labels_t[idx], batch_size=batch_size, seed=seed, indices=idx.tolist(),
                         low_res=None if low_res is None else np.asarray(low_res[idx]), start_stage=start_stage,
                         noise_device=noise_device, **sample_kwargs)[0]

    job = ShardedJob(out, labels_np, rank, world_size)
    try:
        mine = job.claim(manifest, info)
        job.sample(mine, sample_chunk, chunk_size=chunk_size, progress=progress, on_chunk=on_chunk,
                   poll_seconds=poll_seconds)
        result = ShardedSamplingResult(
            path=Path(out), num=num, resumed=job.resumed, new=num - job.resumed,
            sampling_seconds=time.time() - start, seconds=0.0, world_size=world_size, stage_paths=stage_paths)
        outputs = [(Path(out), num_stages - 1)] + [(p, k) for k, p in enumerate(stage_paths) if p is not None]
        result.selected = job.merge(outputs, select)
    finally:
        job.release()
    result.seconds = time.time() - start
    return result
