"""PyTorch port of the TF-FID Inception-v3 network (``inception-2015-12-05``).

This is the graph used by the original TensorFlow FID/IS code and, through the converted weights file
``pt_inception-2015-12-05-6726825d.pth``, by pytorch-fid and torch-fidelity. Module names match the
keys of that file, so it loads directly (``torch.load(..., weights_only=True)``), as does a
``.safetensors`` conversion of it.

Differences from torchvision's Inception-v3 that the TF graph requires (and we reproduce):

* average-pool branches exclude the zero padding from the average (``count_include_pad=False``);
* the last block (``Mixed_7c``) pools its ``branch_pool`` input with a 3x3 *max* pool, not an average;
* 1008 output classes (1000 ImageNet classes plus 8 unused), no auxiliary head;
* inputs are uint8 values resized to 299x299 and normalised as ``(x - 128) / 128``.

Resizing: we implement TF1's ``tf.image.resize_bilinear`` (``align_corners=False``, no half-pixel
centres: source coordinate = ``dst * in_size / out_size``), as torch-fidelity does. pytorch-fid instead
uses ``F.interpolate(mode="bilinear", align_corners=False)``, which samples at half-pixel centres; its
FIDs differ from TF-FID by a small amount (typically well below 1%, larger at tiny input sizes such as
32x32), so numbers from the two are close but not bit-comparable. We also normalise after resizing,
like the TF graph (both steps are linear, so the order only matters at round-off level).

Finding, downloading and checking the weights file, and reading it: :mod:`.inception_weights`.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# the weights file's names are also imported from here, where they lived before inception_weights.py
from .inception_weights import (  # noqa: F401
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    WeightsFileError,
    WeightsHashError,
    check_cached_weights,
    default_inception_cache_path,
    expected_sha256_prefix,
    file_sha256,
    read_state_dict,
    resolve_inception_weights,
)

INCEPTION_INPUT_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_LOGITS = 1008


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def _tf1_source_indices(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbour indices and interpolation weights of TF1 legacy bilinear resizing along one axis."""
    # float32 arithmetic, like TF's kernel, so floor() lands on the same side near integer positions.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = torch.arange(out_size, device=device, dtype=torch.float32) * scale.to(device)
    lower = source.floor()
    weight = source - lower
    lower_index = lower.long().clamp(max=in_size - 1)
    upper_index = (lower_index + 1).clamp(max=in_size - 1)
    return lower_index, upper_index, weight


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TF1 ``resize_bilinear(align_corners=False)`` semantics.

    Output pixel ``i`` samples the input at ``i * in / out`` (no half-pixel offset), interpolating
    between ``floor`` and ``floor + 1`` clamped to the border. No antialiasing, exactly like TF1.
    """
    if images.ndim != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(images.shape)}")
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images
    y0, y1, wy = _tf1_source_indices(out_h, in_h, images.device)
    x0, x1, wx = _tf1_source_indices(out_w, in_w, images.device)
    wy = wy.to(images.dtype)[:, None]
    wx = wx.to(images.dtype)
    rows = images[:, :, y0, :] * (1 - wy) + images[:, :, y1, :] * wy
    return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx


def preprocess_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map an NCHW batch of uint8-valued pixels (uint8 or float in [0, 255]) to the network input.

    1-channel images are repeated to RGB; the batch is resized to 299x299 (TF1 bilinear) and
    normalised to ``(x - 128) / 128``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(images.shape)}")
    if images.is_floating_point() and images.numel() and images.min() < 0:
        raise ValueError(
            "Inception expects uint8-valued pixels in [0, 255], got negative values; convert library images "
            "in [-1, 1] with ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)"
        )
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ValueError(f"Inception expects 1 or 3 channels (NCHW), got {channels} channels")
    # Contiguous NCHW: a permuted NHWC input would otherwise propagate channels-last strides, which
    # makes the fp32 CPU convolutions several times slower.
    x = images.to(torch.float32).contiguous()
    x = resize_bilinear_tf1(x, (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE))
    return ((x - 128.0) / 128.0).contiguous()


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TF graph), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pooling divides by the number of real (non-padding) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_tf_avg_pool_3x3(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], dim=1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches.

    ``max_pool_branch=True`` reproduces the TF graph's last block (``Mixed_7c``), which max-pools
    before its pool projection where the paper (and ``Mixed_7b``) average-pools.
    """

    def __init__(self, in_channels: int, max_pool_branch: bool) -> None:
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], dim=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], dim=1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool_3x3(x)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], dim=1)


class FIDInceptionV3(nn.Module):
    """TF-FID Inception-v3: uint8-valued NCHW images in, (pool3 features, logits) out.

    ``forward`` accepts any input size and 1 or 3 channels; see :func:`preprocess_uint8`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(INCEPTION_FEATURE_DIM, INCEPTION_NUM_LOGITS)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """2048-d pool3 features of an already preprocessed (N, 3, 299, 299) batch."""
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
            self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,
        ):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features (N, 2048), logits (N, 1008))`` for uint8-valued NCHW images.

        The logits omit the final layer's bias, like the original Inception Score code (which
        multiplies pool3 by the softmax weight matrix only) and torch-fidelity's ``logits_unbiased``.
        """
        features = self.pool3(preprocess_uint8(images))
        logits = features @ self.fc.weight.T
        return features, logits


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_inception_state_dict(model: FIDInceptionV3, state: dict[str, torch.Tensor], origin: str = "state dict") -> None:
    """Load ``state`` into ``model`` strictly, except for BatchNorm's ``num_batches_tracked`` counters.

    Those counters are training bookkeeping that converted weight files may or may not carry.
    """
    expected = model.state_dict()
    counters = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - counters)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{origin} is not a TF-FID Inception-v3 state dict: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{origin}: '{key}' has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    completed = dict(state)
    for key in counters - set(state):
        completed[key] = expected[key]
    model.load_state_dict(completed, strict=True)


def load_inception(
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> FIDInceptionV3:
    """Build the TF-FID Inception-v3 in eval mode with weights from :func:`resolve_inception_weights`."""
    path = resolve_inception_weights(weights_path, download=download)
    model = FIDInceptionV3()
    load_inception_state_dict(model, read_state_dict(path), origin=str(path))
    model.requires_grad_(False)
    return model.eval().to(device)
