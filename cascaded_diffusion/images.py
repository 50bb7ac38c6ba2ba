"""Images as the library holds them and as files hold them: uint8 N x H x W x C arrays (``.npz`` files, PNGs,
``Cascade.generate``) and float N x C x H x W tensors in [-1, 1] (the networks, the samplers), converted by
:func:`images_to_tensor` and :func:`tensor_to_images`; and the grids of samples the commands draw."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .fileio import atomic_write_bytes


def images_to_tensor(
    images: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    flip_mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """uint8 N x H x W x C images -> float32 N x C x H x W tensor in [-1, 1] on ``device``.

    The uint8 data is moved before the float conversion (4x less transfer). ``flip_mask`` (bool, length N)
    mirrors the selected images left-right.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images_to_tensor expects uint8 images, got numpy dtype {images.dtype}")
        if not images.flags.writeable or not images.flags.c_contiguous:
            images = np.array(images)  # memmaps are read-only; torch wants writable memory
        tensor = torch.from_numpy(images)
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"images_to_tensor expects uint8 images, got tensor dtype {images.dtype}")
        tensor = images
    else:
        raise ValueError(f"images_to_tensor expects a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.ndim != 4:
        raise ValueError(f"images_to_tensor expects N x H x W x C images, got shape {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    x = tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip_mask is not None:
        mask = torch.as_tensor(flip_mask, device=x.device)
        if mask.dtype != torch.bool or mask.shape != (x.shape[0],):
            raise ValueError(
                f"flip_mask must be a bool tensor of shape ({x.shape[0]},), got {mask.dtype} {tuple(mask.shape)}"
            )
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """Float N x C x H x W tensor in [-1, 1] -> uint8 N x H x W x C numpy array (rounded, clamped)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            "tensor_to_images expects a float N x C x H x W tensor, got "
            + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        )
    x = x.detach()
    if torch.isnan(x).any():
        raise ValueError("tensor_to_images: the images contain NaN (did sampling or training diverge?)")
    pixels = ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------------


def make_grid(
    images: np.ndarray | torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile images into one uint8 H x W x C array with ``nrow`` images per row.

    Args:
        images: uint8 N x H x W x C (numpy or tensor), or a float N x C x H x W tensor in [-1, 1].
        nrow: images per row (callers put one class per row by passing the samples-per-class count).
        padding: pixels between images and around the border.
        pad_value: gray level of the padding (white by default, visible against black backgrounds).
    """
    if isinstance(images, torch.Tensor):
        images = tensor_to_images(images) if images.is_floating_point() else images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"make_grid expects a non-empty uint8 N x H x W x C array, got {images.dtype} {images.shape}"
        )
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(
            "make_grid needs nrow >= 1, padding >= 0, 0 <= pad_value <= 255; "
            f"got nrow={nrow}, padding={padding}, pad_value={pad_value}"
        )
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_grid(
    images: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    nrow: int,
    padding: int = 2,
    pad_value: int = 255,
) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` (format from the extension, e.g. .png); returns it."""
    from PIL import Image

    grid = make_grid(images, nrow, padding=padding, pad_value=pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    try:
        image.save(buffer, format=Image.registered_extensions().get(path.suffix.lower()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot write an image with extension {path.suffix!r} ({e}); use .png") from None
    atomic_write_bytes(path, buffer.getvalue())  # a full disk or a kill never leaves a half-written grid
    return path


def grid_by_class(
    stage_images: Sequence[np.ndarray],
    labels: np.ndarray,
    per_class: int = 8,
    max_classes: int = 10,
    min_tile: int = 32,
) -> np.ndarray:
    """One row per class; each sample shows every stage side by side (nearest-upsampled to the final
    resolution, and to at least ``min_tile`` pixels so tiny stages stay visible), low resolution to high.
    ``stage_images``: uint8 NHWC arrays, one per stage."""
    final = stage_images[-1].shape[1]
    final *= -(-min_tile // final) if final < min_tile else 1
    shown = [np.repeat(np.repeat(imgs, final // imgs.shape[1], 1), final // imgs.shape[2], 2) for imgs in stage_images]
    classes = [c for c in np.unique(labels)][:max_classes]
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    tiles = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in idx:
            tiles.extend(s[j] for s in shown)
    return make_grid(np.stack(tiles), nrow=per_class * len(shown))
