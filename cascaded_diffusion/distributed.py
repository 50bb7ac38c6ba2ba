"""Many processes (``torchrun``, ``torch.distributed``): the one convention for joining a process group and for
splitting work over its ranks.

* :func:`join_process_group` joins the group ``torchrun`` describes in the environment (the trainer, and
  :func:`distributed_from_env`); NCCL for CUDA devices, gloo otherwise.
* :func:`distributed_from_env` is the scope of a command whose every rank runs the same code on the same
  inputs (``cdm sample``, ``stats``, ``eval``, ``sweep``). Inside it, :func:`over_ranks` splits rows of work over
  the ranks and gives every rank all of them back; anywhere else (one process, or a trainer's rank 0 alone) it
  computes every row itself. No function takes a flag for it.

Everything here is a no-op in a single process: ``distributed_context()`` is (0, 1) when no process group is
initialised.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["distributed_context", "join_process_group", "distributed_from_env", "over_ranks", "my_positions",
           "all_gather_rows"]

# set inside distributed_from_env with several processes: every rank runs the same code, so work may be split
_RANKS_ALIKE: contextvars.ContextVar[bool] = contextvars.ContextVar("cdm_ranks_alike", default=False)


def distributed_context() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def join_process_group(device: str | None = "auto") -> tuple[int, int, int, bool]:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) unless one is joined already or there is none: NCCL where ``device`` is a CUDA device (or
    ``auto``) and CUDA is available, gloo otherwise. Returns (rank, world size, local rank, whether it was
    created here); without torchrun (0, 1, 0, False)."""
    rank, world_size = distributed_context()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return rank, world_size, local_rank, False
    device = str(device or "auto")
    use_nccl = (device in ("auto", "cuda") or device.startswith("cuda:")) and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if use_nccl else "gloo")
    rank, world_size = distributed_context()
    return rank, world_size, local_rank, True


@contextlib.contextmanager
def distributed_from_env(device: str | None = "auto"):
    """:func:`join_process_group` for a command whose every rank runs the same code: yields (rank, world size,
    local rank); inside, :func:`over_ranks` splits work over the ranks. A group created here is destroyed on
    exit. Without torchrun: (0, 1, 0)."""
    rank, world_size, local_rank, created = join_process_group(device)
    token = _RANKS_ALIKE.set(world_size > 1)
    try:
        yield rank, world_size, local_rank
    finally:
        _RANKS_ALIKE.reset(token)
        if created:
            torch.distributed.destroy_process_group()


def over_ranks(n: int, compute: Callable[[np.ndarray], Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Rows ``0..n-1`` of one or more arrays, ``compute(positions)`` returning each array's rows at
    ``positions``. Inside :func:`distributed_from_env` with several processes and at least as many rows as
    processes, each rank computes every world-size-th row (:func:`my_positions`) and every rank gets all of
    them back (:func:`all_gather_rows`): the arrays one process computes, if each row depends on its position
    alone. Anywhere else: ``compute(arange(n))``."""
    world_size = distributed_context()[1]
    if _RANKS_ALIKE.get() and 1 < world_size <= n:
        return all_gather_rows(compute(my_positions(n)), n)
    return list(compute(np.arange(n, dtype=np.int64)))


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
