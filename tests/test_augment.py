"""Tests for cascaded_diffusion.augment: resizing, noise / blur / no conditioning augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from cascaded_diffusion.augment import (
    BlurAugmentation,
    NoAugmentation,
    NoiseAugmentation,
    downsample,
    gaussian_kernels,
    upsample,
)


def cosine_alphas_cumprod(num_timesteps: int) -> torch.Tensor:
    """Improved-DDPM cosine schedule, written out here so the test does not depend on diffusion.py."""
    def f(t: float) -> float:
        return math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)


ABAR = cosine_alphas_cumprod(1000)


# ----------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------


def test_downsample_is_block_mean_and_preserves_constants() -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    small = downsample(x, 4)
    assert small.shape == (2, 3, 4, 4)
    torch.testing.assert_close(small, x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5)))
    const = torch.full((1, 1, 12, 12), -0.3)
    torch.testing.assert_close(downsample(const, 5), torch.full((1, 1, 5, 5), -0.3))
    assert downsample(x, 8) is x
    with pytest.raises(ValueError, match="larger"):
        downsample(x, 16)


def test_upsample_modes() -> None:
    x = torch.arange(4.0).view(1, 1, 2, 2)
    nearest = upsample(x, 4, mode="nearest")
    torch.testing.assert_close(nearest, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    for mode in ("bilinear", "bicubic"):
        y = upsample(x, (4, 6), mode=mode)
        assert y.shape == (1, 1, 4, 6)
        torch.testing.assert_close(y.mean(), x.mean(), atol=0.15, rtol=0)
    # No clamping: a noisy conditioning image may lie outside [-1, 1].
    assert upsample(torch.full((1, 1, 2, 2), 3.0), 4).max() == 3.0
    with pytest.raises(ValueError, match="mode"):
        upsample(x, 4, mode="lanczos")
    with pytest.raises(ValueError, match="smaller"):
        upsample(x, 1)


# ----------------------------------------------------------------------------------------------------------
# Noise augmentation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 250, 700, 1000])
def test_noise_level_mean_and_variance(level: int) -> None:
    """z_s over many noise draws: mean sqrt(abar(s)) z0, variance 1 - abar(s), within 5 standard errors."""
    aug = NoiseAugmentation(ABAR, s_min=0, s_max=1000)
    draws = 8000
    z0 = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z_s = aug.apply(z0.expand(draws, -1, -1, -1), level, generator=torch.Generator().manual_seed(2)).double()
    abar = ABAR[level - 1].item()  # level s is 0-based index s - 1
    var = 1 - abar
    mean_tol = 5 * math.sqrt(var / draws)
    var_tol = 5 * var * math.sqrt(2 / (draws - 1))
    assert (z_s.mean(0) - math.sqrt(abar) * z0[0].double()).abs().max() < mean_tol
    assert (z_s.var(0) - var).abs().max() < var_tol


def test_level_zero_is_the_identity_and_levels_are_per_example() -> None:
    aug = NoiseAugmentation(ABAR, s_min=0, s_max=1000)
    z0 = torch.randn(3, 2, 4, 4)
    assert torch.equal(aug.apply(z0, 0), z0)
    noise = torch.randn_like(z0)
    levels = torch.tensor([0, 1, 1000])
    z_s = aug.apply(z0, levels, noise=noise)
    assert torch.equal(z_s[0], z0[0])
    for i in (1, 2):
        abar = ABAR[levels[i] - 1].item()
        torch.testing.assert_close(z_s[i], math.sqrt(abar) * z0[i] + math.sqrt(1 - abar) * noise[i])
    assert aug.alpha_bar(0).item() == 1.0 and aug.alpha_bar(1).item() == ABAR[0].item()


def test_sample_levels_cover_the_range_uniformly() -> None:
    aug = NoiseAugmentation(ABAR, s_min=3, s_max=12)
    levels = aug.sample_levels(20000, torch.Generator().manual_seed(3))
    assert levels.dtype == torch.long and levels.min() == 3 and levels.max() == 12
    counts = torch.bincount(levels - 3, minlength=10).double()
    expected = 20000 / 10
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * 0.9)  # binomial, 5 sigma
    fixed = NoiseAugmentation(ABAR, s_min=3, s_max=12, fixed_s=7).sample_levels(5)
    assert fixed.tolist() == [7] * 5


def test_noise_call_is_seeded_and_returns_levels() -> None:
    aug = NoiseAugmentation(ABAR, s_min=100, s_max=900)
    z0 = torch.zeros(16, 3, 4, 4)
    a, s_a = aug(z0, torch.Generator().manual_seed(4))
    b, s_b = aug(z0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(s_a, s_b)
    assert s_a.shape == (16,) and ((s_a >= 100) & (s_a <= 900)).all()
    assert aug.provides_level
    with pytest.raises(ValueError, match="fixed_s"):
        aug(z0, training=False)
    sampling = NoiseAugmentation(ABAR, s_min=100, s_max=900, fixed_s=0)
    z, s = sampling(torch.ones(2, 1, 2, 2), training=False)
    assert torch.equal(z, torch.ones(2, 1, 2, 2)) and s.tolist() == [0, 0]


def test_level_index_and_scaling_conventions() -> None:
    aug = NoiseAugmentation(cosine_alphas_cumprod(4000), s_min=0, s_max=4000)
    assert aug.level_to_index(1) == 0 and aug.level_to_index(0) == -1
    assert aug.scaled_level(1000) == 250.0 and aug.scaled_level(4000) == 1000.0
    torch.testing.assert_close(aug.scaled_level(torch.tensor([0, 2000])), torch.tensor([0.0, 500.0]))


def test_noise_augmentation_validation() -> None:
    with pytest.raises(ValueError, match="s_max"):
        NoiseAugmentation(ABAR, s_min=0, s_max=1001)
    with pytest.raises(ValueError, match="s_min"):
        NoiseAugmentation(ABAR, s_min=5, s_max=4)
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseAugmentation(torch.tensor([0.9, 0.95]), s_min=0, s_max=2)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseAugmentation(torch.tensor([1.2, 0.5]), s_min=0, s_max=2)
    with pytest.raises(ValueError, match="fixed_s"):
        NoiseAugmentation(ABAR, s_min=0, s_max=10, fixed_s=2000)
    aug = NoiseAugmentation(ABAR.numpy(), s_min=0, s_max=10)  # numpy schedules are accepted too
    with pytest.raises(ValueError, match="level"):
        aug.apply(torch.zeros(2, 1, 2, 2), 1001)
    with pytest.raises(ValueError, match="levels"):
        aug.apply(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2000]))
    with pytest.raises(ValueError, match="shape"):
        aug.apply(torch.zeros(2, 1, 2, 2), torch.tensor([1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------
# Blur augmentation
# ----------------------------------------------------------------------------------------------------------


def test_blur_hits_about_prob_of_the_batch() -> None:
    n, prob = 4000, 0.3
    z = torch.randn(n, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    blurred, levels = BlurAugmentation(prob=prob)(z, torch.Generator().manual_seed(6))
    assert levels is None
    changed = (blurred != z).flatten(1).any(dim=1)
    assert abs(changed.sum().item() - n * prob) < 5 * math.sqrt(n * prob * (1 - prob))  # binomial, 5 sigma
    untouched = ~changed
    assert torch.equal(blurred[untouched], z[untouched])


def test_blur_is_identity_at_sampling_time() -> None:
    z = torch.randn(8, 3, 5, 5)
    out, _ = BlurAugmentation(prob=1.0)(z, training=False)
    assert torch.equal(out, z)


def test_blur_preserves_constant_images() -> None:
    z = torch.full((4, 3, 7, 7), 0.37)
    out, _ = BlurAugmentation(kernel_size=5, prob=1.0)(z, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, z)


def test_blur_matches_scipy_gaussian_filter() -> None:
    """Fixed sigma 0.5, 3x3: scipy's gaussian_filter (radius int(2 * 0.5 + 0.5) = 1, 'mirror' = torch reflect)."""
    image = np.random.default_rng(8).standard_normal((2, 9, 9))
    aug = BlurAugmentation(kernel_size=3, sigma_min=0.5, sigma_max=0.5, prob=1.0)
    out, _ = aug(torch.from_numpy(image)[None], torch.Generator().manual_seed(9))
    expected = np.stack([ndimage.gaussian_filter(c, sigma=0.5, mode="mirror", truncate=2.0) for c in image])
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-12)


def test_blur_uses_a_different_sigma_per_example() -> None:
    aug = BlurAugmentation(kernel_size=3, sigma_min=0.4, sigma_max=0.6, prob=1.0)
    z = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    z[:, :, 2, 2] = 1.0  # impulse: the output is the kernel itself
    out = aug.blur(z, torch.tensor([0.4, 0.6], dtype=torch.float64))
    kernels = gaussian_kernels(torch.tensor([0.4, 0.6], dtype=torch.float64), 3)
    torch.testing.assert_close(out[:, 0, 1:4, 1:4], kernels)
    assert out[0, 0, 2, 2] > out[1, 0, 2, 2], "a wider sigma spreads more mass off the centre"
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(2, dtype=torch.float64))


def test_blur_validation() -> None:
    with pytest.raises(ValueError, match="odd"):
        BlurAugmentation(kernel_size=4)
    with pytest.raises(ValueError, match="sigma_min"):
        BlurAugmentation(sigma_min=0.7, sigma_max=0.6)
    with pytest.raises(ValueError, match="prob"):
        BlurAugmentation(prob=1.5)


# ----------------------------------------------------------------------------------------------------------
# None and factory
# ----------------------------------------------------------------------------------------------------------


def test_no_augmentation() -> None:
    z = torch.randn(2, 3, 4, 4)
    out, levels = NoAugmentation()(z, torch.Generator())
    assert out is z and levels is None
