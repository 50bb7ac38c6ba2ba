"""The classifier's files: the shipped classifier against outputs recorded with the original (v1) loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cascaded_diffusion.evaluation.classifier import DEFAULT_CLASSIFIER_PATH, classifier_outputs
from cascaded_diffusion.evaluation.features import get_feature_extractor

FIXTURE = Path(__file__).parent / "fixtures" / "shipped_classifier_outputs.npz"


def _expected() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def test_shipped_classifier_gives_the_recorded_features_and_logits() -> None:
    expected = _expected()
    extractor = get_feature_extractor("classifier")
    # Same feature-network name as before: statistics computed with the old file stay comparable.
    assert extractor.name == str(expected["network"])
    features, logits = classifier_outputs(extractor.model, expected["images"])
    if torch.backends.cpu.get_cpu_capability() == str(expected["cpu_capability"]):
        np.testing.assert_array_equal(features, expected["features"])  # bit-identical
        np.testing.assert_array_equal(logits, expected["logits"])
    else:  # another vector ISA may round convolutions differently
        np.testing.assert_allclose(features, expected["features"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
    assert DEFAULT_CLASSIFIER_PATH.is_file()
