"""FID / KID / precision-recall / IS math and FeatureStats I/O (numpy only, fast)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from cascaded_diffusion.evaluation.metrics import (
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from cascaded_diffusion.evaluation.stats import FeatureStats, check_compatible


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.5 * np.eye(dim)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 5, 16])
def test_frechet_distance_matches_scipy_sqrtm(dim: int) -> None:
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    # Independent reference: the textbook formula with a general (Schur) matrix square root.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    sigma1, sigma2 = random_spd(rng, 8), random_spd(rng, 8)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        frechet_distance(mu2, sigma2, mu1, sigma1), rel=1e-9
    )


def test_fid_of_a_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64))
    stats = FeatureStats.from_features(features, network="test")
    assert abs(fid_from_stats(stats, stats)) < 1e-6


def test_fid_of_identical_sets_is_never_negative() -> None:
    # Badly scaled features and fewer samples than dimensions: without the clamp at 0 the covariance term
    # (a difference of large, nearly equal traces) came out at about -1e-3 for most of these seeds.
    for seed in range(8):
        rng = np.random.default_rng(seed)
        features = rng.standard_normal((50, 64)) * rng.uniform(0.01, 100, 64)
        with pytest.warns(UserWarning, match="rank-deficient"):
            stats = FeatureStats.from_features(features, network="test")
            fid = fid_from_stats(stats, stats)
        assert 0.0 <= fid < 1e-2
        assert frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma) >= 0.0
    # Only round-off is clamped: a real difference is untouched.
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2)) == pytest.approx(2.0, abs=1e-12)


def test_fid_of_pure_mean_shift_is_squared_shift_and_monotone() -> None:
    rng = np.random.default_rng(3)
    features = rng.standard_normal((400, 32))
    direction = rng.standard_normal(32)
    direction /= np.linalg.norm(direction)
    reference = FeatureStats.from_features(features, network="test")
    fids = []
    for magnitude in [0.0, 0.1, 0.5, 1.0, 3.0]:
        shifted = FeatureStats.from_features(features + magnitude * direction, network="test")
        fid = fid_from_stats(shifted, reference)
        assert fid == pytest.approx(magnitude**2, abs=1e-8)
        fids.append(fid)
    assert all(a < b for a, b in zip(fids, fids[1:]))


def test_fid_with_rank_deficient_covariance_is_finite_and_warns() -> None:
    rng = np.random.default_rng(4)
    few = FeatureStats.from_features(rng.standard_normal((10, 50)), network="test", source="few")
    many = FeatureStats.from_features(rng.standard_normal((200, 50)), network="test", source="many")
    with pytest.warns(UserWarning, match="rank-deficient.*KID"):
        fid = fid_from_stats(few, many)
    assert np.isfinite(fid) and fid > 0


def test_no_warning_with_enough_samples() -> None:
    rng = np.random.default_rng(5)
    stats = FeatureStats.from_features(rng.standard_normal((100, 8)), network="test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid_from_stats(stats, stats)


def test_frechet_distance_rejects_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="feature dimensions differ.*3.*4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_check_compatible_names_the_mismatch() -> None:
    rng = np.random.default_rng(6)
    a = FeatureStats.from_features(rng.standard_normal((20, 4)), network="inception")
    b = FeatureStats.from_features(rng.standard_normal((20, 4)), network="classifier:x@123")
    c = FeatureStats.from_features(rng.standard_normal((20, 5)), network="inception")
    with pytest.raises(ValueError, match="feature networks differ.*inception.*classifier"):
        check_compatible(a, b)
    with pytest.raises(ValueError, match="4-d.*5-d"):
        check_compatible(a, c)


# ----------------------------------------------------------------------------------------------
# FeatureStats I/O
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_features", [True, False])
def test_feature_stats_round_trip(tmp_path, keep_features: bool) -> None:
    rng = np.random.default_rng(7)
    features = rng.standard_normal((30, 6))
    stats = FeatureStats.from_features(
        features, network="classifier:c.safetensors@abc", source="fashion-mnist:test", keep_features=keep_features
    )
    path = tmp_path / "ref_stats"  # no .npz suffix: must be written exactly where asked
    stats.save(path)
    assert path.exists()
    with np.load(path, allow_pickle=False) as raw:
        assert str(raw["network"]) == "classifier:c.safetensors@abc"
        assert int(raw["dim"]) == 6
        assert str(raw["source"]) == "fashion-mnist:test"
    loaded = FeatureStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert (loaded.num, loaded.dim, loaded.network, loaded.source) == (30, 6, stats.network, stats.source)
    if keep_features:
        np.testing.assert_array_equal(loaded.features, features)
    else:
        assert loaded.features is None
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False))


def test_feature_stats_load_rejects_foreign_npz(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="not a FeatureStats file.*missing"):
        FeatureStats.load(path)


def test_feature_stats_validates_shapes() -> None:
    with pytest.raises(ValueError, match="sigma must have shape"):
        FeatureStats(mu=np.zeros(3), sigma=np.eye(2), num=5, network="x")
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 3)), network="x")
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats.from_features(np.full((4, 3), np.nan), network="x")


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def brute_force_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_when_the_subset_is_the_whole_set() -> None:
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4)) + 0.3
    mean, std = kid(x, y, num_subsets=3, subset_size=1000)  # capped at 12: every subset is the full set
    assert mean == pytest.approx(brute_force_unbiased_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same_mean, _ = kid(x, y, num_subsets=20, subset_size=200)
    shifted_mean, shifted_std = kid(x, y + 1.0, num_subsets=20, subset_size=200)
    assert shifted_mean > 0.5
    assert shifted_mean > 10 * shifted_std
    assert abs(same_mean) < 0.01 * shifted_mean


def test_kid_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="feature dimensions differ"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------


def test_precision_recall_identical_sets() -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((200, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_sets() -> None:
    rng = np.random.default_rng(11)
    real = rng.standard_normal((150, 8))
    fake = rng.standard_normal((150, 8)) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_dropping_and_outliers() -> None:
    rng = np.random.default_rng(12)
    real = np.concatenate([rng.standard_normal((200, 4)), rng.standard_normal((200, 4)) + 50.0])
    # Fake covers only the first real mode (recall ~0.5) and is fully realistic (precision ~1).
    fake = rng.standard_normal((200, 4))
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.4 < recall < 0.55
    # Half of the fake samples are far outliers: precision drops to ~0.5, recall unchanged.
    fake_with_outliers = np.concatenate([fake[:100], rng.standard_normal((100, 4)) - 50.0])
    precision_o, recall_o = precision_recall(real, fake_with_outliers, k=3)
    assert 0.4 < precision_o < 0.55
    assert 0.35 < recall_o < 0.55


def test_precision_recall_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(13)
    real, fake = rng.standard_normal((97, 5)), rng.standard_normal((83, 5)) * 1.3 + 0.2
    full = precision_recall(real, fake, k=4, batch_size=1000)
    batched = precision_recall(real, fake, k=4, batch_size=7)
    assert full == batched
    assert 0.0 < full.precision < 1.0 and 0.0 < full.recall < 1.0


def test_precision_recall_rejects_too_few_samples() -> None:
    with pytest.raises(ValueError, match="needs more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------


def test_inception_score_uniform_predictions_is_one() -> None:
    probs = np.full((100, 10), 0.1)
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_and_diverse_is_num_classes() -> None:
    num_classes = 7
    probs = np.eye(num_classes)[np.arange(70) % num_classes]  # one-hot, every class equally often
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_does_not_depend_on_class_grouped_order() -> None:
    # cdm sample writes class-balanced samples grouped by class; the score must not see that order
    num_classes = 10
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), 100)
    probs = np.full((len(labels), num_classes), 0.02)
    probs[np.arange(len(labels)), labels] = 0.82
    grouped = inception_score(probs, splits=10)[0]
    shuffled = inception_score(probs[rng.permutation(len(labels))], splits=10)[0]
    assert grouped == pytest.approx(shuffled, rel=0.05)  # contiguous chunks of this order would score ~1.0
    assert grouped > 4.0  # exp(H(y) - H(y|x)) = 4.20 for these probabilities


def test_inception_score_mode_collapse_is_one() -> None:
    probs = np.zeros((50, 5))
    probs[:, 2] = 1.0  # confident but always the same class
    assert inception_score(probs, splits=5)[0] == pytest.approx(1.0)


def test_inception_score_rejects_logits_and_too_few_samples() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.random.default_rng(0).standard_normal((20, 4)) ** 2, splits=2)
    with pytest.raises(ValueError, match="at least one sample per split"):
        inception_score(np.full((5, 2), 0.5), splits=10)
