"""The prefetching loader: the same batches as a direct read, and a resume at the exact data position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascaded_diffusion.data.loader import BatchStream
from cascaded_diffusion.data.loader import PrefetchLoader


def dataset(tmp_path, n=37):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npy"
    np.save(path, rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8))
    return np.load(path, mmap_mode="r"), rng.integers(0, 5, n).astype(np.int64)


def direct(images, labels, stream, k):
    """What the trainer read before the loader: sorted indices, fancy-indexed from the memory map."""
    out = []
    for _ in range(k):
        idx = np.sort(stream.next_indices())
        out.append((np.asarray(images[idx]), labels[idx]))
    return out


def same(batches, expected):
    assert len(batches) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(batches, expected):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), want_images) and np.array_equal(labels.numpy(), want_labels)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_equal_a_direct_read_and_the_stream_advances_in_step(tmp_path, depth):
    images, labels = dataset(tmp_path)
    expected = direct(images, labels, BatchStream(37, 8, seed=3), 12)  # crosses two epoch boundaries
    stream = BatchStream(37, 8, seed=3)
    with PrefetchLoader(images, labels, stream, depth=depth) as loader:
        batches = []
        for k in range(12):
            batches.append(loader.next())
            reference = BatchStream(37, 8, seed=3)
            for _ in range(k + 1):
                reference.next_indices()
            assert stream.state_dict() == reference.state_dict()  # never counts what was only read ahead
    same(batches, expected)


def test_resume_continues_at_the_exact_data_position(tmp_path):
    images, labels = dataset(tmp_path)
    expected = direct(images, labels, BatchStream(37, 8, seed=1, rank=1, world_size=2), 9)
    stream = BatchStream(37, 8, seed=1, rank=1, world_size=2)
    with PrefetchLoader(images, labels, stream, depth=2) as loader:
        first = [loader.next() for _ in range(4)]
        saved = stream.state_dict()  # what a checkpoint stores after step 4; the thread is batches ahead
    resumed_stream = BatchStream(37, 8, seed=1, rank=1, world_size=2)
    resumed_stream.load_state_dict(saved)
    with PrefetchLoader(images, labels, resumed_stream, depth=2) as loader:
        rest = [loader.next() for _ in range(5)]
    same(first + rest, expected)


def test_a_stream_moved_under_a_running_thread_is_followed(tmp_path):
    images, labels = dataset(tmp_path)
    stream = BatchStream(37, 8, seed=5)
    loader = PrefetchLoader(images, labels, stream, depth=2)
    loader.next()
    loader.next()
    # as Trainer.resume does after the loader exists: restore an earlier position
    start = BatchStream(37, 8, seed=5)
    start.next_indices()
    stream.load_state_dict(start.state_dict())
    batches = [loader.next() for _ in range(4)]
    loader.close()
    assert loader.restarts == 1
    reference = BatchStream(37, 8, seed=5)
    reference.next_indices()
    same(batches, direct(images, labels, reference, 4))


def test_a_read_error_in_the_thread_is_raised_in_the_caller(tmp_path):
    images, labels = dataset(tmp_path)
    stream = BatchStream(37, 8, seed=0)
    loader = PrefetchLoader(images[:5], labels, stream, depth=2)  # indices up to 36 on a 5-image array
    with pytest.raises(IndexError):
        for _ in range(5):
            loader.next()
    loader.close()
