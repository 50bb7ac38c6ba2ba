"""The trainer's batches: which items each step takes (:class:`BatchStream`, deterministic and resumable) and a
prefetching loader that reads the batches the stream will ask for next in a background thread, while the current
training step runs (:class:`PrefetchLoader`).

The trainer's stream stays the only source of truth for the data position: every :meth:`PrefetchLoader.next`
advances it by exactly one batch, as a direct read would, and returns the images of exactly those indices. The
thread works on its own copy of the stream, started from the stream's position at the first call, and only
reads ahead; if the stream was moved meanwhile (a resume restored another position), the prefetched batch does
not match, is thrown away, and the thread restarts from the stream's position. So batch ``k`` holds the same
images with or without prefetching, and a checkpoint's ``data_stream`` state never counts batches that were
only read ahead.

Reading a batch is: sorted indices → ``np.take`` from the (memory-mapped) uint8 array into a torch tensor, in
page-locked (pinned) memory when the batches go to a CUDA device, so the trainer's ``.to(device,
non_blocking=True)`` is an asynchronous DMA copy. NumPy releases the GIL while it copies, so the read
overlaps the step's Python and CUDA work.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np
import torch


__all__ = ["BatchStream", "PrefetchLoader"]


class BatchStream:
    """Deterministic, resumable stream of batch indices over ``num_items`` items.

    The stream is the concatenation of per-epoch orders: epoch ``e`` is a permutation of ``range(num_items)``
    drawn from ``(seed, e)`` (or the identity order when ``shuffle=False``). Each step consumes one *global*
    batch of ``batch_size * world_size`` consecutive entries; rank ``r`` gets the ``r``-th slice of
    ``batch_size`` entries, so ranks are disjoint within a step and together cover the global batch.
    ``batch_size`` is therefore **per rank**. A global batch that runs past the end of an epoch continues
    into the next epoch's order rather than dropping the remainder, so every item is seen once per epoch
    and tiny datasets (``num_items < batch_size``) still work; the price is that a batch straddling an
    epoch boundary may repeat an item.

    The state (epoch, position within the epoch) is global and identical on every rank, so it can be saved
    from rank 0 and restored on all ranks, even with a different ``world_size`` or ``batch_size``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        for name, value, minimum in (("num_items", num_items, 1), ("batch_size", batch_size, 1),
                                     ("seed", seed, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"BatchStream {name} must be an integer >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"BatchStream rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Items consumed per step across all ranks."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the data (fractional when the global batch does not divide num_items)."""
        return self.num_items / self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of ``epoch`` (int64, a permutation of ``range(num_items)``)."""
        if epoch not in self._orders:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                order = np.arange(self.num_items)
            # Only the current and the next epoch are ever needed.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order.astype(np.int64)
        return self._orders[epoch]

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next batch (int64, length ``batch_size``); advances the stream."""
        global_batch = np.empty(self.global_batch_size, dtype=np.int64)
        filled = 0
        while filled < self.global_batch_size:
            order = self.epoch_order(self.epoch)
            take = min(self.global_batch_size - filled, self.num_items - self.position)
            global_batch[filled : filled + take] = order[self.position : self.position + take]
            filled += take
            self.position += take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position of the stream (plus num_items/seed/shuffle to catch mismatches)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; later batches equal those of an uninterrupted stream."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"BatchStream state is missing {key!r}; got keys {sorted(state)}")
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"BatchStream state was saved with {key}={state[key]!r} but this stream has "
                    f"{key}={getattr(self, key)!r}; the saved position would not be meaningful"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(
                f"BatchStream state has epoch={epoch}, position={position}; expected epoch >= 0 and "
                f"0 <= position < num_items={self.num_items}"
            )
        self.epoch, self.position = epoch, position


class PrefetchLoader:
    """Batches of ``(uint8 images N x H x W x C, int64 labels)`` tensors for ``stream``'s next indices.

    Args:
        images: uint8 N x H x W x C array (a read-only ``np.memmap`` is fine).
        labels: int64 labels, one per image.
        stream: the trainer's :class:`BatchStream`; :meth:`next` advances it by one batch.
        depth: batches read ahead (0: read on the calling thread, no background thread).
        pin_memory: put the batches in page-locked memory (for non-blocking host-to-CUDA copies).
        sort: sort each batch's indices (sequential reads from a memory map; the order within a batch is
            irrelevant to training, which draws flips and noise per position).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        stream: BatchStream,
        *,
        depth: int = 2,
        pin_memory: bool = False,
        sort: bool = True,
    ) -> None:
        if depth < 0:
            raise ValueError(f"PrefetchLoader depth must be >= 0, got {depth}")
        self.images = images
        self.labels = labels
        self.stream = stream
        self.depth = int(depth)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.sort = sort
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self.restarts = 0  # times the thread was restarted because the stream had been moved (for tests)

    # --- reading -------------------------------------------------------------------------------------------
    def _indices(self, stream: BatchStream) -> np.ndarray:
        idx = stream.next_indices()
        return np.sort(idx) if self.sort else idx

    def read(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``idx``, as CPU tensors (pinned if ``pin_memory``)."""
        images = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin_memory)
        labels = torch.empty(len(idx), dtype=torch.int64, pin_memory=self.pin_memory)
        np.take(self.images, idx, axis=0, out=images.numpy())
        np.take(np.asarray(self.labels, dtype=np.int64), idx, out=labels.numpy())
        return images, labels

    # --- the public step -----------------------------------------------------------------------------------
    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the stream by one batch and return that batch's ``(images, labels)``."""
        if self.depth == 0:
            return self.read(self._indices(self.stream))
        if self._thread is None:
            self._start(self.stream.state_dict())
        idx = self._indices(self.stream)
        item = self._get()
        if not np.array_equal(item[0], idx):  # the stream was moved since the thread started
            self.restarts += 1
            self._shutdown()
            self._start(self.stream.state_dict())
            return self.read(idx)
        return item[1], item[2]

    def close(self) -> None:
        """Stop the background thread (a later :meth:`next` starts a new one)."""
        self._shutdown()

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._shutdown()
        except Exception:
            pass

    # --- the thread ----------------------------------------------------------------------------------------
    def _start(self, state: dict[str, Any]) -> None:
        s = self.stream
        shadow = BatchStream(s.num_items, s.batch_size, s.seed, s.rank, s.world_size, s.shuffle)
        shadow.load_state_dict(state)
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(shadow, self._queue, self._stop), name="cdm-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, shadow: BatchStream, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                idx = self._indices(shadow)
                item: Any = (idx, *self.read(idx))
                while not self._put(out, stop, item):
                    pass
        except BaseException as e:  # handed to the training thread, raised there
            while not self._put(out, stop, e):
                pass

    @staticmethod
    def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
        """Put ``item``; True once it is in the queue or the loader stops (then it is dropped)."""
        if stop.is_set():
            return True
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def _get(self) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        assert self._queue is not None and self._thread is not None
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetching thread ended without a batch") from None
        if isinstance(item, BaseException):
            self._shutdown()
            raise item
        return item

    def _shutdown(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
        self._thread = self._queue = self._stop = None
