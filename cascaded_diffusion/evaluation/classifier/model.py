"""The classifier network: a small ResNet for 32x32 images, its input conversion and its outputs.

The network behind the Fashion-MNIST feature extractor (``features.py``: penultimate features for FID / KID /
PR, softmax for an IS-like score) and the CAS recipe (``cas.py``). Training lives in :mod:`.recipe`, files in
:mod:`.files`.

Images arrive as uint8 NHWC arrays (the library's on-disk format) and are converted per batch to
float [-1, 1] NCHW at the classifier resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`ResNetClassifier`.

    ``widths`` gives one stage per entry; every stage after the first halves the resolution. The
    last feature map is average-pooled to a ``head_pool x head_pool`` grid and projected to
    ``feature_dim`` features. ``stem_stride`` > 1 makes the stem a non-overlapping ``stem_stride``-pixel patch
    embedding: every pixel of a 256x256 image still reaches the features (blur or aliasing at full resolution
    moves them), at the cost of a 64x64 network.
    """

    num_classes: int = 10
    in_channels: int = 1
    resolution: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1
    head_pool: int = 4
    feature_dim: int = 128
    stem_stride: int = 1

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}")
        if self.blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if self.head_pool < 1 or self.feature_dim < 1:
            raise ValueError(f"head_pool and feature_dim must be >= 1, got {self.head_pool} and {self.feature_dim}")
        if self.stem_stride < 1 or self.resolution % self.stem_stride:
            raise ValueError(f"stem_stride must be >= 1 and divide resolution {self.resolution}, got {self.stem_stride}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        """The config as stored (and fingerprinted); ``stem_stride`` only when not 1, so classifiers written
        before it existed keep their descriptions and fingerprints."""
        values = asdict(self)
        if values["stem_stride"] == 1:
            del values["stem_stride"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ClassifierConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**{k: tuple(v) if k == "widths" else v for k, v in values.items()})


class ResidualBlock(nn.Module):
    """Post-activation basic block (two 3x3 convs + BN), projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """Small ResNet: 3x3 stem, ``len(widths)`` residual stages, pooled-grid projection, linear head.

    The head average-pools the last feature map to a small grid (4x4 by default) instead of a single
    global average: keeping coarse layout (sleeves, heels, handles) makes the short CPU schedule
    converge much faster on Fashion-MNIST. The features are the batch-normalised projection *before*
    its ReLU, so no dimension is dead (zero variance), which keeps their covariance well conditioned
    for FID.

    Input: float images in [-1, 1], NCHW, ``config.resolution`` square, ``config.in_channels`` channels.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        if config.stem_stride > 1:
            stem_conv = nn.Conv2d(config.in_channels, config.widths[0], config.stem_stride, stride=config.stem_stride,
                                  bias=False)
        else:
            stem_conv = nn.Conv2d(config.in_channels, config.widths[0], 3, padding=1, bias=False)
        self.stem = nn.Sequential(
            stem_conv,
            nn.BatchNorm2d(config.widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        channels = config.widths[0]
        for stage, width in enumerate(config.widths):
            for index in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(ResidualBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(config.head_pool)
        self.projection = nn.Linear(channels * config.head_pool**2, config.feature_dim, bias=False)
        self.projection_bn = nn.BatchNorm1d(config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (pre-ReLU projection), shape (N, feature_dim)."""
        pooled = self.pool(self.blocks(self.stem(x))).flatten(1)
        return self.projection_bn(self.projection(pooled))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the output of :meth:`features`."""
        return self.head(F.relu(features))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (N, num_classes)."""
        return self.classify_features(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


# ----------------------------------------------------------------------------------------------
# Input conversion and outputs
# ----------------------------------------------------------------------------------------------


def check_images_uint8_nhwc(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validate a uint8 NHWC image array (1 or 3 channels) and return it as a numpy array."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (NHWC, 0..255), got dtype {array.dtype}")
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must have shape (N, H, W, C) with C in (1, 3), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return array


def uint8_batch_to_pixels(
    images_uint8_nhwc: np.ndarray, resolution: int, channels: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 NHWC batch -> float NCHW in [0, 255] at ``resolution``, with ``channels`` channels.

    Grayscale input is repeated to RGB when the network wants 3 channels; RGB input for a grayscale
    network is rejected (silently converting would hide a dataset mix-up). Downsampling uses
    antialiased bilinear filtering so high-resolution samples are not aliased.
    """
    # Copy: the input may be a read-only view (np.frombuffer, np.load mmap), which torch warns about.
    batch = torch.from_numpy(np.array(images_uint8_nhwc, dtype=np.uint8, copy=True)).to(device)
    x = batch.permute(0, 3, 1, 2).to(torch.float32)
    if x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"classifier expects {channels}-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] != (resolution, resolution):
        downsampling = x.shape[-1] > resolution or x.shape[-2] > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=downsampling)
        x = x.clamp(0.0, 255.0)
    return x


def pixels_to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1], the library's image range."""
    return pixels / 127.5 - 1.0


@torch.no_grad()
def classifier_outputs(
    model: ResNetClassifier,
    images_uint8_nhwc: np.ndarray,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, D) and logits (N, num_classes) in float32, eval mode, no autocast (exact features)."""
    images = check_images_uint8_nhwc(images_uint8_nhwc)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    config = model.config
    was_training = model.training
    model.eval()
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        pixels = uint8_batch_to_pixels(images[start : start + batch_size], config.resolution, config.in_channels, device)
        x = pixels_to_model_input(pixels).contiguous(memory_format=torch.channels_last)
        feats = model.features(x)
        features.append(feats.float().cpu())
        logits.append(model.classify_features(feats).float().cpu())
    model.train(was_training)
    return torch.cat(features).numpy(), torch.cat(logits).numpy()
