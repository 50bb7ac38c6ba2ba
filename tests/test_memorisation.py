"""The nearest-training-neighbour check: exact copies sit at distance 0, fresh draws where held-out images sit."""

from __future__ import annotations

import numpy as np
import pytest

from cascaded_diffusion.evaluation.memorisation import memorisation_report, nearest_training_neighbours


def test_nearest_neighbour_is_the_brute_force_one():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    distances, indices = nearest_training_neighbours(images, train, batch_size=3)
    brute = np.sqrt(((images[:, None].astype(float) - train[None].astype(float)) ** 2).mean(axis=(2, 3, 4)))
    assert np.array_equal(indices, brute.argmin(axis=1))
    np.testing.assert_allclose(distances, brute.min(axis=1), rtol=1e-9)
    copies, where = nearest_training_neighbours(train[[4, 9]], train)
    assert np.array_equal(where, [4, 9]) and np.all(copies == 0)
    with pytest.raises(ValueError, match="differ in shape"):
        nearest_training_neighbours(images[:, :4], train)


def test_a_copying_model_is_told_from_one_that_draws_fresh_images():
    rng = np.random.default_rng(1)
    population = rng.integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    train, held_out, fresh = population[:200], population[200:300], population[300:]
    honest = memorisation_report(fresh, train, held_out)
    assert 0.8 < honest["median_ratio"] < 1.2 and honest["closer_than_any_held_out"] < 0.05
    noisy_copies = np.clip(train[:100].astype(int) + rng.integers(-3, 4, train[:100].shape), 0, 255).astype(np.uint8)
    copier = memorisation_report(noisy_copies, train, held_out)
    assert copier["median_ratio"] < 0.1 and copier["closer_than_any_held_out"] == 1.0
    assert copier["below_held_out_p5"] == 1.0 and copier["num_train"] == 200
