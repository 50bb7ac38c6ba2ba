"""Conditioning augmentation of the low-resolution input of super-resolution stages (Ho et al. 2021).

An SR stage is conditioned on the previous stage's output, upsampled to its own resolution. During training
the clean low-resolution image z0 is corrupted so the SR model learns to tolerate the imperfect samples the
previous stage produces at sampling time:

* :class:`NoiseAugmentation` -- the previous stage's own forward process,
  ``z_s = sqrt(abar(s)) z0 + sqrt(1 - abar(s)) eps``, amortized over a random level s per example that the
  network also receives (scaled like a timestep). Used at low resolutions.
* :class:`BlurAugmentation` -- a small random Gaussian blur on a random half of the batch during training,
  nothing at sampling time. Used at high resolutions.
* :class:`NoAugmentation` -- the ablation baseline.

Level convention (the paper's, 1-based): level ``s`` in ``0..T_prev`` where
``abar(s) = prod_{i=1..s} (1 - beta_i)`` over the previous stage's schedule and ``abar(0) = 1``. Level 0 is
exactly the clean image and level ``s >= 1`` equals the 0-based schedule index ``s - 1`` used by
``diffusion.py`` (so clean data is index -1, as in docs/architecture.md).

All three augmentations are callables ``aug(z, generator=None, training=True) -> (z_aug, levels)`` where
``levels`` is an int64 tensor of per-example levels for noise augmentation and ``None`` otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .unet_config import LOW_RES_UPSAMPLE_MODES
from . import rng

__all__ = [
    "downsample",
    "upsample",
    "NoiseAugmentation",
    "BlurAugmentation",
    "NoAugmentation",
    "gaussian_kernels",
]

AUGMENTATIONS = ("none", "noise", "blur")  # conditioning.augmentation: NoAugmentation, NoiseAugmentation, BlurAugmentation


def _size_pair(size: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(not isinstance(s, int) or s < 1 for s in pair):
        raise ValueError(f"{name}: size must be a positive int or an (height, width) pair, got {size!r}")
    return pair  # type: ignore[return-value]


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} expects a float N x C x H x W tensor, got {got}")


def downsample(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Antialiased area resize to a smaller ``size`` (each output pixel averages the input pixels it covers).

    For integer factors this is an exact box filter, the low-resolution image an SR stage is trained on.
    """
    _check_images(x, "downsample")
    target = _size_pair(size, "downsample")
    if target == tuple(x.shape[-2:]):
        return x
    if target[0] > x.shape[-2] or target[1] > x.shape[-1]:
        raise ValueError(
            f"downsample: target size {target} is larger than the input {tuple(x.shape[-2:])}; use upsample"
        )
    return F.interpolate(x, size=target, mode="area")


def upsample(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize to a larger ``size`` with ``mode`` in {"bilinear", "bicubic", "nearest"}.

    No clamping: the input may be a noise-augmented z_s that legitimately lies outside [-1, 1].
    """
    _check_images(x, "upsample")
    target = _size_pair(size, "upsample")
    if mode not in LOW_RES_UPSAMPLE_MODES:
        raise ValueError(f"upsample: mode must be one of {LOW_RES_UPSAMPLE_MODES}, got {mode!r}")
    if target == tuple(x.shape[-2:]):
        return x
    if target[0] < x.shape[-2] or target[1] < x.shape[-1]:
        raise ValueError(
            f"upsample: target size {target} is smaller than the input {tuple(x.shape[-2:])}; use downsample"
        )
    if mode == "nearest":
        # "nearest-exact" samples pixel centres; plain "nearest" is shifted for non-integer factors.
        return F.interpolate(x, size=target, mode="nearest-exact")
    return F.interpolate(x, size=target, mode=mode, align_corners=False)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved to ``device``."""
    return rng.rand(shape, generator, device)


def _randn(shape: tuple[int, ...], generator: rng.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normal numbers drawn on the generator's device (a per-sample generator: each row its own stream)."""
    return rng.randn(shape, generator, device, dtype)


class NoiseAugmentation:
    """Gaussian noise augmentation with the previous stage's forward process.

    Args:
        alphas_cumprod_prev: the previous stage's ``abar`` by 0-based index (length ``T_prev``,
            ``abar[i] = prod_{j<=i} (1 - beta_j)``), e.g. ``GaussianDiffusion.alphas_cumprod``.
        s_min, s_max: training levels are drawn uniformly from the integers ``s_min..s_max``
            (1-based levels, ``0 <= s_min <= s_max <= T_prev``).
        fixed_s: if given, always use this level (non-amortized training, or the sampling-time level
            chosen by the sweep).
    """

    provides_level = True

    def __init__(
        self,
        alphas_cumprod_prev: torch.Tensor | np.ndarray,
        s_min: int,
        s_max: int,
        fixed_s: int | None = None,
    ) -> None:
        if isinstance(alphas_cumprod_prev, torch.Tensor):
            abar = alphas_cumprod_prev.detach().to(device="cpu", dtype=torch.float64)
        else:
            abar = torch.as_tensor(np.asarray(alphas_cumprod_prev, dtype=np.float64))
        if abar.ndim != 1 or abar.numel() == 0:
            raise ValueError(f"alphas_cumprod_prev must be a non-empty 1-D array, got shape {tuple(abar.shape)}")
        if not torch.isfinite(abar).all() or (abar <= 0).any() or (abar > 1).any():
            raise ValueError("alphas_cumprod_prev must hold values in (0, 1] (cumulative products of 1 - beta)")
        if (abar[1:] > abar[:-1]).any():
            raise ValueError("alphas_cumprod_prev must be non-increasing (a cumulative product of 1 - beta)")
        self.num_timesteps_prev = int(abar.numel())
        for name, value in (("s_min", s_min), ("s_max", s_max)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"NoiseAugmentation {name} must be an integer level, got {value!r}")
        if not 0 <= s_min <= s_max <= self.num_timesteps_prev:
            raise ValueError(
                f"NoiseAugmentation needs 0 <= s_min <= s_max <= T_prev={self.num_timesteps_prev}, "
                f"got s_min={s_min}, s_max={s_max}"
            )
        if fixed_s is not None and (
            not isinstance(fixed_s, (int, np.integer)) or not 0 <= fixed_s <= self.num_timesteps_prev
        ):
            raise ValueError(
                f"NoiseAugmentation fixed_s must be an integer in [0, {self.num_timesteps_prev}], got {fixed_s!r}"
            )
        self.s_min, self.s_max = int(s_min), int(s_max)
        self.fixed_s = None if fixed_s is None else int(fixed_s)
        # Prepend abar(0) = 1 so the table is indexed directly by the 1-based level.
        self._alpha_bar_by_level = torch.cat([abar.new_ones(1), abar])
        self._coef_cpu = torch.stack(  # (2, T_prev + 1): sqrt(abar), sqrt(1 - abar)
            [self._alpha_bar_by_level.sqrt(), (1.0 - self._alpha_bar_by_level).sqrt()]
        )
        self._coef_by_device: dict[torch.device, torch.Tensor] = {}

    def _coefficients(self, device: torch.device) -> torch.Tensor:
        if device not in self._coef_by_device:
            self._coef_by_device[device] = self._coef_cpu.to(device)
        return self._coef_by_device[device]

    def alpha_bar(self, s: int | torch.Tensor) -> torch.Tensor:
        """``abar(s)`` (float64) for 1-based level(s) ``s``; ``abar(0) = 1``."""
        return self._alpha_bar_by_level[torch.as_tensor(s, dtype=torch.long, device="cpu")]

    def sample_levels(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """``n`` levels (int64): uniform integers in ``[s_min, s_max]``, or all ``fixed_s``."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.fixed_s is not None:
            return torch.full((n,), self.fixed_s, dtype=torch.long, device=device)
        source = generator.device if generator is not None else device
        levels = torch.randint(self.s_min, self.s_max + 1, (n,), generator=generator, device=source)
        return levels.to(device, non_blocking=True)

    def apply(
        self,
        z0: torch.Tensor,
        s: int | torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: rng.Generator = None,
    ) -> torch.Tensor:
        """Corrupt ``z0`` to level ``s``: ``sqrt(abar(s)) z0 + sqrt(1 - abar(s)) noise``.

        ``s`` is an int or a per-example int tensor of shape (N,). Level 0 returns ``z0`` exactly. Tensor
        levels on an accelerator are not range-checked, to avoid a host synchronisation.
        """
        _check_images(z0, "NoiseAugmentation.apply")
        n = z0.shape[0]
        if isinstance(s, torch.Tensor):
            if s.dtype.is_floating_point or s.dtype == torch.bool:
                raise ValueError(f"levels s must be an integer tensor, got {s.dtype}")
            if s.ndim == 0:
                s = s.expand(n)
            if s.shape != (n,):
                raise ValueError(f"levels s must have shape ({n},) to match z0, got {tuple(s.shape)}")
            if s.device.type == "cpu" and s.numel() and (s.min() < 0 or s.max() > self.num_timesteps_prev):
                raise ValueError(f"levels s must lie in [0, {self.num_timesteps_prev}], got {s.min()}..{s.max()}")
            s = s.to(z0.device, non_blocking=True)
        else:
            if not isinstance(s, (int, np.integer)) or not 0 <= s <= self.num_timesteps_prev:
                raise ValueError(f"level s must be an integer in [0, {self.num_timesteps_prev}], got {s!r}")
            s = torch.full((n,), int(s), dtype=torch.long, device=z0.device)
        if noise is None:
            noise = _randn(tuple(z0.shape), generator, z0.device, z0.dtype)
        elif noise.shape != z0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal z0 shape {tuple(z0.shape)}")
        coef = self._coefficients(z0.device)[:, s].to(z0.dtype).view(2, n, *([1] * (z0.ndim - 1)))
        # Level 0 has coefficients exactly (1, 0), so z0 passes through unchanged (noise * 0 = 0).
        return coef[0] * z0 + coef[1] * noise

    def __call__(
        self, z0: torch.Tensor, generator: torch.Generator | None = None, training: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training augmentation: draw per-example levels and corrupt; returns ``(z_s, s)``.

        At sampling time (``training=False``) the level must be the one chosen for sampling, ``fixed_s``.
        """
        if not training and self.fixed_s is None:
            raise ValueError(
                "NoiseAugmentation at sampling time needs fixed_s (the level chosen by the sweep); "
                "construct it with fixed_s= or call apply(z0, s) directly"
            )
        levels = self.sample_levels(z0.shape[0], generator, z0.device)
        return self.apply(z0, levels, generator=generator), levels

    @staticmethod
    def level_to_index(s: int | torch.Tensor) -> int | torch.Tensor:
        """1-based level -> 0-based schedule index of the previous stage (level 0 -> -1, clean data)."""
        return s - 1

    def scaled_level(self, s: int | torch.Tensor) -> float | torch.Tensor:
        """Level as the network sees it: ``s * 1000 / T_prev`` (0 = clean, 1000 = fully noised)."""
        if isinstance(s, torch.Tensor):
            return s.float() * (1000.0 / self.num_timesteps_prev)
        return s * 1000.0 / self.num_timesteps_prev

    def __repr__(self) -> str:
        return (
            f"NoiseAugmentation(T_prev={self.num_timesteps_prev}, s_min={self.s_min}, s_max={self.s_max}, "
            f"fixed_s={self.fixed_s})"
        )


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalized 2-D Gaussian kernels, one per sigma: (N,) -> (N, kernel_size, kernel_size), each summing to 1."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    weights_1d = torch.exp(-(offsets[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    weights_1d = weights_1d / weights_1d.sum(dim=1, keepdim=True)
    return weights_1d[:, :, None] * weights_1d[:, None, :]


class BlurAugmentation:
    """Random Gaussian blur of the low-resolution conditioning input (training only).

    Each example independently gets blurred with probability ``prob``, with its own
    ``sigma ~ U(sigma_min, sigma_max)`` and a normalized ``kernel_size`` x ``kernel_size`` Gaussian,
    applied per channel with reflect padding (so a constant image stays constant). At sampling time
    (``training=False``) it is the identity, as in the paper.
    """

    provides_level = False

    def __init__(
        self, kernel_size: int = 3, sigma_min: float = 0.4, sigma_max: float = 0.6, prob: float = 0.5
    ) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"BlurAugmentation kernel_size must be a positive odd integer, got {kernel_size!r}")
        if not 0 < sigma_min <= sigma_max:
            raise ValueError(
                "BlurAugmentation needs 0 < sigma_min <= sigma_max, "
                f"got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"BlurAugmentation prob must be in [0, 1], got {prob}")
        self.kernel_size = kernel_size
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.prob = float(prob)

    def blur(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Blur every example of ``z`` with its own ``sigma`` (shape (N,))."""
        _check_images(z, "BlurAugmentation")
        n, c, h, w = z.shape
        radius = self.kernel_size // 2
        if radius == 0:
            return z
        if h <= radius or w <= radius:
            raise ValueError(f"BlurAugmentation: images {h}x{w} are too small for reflect padding of {radius}")
        # Build kernels in at least float32 so half-precision inputs still get an accurately normalized kernel.
        kernel_dtype = torch.promote_types(z.dtype, torch.float32)
        kernels = gaussian_kernels(sigma.to(device=z.device, dtype=kernel_dtype), self.kernel_size).to(z.dtype)
        # One group per (example, channel) lets a single depthwise conv use a different kernel per example.
        weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
        padded = F.pad(z.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
        return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)

    def __call__(
        self, z: torch.Tensor, generator: torch.Generator | None = None, training: bool = True
    ) -> tuple[torch.Tensor, None]:
        """Blur a random subset (probability ``prob`` each) during training; identity otherwise."""
        _check_images(z, "BlurAugmentation")
        if not training or self.prob == 0.0:
            return z, None
        n = z.shape[0]
        uniform = _rand((2, n), generator, z.device)
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * uniform[0]
        selected = uniform[1] < self.prob
        return torch.where(selected[:, None, None, None], self.blur(z, sigma), z), None

    def __repr__(self) -> str:
        return (
            f"BlurAugmentation(kernel_size={self.kernel_size}, sigma_min={self.sigma_min}, "
            f"sigma_max={self.sigma_max}, prob={self.prob})"
        )


class NoAugmentation:
    """The identity, with the same call shape as the other augmentations."""

    provides_level = False

    def __call__(
        self, z: torch.Tensor, generator: torch.Generator | None = None, training: bool = True
    ) -> tuple[torch.Tensor, None]:
        return z, None

    def __repr__(self) -> str:
        return "NoAugmentation()"
