"""Feature networks behind the metrics: a common protocol, two implementations, and stats computation.

Feature-network specs (:func:`get_feature_extractor`):

* ``"inception"`` / ``"inception:WEIGHTS_PATH"``: the TF-FID Inception-v3 port, 2048-d pool3 features,
  1008-way softmax for IS. Only numbers from this network are comparable with published FIDs.
* ``"classifier"`` / ``"classifier:PATH"``: our small Fashion-MNIST ResNet (``classifier/``),
  penultimate features. Numbers from it must be labelled "classifier features (NAME)" and are only
  comparable with other numbers from the *same* classifier: its ``name`` embeds a hash of the config and
  weights (``classifier/files.py``) so statistics from a different classifier can never be mixed in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from scipy.special import softmax

from .classifier import (
    DEFAULT_CLASSIFIER_PATH,
    check_images_uint8_nhwc,
    classifier_outputs,
    classifier_paths,
    feature_network_name,
    load_classifier,
)
from .inception import INCEPTION_FEATURE_DIM, load_inception
from .stats import FeatureStats


@runtime_checkable
class FeatureExtractor(Protocol):
    """A feature network: uint8 NHWC image batches in, float64 feature / probability matrices out."""

    name: str  # identifier recorded in FeatureStats.network; equal names mean comparable features
    label: str  # human-readable description for reports and plots
    dim: int

    def features(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """(N, dim) float64 features."""
        ...

    def probs(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """(N, num_classes) float64 softmax probabilities (for the Inception Score)."""
        ...

    def features_and_probs(self, images_uint8_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both of the above from a single forward pass."""
        ...


class InceptionFeatureExtractor:
    """TF-FID Inception-v3 (see ``inception.py``): pool3 features and 1008-way softmax."""

    name = "inception"
    label = "TF-FID Inception-v3 pool3 features"
    dim = INCEPTION_FEATURE_DIM

    def __init__(
        self, weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", download: bool = True
    ) -> None:
        self.device = torch.device(device)
        self.model = load_inception(weights_path, device=self.device, download=download)

    @torch.no_grad()
    def features_and_probs(self, images_uint8_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = check_images_uint8_nhwc(images_uint8_nhwc)
        batch = torch.from_numpy(np.array(images, copy=True)).to(self.device).permute(0, 3, 1, 2)
        features, logits = self.model(batch)
        logits64 = logits.double().cpu().numpy()
        return features.double().cpu().numpy(), softmax(logits64, axis=1)

    def features(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        return self.features_and_probs(images_uint8_nhwc)[0]

    def probs(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        return self.features_and_probs(images_uint8_nhwc)[1]


class ClassifierFeatureExtractor:
    """Penultimate features and softmax of a classifier saved by ``classifier.save_classifier``."""

    def __init__(self, path: str | os.PathLike = DEFAULT_CLASSIFIER_PATH, device: str | torch.device = "cpu") -> None:
        self.path = classifier_paths(path)[0]
        self.device = torch.device(device)
        self.model, self.metadata = load_classifier(self.path, device=self.device)
        self.name = feature_network_name(self.path)
        self.label = f"classifier features ({self.path.name})"
        self.dim = self.model.config.feature_dim

    def features_and_probs(self, images_uint8_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = classifier_outputs(self.model, images_uint8_nhwc, device=self.device)
        return features.astype(np.float64), softmax(logits.astype(np.float64), axis=1)

    def features(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        return self.features_and_probs(images_uint8_nhwc)[0]

    def probs(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        return self.features_and_probs(images_uint8_nhwc)[1]


def _classifier_location(argument: str) -> str | os.PathLike:
    if not argument:
        return DEFAULT_CLASSIFIER_PATH
    from ..pretrained import available_pretrained, pretrained_file

    if argument in available_pretrained() and not any(p.exists() for p in classifier_paths(argument)):
        return pretrained_file(argument, "classifier.safetensors")
    return argument


def get_feature_extractor(spec: str, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build a feature extractor from a spec: ``inception[:WEIGHTS]`` or ``classifier[:PATH]``.

    Bare ``classifier`` means the shipped Fashion-MNIST classifier; ``classifier:NAME`` with the name of a
    bundled cascade (``emoji``) that bundle's classifier, unless a file of that name exists.
    """
    kind, _, argument = spec.partition(":")
    if kind == "inception":
        return InceptionFeatureExtractor(argument or None, device=device)
    if kind == "classifier":
        return ClassifierFeatureExtractor(_classifier_location(argument), device=device)
    raise ValueError(
        f"unknown feature network spec {spec!r}; expected 'inception', 'inception:WEIGHTS_PATH', "
        "'classifier' or 'classifier:PATH'"
    )


def _batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(images, np.ndarray):
        check_images_uint8_nhwc(images)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
    else:
        for batch in images:
            yield check_images_uint8_nhwc(batch, "image batch")


def extract(
    images_uint8: np.ndarray | Iterable[np.ndarray],
    extractor: FeatureExtractor,
    batch_size: int = 200,
    with_probs: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run ``extractor`` over an image array (or an iterable of uint8 NHWC batches).

    Returns ``(features (N, dim), probs (N, C) or None)``, both float64. Over many processes:
    :func:`extract_over_ranks`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features, probs = [], []
    for batch in _batches(images_uint8, batch_size):
        if with_probs:
            batch_features, batch_probs = extractor.features_and_probs(batch)
            probs.append(batch_probs)
        else:
            batch_features = extractor.features(batch)
        features.append(batch_features)
    if not features:
        raise ValueError("no images to extract features from")
    return np.concatenate(features), (np.concatenate(probs) if with_probs else None)


def extract_over_ranks(images_uint8: np.ndarray, extractor: FeatureExtractor, batch_size: int = 200,
                       with_probs: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`extract` of an image array, split over the ranks inside ``distributed_from_env``
    (:func:`~cascaded_diffusion.distributed.over_ranks`; every rank gets all the features), else in this process."""
    from ..distributed import over_ranks

    def compute(positions: np.ndarray) -> list[np.ndarray]:
        features, probs = extract(images_uint8[positions], extractor, batch_size, with_probs)
        return [features] + ([probs] if with_probs else [])

    rows = over_ranks(len(images_uint8), compute)
    return rows[0], (rows[1] if with_probs else None)


def compute_stats(
    images_uint8: np.ndarray | Iterable[np.ndarray],
    extractor: FeatureExtractor,
    batch_size: int = 200,
    keep_features: bool = True,
    source: str = "",
) -> FeatureStats:
    """Feature statistics of a set of images (mean, covariance and, by default, the raw features)."""
    features, _ = extract(images_uint8, extractor, batch_size=batch_size)
    return FeatureStats.from_features(features, network=extractor.name, source=source, keep_features=keep_features)
