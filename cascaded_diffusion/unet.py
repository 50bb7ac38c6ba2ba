"""The ADM-family U-Net (Dhariwal & Nichol 2021) used by every stage of the cascade.

Architecture: BigGAN-style residual blocks (optionally resampling inside the block), adaptive group norm
(scale-shift from the embedding), multi-head self-attention at chosen feature-map resolutions, and
conditioning on the timestep, the class label, the augmentation level ``s`` of super-resolution stages and a
low-resolution image that is upsampled and concatenated with ``x_t``.

Conventions (see ``docs/architecture.md``): images are NCHW in [-1, 1]; ``t`` and ``aug_level`` arrive already
scaled to ``[0, 1000)`` by ``GaussianDiffusion.scale_timesteps``; class ``num_classes`` is the null class; with
``learn_sigma`` the output has ``2 * out_channels`` channels (prediction first, variance interpolation second).

How the blocks compute (memory formats, sub-pixel upsampling, norms, attention) is described in
:mod:`cascaded_diffusion.unet_layers`; the measurements are in docs/performance.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .unet_config import LOW_RES_UPSAMPLE_MODES, ModelOptions, UNetConfig
from .unet_layers import (
    _attention,
    _group_norm,
    _group_norm_silu,
    _scale_shift,
    _upsample_conv3x3,
    _zero_init,
    count_parameters,
    timestep_embedding,
)

__all__ = ["LOW_RES_UPSAMPLE_MODES", "ModelOptions", "UNetConfig", "UNet", "UPSAMPLE_ALGORITHMS", "set_upsample_algorithm",
           "ResBlock", "AttentionBlock", "timestep_embedding", "count_parameters"]


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
        middle_attention = [attention(ch, bottom_resolution)] if cfg.middle_attention else []
        self.middle = EmbedSequential([res_block(ch, ch), *middle_attention, res_block(ch, ch)])

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
