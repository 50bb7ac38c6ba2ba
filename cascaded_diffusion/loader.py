"""A prefetching batch loader: reads the batches a :class:`~cascaded_diffusion.data.BatchStream` will ask for
next in a background thread, while the current training step runs.

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
from typing import Any

import numpy as np
import torch

from .data import BatchStream

__all__ = ["PrefetchLoader"]


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
