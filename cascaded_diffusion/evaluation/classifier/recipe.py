"""The fixed classifier training recipe: data order, augmentation, optimizer, schedule, and the eval loop.

The same recipe (:class:`ClassifierRecipe` defaults) trains the shipped Fashion-MNIST feature network and,
on generated images only, the Classification Accuracy Score classifier (``cas.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...hardware import bf16_autocast, choose_precision
from .model import (
    ClassifierConfig,
    ResNetClassifier,
    check_images_uint8_nhwc,
    classifier_outputs,
    pixels_to_model_input,
    uint8_batch_to_pixels,
)


def random_crop_and_flip(
    pixels: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True
) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels (zero = black padding) and, with ``flip``, random
    horizontal flips."""
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
    if not flip:
        return pixels
    flips = (torch.rand(n, generator=generator) < 0.5).to(pixels.device)
    return torch.where(flips[:, None, None, None], pixels.flip(3), pixels)


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


def _learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup, then linear decay to zero: robust for short, fixed-length schedules."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass(frozen=True)
class ClassifierRecipe:
    """The classifier training recipe, validated on construction (``ValueError`` naming the bad field): SGD with
    Nesterov momentum, linear warmup (``warmup_fraction`` of the steps) then linear decay to 0, label
    smoothing, weight decay on conv/linear weights, random translation (``crop_padding`` pixels) and horizontal
    flips (unless ``flip=False``: data whose mirror image is another thing, such as flags and text), bf16
    autocast where the hardware does bf16 natively (``bf16=None``, :func:`~cascaded_diffusion.hardware.
    choose_precision`; True/False force it). ``steps`` overrides ``epochs``; ``log_every`` steps make one
    entry of :attr:`TrainingHistory.losses`."""

    epochs: int = 5
    steps: int | None = None
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.05
    seed: int = 0
    augment: bool = True
    crop_padding: int = 2
    flip: bool = True
    bf16: bool | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"batch norm needs at least 2 images per batch: got batch_size={self.batch_size}")
        if self.steps is not None and self.steps < 1 or self.steps is None and self.epochs < 1:
            raise ValueError(f"nothing to train: steps={self.steps}, epochs={self.epochs}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_fraction", "crop_padding"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"ClassifierRecipe.{name} must be a finite number >= 0, got {value!r}")
        if self.log_every < 1:
            raise ValueError(f"ClassifierRecipe.log_every must be >= 1, got {self.log_every}")


def _optimizer(model: ResNetClassifier, recipe: ClassifierRecipe, total_steps: int):
    """SGD (Nesterov) with weight decay on conv/linear weights only (on BN scales/shifts and biases it only
    hurts), and its warmup-then-decay schedule."""
    decay, no_decay = [], []
    for _, parameter in model.named_parameters():
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    warmup_steps = max(1, int(recipe.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(step, total_steps, warmup_steps)
    )
    return optimizer, scheduler


class _Run:
    """The state of one :func:`train_classifier` call: the model, its optimizer, the data order's generator,
    the step count and the loss window."""

    def __init__(self, images: np.ndarray, targets: torch.Tensor, config: ClassifierConfig, recipe: ClassifierRecipe,
                 device: torch.device, bf16: bool, total_steps: int, history: TrainingHistory, bar):
        self.images, self.targets, self.config, self.recipe = images, targets, config, recipe
        self.device, self.bf16, self.total_steps, self.history, self.bar = device, bf16, total_steps, history, bar
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = ResNetClassifier(config)
        self.model = model.to(device=device, memory_format=torch.channels_last)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.optimizer, self.scheduler = _optimizer(self.model, recipe, total_steps)
        self.step = 0
        self.window_loss, self.window_count = 0.0, 0

    def train_step(self, index: np.ndarray) -> tuple[float, int]:
        """One optimizer step on the images ``index``; returns (its loss, correct predictions)."""
        recipe, config = self.recipe, self.config
        pixels = uint8_batch_to_pixels(self.images[index], config.resolution, config.in_channels, self.device)
        if recipe.augment:
            pixels = random_crop_and_flip(pixels, recipe.crop_padding, self.generator, recipe.flip)
        x = pixels_to_model_input(pixels).contiguous(memory_format=torch.channels_last)
        y = self.targets[index].to(self.device)
        with bf16_autocast(self.device, self.bf16):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise RuntimeError(f"classifier training diverged at step {self.step} (loss {loss_value}); lower lr")
        self.window_loss += loss_value
        self.window_count += 1
        if self.window_count == recipe.log_every:
            self.history.losses.append(self.window_loss / self.window_count)
            self.window_loss, self.window_count = 0.0, 0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        return loss_value, int((logits.argmax(dim=1) == y).sum())

    def epoch(self, batch_size: int, steps_per_epoch: int) -> dict[str, float]:
        """One pass over a fresh random order (the ragged last batch dropped), or what is left of the steps."""
        order = torch.randperm(len(self.images), generator=self.generator).numpy()
        loss_sum, correct, seen = 0.0, 0, 0
        for batch_start in range(0, steps_per_epoch * batch_size, batch_size):
            if self.step >= self.total_steps:
                break
            index = np.sort(order[batch_start : batch_start + batch_size])  # sorted: faster gather
            loss_value, right = self.train_step(index)
            loss_sum += loss_value * len(index)
            correct += right
            seen += len(index)
        return {"step": float(self.step), "train_loss": loss_sum / max(1, seen), "train_top1": correct / max(1, seen)}


def train_classifier(
    images_uint8_nhwc: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    recipe: ClassifierRecipe | None = None,
    *,
    config: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
) -> tuple[ResNetClassifier, TrainingHistory]:
    """Train a :class:`ResNetClassifier` with ``recipe`` (default :class:`ClassifierRecipe`); return it (eval
    mode) and its history. When ``eval_images``/``eval_labels`` are given they are scored after every epoch
    (reporting only: nothing is selected on them).

    ``config`` defaults to ``ClassifierConfig(num_classes, channels of the images, resolution 32)``.
    """
    recipe = recipe if recipe is not None else ClassifierRecipe()
    images = check_images_uint8_nhwc(images_uint8_nhwc)
    targets = _check_labels(labels, images.shape[0], num_classes)
    if (eval_images is None) != (eval_labels is None):
        raise ValueError("eval_images and eval_labels must be given together")
    if config is None:
        config = ClassifierConfig(num_classes=num_classes, in_channels=images.shape[-1])
    elif config.num_classes != num_classes:
        raise ValueError(f"config.num_classes={config.num_classes} but num_classes={num_classes}")
    if images.shape[0] < 2:
        raise ValueError(
            f"batch norm needs at least 2 images per batch: got batch_size={recipe.batch_size} and "
            f"{images.shape[0]} images"
        )
    device = torch.device(device)
    # the history records the precision actually used
    bf16 = choose_precision("auto", device).bf16 if recipe.bf16 is None else recipe.bf16
    num_images = images.shape[0]
    batch_size = min(recipe.batch_size, num_images)
    steps_per_epoch = num_images // batch_size  # the ragged last batch is dropped (BN statistics)
    total_steps = recipe.steps if recipe.steps is not None else recipe.epochs * steps_per_epoch
    r = recipe
    history = TrainingHistory(
        recipe=dict(
            epochs=r.epochs, steps=total_steps, batch_size=batch_size, lr=r.lr, momentum=r.momentum,
            weight_decay=r.weight_decay, label_smoothing=r.label_smoothing, warmup_fraction=r.warmup_fraction,
            seed=r.seed, augment=r.augment, crop_padding=r.crop_padding, flip=r.flip, bf16=bf16,
            num_train=num_images, config=config.to_dict(),
        )
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="classifier", mininterval=5.0)
    run = _Run(images, targets, config, recipe, device, bf16, total_steps, history, bar)
    start_time = time.time()
    run.model.train()
    while run.step < total_steps:
        summary = {"epoch": float(len(history.epochs) + 1), **run.epoch(batch_size, steps_per_epoch)}
        if eval_images is not None:
            scores = evaluate_classifier(run.model, eval_images, eval_labels, device=device)
            summary.update(eval_top1=scores["top1"], eval_top5=scores["top5"])
            run.model.train()
        summary["elapsed_s"] = time.time() - start_time
        history.epochs.append(summary)
        if bar is not None:
            bar.write(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    if run.window_count:
        history.losses.append(run.window_loss / run.window_count)
    if bar is not None:
        bar.close()
    history.steps = run.step
    history.wall_s = time.time() - start_time
    run.model.eval()
    return run.model, history


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
