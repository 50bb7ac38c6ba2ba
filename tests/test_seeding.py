"""Per-sample seeding: every sample's noise depends on (seed, its index) only, so the samples are the same bit
for bit for any batch size, and sample i does not depend on which other samples share its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascaded_diffusion.cascade import Cascade, sample_in_batches
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.rng import PerSampleGenerator, randn, sample_seed

from conftest import make_stage, stage_config


@pytest.fixture(scope="module")
def cascade():
    base = make_stage(stage_config("base", 8, timesteps=20))
    sr = make_stage(stage_config("sr", 16, 8, timesteps=20, sample_s=6), seed=1)
    return Cascade([base, sr])


def test_sample_seed_mixes_and_is_a_valid_torch_seed():
    seeds = {sample_seed(s, i) for s in range(4) for i in range(256)}
    assert len(seeds) == 4 * 256
    assert all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))
    with pytest.raises(ValueError):
        sample_seed(0, -1)


def test_per_sample_rows_do_not_depend_on_the_batch():
    full = PerSampleGenerator(3, range(6)).randn((6, 2, 4, 4), "cpu")
    part = PerSampleGenerator(3, [4, 1]).randn((2, 2, 4, 4), "cpu")
    assert torch.equal(part, full[[4, 1]])
    # each row's stream goes on: a second draw is the same whatever the batch
    g6, g2 = PerSampleGenerator(3, range(6)), PerSampleGenerator(3, [5])
    g6.randn((6, 3), "cpu"), g2.randn((1, 3), "cpu")
    assert torch.equal(g6.randn((6, 3), "cpu")[5:], g2.randn((1, 3), "cpu"))
    assert not torch.equal(PerSampleGenerator(4, [1]).randn((1, 8), "cpu"), full[1:2].flatten()[:8].view(1, 8))
    with pytest.raises(ValueError, match="cannot draw"):
        PerSampleGenerator(0, range(3)).randn((4, 2), "cpu")
    # plain generators keep working (training, the older APIs)
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(0), "cpu"),
                       torch.randn((2, 3), generator=torch.Generator().manual_seed(0)))


CASES = [
    dict(sampler="ddpm", steps=4, truncated=False, aug_levels=[6]),
    dict(sampler="ddpm", steps=4, truncated=True, aug_levels=[6]),
    dict(sampler=["dpmpp", "ddpm"], steps=[3, 4], truncated=False, aug_levels=[6]),
    dict(sampler="dpmpp", steps=3, truncated=True, aug_levels=[6]),
    dict(sampler="ddim", steps=3, eta=1.0, truncated=False, aug_levels=[6], autocast=False),
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: f"{k['sampler']}-{'trunc' if k['truncated'] else 'full'}")
def test_samples_are_bit_identical_for_any_batch_size(cascade, kwargs):
    labels = balanced_labels(8, 3)
    results = [sample_in_batches(cascade, labels, batch_size=b, seed=5, **kwargs)[0] for b in (1, 3, 8)]
    for stages in results[1:]:
        for a, b in zip(results[0], stages):
            assert a.dtype == np.uint8 and np.array_equal(a, b)
    other = sample_in_batches(cascade, labels, batch_size=8, seed=6, **kwargs)[0]
    assert not np.array_equal(other[-1], results[0][-1])
    # the samples of a batch differ from one another (each row has its own noise)
    assert not np.array_equal(results[0][-1][0], results[0][-1][3])


def test_a_sample_does_not_depend_on_its_batch_mates(cascade):
    labels = balanced_labels(8, 3)
    kwargs = dict(sampler="ddpm", steps=4, aug_levels=[6])
    everything = sample_in_batches(cascade, labels, batch_size=8, seed=2, **kwargs)[0][-1]
    pick = [6, 0, 3]
    alone = sample_in_batches(cascade, labels[pick], batch_size=2, seed=2, indices=pick, **kwargs)[0][-1]
    assert np.array_equal(alone, everything[pick])
