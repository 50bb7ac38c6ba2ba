"""Scoring sample files against a reference: the Python API behind ``cdm stats`` and ``cdm eval``.

A reference is either a dataset spec (``fashion-mnist``, ``fashion-mnist:test``, ``imagefolder:PATH``,
``npz:PATH``) whose statistics are computed (and cached) at the samples' resolution, or a statistics file
written by ``cdm stats``. Every result states the number of samples, the reference and the feature
network, so a number can never be separated from what it measures.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import naming
from ..fileio import cache_dir, read_samples_npz
from ..distributed import distributed_context
from .features import FeatureExtractor, extract_over_ranks
from .metrics import fid_from_stats, inception_score, kid, precision_recall
from .stats import FeatureStats, NotAStatsFile, check_compatible, check_images_match, warn_if_rank_deficient

METRICS = ("fid", "kid", "is", "pr")


def load_samples(path: str | os.PathLike, num: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``arr_0`` (uint8 N×H×W×C) and optional ``arr_1`` labels from a samples ``.npz``."""
    images, labels = read_samples_npz(path)
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must have 1 or 3 channels (N×H×W×C), got shape {images.shape}")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ValueError(f"{path}: arr_1 has {labels.shape[0]} labels for {images.shape[0]} images")
    if num is not None:
        if num > images.shape[0]:
            raise naming(ValueError, "{path} holds {count} samples, fewer than {option} {num}", {"option": "num"},
                         path=path, count=images.shape[0], num=num)
        images = images[:num]
        labels = labels[:num] if labels is not None else None
    return images, (labels.astype(np.int64) if labels is not None else None)


def default_stats_cache() -> Path:
    return cache_dir("stats")


def reference_stats(
    ref: str,
    extractor: FeatureExtractor,
    *,
    resolution: int | None,
    channels: int | None = None,
    num: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    resize: str = "any",
) -> FeatureStats:
    """Statistics of a reference: a stats ``.npz`` file as is, or a dataset spec computed (split over the ranks
    inside ``distributed_from_env``; rank 0 writes the cache) and cached. ``resize``: how an ``npz:`` reference at
    another resolution is treated (:func:`cascaded_diffusion.data.load_images`)."""
    path = Path(ref)
    precomputed = None
    if ref.endswith(".npz") and path.is_file() and not ref.startswith("npz:"):
        try:
            return FeatureStats.load(path)
        except NotAStatsFile:
            pass  # not a stats file: treat it as an image npz below (a corrupt file is an error, named)
        precomputed = adm_precomputed_stats(path)
        ref = f"npz:{ref}"
    elif ref.startswith("npz:") and Path(ref[4:]).is_file():
        precomputed = adm_precomputed_stats(Path(ref[4:]))
    from ..data import load_images

    data = load_images(ref, resolution or 32, channels=channels, resize=resize if resolution else "any")
    if resolution is None:
        resolution = data.resolution
    images = data.images if num is None else data.images[:num]
    key = json.dumps([ref, resolution, channels, len(images), extractor.name], sort_keys=True)
    cache = Path(cache_dir) if cache_dir else default_stats_cache()
    cached = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
    if cached.is_file():
        try:
            stats = FeatureStats.load(cached)
            stats.resolution, stats.channels = resolution, int(images.shape[-1])
            return _check_precomputed(stats, precomputed, extractor, ref)
        except (ValueError, OSError):
            cached.unlink(missing_ok=True)
    stats = FeatureStats.from_features(
        extract_over_ranks(np.asarray(images), extractor, batch_size=batch_size)[0],
        network=extractor.name,
        source=f"{ref} @ {resolution}px, n={len(images)}",
    )
    stats.resolution, stats.channels = resolution, int(images.shape[-1])
    try:
        if distributed_context()[0] != 0:  # rank 0 writes the cache
            return _check_precomputed(stats, precomputed, extractor, ref)
        cache.mkdir(parents=True, exist_ok=True)
        stats.save(cached)  # atomic
    except OSError as e:  # a cache that cannot be written costs a recomputation next time, not this result
        warnings.warn(f"could not cache the reference statistics at {cached}: {e}", stacklevel=2)
    return _check_precomputed(stats, precomputed, extractor, ref)


# guided-diffusion (ADM) reference batches, e.g. VIRTUAL_imagenet64_labeled.npz: arr_0 (uint8 NHWC images) and
# the Inception pool3 statistics of those images precomputed by ADM's TensorFlow evaluator (mu, sigma; also
# mu_s, sigma_s of its spatial features, unused here)
ADM_FID_TOLERANCE = 0.5


def adm_precomputed_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mu, sigma)`` of a guided-diffusion reference batch (an images ``.npz`` that also holds ``mu`` and
    ``sigma``), else None. A file with ``mu``/``sigma`` but no ``arr_0`` is an error: the features of the
    images are what the samples are compared with."""
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(getattr(data, "files", ()))
            if not {"mu", "sigma"} <= files:
                return None
            if "arr_0" not in files:
                raise ValueError(
                    f"{path} holds precomputed mu/sigma but no arr_0 images; a reference needs the images "
                    "(a guided-diffusion reference batch has both) or a statistics file from `cdm stats`"
                )
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - unreadable: the image loader names the problem
        return None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: precomputed mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


def _check_precomputed(stats: FeatureStats, precomputed, extractor: FeatureExtractor, ref: str) -> FeatureStats:
    """For an ADM reference batch: FID is always computed from the features of its images with our network
    (the same network as the samples'); with Inception features, the batch's precomputed statistics (from
    ADM's TensorFlow Inception) cross-check our port, and a disagreement is a warning."""
    if precomputed is None:
        return stats
    mu, sigma = precomputed
    if extractor.name != "inception" or mu.shape[0] != stats.dim:
        stats.source += (f" (guided-diffusion reference batch; its precomputed {mu.shape[0]}-d Inception mu/sigma "
                         f"are not used with {extractor.name} features)")
        return stats
    theirs = FeatureStats(mu=mu, sigma=sigma, num=stats.num, network=extractor.name, source=f"{ref} mu/sigma")
    distance = fid_from_stats(stats, theirs)
    stats.source += f" (guided-diffusion reference batch; FID {distance:.4f} to its precomputed mu/sigma)"
    if distance > ADM_FID_TOLERANCE:
        warnings.warn(
            f"{ref}: the Inception features of its images are at FID {distance:.3f} from its precomputed mu/sigma "
            f"(more than {ADM_FID_TOLERANCE}): the Inception weights or the resize differ from the ones that "
            "computed them, so FIDs here are not comparable with numbers computed from those statistics",
            stacklevel=3,
        )
    return stats


def evaluate_images(
    images: np.ndarray,
    reference: FeatureStats,
    extractor: FeatureExtractor,
    metrics: Sequence[str] = ("fid",),
    *,
    batch_size: int = 250,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    source: str = "",
) -> dict[str, Any]:
    """Score uint8 NHWC ``images`` against ``reference``; returns a JSON-ready dict. Inside ``distributed_from_env``
    every rank calls this alike and extracts a share of the features (:func:`extract_over_ranks`)."""
    _check_metrics(metrics)
    check_images_match(np.shape(images), reference, f"the samples {source}".rstrip())
    features, probs = extract_over_ranks(np.asarray(images), extractor, batch_size=batch_size,
                                         with_probs="is" in metrics)
    return evaluate_features(features, probs, reference, extractor.name, metrics, kid_subsets=kid_subsets,
                             kid_subset_size=kid_subset_size, pr_k=pr_k, source=source)


def _check_metrics(metrics: Sequence[str]) -> None:
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} (valid: {', '.join(METRICS)})")


def evaluate_features(
    features: np.ndarray,
    probs: np.ndarray | None,
    reference: FeatureStats,
    network: str,
    metrics: Sequence[str] = ("fid",),
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    source: str = "",
) -> dict[str, Any]:
    """:func:`evaluate_images` on features already extracted by the network named ``network`` (and its softmax
    ``probs`` when ``"is"`` is asked for): one extraction scored against several references."""
    _check_metrics(metrics)
    if "is" in metrics and probs is None:
        raise ValueError("the Inception Score needs the network's softmax: pass probs")
    stats = FeatureStats.from_features(features, network=network, source=source, keep_features=False)
    check_compatible(stats, reference)
    result: dict[str, Any] = {
        "num_samples": int(len(features)),
        "samples": source,
        "reference": {"source": reference.source, "num": reference.num},
        "feature_network": network,
        "feature_dim": stats.dim,
    }
    if "fid" in metrics:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_rank_deficient(stats.num, stats.dim, "samples")
            warn_if_rank_deficient(reference.num, reference.dim, "reference")
        for w in caught:
            warnings.warn(str(w.message), stacklevel=2)
        result["fid"] = fid_from_stats(stats, reference)
        if caught:
            result["fid_warning"] = "; ".join(str(w.message) for w in caught)
    if "kid" in metrics or "pr" in metrics:
        if reference.features is None:
            raise naming(ValueError, "KID and precision/recall need the reference's raw features; recompute the "
                         "reference with `cdm stats` (it keeps them) or pass a dataset spec as {option}",
                         {"option": "reference"})
    if "kid" in metrics:
        mean, std = kid(features, reference.features, num_subsets=kid_subsets, subset_size=kid_subset_size)
        result["kid"] = {"mean": mean, "std": std}
    if "pr" in metrics:
        pr = precision_recall(reference.features, features, k=pr_k)
        result["precision"], result["recall"] = pr.precision, pr.recall
    if "is" in metrics:
        mean, std = inception_score(probs, splits=10)
        result["is"] = {"mean": mean, "std": std, "splits": 10}
    return result
