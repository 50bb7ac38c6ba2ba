"""A small ResNet classifier for 32x32 images: our Fashion-MNIST feature network and the CAS recipe.

The same fixed recipe (:func:`train_classifier` defaults) is used to

* train the shipped Fashion-MNIST feature network (``pretrained/fashion-mnist/classifier.safetensors``)
  whose penultimate features replace Inception features for FID/KID/PR when Inception weights are not
  available, and whose softmax gives an IS-like score; and
* compute the Classification Accuracy Score (``cas.py``), trained on generated images only.

Images arrive as uint8 NHWC arrays (the library's on-disk format) and are converted per batch to
float [-1, 1] NCHW at the classifier resolution.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_FORMAT = "cascaded_diffusion.classifier.v1"
DEFAULT_CLASSIFIER_PATH = (
    Path(__file__).resolve().parent.parent / "pretrained" / "fashion-mnist" / "classifier.safetensors"
)


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of :class:`ResNetClassifier`.

    ``widths`` gives one stage per entry; every stage after the first halves the resolution. The
    last feature map is average-pooled to a ``head_pool x head_pool`` grid and projected to
    ``feature_dim`` features.
    """

    num_classes: int = 10
    in_channels: int = 1
    resolution: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 1
    head_pool: int = 4
    feature_dim: int = 128

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
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

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
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, config.widths[0], 3, padding=1, bias=False),
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
# Input conversion and augmentation
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


def random_crop_and_flip(pixels: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels (zero = black padding) and random horizontal flips."""
    n, _, h, w = pixels.shape
    if padding > 0:
        padded = F.pad(pixels, (padding, padding, padding, padding))
        offsets_y = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        offsets_x = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (offsets_y[:, None] + torch.arange(h)[None, :]).to(pixels.device)
        cols = (offsets_x[:, None] + torch.arange(w)[None, :]).to(pixels.device)
        batch_index = torch.arange(n, device=pixels.device)[:, None, None]
        # Advanced indexing puts the indexed dims first: (N, H, W, C) -> back to NCHW.
        pixels = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(pixels.device)
    return torch.where(flip[:, None, None, None], pixels.flip(3), pixels)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainingHistory:
    """What happened during :func:`train_classifier`.

    ``losses`` holds the mean training loss of every ``log_every`` steps; ``epochs`` one dict per
    epoch (train loss/accuracy, optional eval top-1/top-5, elapsed seconds).
    """

    losses: list[float] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    wall_s: float = 0.0
    recipe: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then linear decay to zero: robust for short, fixed-length schedules."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def train_classifier(
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 5,
    steps: int | None = None,
    batch_size: int = 256,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.1,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: bool = True,
    crop_padding: int = 2,
    bf16: bool = True,
    progress: bool = True,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    config: ClassifierConfig | None = None,
    log_every: int = 50,
) -> tuple[ResNetClassifier, TrainingHistory]:
    """Train a :class:`ResNetClassifier` with the fixed recipe; return it (eval mode) and its history.

    Recipe: SGD with Nesterov momentum, linear warmup then linear decay to 0, label smoothing, weight
    decay, random translation (``crop_padding`` pixels) and horizontal flips, bf16 autocast. ``steps``
    overrides ``epochs``. When ``eval_images``/``eval_labels`` are given they are scored after every
    epoch (reporting only: nothing is selected on them).

    ``config`` defaults to ``ClassifierConfig(num_classes, channels of the images, resolution 32)``.
    """
    images = check_images_uint8_nhwc(images_uint8_nhwc)
    targets = _check_labels(labels, images.shape[0], num_classes)
    if (eval_images is None) != (eval_labels is None):
        raise ValueError("eval_images and eval_labels must be given together")
    if config is None:
        config = ClassifierConfig(num_classes=num_classes, in_channels=images.shape[-1])
    elif config.num_classes != num_classes:
        raise ValueError(f"config.num_classes={config.num_classes} but num_classes={num_classes}")
    if batch_size < 2 or images.shape[0] < 2:
        raise ValueError(
            f"batch norm needs at least 2 images per batch: got batch_size={batch_size} and {images.shape[0]} images"
        )
    device = torch.device(device)

    num_images = images.shape[0]
    batch_size = min(batch_size, num_images)
    steps_per_epoch = num_images // batch_size  # the ragged last batch is dropped (BN statistics)
    total_steps = steps if steps is not None else epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"nothing to train: steps={steps}, epochs={epochs}")
    warmup_steps = max(1, int(warmup_fraction * total_steps))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetClassifier(config)
    model = model.to(device=device, memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        # Weight decay on BN scales/shifts and biases only hurts; decay conv/linear weights.
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, total_steps, warmup_steps)
    )

    history = TrainingHistory(
        recipe=dict(
            epochs=epochs, steps=total_steps, batch_size=batch_size, lr=lr, momentum=momentum,
            weight_decay=weight_decay, label_smoothing=label_smoothing, warmup_fraction=warmup_fraction,
            seed=seed, augment=augment, crop_padding=crop_padding, bf16=bf16, num_train=num_images,
            config=asdict(config),
        )
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="classifier", mininterval=5.0)

    start_time = time.time()
    step = 0
    epoch = 0
    window_loss = 0.0
    window_count = 0
    model.train()
    while step < total_steps:
        order = torch.randperm(num_images, generator=generator).numpy()
        epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
        for batch_start in range(0, steps_per_epoch * batch_size, batch_size):
            if step >= total_steps:
                break
            index = np.sort(order[batch_start : batch_start + batch_size])  # sorted: faster gather
            pixels = uint8_batch_to_pixels(images[index], config.resolution, config.in_channels, device)
            if augment:
                pixels = random_crop_and_flip(pixels, crop_padding, generator)
            x = pixels_to_model_input(pixels).contiguous(memory_format=torch.channels_last)
            y = targets[index].to(device)
            with _autocast(device, bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1

            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"classifier training diverged at step {step} (loss {loss_value}); lower lr")
            epoch_loss += loss_value * y.shape[0]
            epoch_correct += int((logits.argmax(dim=1) == y).sum())
            epoch_seen += y.shape[0]
            window_loss += loss_value
            window_count += 1
            if window_count == log_every:
                history.losses.append(window_loss / window_count)
                window_loss, window_count = 0.0, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        epoch += 1
        summary = {
            "epoch": float(epoch),
            "step": float(step),
            "train_loss": epoch_loss / max(1, epoch_seen),
            "train_top1": epoch_correct / max(1, epoch_seen),
        }
        if eval_images is not None:
            scores = evaluate_classifier(model, eval_images, eval_labels, device=device)
            summary.update(eval_top1=scores["top1"], eval_top5=scores["top5"])
            model.train()
        summary["elapsed_s"] = time.time() - start_time
        history.epochs.append(summary)
        if bar is not None:
            bar.write(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    if window_count:
        history.losses.append(window_loss / window_count)
    if bar is not None:
        bar.close()
    history.steps = step
    history.wall_s = time.time() - start_time
    model.eval()
    return model, history


def _check_labels(labels: np.ndarray, num_images: int, num_classes: int) -> torch.Tensor:
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != num_images:
        raise ValueError(f"labels must be a 1-D array with one label per image ({num_images}), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}); found range "
            f"[{array.min()}, {array.max()}]"
        )
    return torch.from_numpy(array.astype(np.int64))


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


def evaluate_classifier(
    model: ResNetClassifier,
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-5 is 1.0 whenever num_classes <= 5)."""
    images = check_images_uint8_nhwc(images_uint8_nhwc)
    targets = _check_labels(labels, images.shape[0], model.config.num_classes).numpy()
    _, logits = classifier_outputs(model, images, batch_size=batch_size, device=device)
    top1 = float(np.mean(logits.argmax(axis=1) == targets))
    k = min(5, logits.shape[1])
    top_k = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    top5 = float(np.mean(np.any(top_k == targets[:, None], axis=1)))
    return {"top1": top1, "top5": top5}


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def metadata_sidecar_path(path: str | os.PathLike) -> Path:
    """``classifier.safetensors`` -> ``classifier.json``."""
    return Path(path).with_suffix(".json")


def save_classifier(
    model: ResNetClassifier, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write weights to ``path`` (safetensors) and config + ``metadata`` to the header and a JSON sidecar.

    ``metadata`` should hold JSON-serialisable facts such as the dataset and test accuracy. Both files
    are written atomically.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "format": CLASSIFIER_FORMAT,
        "config": asdict(model.config),
        "metadata": metadata or {},
    }
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    header = {"format": CLASSIFIER_FORMAT, "info": json.dumps(info)}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_weights = Path(tmp.name)
    save_file(state, str(tmp_weights), metadata=header)
    _publish(tmp_weights, path)

    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(info, tmp, indent=2, sort_keys=True)
        tmp.write("\n")
    _publish(Path(tmp.name), metadata_sidecar_path(path))


def _publish(tmp_path: Path, path: Path) -> None:
    """Move a finished temp file into place with normal permissions (temp files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, path)


def load_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[ResNetClassifier, dict[str, Any]]:
    """Load a classifier written by :func:`save_classifier`; returns ``(model in eval mode, metadata)``.

    The config is read from the safetensors header (the JSON sidecar is informational).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("format") != CLASSIFIER_FORMAT or "info" not in header:
        raise ValueError(f"{path} is not a classifier saved by save_classifier (format {header.get('format')!r})")
    info = json.loads(header["info"])
    config = ClassifierConfig.from_dict(info["config"])
    model = ResNetClassifier(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.requires_grad_(False)
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    return model, info.get("metadata", {})
