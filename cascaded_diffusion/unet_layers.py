"""The functions the U-Net's blocks are made of: timestep embedding, group norm in the activation dtype, scale-shift,
attention, and sub-pixel upsampling (``conv3x3(nearest_upsample(h))`` at 4/9 of the FLOPs). What each costs and why
it is written this way is in docs/performance.md; the blocks and the network are in :mod:`cascaded_diffusion.unet`.

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

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
