"""Convert a v1 classifier file to the current pair (``files.py``), once: ``python -m`` this module ``PATH...``.

A v1 classifier was one safetensors file whose header held the format, the config and the metadata as JSON
strings (a JSON sidecar next to it was informational). The conversion keeps the tensors exactly (checked by
their digest), moves config and metadata into ``NAME.json``, and records the v1 feature-network name
(``classifier:NAME.safetensors@SHA256(file)[:12]``) so statistics computed before the conversion stay
comparable. It runs in place and may be repeated: the description is written first and the weights last,
and until the weights are rewritten the v1 header is still there to convert from. Loading a v1 file without
converting it is refused with a one-line error naming this command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ...checkpoint import CheckpointError, load_tensors, load_weights_into
from ...fileio import atomic_write_bytes, atomic_write_text
from ..inception_weights import file_sha256
from .files import (
    LEGACY_FORMAT,
    classifier_file_contents,
    classifier_paths,
    is_legacy_classifier,
    safetensors_header_metadata,
    tensors_digest,
)
from .model import ClassifierConfig, ResNetClassifier


def convert_legacy_classifier(path: str | os.PathLike) -> bool:
    """Convert the v1 classifier at ``path`` in place; returns False when it is already in the current format."""
    weights, description = classifier_paths(path)
    header = safetensors_header_metadata(weights) if weights.is_file() else {}
    if header.get("format") != LEGACY_FORMAT:
        if is_legacy_classifier(weights):
            raise CheckpointError(f"{weights}: its {description.name} says v1 but the weights have no v1 header")
        if not weights.is_file():
            raise FileNotFoundError(f"classifier not found: {weights}")
        return False
    try:
        info = json.loads(header["info"])
        config = ClassifierConfig.from_dict(info["config"])
        metadata = info.get("metadata", {})
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{weights}: unreadable v1 header ({e})") from None
    tensors = load_tensors(weights.parent, weights.stem)
    load_weights_into(ResNetClassifier(config), tensors, str(weights))  # the tensors fit the config
    feature_network = f"classifier:{weights.name}@{file_sha256(weights)}"
    digest = tensors_digest(tensors)

    weights_bytes, description_text = classifier_file_contents(config, tensors, metadata, feature_network)
    # Description first: until the weights are rewritten the v1 header stays readable for a rerun, and the new
    # description already matches the old file's tensors (the fingerprint ignores the file layout).
    atomic_write_text(description, description_text)
    atomic_write_bytes(weights, weights_bytes)
    if tensors_digest(load_tensors(weights.parent, weights.stem)) != digest:  # pragma: no cover - paranoia
        raise CheckpointError(f"{weights}: the converted tensors differ from the v1 file's")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cascaded_diffusion.evaluation.classifier.legacy",
        description="Convert v1 classifier files (config in the safetensors header) to NAME.safetensors + "
        "NAME.json, in place, keeping the tensors and the feature-network name.",
    )
    parser.add_argument("paths", nargs="+", help="NAME.safetensors of each v1 classifier")
    args = parser.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            converted = convert_legacy_classifier(path)
        except (OSError, CheckpointError) as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(f"{path}: {'converted' if converted else 'already in the current format'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
