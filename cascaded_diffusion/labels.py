"""Which classes a sampling run draws: every class equally often (:func:`balanced_labels`, what ``cdm sample`` and
``Cascade.generate`` do), in a data set's proportions (:func:`proportional_labels`), and the samples a grid shows
(:func:`grid_indices`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import naming

__all__ = ["balanced_labels", "proportional_labels", "grid_indices"]


def balanced_labels(num: int, num_classes: int, class_labels: Sequence[int] | None = None) -> torch.Tensor:
    """``num`` labels: the given classes cycled, or all classes equally often, sorted by class."""
    if class_labels:
        for c in class_labels:
            if not 0 <= c < num_classes:
                raise naming(ValueError, "{option} {c} is outside [0, {num_classes})", {"option": "class_labels"}, c=c,
                             num_classes=num_classes)
        pool = torch.tensor(list(class_labels), dtype=torch.long)
    else:
        pool = torch.arange(num_classes, dtype=torch.long)
    labels = pool.repeat((num + len(pool) - 1) // len(pool))[:num]
    return labels.sort(stable=True).values


def proportional_labels(num: int, class_counts: Sequence[int]) -> torch.Tensor:
    """``num`` labels in the proportions of ``class_counts`` (e.g. a data set's images per class), sorted.

    Largest-remainder rounding, ties to the lower class: deterministic, and each class gets its count's share
    to within one sample. FID/KID against an imbalanced data set need samples in the data's proportions, or the
    class mix alone adds distance.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class_counts must be non-negative with a positive sum, got {list(class_counts)}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    exact = num * counts / counts.sum()
    whole = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - whole), kind="stable")
    whole[remainder_order[: num - int(whole.sum())]] += 1
    return torch.from_numpy(np.repeat(np.arange(counts.size), whole)).long()


def grid_indices(labels: np.ndarray, per_class: int = 8, max_classes: int = 10) -> np.ndarray:
    """The sample indices :func:`grid_by_class` shows (sorted): ``grid_by_class`` of just these samples is the
    grid of all of them, so a long sampling job keeps only these in memory for its grid."""
    labels = np.asarray(labels)
    classes = [c for c in np.unique(labels)][:max_classes]
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes]))
