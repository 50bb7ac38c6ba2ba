"""The post-training sweep of the conditioning-augmentation level s (PAPER.md).

For each s, the SR stages are run on (a) the base stage's own samples — generated once and reused for
every s in the non-truncated mode — and (b) ground-truth low-resolution images, and FID is measured for
both. The paper's signature: with ground-truth inputs FID worsens monotonically in s; with generated inputs
it is U-shaped, and the best s is mid-range.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..augment import downsample
from ..cascade import Cascade, sample_in_batches
from ..labels import balanced_labels
from ..data import load_images
from ..distributed import distributed_context, over_ranks
from ..images import images_to_tensor, tensor_to_images
from ..rng import PerSampleGenerator
from .evaluate import evaluate_images
from .features import FeatureExtractor
from .stats import FeatureStats


def _final_images(cascade: Cascade, labels: torch.Tensor, level: int, *, seed: int, batch_size: int,
                  sampling: dict, low: np.ndarray | None = None, truncated: bool = False) -> np.ndarray:
    """Final-stage images with the first SR stage at ``level``: from the given clean low-resolution
    images ``low`` (SR stages only), or through the whole cascade (``truncated`` or not); split over the ranks
    inside ``distributed_from_env``."""
    levels = [level] + cascade.default_aug_levels()[1:]

    def compute(positions: np.ndarray) -> list[np.ndarray]:
        stages, _ = sample_in_batches(cascade, labels[torch.from_numpy(positions)], batch_size=batch_size, seed=seed,
                                      indices=positions.tolist(), low_res=None if low is None else low[positions],
                                      start_stage=0 if low is None else 1, aug_levels=levels, truncated=truncated,
                                      **sampling)
        return stages[-1:]

    return over_ranks(len(labels), compute)[0]


def _base_images(cascade: Cascade, labels: torch.Tensor, *, seed: int, batch_size: int, sampling: dict) -> np.ndarray:
    """The base stage's samples (first values of the per-stage ``sampling`` options), split over the ranks
    inside ``distributed_from_env``."""
    base_kw = {k: (v[0] if isinstance(v, (list, tuple)) else v) for k, v in sampling.items()
               if k in ("steps", "sampler", "guidance", "eta")}
    device = cascade.stages[0].device

    def compute(positions: np.ndarray) -> list[np.ndarray]:
        chunks = []
        for lo in range(0, len(positions), batch_size):
            idx = positions[lo : lo + batch_size]
            gen = PerSampleGenerator(seed, idx.tolist(), device)
            x = cascade.stages[0].sample(labels[torch.from_numpy(idx)], generator=gen, **base_kw)
            chunks.append(tensor_to_images(x.clamp(-1, 1)))
        return [np.concatenate(chunks)]

    return over_ranks(len(labels), compute)[0]


def _ground_truth_inputs(cascade: Cascade, ground_truth: str, num: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Up to ``num`` real images of ``ground_truth`` (a random, sorted pick seeded by ``seed``) brought down to the
    first SR stage's input size the way training does, with their labels."""
    sr = cascade.stages[1]
    data = load_images(ground_truth, cascade.stages[-1].resolution, channels=sr.channels)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(data.images), size=min(num, len(data.images)), replace=False)
    pick.sort()
    real = images_to_tensor(np.asarray(data.images[pick]))
    return tensor_to_images(downsample(real, sr.low_res)), torch.from_numpy(np.asarray(data.labels[pick], dtype=np.int64))


def augmentation_sweep(
    cascade: Cascade,
    levels: Sequence[int],
    *,
    num: int,
    reference: FeatureStats,
    extractor: FeatureExtractor,
    ground_truth: str | None,
    truncated: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    metrics: Sequence[str] = ("fid",),
    sampling: dict | None = None,
    log=print,
    labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """FID per level s for generated (and, with ``ground_truth``, real) low-resolution inputs.

    ``labels``: the classes of the generated samples (``num`` of them; default every class equally often).

    Inside ``distributed_from_env`` every rank calls this alike: the sampling and the feature extraction are
    split over the ranks (each sample depends on its seed and index only, so the images are those of one
    process), every rank returns the result and only rank 0 logs."""
    if distributed_context()[0] != 0:
        log = lambda *a, **k: None  # noqa: E731
    if len(cascade.stages) < 2:
        raise ValueError("the sweep needs a base stage and at least one SR stage")
    sr = cascade.stages[1]
    if any(s > 0 for s in levels) and not sr.uses_noise_augmentation:
        raise ValueError(
            f"stage 2 was trained with conditioning.augmentation = {sr.config.conditioning.augmentation!r}: "
            "only 0 is a valid level (sweep a noise-augmented SR stage)"
        )
    # per-stage options (steps, sampler, ...) are indexed by absolute stage, so SR-only runs use them as is
    sampling = dict(sampling or {})
    if labels is None:
        labels = balanced_labels(num, cascade.num_classes)
    elif len(labels) != num:
        raise ValueError(f"labels has {len(labels)} entries, num is {num}")
    result: dict[str, Any] = {
        "levels": list(levels),
        "num_samples": num,
        "truncated": truncated,
        "feature_network": extractor.name,
        "reference": reference.source,
        "stages": [s.source for s in cascade.stages],
        "generated": [],
        "ground_truth": [],
    }
    base_images = None
    if not truncated:
        start = time.time()
        base_images = _base_images(cascade, labels, seed=seed, batch_size=batch_size, sampling=sampling)
        log(f"base samples: {num} in {time.time() - start:.0f} s (reused for every level)")
    real_low, real_labels = _ground_truth_inputs(cascade, ground_truth, num, seed) if ground_truth else (None, None)
    for s in levels:
        start = time.time()
        if truncated:
            images = _final_images(cascade, labels, s, seed=seed, batch_size=batch_size, sampling=sampling,
                                   truncated=True)
        else:
            images = _final_images(cascade, labels, s, seed=seed + 1, batch_size=batch_size, sampling=sampling,
                                   low=base_images)
        scores = evaluate_images(images, reference, extractor, metrics, source=f"generated low-res, s={s}")
        result["generated"].append({"level": s, **_compact(scores)})
        line = f"s={s:5d}  generated-input FID {scores['fid']:.3f}"
        if real_low is not None:
            images = _final_images(cascade, real_labels, s, seed=seed + 2, batch_size=batch_size,
                                   sampling=sampling, low=real_low)
            scores = evaluate_images(images, reference, extractor, metrics, source=f"ground-truth low-res, s={s}")
            result["ground_truth"].append({"level": s, **_compact(scores)})
            line += f"  ground-truth-input FID {scores['fid']:.3f}"
        log(f"{line}  ({time.time() - start:.0f} s)")
    best = min(result["generated"], key=lambda r: r["fid"])
    result["best_level"] = best["level"]
    result["best_fid"] = best["fid"]
    return result


def _compact(scores: dict) -> dict:
    keep = {"fid", "kid", "precision", "recall", "is"}
    return {k: v for k, v in scores.items() if k in keep}


def plot_sweep(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    gen = result["generated"]
    ax.plot([r["level"] for r in gen], [r["fid"] for r in gen], "o-", label="generated low-res inputs")
    if result.get("ground_truth"):
        gt = result["ground_truth"]
        ax.plot([r["level"] for r in gt], [r["fid"] for r in gt], "s--", label="ground-truth low-res inputs")
    ax.axvline(result["best_level"], color="grey", lw=0.8, ls=":")
    mode = "truncated" if result["truncated"] else "non-truncated"
    ax.set_xlabel("conditioning augmentation level s")
    ax.set_ylabel(f"FID ({result['feature_network']})")
    ax.set_title(f"augmentation sweep ({mode}, n={result['num_samples']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
