"""Sample-quality metrics on feature vectors: FID, KID, improved precision/recall and Inception Score.

Everything here is plain numpy/scipy in float64 and independent of the network that produced the
features (see ``features.py``); the statistics they compare are :class:`~.stats.FeatureStats`, which record
that network.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import xlogy

from .stats import FeatureStats, as_feature_matrix, check_compatible, check_same_feature_dim, warn_if_rank_deficient


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def _symmetric_psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh.

    Tiny negative eigenvalues from round-off (or from a rank-deficient covariance) are clipped to 0.
    """
    symmetric = 0.5 * (matrix + matrix.T)
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(Σ1 Σ2)) for symmetric PSD Σ1, Σ2.

    Σ1 Σ2 is similar to A = Σ1^½ Σ2 Σ1^½, which is symmetric PSD, so the eigenvalues of sqrtm(Σ1 Σ2)
    are the square roots of A's (real, non-negative) eigenvalues. This avoids the non-symmetric
    Schur-based ``scipy.linalg.sqrtm`` and its complex round-off.
    """
    sqrt_sigma1 = _symmetric_psd_sqrt(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d² = ||mu1 - mu2||² + tr(Σ1) + tr(Σ2) - 2 tr(sqrtm(Σ1 Σ2)), which is never negative. The covariance term
    is a difference of large, nearly equal traces, so round-off can take it slightly below zero for (near-)
    identical statistics (FID(x, x) = -6e-5 was seen with 128-d features); the result is clamped at 0.
    """
    mu1 = np.asarray(mu1, dtype=np.float64)
    mu2 = np.asarray(mu2, dtype=np.float64)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise ValueError(f"means must be 1-D vectors, got shapes {mu1.shape} and {mu2.shape}")
    check_same_feature_dim(mu1.shape[0], mu2.shape[0], "mu1", "mu2")
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means, got {sigma.shape}")
        if not np.all(np.isfinite(sigma)):
            raise ValueError(f"{name} contains NaN or inf values")
    if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))):
        raise ValueError("means contain NaN or inf values")

    mean_term = float(np.sum((mu1 - mu2) ** 2))
    covariance_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(0.0, mean_term + covariance_term)


def fid_from_stats(stats: FeatureStats, reference: FeatureStats) -> float:
    """FID between two :class:`FeatureStats`, after checking they are comparable.

    Warns (``warnings.warn``) when either side has fewer samples than feature dimensions.
    """
    check_compatible(stats, reference)
    warn_if_rank_deficient(stats.num, stats.dim, f"stats ({stats.source or 'unnamed'})")
    warn_if_rank_deficient(reference.num, reference.dim, f"reference ({reference.source or 'unnamed'})")
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel k(x, y) = (x·y / d + 1)^3 of Bińkowski et al. (2018)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD² between the distributions of the rows of x and y."""
    m, n = x.shape[0], y.shape[0]
    k_xx = _polynomial_kernel(x, x)
    k_yy = _polynomial_kernel(y, y)
    k_xy = _polynomial_kernel(x, y)
    # Dropping the diagonal (k(x_i, x_i)) is what makes the within-set terms unbiased.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid(
    feats1: np.ndarray,
    feats2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD² over random subsets.

    Each subset draws ``subset_size`` rows without replacement from each set; ``subset_size`` is capped
    by the smaller set. Returns ``(mean, std)``; values are in raw MMD² units (multiply by 1e3 to match
    the common "KID x 10^3" tables).
    """
    x = as_feature_matrix(feats1, "feats1")
    y = as_feature_matrix(feats2, "feats2")
    check_same_feature_dim(x.shape[1], y.shape[1], "feats1", "feats2")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set, got {x.shape[0]} and {y.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets, dtype=np.float64)
    for i in range(num_subsets):
        x_subset = x[rng.choice(x.shape[0], size, replace=False)]
        y_subset = y[rng.choice(y.shape[0], size, replace=False)]
        estimates[i] = _unbiased_mmd2(x_subset, y_subset)
    return float(estimates.mean()), float(estimates.std())


# ----------------------------------------------------------------------------------------------
# Improved precision / recall
# ----------------------------------------------------------------------------------------------


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def squared_distances(a: np.ndarray, b: np.ndarray, b_sq_norms: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances between the rows of a and b (clipped at 0 for round-off)."""
    a_sq_norms = np.einsum("ij,ij->i", a, a)
    distances = a_sq_norms[:, None] + b_sq_norms[None, :] - 2.0 * (a @ b.T)
    return np.maximum(distances, 0.0)


def _kth_neighbour_radii(points: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance from each point to its k-th nearest neighbour within the same set."""
    sq_norms = np.einsum("ij,ij->i", points, points)
    radii = np.empty(points.shape[0], dtype=np.float64)
    for start in range(0, points.shape[0], batch_size):
        block = squared_distances(points[start : start + batch_size], points, sq_norms)
        # Index k (0-based) skips the point itself, which sits at distance 0 in position 0.
        radii[start : start + batch_size] = np.partition(block, k, axis=1)[:, k]
    return radii


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, batch_size: int = 1000
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    The real (resp. fake) manifold is the union of balls around each real (fake) feature with radius
    the distance to its k-th nearest neighbour. Precision is the fraction of fake samples inside the
    real manifold; recall the fraction of real samples inside the fake manifold. Distances are
    computed ``batch_size`` rows at a time, so memory is O(batch_size x N) (10k x 10k is fine).
    """
    real = as_feature_matrix(real, "real")
    fake = as_feature_matrix(fake, "fake")
    check_same_feature_dim(fake.shape[1], real.shape[1], "fake", "real")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, feats in (("real", real), ("fake", fake)):
        if feats.shape[0] <= k:
            raise ValueError(f"{name} has {feats.shape[0]} samples; precision/recall with k={k} needs more than k")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)

    real_sq_norms = np.einsum("ij,ij->i", real, real)
    fake_in_real_manifold = np.zeros(fake.shape[0], dtype=bool)
    real_in_fake_manifold = np.zeros(real.shape[0], dtype=bool)
    # One pass over the fake x real distance matrix answers both questions.
    for start in range(0, fake.shape[0], batch_size):
        stop = start + batch_size
        block = squared_distances(fake[start:stop], real, real_sq_norms)
        fake_in_real_manifold[start:stop] = np.any(block <= real_radii[None, :], axis=1)
        real_in_fake_manifold |= np.any(block <= fake_radii[start:stop, None], axis=0)
    return PrecisionRecall(float(fake_in_real_manifold.mean()), float(real_in_fake_manifold.mean()))


# ----------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` equal chunks.

    ``probs`` is an (N, C) matrix of class probabilities (softmax outputs). Split i takes every
    ``splits``-th sample starting at i, not a contiguous chunk as the original implementation did: class-conditional
    sampling writes images grouped by class, and a contiguous chunk of one class scores ~1 whatever the
    images look like. For samples in random order the two are the same estimator.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D array (num_samples, num_classes), got shape {p.shape}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if p.shape[0] < splits:
        raise ValueError(f"need at least one sample per split: got {p.shape[0]} samples for {splits} splits")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    row_sums = p.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        worst = float(row_sums[np.argmax(np.abs(row_sums - 1.0))])
        raise ValueError(f"each row of probs must sum to 1 (softmax outputs, not logits); found a row summing to {worst}")

    scores = np.empty(splits, dtype=np.float64)
    for i in range(splits):
        part = p[i::splits]
        marginal = part.mean(axis=0, keepdims=True)
        # xlogy gives 0·log 0 = 0, so one-hot predictions are handled exactly.
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores[i] = np.exp(kl.mean())
    return float(scores.mean()), float(scores.std())
