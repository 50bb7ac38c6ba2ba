"""Classifier files: a weights + description pair, written and read like an exported stage (``checkpoint.py``).

::

    NAME.safetensors   the network's state dict: plain safetensors, nothing in its header
    NAME.json          {"format": "cascaded_diffusion.classifier", "format_version": 2,
                        "config": ClassifierConfig, "fingerprint": sha256 of config + tensors,
                        "metadata": {...facts such as the data and test accuracy...},
                        "feature_network": NAME (only in a converted v1 file, see below)}

As with ``model.safetensors`` + ``stage.json``, tensors come from safetensors and everything else from JSON;
nothing is unpickled. Both files are written atomically, the weights first and the description last. The
description names its weights by fingerprint (a hash of the config and of every tensor's name, dtype, shape
and bytes, independent of how the file is laid out), so a truncated or modified file, or two halves of
different pairs, are refused with an error that says which, never loaded.

The feature-network name recorded in statistics (``FeatureStats.network``) is
``classifier:NAME.safetensors@FINGERPRINT[:12]``. A classifier converted from the v1 format (one safetensors
file with its config in the header, ``legacy.py``) keeps its v1 name in ``feature_network``: same config,
same tensors, so statistics computed with it before the conversion stay comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ...checkpoint import CheckpointError, load_tensors, load_weights_into
from ...fileio import atomic_write_bytes, atomic_write_text
from ...pretrained import PRETRAINED_ROOT
from .model import ClassifierConfig, ResNetClassifier

CLASSIFIER_FORMAT = "cascaded_diffusion.classifier"
CLASSIFIER_FORMAT_VERSION = 2
LEGACY_FORMAT = "cascaded_diffusion.classifier.v1"
DEFAULT_CLASSIFIER_PATH = PRETRAINED_ROOT / "fashion-mnist" / "classifier.safetensors"


def classifier_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` for either file of a pair (``NAME`` alone means the same pair)."""
    path = Path(path)
    if path.suffix == ".json":
        weights = path.with_suffix(".safetensors")
    elif path.suffix == ".safetensors":
        weights = path
    else:
        weights = path.with_name(path.name + ".safetensors")
    return weights, weights.with_suffix(".json")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def classifier_fingerprint(config: ClassifierConfig, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the config and the tensors: what determines the classifier's outputs."""
    canonical = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{canonical}\n{tensors_digest(tensors)}".encode()).hexdigest()


def classifier_file_contents(
    config: ClassifierConfig,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    feature_network: str | None = None,
) -> tuple[bytes, str]:
    """The bytes of ``NAME.safetensors`` and the text of ``NAME.json`` for a config and a state dict."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    info: dict[str, Any] = {
        "format": CLASSIFIER_FORMAT,
        "format_version": CLASSIFIER_FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": classifier_fingerprint(config, tensors),
        "metadata": metadata or {},
    }
    if feature_network is not None:
        info["feature_network"] = feature_network
    return save(tensors), json.dumps(info, indent=2, sort_keys=True) + "\n"


def write_classifier_files(
    path: str | os.PathLike,
    config: ClassifierConfig,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any] | None = None,
    feature_network: str | None = None,
) -> Path:
    """Write a classifier pair from a config and a state dict; returns the weights path.

    Weights first, description last, each atomically (a kill or a full disk leaves any previous file whole;
    a torn pair fails the fingerprint check on load)."""
    weights, description = classifier_paths(path)
    weights_bytes, description_text = classifier_file_contents(config, tensors, metadata, feature_network)
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, weights_bytes)
    atomic_write_text(description, description_text)
    return weights


def save_classifier(
    model: ResNetClassifier, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> Path:
    """Save ``model`` as ``NAME.safetensors`` + ``NAME.json`` (``path`` names either); returns the weights path.

    ``metadata`` should hold JSON-serialisable facts such as the dataset and the test accuracy."""
    return write_classifier_files(path, model.config, model.state_dict(), metadata)


def safetensors_header_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors header (JSON, no tensor is read); ``{}`` if none or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # safetensors raises its own error types for truncated or foreign files
        return {}


def is_legacy_classifier(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a v1 classifier (config in the safetensors header) not yet converted."""
    weights, description = classifier_paths(path)
    if description.is_file():
        try:
            return json.loads(description.read_text()).get("format") == LEGACY_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return weights.is_file() and safetensors_header_metadata(weights).get("format") == LEGACY_FORMAT


def _legacy_error(weights: Path) -> CheckpointError:
    return CheckpointError(
        f"{weights} is a classifier in the old v1 format (its config in the safetensors header); convert it once "
        f"with: python -m cascaded_diffusion.evaluation.classifier.legacy {weights}"
    )


def read_classifier_description(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``NAME.json`` of a classifier pair, with ``config`` as a :class:`ClassifierConfig`.

    Raises FileNotFoundError when there is no classifier at ``path``, CheckpointError when the pair is not a
    readable classifier of a known format (with what to do about it)."""
    weights, description = classifier_paths(path)
    if is_legacy_classifier(weights):
        raise _legacy_error(weights)
    if not description.is_file():
        if not weights.is_file():
            raise FileNotFoundError(f"classifier not found: {weights} (nor {description.name} next to it)")
        raise CheckpointError(
            f"{weights} has no {description.name} next to it: a classifier is a NAME.safetensors + NAME.json "
            "pair written by `cdm classifier train` (save_classifier)"
        )
    try:
        info = json.loads(description.read_text())
    except ValueError as e:
        raise CheckpointError(f"{description} is corrupt: {e}") from None
    if not isinstance(info, dict) or info.get("format") != CLASSIFIER_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(f"{description} does not describe a classifier (format {found!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > CLASSIFIER_FORMAT_VERSION:
        raise CheckpointError(
            f"{description} has format_version {version!r}; this version of cascaded_diffusion reads classifier "
            f"files up to version {CLASSIFIER_FORMAT_VERSION} (upgrade the package)"
        )
    if not isinstance(info.get("fingerprint"), str):
        raise CheckpointError(f"{description} is corrupt: no fingerprint")
    try:
        info["config"] = ClassifierConfig.from_dict(info.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{description} is corrupt: bad config ({e})") from None
    info.setdefault("metadata", {})
    return info


def load_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[ResNetClassifier, dict[str, Any]]:
    """Load a classifier pair written by :func:`save_classifier`; returns ``(model in eval mode, metadata)``."""
    weights, description = classifier_paths(path)
    info = read_classifier_description(weights)
    tensors = load_tensors(weights.parent, weights.stem)
    config = info["config"]
    if classifier_fingerprint(config, tensors) != info["fingerprint"]:
        raise CheckpointError(
            f"{weights} does not match {description.name} (fingerprint differs): one of them was modified, or "
            "they come from different classifiers; save or convert the classifier again"
        )
    model = ResNetClassifier(config)
    load_weights_into(model, tensors, str(weights))
    model.requires_grad_(False)
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    return model, info["metadata"]


def feature_network_name(path: str | os.PathLike) -> str:
    """The name under which statistics computed with this classifier are recorded (see the module docstring)."""
    weights, _ = classifier_paths(path)
    info = read_classifier_description(weights)
    return info.get("feature_network") or f"classifier:{weights.name}@{info['fingerprint'][:12]}"
