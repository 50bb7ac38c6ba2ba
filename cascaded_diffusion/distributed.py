"""Splitting sampling and evaluation work over the processes of ``torchrun`` (``torch.distributed``).

Everything here is a no-op in a single process: ``distributed_context()`` is (0, 1) when no process group is
initialised, and the helpers then return their input.
"""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch

__all__ = ["distributed_context", "distributed_from_env", "my_positions", "all_gather_rows"]


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed_from_env(device: str | None = "auto"):
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) if it is not joined yet: NCCL for CUDA devices, gloo otherwise. Yields
    (rank, world size, local rank); a group created here is destroyed on exit. Without torchrun: (0, 1, 0)."""
    rank, world_size = distributed_context()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    created = False
    if world_size == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = str(device or "auto")
        use_nccl = device in ("auto", "cuda") or device.startswith("cuda:")
        use_nccl = use_nccl and torch.cuda.is_available()
        if use_nccl:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
        created = True
        rank, world_size = distributed_context()
    try:
        yield rank, world_size, local_rank
    finally:
        if created:
            torch.distributed.destroy_process_group()


def my_positions(n: int, rank: int | None = None, world_size: int | None = None) -> np.ndarray:
    """The positions ``0..n-1`` this rank works on: every ``world_size``-th from ``rank`` (balanced, and the
    classes of class-sorted labels are spread over the ranks)."""
    if rank is None or world_size is None:
        rank, world_size = distributed_context()
    return np.arange(rank, n, world_size, dtype=np.int64)


def all_gather_rows(arrays: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """Every rank holds the rows :func:`my_positions` of ``n`` for each array; every rank gets the full arrays
    back, rows in position order. In one process the arrays are returned as they are."""
    rank, world_size = distributed_context()
    if world_size == 1:
        return list(arrays)
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, [np.ascontiguousarray(a) for a in arrays])
    out = []
    for k in range(len(arrays)):
        parts = [g[k] for g in gathered]
        full = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            full[r::world_size] = part
        out.append(full)
    return out
