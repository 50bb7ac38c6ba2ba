"""The ADM-family U-Net (Dhariwal & Nichol 2021) used by every stage of the cascade.

Architecture: BigGAN-style residual blocks (optionally resampling inside the block), adaptive group norm
(scale-shift from the embedding), multi-head self-attention at chosen feature-map resolutions, and
conditioning on the timestep, the class label, the augmentation level ``s`` of super-resolution stages and a
low-resolution image that is upsampled and concatenated with ``x_t``.

Conventions (see ``docs/architecture.md``): images are NCHW in [-1, 1]; ``t`` and ``aug_level`` arrive already
scaled to ``[0, 1000)`` by ``GaussianDiffusion.scale_timesteps``; class ``num_classes`` is the null class; with
``learn_sigma`` the output has ``2 * out_channels`` channels (prediction first, variance interpolation second).

Speed notes:

* Every op in the hot path keeps the memory format of its input, so ``model.to(memory_format=torch.channels_last)``
  keeps activations channels-last end to end (on CPU this lets oneDNN convolutions skip layout reorders). The
  exception is PyTorch's CUDA ``group_norm``, which makes its input NCHW-contiguous: in eager mode on a GPU,
  channels_last then costs layout copies around every norm (torch.compile generates its own norm instead).
* Upsampling blocks compute ``conv3x3(nearest_upsample(h))`` as one 2×2 convolution of the low-resolution map
  (``_upsample_conv3x3``): the same function with 4/9 of that convolution's multiply-adds.
* Group norms run in the activation dtype under autocast (statistics are still accumulated in fp32 by the
  kernel), as ADM's ``GroupNorm32`` does, instead of being upcast to an fp32 copy of the whole activation.
* SiLU after a norm is applied in place; scale-shift is a single ``addcmul`` (on CPU a multiply and an in-place
  add, see ``_scale_shift``); the SiLU of the embedding is computed once per forward instead of once per residual
  block; attention uses one fused qkv projection on a token-major view and ``F.scaled_dot_product_attention``
  (in fp32 on CPU for bf16/fp16 inputs over short sequences, see ``_attention``).
* Everything else is plain PyTorch, the same op on every device (pooling, nearest upsampling, dropout).
* Every measurement behind these choices (devices, shapes, timings) is in ``docs/performance.md``;
  ``benchmarks/unet_throughput.py`` measures the network against diffusers' ``UNet2DModel``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LOW_RES_UPSAMPLE_MODES",
    "ModelOptions",
    "UNetConfig",
    "UNet",
    "UPSAMPLE_ALGORITHMS",
    "set_upsample_algorithm",
    "ResBlock",
    "AttentionBlock",
    "timestep_embedding",
    "count_parameters",
]

LOW_RES_UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest")

_NOT_SHAPE = {"architecture": False}  # an option that leaves the network's shape (and so its weights) unchanged


@dataclass
class ModelOptions:
    """The ``[model]`` section of a stage config, loaded as is: the network's own options. The rest of its
    :class:`UNetConfig` follows from the stage (:meth:`UNetConfig.from_options`). Options marked
    ``architecture: False`` may change between a run and its resume; every other one fixes the weights' shapes."""

    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = field(default=0.0, metadata=_NOT_SHAPE)
    label_dropout: float = field(default=0.0, metadata=_NOT_SHAPE)  # > 0 trains the null class (guidance)
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    gradient_checkpointing: bool = field(default=False, metadata=_NOT_SHAPE)

    def architecture(self) -> dict[str, Any]:
        """The options that fix the network's shape."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("architecture", True)}


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet`. Validated on construction (``ValueError`` naming the bad field).

    ``attention_resolutions`` are feature-map sizes (e.g. ``(16, 8)``), not downsampling factors.
    ``num_head_channels > 0`` fixes the channels per head and overrides ``num_heads``.
    ``num_classes=None`` builds an unconditional network; otherwise the class table has ``num_classes + 1``
    rows, the last one being the null class. ``low_res_channels > 0`` makes a super-resolution network that
    takes an extra low-resolution image. ``gradient_checkpointing`` trades compute for activation memory
    during training.
    """

    resolution: int = 32
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    learn_sigma: bool = False
    use_aug_level: bool = False
    low_res_channels: int = 0
    low_res_upsample: str = "bilinear"
    resblock_updown: bool = True
    use_scale_shift_norm: bool = True
    norm_groups: int = 32
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # Accept lists (JSON/TOML) for the tuple fields so that configs round-trip.
        self.channel_mult = _as_int_tuple("channel_mult", self.channel_mult)
        self.attention_resolutions = _as_int_tuple("attention_resolutions", self.attention_resolutions)
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        """Number of resolutions in the U (one per entry of ``channel_mult``)."""
        return len(self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map resolution at each level, from the input resolution down."""
        return tuple(self.resolution // 2**level for level in range(self.num_levels))

    @property
    def emb_channels(self) -> int:
        """Width of the timestep/class/augmentation embedding (4 × model_channels, as ADM)."""
        return 4 * self.model_channels

    @property
    def output_channels(self) -> int:
        """Channels of the raw network output: ``2 * out_channels`` with learned variances."""
        return 2 * self.out_channels if self.learn_sigma else self.out_channels

    def head_layout(self, channels: int) -> tuple[int, int]:
        """``(num_heads, head_dim)`` of an attention block over ``channels`` channels."""
        if self.num_head_channels > 0:
            if channels % self.num_head_channels:
                raise ValueError(
                    f"num_head_channels={self.num_head_channels} must divide the attention block width "
                    f"{channels}"
                )
            return channels // self.num_head_channels, self.num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide the attention block width {channels}")
        return self.num_heads, channels // self.num_heads

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` if any field is out of range or the fields are inconsistent."""
        for name in ("resolution", "in_channels", "out_channels", "model_channels", "num_res_blocks",
                     "num_heads", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of positive ints, "
                             f"got {self.channel_mult!r}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ValueError(f"UNetConfig.num_head_channels must be -1 (use num_heads) or positive, "
                             f"got {self.num_head_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and (isinstance(self.num_classes, bool) or self.num_classes < 1):
            raise ValueError(f"UNetConfig.num_classes must be None (unconditional) or >= 1, "
                             f"got {self.num_classes!r}")
        if self.low_res_channels < 0:
            raise ValueError(f"UNetConfig.low_res_channels must be >= 0 (0 = base model), "
                             f"got {self.low_res_channels}")
        if self.low_res_upsample not in LOW_RES_UPSAMPLE_MODES:
            raise ValueError(f"UNetConfig.low_res_upsample must be one of {LOW_RES_UPSAMPLE_MODES}, "
                             f"got {self.low_res_upsample!r}")

        downsample_factor = 2 ** (self.num_levels - 1)
        if self.resolution % downsample_factor:
            raise ValueError(
                f"UNetConfig.resolution={self.resolution} must be divisible by 2**(len(channel_mult)-1)="
                f"{downsample_factor} so that every level halves the feature map exactly"
            )
        unreachable = sorted(set(self.attention_resolutions) - set(self.level_resolutions))
        if unreachable:
            raise ValueError(
                f"UNetConfig.attention_resolutions {unreachable} are not feature-map resolutions of this network; "
                f"available: {self.level_resolutions}"
            )
        widths = {self.model_channels} | {self.model_channels * m for m in self.channel_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(
                f"UNetConfig.norm_groups={self.norm_groups} must divide every block width, but does not divide "
                f"{bad} (model_channels={self.model_channels}, channel_mult={self.channel_mult})"
            )
        for level, mult in enumerate(self.channel_mult):
            if self.level_resolutions[level] in self.attention_resolutions:
                self.head_layout(self.model_channels * mult)

    @classmethod
    def from_options(
        cls,
        options: ModelOptions,
        *,
        resolution: int,
        channels: int,
        num_classes: int | None,
        learn_sigma: bool,
        use_aug_level: bool = False,
        low_res_channels: int = 0,
        low_res_upsample: str = "bilinear",
    ) -> "UNetConfig":
        """The network of a stage: its ``[model]`` options plus what the stage fixes (image size and channels,
        classes, learned variances, and for an SR stage the low-res input and its augmentation level)."""
        return cls(
            resolution=resolution, in_channels=channels, out_channels=channels, model_channels=options.channels,
            channel_mult=tuple(options.channel_mult), num_res_blocks=options.num_res_blocks,
            attention_resolutions=tuple(options.attention_resolutions), num_heads=options.num_heads,
            num_head_channels=options.num_head_channels, dropout=options.dropout, num_classes=num_classes,
            learn_sigma=learn_sigma, use_aug_level=use_aug_level, low_res_channels=low_res_channels,
            low_res_upsample=low_res_upsample, resblock_updown=options.resblock_updown,
            use_scale_shift_norm=options.use_scale_shift_norm, norm_groups=options.norm_groups,
            gradient_checkpointing=options.gradient_checkpointing,
        )

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**dict(data))


def _as_int_tuple(name: str, value: Iterable[int] | int) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"UNetConfig.{name} must be a sequence of ints, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"UNetConfig.{name} must contain only ints, got {items!r}")
    return items


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t·f_i), sin(t·f_i)]`` of scaled timesteps, shape ``(N, dim)``, fp32.

    Frequencies ``f_i = max_period ** (-i / (dim // 2))`` as in ADM; an odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (works on the meta device)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _zero_init(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module so that the branch it ends starts as the identity / zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _group_norm(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """Group norm whose output keeps the activation dtype.

    CUDA autocast upcasts ``group_norm`` to fp32, which writes an fp32 copy of every activation and makes the
    following SiLU/scale-shift run in fp32 too. The kernel accumulates its statistics in fp32 for bf16/fp16
    inputs anyway, so running it in the activation dtype matches ADM's ``GroupNorm32`` (fp32 math, result cast
    back) at a fraction of the memory traffic.
    """
    device_type = x.device.type
    if x.dtype != norm.weight.dtype and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return F.group_norm(x, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


def _group_norm_silu(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    # In place is safe for autograd: group_norm's backward needs its input and statistics, not its output.
    return F.silu(_group_norm(x, norm), inplace=True)


def _is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out channels-last, and not also NCHW-contiguous (as one-channel or 1×1 maps are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _interleave_phases(phase: Callable[[int, int], Tensor], shape: torch.Size | tuple[int, ...], like: Tensor,
                       channels_last: bool) -> Tensor:
    """The ``(N, C, 2H, 2W)`` tensor whose pixel ``(2i + a, 2j + b)`` is ``phase(a, b)[:, :, i, j]``, for ``shape``
    ``(N, C, H, W)``: four strided copies into a new tensor with ``like``'s dtype and device."""
    n, c, height, width = shape
    out = torch.empty((n, c, 2 * height, 2 * width), dtype=like.dtype, device=like.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    phases = out.unflatten(3, (width, 2)).unflatten(2, (height, 2))  # (N, C, H, a, W, b), a view of out
    for a in (0, 1):
        for b in (0, 1):
            phases[:, :, :, a, :, b].copy_(phase(a, b))
    return out


def _scale_shift(h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``h * (1 + scale) + shift`` for per-(N, C) ``scale``/``shift`` of shape ``(N, C, 1, 1)``.

    One ``addcmul`` everywhere but on CPU, where PyTorch's kernel leaves its vectorised loop when two operands are
    broadcast, so a multiply and an in-place add (each vectorised) run instead; the results differ by rounding
    (addcmul rounds once). Timings: docs/performance.md, "CPU fast paths for sampling".
    """
    if h.device.type == "cpu":  # also when compiling, so that a traced graph computes what eager mode does
        return (h * (1.0 + scale)).add_(shift)
    return torch.addcmul(shift, h, 1.0 + scale)


_CPU_FP32_ATTENTION_MAX_TOKENS = 256


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``F.scaled_dot_product_attention``; on CPU, bf16/fp16 inputs over <= 256 tokens are attended in fp32.

    PyTorch's CPU attention kernel is slower in bf16 than in fp32 for short sequences (docs/performance.md,
    "Attention in fp32 on CPU"); only the rounding changes. Autocast has to be off around the call, or it would
    cast the fp32 inputs straight back to bf16. fp32 inputs, longer sequences and every non-CPU device take the
    plain call.
    """
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] <= _CPU_FP32_ATTENTION_MAX_TOKENS):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def _phase_kernels(weight: Tensor) -> Tensor:
    """The four 2×2 kernels that make a 3×3 convolution of a ×2 nearest-upsampled map one of the low-res map.

    Output row ``2i + a`` of ``conv3x3(upsample(h))`` reads upsampled rows ``2i + a - 1 .. 2i + a + 1``, which are
    source rows ``i - 1, i, i`` for ``a = 0`` and ``i, i, i + 1`` for ``a = 1``: two source rows, whose kernel
    rows are ``(w0, w1 + w2)`` and ``(w0 + w1, w2)``. The same holds for columns. Returns ``(4·C_out, C_in, 2, 2)``
    with the output channels ordered (a, b, c_out).
    """
    def by_parity(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)

    return torch.cat([kernel for rows in by_parity(weight, 2) for kernel in by_parity(rows, 3)], 0)


def _upsample_conv3x3(h: Tensor, conv: nn.Conv2d, interleave: str = "auto") -> Tensor:
    """``conv(F.interpolate(h, scale_factor=2, mode="nearest"))`` for a 3×3, padding-1 ``conv``, at 4/9 the FLOPs.

    Each of the four output phases (row parity a, column parity b) is a 2×2 convolution of the zero-padded
    low-res map (:func:`_phase_kernels`), so all four are one convolution with 4·C_out channels over the
    ``(H+1)×(W+1)`` window positions; phase (a, b) of output pixel (i, j) sits at window (i + a, j + b). The
    same function of the same weights as the direct form, with the products summed in another order (fp32
    differences are rounding-sized); it skips the 4× larger upsampled input and 5/9 of the multiply-adds,
    forward and backward. The output keeps the input's memory format.

    Interleaving the phases: window k holds output rows 2k − 1 (phase a = 1 of row k − 1) and 2k (phase a = 0
    of row k), and likewise for columns. With the phases ordered (c, 1 − a, 1 − b), ``pixel_shuffle`` puts every
    phase in place, one row and column down, and a crop removes the first and last rows and columns: the way for
    NCHW inputs. A channels_last input takes four slice copies instead, each writing contiguous runs of channels
    (pixel_shuffle is a reshape-permute composite for that layout). Both give the same values; neither uses
    ``as_strided``/``storage_offset``, which break a ``torch.compile`` graph. ``interleave="shuffle"`` or
    ``"copies"`` forces one way (for tests). Measurements: docs/performance.md, "Sub-pixel upsampling".
    """
    n, _, height, width = h.shape
    c = conv.out_channels
    channels_last = _is_channels_last(h)
    kernels = _phase_kernels(conv.weight)  # output channels (a, b, c)
    if interleave == "auto":
        interleave = "copies" if channels_last else "shuffle"
    elif interleave not in ("shuffle", "copies"):
        raise ValueError(f"interleave must be 'auto', 'shuffle' or 'copies', got {interleave!r}")
    if interleave == "shuffle":
        kernels = kernels.unflatten(0, (2, 2, c)).flip(0, 1).permute(2, 0, 1, 3, 4, 5).flatten(0, 2)
        bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
        windows = F.conv2d(h, kernels, bias, padding=1)  # (N, 4·C, H+1, W+1), channels (c, 1 - a, 1 - b)
        out = F.pixel_shuffle(windows, 2)[:, :, 1 : 2 * height + 1, 1 : 2 * width + 1]
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    windows = F.conv2d(h, kernels, bias, padding=1).unflatten(1, (2, 2, c))  # (N, a, b, C, H+1, W+1)
    return _interleave_phases(lambda a, b: windows[:, a, b, :, a : a + height, b : b + width],
                              (n, c, height, width), windows, channels_last)


# --------------------------------------------------------------------------------------------------------------
# Blocks. Every block takes ``(h, emb_act)`` so that stages can be run uniformly; ``emb_act`` is SiLU(emb).
# --------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """BigGAN-style residual block with adaptive group norm.

    ``in_norm → SiLU → [resample] → conv3x3 → out_norm ⊙ (1 + scale) + shift → SiLU → dropout → conv3x3(zero)``,
    plus a skip (identity, or conv1x1 when the width changes). With ``resample`` the same average-pool /
    nearest upsample is applied to the skip branch. Without scale-shift the projected embedding is added
    before ``out_norm``.
    """

    upsample_algorithm = "subpixel"  # see set_upsample_algorithm

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        dropout: float = 0.0,
        norm_groups: int = 32,
        use_scale_shift_norm: bool = True,
        resample: str = "none",
    ) -> None:
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"resample must be 'none', 'up' or 'down', got {resample!r}")
        self.resample = resample
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = nn.GroupNorm(norm_groups, in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.out_norm = nn.GroupNorm(norm_groups, out_channels)
        self.out_conv = _zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        h = _group_norm_silu(x, self.in_norm)
        if self.resample == "up" and self.upsample_algorithm == "subpixel":
            h = _upsample_conv3x3(h, self.in_conv)
        else:
            h = self.in_conv(self._resample(h))
        x = self._resample(x)

        emb_out = self.emb_proj(emb_act)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = _scale_shift(_group_norm(h, self.out_norm), scale, shift)
            h = F.silu(h, inplace=True)
        else:
            h = _group_norm_silu(h + emb_out, self.out_norm)
        h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.out_conv(h)
        # In place on the conv output: conv's backward needs its input and weight, not its output.
        return h.add_(self.skip(x))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    ``x + proj(SDPA(qkv(norm(x))))``. The projections are 1×1 convolutions written as ``nn.Linear`` over a
    token-major ``(N, H·W, C)`` view: for channels-last activations that view is free and the per-head q/k/v
    slices come out with unit stride on the head dimension, which is what the SDPA kernels want. The qkv
    channels are ordered (q|k|v, head, head_dim). ``proj`` is zero-initialised so the block starts as identity.
    """

    def __init__(self, channels: int, num_heads: int, *, norm_groups: int = 32, resolution: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide channels={channels}")
        self.channels = channels
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.resolution = resolution  # the feature-map size this block was built for (informational)
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero_init(nn.Linear(channels, channels))

    def forward(self, x: Tensor, emb_act: Tensor | None = None) -> Tensor:
        n, c, height, width = x.shape
        # (N·L, C) token rows: a free view of channels-last activations, one copy of NCHW ones. A strided 3-D
        # input would send nn.Linear to a batched matmul against the weight expanded over the batch, which the
        # CPU kernel materialises (N copies of the weight).
        tokens = _group_norm(x, self.norm).flatten(2).transpose(1, 2).reshape(n * height * width, c)
        qkv = self.qkv(tokens).view(n, height * width, 3, self.num_heads, self.head_dim)  # (N, L, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, d)
        attended = _attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(n, height * width, c)
        out = self.proj(attended).transpose(1, 2).unflatten(2, (height, width))  # (N, C, H, W), channels-last
        return x + out


class Downsample(nn.Module):
    """Strided 3×3 convolution (used when ``resblock_updown`` is off)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb_act: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 upsampling followed by a 3×3 convolution (used when ``resblock_updown`` is off)."""

    upsample_algorithm = "subpixel"  # see set_upsample_algorithm

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb_act: Tensor | None = None) -> Tensor:
        if self.upsample_algorithm == "subpixel":
            return _upsample_conv3x3(x, self.conv)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbedSequential(nn.ModuleList):
    """Blocks run in order, each called as ``block(h, emb_act)``."""

    def forward(self, h: Tensor, emb_act: Tensor) -> Tensor:
        for block in self:
            h = block(h, emb_act)
        return h


def _embedding_mlp(in_channels: int, emb_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))


UPSAMPLE_ALGORITHMS = ("subpixel", "direct")


def set_upsample_algorithm(model: nn.Module, algorithm: str) -> nn.Module:
    """How the upsampling blocks of ``model`` compute ``conv3x3(nearest_upsample(h))``.

    ``"subpixel"`` (the default) runs it as one 2×2 convolution of the low-res map (:func:`_upsample_conv3x3`,
    4/9 of the FLOPs); ``"direct"`` upsamples first, as ADM's code does. Both compute the same function of the
    same weights, so this is not part of :class:`UNetConfig` and checkpoints are unaffected; ``"direct"``
    exists for A/B measurements and to reproduce the summation order of the direct form.
    """
    if algorithm not in UPSAMPLE_ALGORITHMS:
        raise ValueError(f"upsample algorithm must be one of {UPSAMPLE_ALGORITHMS}, got {algorithm!r}")
    for module in model.modules():
        if isinstance(module, (ResBlock, Upsample)):
            module.upsample_algorithm = algorithm
    return model


# --------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """ADM U-Net for base (``low_res_channels == 0``) and super-resolution stages of the cascade.

    Build on another device without allocating on the CPU first with ``UNet(config, device="meta")`` (or under
    ``with torch.device(...)``). Call as ``model(x, t, y=..., aug_level=..., low_res=...)``; see :meth:`forward`.
    """

    def __init__(self, config: UNetConfig, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(config)

    def _build(self, cfg: UNetConfig) -> None:
        mc, emb_ch = cfg.model_channels, cfg.emb_channels

        def res_block(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(cin, cout, emb_ch, dropout=cfg.dropout, norm_groups=cfg.norm_groups,
                            use_scale_shift_norm=cfg.use_scale_shift_norm, resample=resample)

        def attention(channels: int, resolution: int) -> AttentionBlock:
            heads, _ = cfg.head_layout(channels)
            return AttentionBlock(channels, heads, norm_groups=cfg.norm_groups, resolution=resolution)

        self.time_embed = _embedding_mlp(mc, emb_ch)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_ch) if cfg.num_classes is not None else None
        self.aug_embed = _embedding_mlp(mc, emb_ch) if cfg.use_aug_level else None

        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.low_res_channels, mc, 3, padding=1)

        # Encoder: every stage's output is kept as a skip for the decoder (plus input_conv's output).
        self.encoder = nn.ModuleList()
        skip_channels = [mc]
        ch = mc
        for level, mult in enumerate(cfg.channel_mult):
            resolution = cfg.level_resolutions[level]
            for _ in range(cfg.num_res_blocks):
                stage = EmbedSequential([res_block(ch, mc * mult)])
                ch = mc * mult
                if resolution in cfg.attention_resolutions:
                    stage.append(attention(ch, resolution))
                self.encoder.append(stage)
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                down = res_block(ch, ch, resample="down") if cfg.resblock_updown else Downsample(ch)
                self.encoder.append(EmbedSequential([down]))
                skip_channels.append(ch)

        bottom_resolution = cfg.level_resolutions[-1]
        self.middle = EmbedSequential([res_block(ch, ch), attention(ch, bottom_resolution), res_block(ch, ch)])

        # Decoder: num_res_blocks + 1 stages per level, each consuming one skip; the last one of a level
        # (except the top level) upsamples.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            resolution = cfg.level_resolutions[level]
            for i in range(cfg.num_res_blocks + 1):
                stage = EmbedSequential([res_block(ch + skip_channels.pop(), mc * mult)])
                ch = mc * mult
                if resolution in cfg.attention_resolutions:
                    stage.append(attention(ch, resolution))
                if level != 0 and i == cfg.num_res_blocks:
                    stage.append(res_block(ch, ch, resample="up") if cfg.resblock_updown else Upsample(ch))
                self.decoder.append(stage)
        assert not skip_channels, "encoder and decoder stage counts disagree"

        self.out_norm = nn.GroupNorm(cfg.norm_groups, ch)
        self.out_conv = _zero_init(nn.Conv2d(ch, cfg.output_channels, 3, padding=1))

    # ----------------------------------------------------------------------------------------------------------
    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each stage in backward instead of storing its activations (stored in ``self.config``)."""
        return self.config.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.config.gradient_checkpointing = bool(enabled)

    def _run_stage(self, stage: nn.Module, h: Tensor, emb_act: Tensor) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so dropout masks match on recomputation.
            return checkpoint(stage, h, emb_act, use_reentrant=False)
        return stage(h, emb_act)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        aug_level: Tensor | None = None,
        low_res: Tensor | None = None,
    ) -> Tensor:
        """Raw network output, shape ``(N, config.output_channels, H, W)``.

        Args:
            x: noisy images ``x_t``, ``(N, in_channels, resolution, resolution)``.
            t: timesteps already scaled to ``[0, 1000)``, float ``(N,)`` (a 0-d tensor is broadcast).
            y: class labels, integer ``(N,)``; ``num_classes`` is the null class. Required iff class-conditional.
            aug_level: augmentation level ``s`` scaled like ``t``, ``(N,)`` or 0-d. Required iff ``use_aug_level``.
            low_res: the conditioning image at its low resolution, ``(N, low_res_channels, h, w)`` with
                ``h, w <= resolution``; upsampled here with ``low_res_upsample``. Required iff an SR model.
        """
        t, aug_level = self._check_inputs(x, t, y, aug_level, low_res)
        cfg = self.config
        param_dtype = self.input_conv.weight.dtype

        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(param_dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)
        if self.aug_embed is not None:
            emb = emb + self.aug_embed(timestep_embedding(aug_level, cfg.model_channels).to(param_dtype))
        emb_act = F.silu(emb)  # every block's embedding projection starts with SiLU; compute it once

        if low_res is not None:
            x = torch.cat([x, self.upsample_low_res(low_res.to(x.dtype), x.shape[-2:])], dim=1)

        h = self.input_conv(x)
        skips = [h]
        for stage in self.encoder:
            h = self._run_stage(stage, h, emb_act)
            skips.append(h)
        h = self._run_stage(self.middle, h, emb_act)
        for stage in self.decoder:
            h = self._run_stage(stage, torch.cat([h, skips.pop()], dim=1), emb_act)
        return self.out_conv(_group_norm_silu(h, self.out_norm))

    def upsample_low_res(self, low_res: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
        """The conditioning image at ``size``, as the network sees it (unchanged if it is that size already)."""
        if tuple(low_res.shape[-2:]) == tuple(size):
            return low_res
        mode = self.config.low_res_upsample
        align_corners = None if mode == "nearest" else False
        return F.interpolate(low_res, size=tuple(size), mode=mode, align_corners=align_corners)

    def _check_inputs(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None,
        aug_level: Tensor | None,
        low_res: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Shape/dtype checks only (no value checks, which would force a device→host sync).

        Returns ``t`` and ``aug_level`` broadcast to ``(N,)``.
        """
        cfg = self.config
        expected = (cfg.in_channels, cfg.resolution, cfg.resolution)
        # SR stages train on crops (train.crop): any size up to the resolution that the levels can halve evenly
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if (x.ndim != 4 or x.shape[1] != cfg.in_channels or not 0 < x.shape[2] <= cfg.resolution
                or not 0 < x.shape[3] <= cfg.resolution or x.shape[2] % factor or x.shape[3] % factor):
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}) "
                             f"(N, in_channels, resolution, resolution), or a crop of it whose sides are "
                             f"multiples of {factor}, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        n = x.shape[0]
        t = _check_per_example_scalar("t", t, n)

        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("y was given but the model is unconditional (config.num_classes is None)")
        else:
            if y is None:
                raise ValueError(f"y (class labels, shape (N,), null class = {cfg.num_classes}) is required: "
                                 f"the model is class-conditional")
            if tuple(y.shape) != (n,):
                raise ValueError(f"y must have shape ({n},) to match x, got {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")

        if cfg.use_aug_level:
            if aug_level is None:
                raise ValueError("aug_level (augmentation level s, scaled like t) is required: "
                                 "config.use_aug_level is True")
            aug_level = _check_per_example_scalar("aug_level", aug_level, n)
        elif aug_level is not None:
            raise ValueError("aug_level was given but config.use_aug_level is False")

        if cfg.low_res_channels > 0:
            if low_res is None:
                raise ValueError(f"low_res (N, {cfg.low_res_channels}, h, w) is required: this is a "
                                 f"super-resolution model (config.low_res_channels={cfg.low_res_channels})")
            if low_res.ndim != 4 or low_res.shape[0] != n or low_res.shape[1] != cfg.low_res_channels:
                raise ValueError(f"low_res must have shape ({n}, {cfg.low_res_channels}, h, w), "
                                 f"got {tuple(low_res.shape)}")
            if low_res.shape[2] > x.shape[2] or low_res.shape[3] > x.shape[3]:
                raise ValueError(f"low_res spatial size {tuple(low_res.shape[2:])} exceeds the model resolution "
                                 f"{cfg.resolution}; pass the image at its low resolution")
        elif low_res is not None:
            raise ValueError("low_res was given but the model is a base model (config.low_res_channels == 0)")
        return t, aug_level


def _check_per_example_scalar(name: str, value: Tensor, batch: int) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({batch},), got {type(value).__name__}")
    if value.ndim == 0:
        return value.expand(batch)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one value per example) or be 0-d, "
                         f"got {tuple(value.shape)}")
    return value
