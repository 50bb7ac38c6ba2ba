"""Does a model copy its training images? Nearest-training-neighbour distances of samples, beside those of held-out
real images.

On a small data set (the emoji: 1607 training images) a model can score a good FID/KID against its training
split by reproducing it. The check here is in pixel space: for every sample, the RMS pixel distance (0-255 scale)
to the nearest training image; held-out real images of the same distribution give the reference distances a
non-copying model should match. A copying model has many samples far closer to a training image than any held-out
image is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .classifier import check_images_uint8_nhwc
from .metrics import squared_distances


def nearest_training_neighbours(
    images_uint8_nhwc: np.ndarray, train_uint8_nhwc: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """``(rms_distance, index)`` of each image's nearest training image (Euclidean in pixels, RMS per value)."""
    images = check_images_uint8_nhwc(images_uint8_nhwc, "images")
    train = check_images_uint8_nhwc(train_uint8_nhwc, "training images")
    if images.shape[1:] != train.shape[1:]:
        raise ValueError(f"images {images.shape[1:]} and training images {train.shape[1:]} differ in shape")
    values = int(np.prod(train.shape[1:]))
    # float64 for the squared-norm expansion: float32 loses the small distances of near-copies to cancellation
    reference = train.reshape(len(train), values).astype(np.float64)
    reference_sq = np.einsum("ij,ij->i", reference, reference)
    distances = np.empty(len(images), dtype=np.float64)
    indices = np.empty(len(images), dtype=np.int64)
    for start in range(0, len(images), batch_size):
        block = images[start : start + batch_size].reshape(-1, values).astype(np.float64)
        squared = squared_distances(block, reference, reference_sq)  # clipped at 0, as precision/recall's
        nearest = squared.argmin(axis=1)
        indices[start : start + len(block)] = nearest
        distances[start : start + len(block)] = np.sqrt(squared[np.arange(len(block)), nearest] / values)
    return distances, indices


def memorisation_report(
    samples_uint8_nhwc: np.ndarray, train_uint8_nhwc: np.ndarray, held_out_uint8_nhwc: np.ndarray
) -> dict[str, Any]:
    """Nearest-training-neighbour distances of samples against those of held-out real images.

    ``closer_than_any_held_out``: the fraction of samples nearer to a training image than the nearest of all
    held-out images is (about 0 for a model that does not copy; 1 for one that replays its data).
    ``below_held_out_p5``: the fraction below the held-out distances' 5th percentile (5 % expected by chance).
    """
    samples, _ = nearest_training_neighbours(samples_uint8_nhwc, train_uint8_nhwc)
    held_out, _ = nearest_training_neighbours(held_out_uint8_nhwc, train_uint8_nhwc)
    p5 = float(np.percentile(held_out, 5))
    return {
        "samples_median": float(np.median(samples)),
        "held_out_median": float(np.median(held_out)),
        "median_ratio": float(np.median(samples) / max(np.median(held_out), 1e-12)),
        "held_out_min": float(held_out.min()),
        "held_out_p5": p5,
        "closer_than_any_held_out": float(np.mean(samples < held_out.min())),
        "below_held_out_p5": float(np.mean(samples < p5)),
        "num_samples": int(len(samples)),
        "num_held_out": int(len(held_out)),
        "num_train": int(len(train_uint8_nhwc)),
        "distance": "RMS pixel distance (0-255) to the nearest training image",
    }
