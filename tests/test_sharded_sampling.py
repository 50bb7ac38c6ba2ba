"""Sharded, resumable sampling: one npz, byte-identical for 1 or 2 (gloo) processes and any batch size; an
interrupted job resumes from its chunks without recomputing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cascaded_diffusion.cascade import Cascade, sample_in_batches
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.distributed import distributed_from_env, over_ranks
from cascaded_diffusion.sharded_sampling import ShardManifestError, sample_sharded, shard_dir_for

from conftest import make_stage, stage_config

NUM = 10
KWARGS = dict(sampler="ddpm", steps=3, aug_levels=[6])


def tiny_cascade() -> Cascade:
    base = make_stage(stage_config("base", 8, timesteps=20))
    sr = make_stage(stage_config("sr", 16, 8, timesteps=20, sample_s=6), seed=1)
    return Cascade([base, sr])


@pytest.fixture(scope="module")
def cascade():
    return tiny_cascade()


def _worker(rank: int, world: int, rendezvous: str, out: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        result = sample_sharded(tiny_cascade(), balanced_labels(NUM, 3), out, seed=7, batch_size=batch_size,
                                poll_seconds=0.05, **KWARGS)
        assert result.world_size == world and result.new == NUM and Path(out).is_file()
        # the in-memory path (cdm sweep): every rank samples its share and gets all the images
        cascade, labels = tiny_cascade(), balanced_labels(NUM, 3)

        def sample(positions):
            return sample_in_batches(cascade, labels[torch.from_numpy(positions)], batch_size=2, seed=7,
                                     indices=positions.tolist(), truncated=True, **KWARGS)[0]

        with distributed_from_env("cpu"):  # every rank runs this alike: over_ranks splits the work
            stages = over_ranks(NUM, sample)
        np.save(f"{out}.truncated-rank{rank}.npy", stages[-1])
    finally:
        torch.distributed.destroy_process_group()


def test_one_npz_byte_identical_for_batch_sizes_and_two_gloo_processes(cascade, tmp_path):
    labels = balanced_labels(NUM, 3)
    one = tmp_path / "one.npz"
    result = sample_sharded(cascade, labels, one, seed=7, batch_size=3, **KWARGS)
    assert (result.num, result.resumed, result.new, result.world_size) == (NUM, 0, NUM, 1)
    assert not shard_dir_for(one).exists()
    with np.load(one, allow_pickle=False) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, saved_labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM, 16, 16, 1)
    assert saved_labels.dtype == np.int64 and np.array_equal(saved_labels, labels.numpy())
    # the same images as sampling in one process in memory
    reference = sample_in_batches(cascade, labels, batch_size=4, seed=7, **KWARGS)[0][-1]
    assert np.array_equal(images, reference)

    other_batch = tmp_path / "b8.npz"
    sample_sharded(cascade, labels, other_batch, seed=7, batch_size=8, chunk_size=5, **KWARGS)
    assert other_batch.read_bytes() == one.read_bytes()

    two = tmp_path / "two.npz"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(two), 2), nprocs=2, join=True)
    assert two.read_bytes() == one.read_bytes()
    truncated = sample_in_batches(cascade, labels, batch_size=5, seed=7, truncated=True, **KWARGS)[0][-1]
    for rank in range(2):
        assert np.array_equal(np.load(f"{two}.truncated-rank{rank}.npy"), truncated)


class Interrupt(Exception):
    pass


def test_interrupted_job_resumes_from_its_chunks(cascade, tmp_path):
    labels = balanced_labels(NUM, 3)
    whole = tmp_path / "whole.npz"
    sample_sharded(cascade, labels, whole, seed=3, batch_size=2, **KWARGS)

    out = tmp_path / "out.npz"
    first: list[int] = []

    def stop_after_two(path, indices):
        first.extend(indices.tolist())
        if len(first) >= 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        sample_sharded(cascade, labels, out, seed=3, batch_size=2, on_chunk=stop_after_two, **KWARGS)
    shards = shard_dir_for(out)
    assert not out.exists() and len(list(shards.glob("chunk-*.npz"))) == 2
    assert json.loads((shards / "manifest.json").read_text())["seed"] == 3

    # different settings: refused before any compute, the shards kept
    with pytest.raises(ShardManifestError, match="different sampling job.*steps"):
        sample_sharded(cascade, labels, out, seed=3, batch_size=2, **{**KWARGS, "steps": 4})
    with pytest.raises(ShardManifestError, match="seed"):
        sample_sharded(cascade, labels, out, seed=4, batch_size=2, **KWARGS)

    # what a kill can leave besides complete chunks: a temporary file, and (without fsync) a damaged chunk
    (shards / ".chunk-x.npz.tmp-999").write_bytes(b"half a chunk")
    damaged = sorted(shards.glob("chunk-*.npz"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    lost = {int(i) for i in first[2:4]}
    first = first[:2]

    second: list[int] = []
    result = sample_sharded(cascade, labels, out, seed=3, batch_size=3, chunk_size=3,
                            on_chunk=lambda p, i: second.extend(i.tolist()), **KWARGS)
    assert result.resumed == 2 and result.new == NUM - 2 and lost <= set(second)
    assert not set(first) & set(second) and sorted(first + second) == list(range(NUM))
    assert out.read_bytes() == whole.read_bytes()
    assert not shards.exists()


def test_stage_files_selection_and_low_res_inputs(cascade, tmp_path):
    labels = balanced_labels(6, 3)
    stages, _ = sample_in_batches(cascade, labels, batch_size=6, seed=1, **KWARGS)
    paths = [tmp_path / "s1.npz", tmp_path / "s2.npz"]
    result = sample_sharded(cascade, labels, tmp_path / "o.npz", seed=1, batch_size=4, stage_paths=paths,
                            select=[5, 0], **KWARGS)
    for path, expected in zip(paths, stages):
        with np.load(path) as f:
            assert np.array_equal(f["arr_0"], expected) and np.array_equal(f["arr_1"], labels.numpy())
    assert all(np.array_equal(s, e[[5, 0]]) for s, e in zip(result.selected, stages))
    # given low-resolution inputs: only the SR stage runs, each sample keyed by its index as well
    low = stages[0]
    sr_only = sample_in_batches(cascade, labels, batch_size=6, seed=2, low_res=low, start_stage=1, **KWARGS)[0]
    result = sample_sharded(cascade, labels, tmp_path / "sr.npz", seed=2, batch_size=4, low_res=low,
                            start_stage=1, **KWARGS)
    with np.load(tmp_path / "sr.npz") as f:
        assert np.array_equal(f["arr_0"], sr_only[-1])
