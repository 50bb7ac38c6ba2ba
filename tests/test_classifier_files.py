"""The classifier's files (``evaluation/classifier/files.py``, ``legacy.py``): the v2 pair, its errors, the v1
conversion, and the shipped classifier against outputs recorded with the original (v1) loader."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cascaded_diffusion.checkpoint import CheckpointError
from cascaded_diffusion.evaluation.classifier import (
    CLASSIFIER_FORMAT,
    CLASSIFIER_FORMAT_VERSION,
    DEFAULT_CLASSIFIER_PATH,
    ClassifierConfig,
    ResNetClassifier,
    classifier_outputs,
    feature_network_name,
    load_classifier,
    save_classifier,
)
from cascaded_diffusion.evaluation.classifier.files import classifier_fingerprint, is_legacy_classifier, tensors_digest
from cascaded_diffusion.evaluation.classifier.legacy import convert_legacy_classifier, main as convert_main
from cascaded_diffusion.evaluation.features import get_feature_extractor
from cascaded_diffusion.evaluation.inception import file_sha256

from bit_identity_cases import machine_signature

FIXTURE = Path(__file__).parent / "fixtures" / "shipped_classifier_outputs.npz"
TINY = ClassifierConfig(num_classes=4, in_channels=1, resolution=16, widths=(4, 8), head_pool=2, feature_dim=8)
IMAGES = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)


def _expected() -> dict:
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


def _tiny_model(seed: int = 0) -> ResNetClassifier:
    torch.manual_seed(seed)
    model = ResNetClassifier(TINY)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that they are seen to round-trip
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.to(memory_format=torch.channels_last).eval()  # as trained and as loaded: same conv kernels


def _save_v1(model: ResNetClassifier, path: Path, metadata: dict) -> None:
    """A classifier as the v1 ``save_classifier`` wrote it: config in the safetensors header, JSON sidecar."""
    info = {"format": "cascaded_diffusion.classifier.v1", "config": asdict(model.config), "metadata": metadata}
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": info["format"], "info": json.dumps(info)})
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


# --- the shipped classifier ----------------------------------------------------------------------------------


def test_shipped_classifier_gives_the_recorded_features_and_logits() -> None:
    expected = _expected()
    extractor = get_feature_extractor("classifier")
    # Same feature-network name as before the conversion: statistics computed with the v1 file stay comparable.
    assert extractor.name == str(expected["network"]) == "classifier:classifier.safetensors@126c212ed129"
    assert json.dumps(extractor.model.config.to_dict(), sort_keys=True) == str(expected["config"])
    assert tensors_digest(extractor.model.state_dict()) == str(expected["tensors_sha256"])  # the same tensors
    features, logits = classifier_outputs(extractor.model, expected["images"])
    if "machine_signature" in expected and machine_signature() == str(expected["machine_signature"]):
        np.testing.assert_array_equal(features, expected["features"])  # bit-identical to the v1 loader
        np.testing.assert_array_equal(logits, expected["logits"])
    else:  # another CPU kind (ISA, AMX or not) may round the convolutions differently: the same AVX512 capability
        # gave 1.3e-6 differences on an AMX machine; a wrong weight or layer moves features by far more than 1e-4
        np.testing.assert_allclose(features, expected["features"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits, expected["logits"], rtol=0, atol=1e-4)
    assert logits.argmax(1)[:12].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5]  # the test labels of these images


def test_shipped_classifier_is_a_v2_pair() -> None:
    info = json.loads(DEFAULT_CLASSIFIER_PATH.with_suffix(".json").read_text())
    assert info["format"] == CLASSIFIER_FORMAT and info["format_version"] == CLASSIFIER_FORMAT_VERSION
    assert info["metadata"]["test_top1"] >= 0.92
    with safe_open(str(DEFAULT_CLASSIFIER_PATH), framework="pt") as handle:
        assert not handle.metadata()  # nothing in the weights' header: the JSON is the one description
    assert not is_legacy_classifier(DEFAULT_CLASSIFIER_PATH)


# --- the v2 pair -----------------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_names_the_network_by_fingerprint(tmp_path) -> None:
    model = _tiny_model()
    weights = save_classifier(model, tmp_path / "sub" / "tiny.safetensors", metadata={"data": "noise", "top1": 0.5})
    assert weights == tmp_path / "sub" / "tiny.safetensors"
    info = json.loads(weights.with_suffix(".json").read_text())
    assert info["format_version"] == 2 and info["config"]["widths"] == [4, 8] and info["metadata"]["top1"] == 0.5
    assert info["fingerprint"] == classifier_fingerprint(TINY, model.state_dict())
    assert sorted(p.name for p in weights.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]  # no temp files

    for path in (weights, weights.with_suffix(".json"), weights.with_suffix("")):  # either file names the pair
        loaded, metadata = load_classifier(path)
        assert loaded.config == TINY and metadata == {"data": "noise", "top1": 0.5} and not loaded.training
        for a, b in zip(classifier_outputs(model, IMAGES), classifier_outputs(loaded, IMAGES)):
            np.testing.assert_array_equal(a, b)
    assert feature_network_name(weights) == f"classifier:tiny.safetensors@{info['fingerprint'][:12]}"
    extractor = get_feature_extractor(f"classifier:{weights.with_suffix('.json')}")
    assert extractor.name == feature_network_name(weights)
    assert extractor.label == "classifier features (tiny.safetensors)"

    # Another classifier (other weights or another config) gets another name.
    other = save_classifier(_tiny_model(seed=1), tmp_path / "other.safetensors")
    assert feature_network_name(other).split("@")[1] != info["fingerprint"][:12]


def test_saving_unserialisable_metadata_writes_nothing(tmp_path) -> None:
    with pytest.raises(TypeError):
        save_classifier(_tiny_model(), tmp_path / "c.safetensors", metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    weights = save_classifier(_tiny_model(), tmp_path / "c.safetensors")
    return weights, weights.with_suffix(".json")


def _edit_json(path: Path, **changes) -> None:
    info = json.loads(path.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda w, d: d.write_text(d.read_text()[:40]), r"c.json is corrupt"),
        (lambda w, d: _edit_json(d, format="cascaded_diffusion.stage"), r"does not describe a classifier"),
        (lambda w, d: _edit_json(d, format_version=3), r"format_version 3.*up to version 2"),
        (lambda w, d: _edit_json(d, fingerprint=None), r"corrupt: no fingerprint"),
        (lambda w, d: _edit_json(d, config={"widths": [4, 8], "depth": 3}), r"corrupt: bad config.*unknown"),
        # the config edited by hand: the fingerprint covers it
        (lambda w, d: _edit_json(d, config={**json.loads(d.read_text())["config"], "resolution": 32}),
         r"does not match c.json"),
        (lambda w, d: w.write_bytes(w.read_bytes()[:-100]), r"c.safetensors is not a readable safetensors file"),
        (lambda w, d: d.unlink(), r"has no c.json next to it"),
    ],
)
def test_a_damaged_pair_is_refused_with_a_clear_error(tmp_path, damage, message) -> None:
    weights, description = _pair(tmp_path)
    damage(weights, description)
    with pytest.raises(CheckpointError, match=message):
        load_classifier(weights)


def test_modified_weights_and_mixed_pairs_are_refused(tmp_path) -> None:
    weights, description = _pair(tmp_path)
    model = _tiny_model()
    with torch.no_grad():
        model.head.bias.add_(1e-3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))  # well-formed, other values
    with pytest.raises(CheckpointError, match="does not match c.json.*modified.*different classifiers"):
        load_classifier(weights)
    # weights of another architecture under a matching fingerprint: the shapes are checked too
    other = ClassifierConfig(num_classes=4, in_channels=1, resolution=16, widths=(4, 4), head_pool=2, feature_dim=8)
    state = ResNetClassifier(other).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    _edit_json(description, fingerprint=classifier_fingerprint(TINY, state))
    with pytest.raises(CheckpointError, match="do not fit this network"):
        load_classifier(weights)
    with pytest.raises(FileNotFoundError, match="classifier not found: .*missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")


# --- v1 files --------------------------------------------------------------------------------------------------


def test_a_v1_file_is_refused_with_the_command_that_converts_it(tmp_path) -> None:
    path = tmp_path / "old.safetensors"
    _save_v1(_tiny_model(), path, {"note": "v1"})
    assert is_legacy_classifier(path)
    with pytest.raises(CheckpointError) as error:
        load_classifier(path)
    message = str(error.value)
    assert "\n" not in message and "old v1 format" in message
    assert f"python -m cascaded_diffusion.evaluation.classifier.legacy {path}" in message
    path.with_suffix(".json").unlink()  # the header alone identifies a v1 file
    with pytest.raises(CheckpointError, match="old v1 format"):
        load_classifier(path)


def test_converting_a_v1_file_keeps_its_tensors_outputs_and_network_name(tmp_path, capsys) -> None:
    model = _tiny_model()
    path = tmp_path / "old.safetensors"
    _save_v1(model, path, {"note": "v1"})
    v1_name = f"classifier:old.safetensors@{file_sha256(path)}"

    assert convert_main([str(path)]) == 0
    assert "converted" in capsys.readouterr().out
    loaded, metadata = load_classifier(path)
    assert metadata == {"note": "v1"} and not is_legacy_classifier(path)
    for a, b in zip(classifier_outputs(model, IMAGES), classifier_outputs(loaded, IMAGES)):
        np.testing.assert_array_equal(a, b)
    assert feature_network_name(path) == v1_name  # statistics computed with the v1 file stay comparable
    with safe_open(str(path), framework="pt") as handle:
        assert not handle.metadata()

    assert convert_legacy_classifier(path) is False  # a second run changes nothing
    assert convert_main([str(path), str(tmp_path / "nothing.safetensors")]) == 2
    assert "already in the current format" in capsys.readouterr().out


def test_a_conversion_killed_between_its_two_writes_loads_and_can_be_rerun(tmp_path) -> None:
    model = _tiny_model()
    path = tmp_path / "old.safetensors"
    _save_v1(model, path, {})
    v1_bytes = path.read_bytes()
    v1_name = f"classifier:old.safetensors@{file_sha256(path)}"
    convert_legacy_classifier(path)
    path.write_bytes(v1_bytes)  # as if killed after the description was written, before the weights

    loaded, _ = load_classifier(path)  # the fingerprint is of the tensors, not of the file's layout
    np.testing.assert_array_equal(classifier_outputs(model, IMAGES)[0], classifier_outputs(loaded, IMAGES)[0])
    assert convert_legacy_classifier(path) is True  # the v1 header is still there: finish the job
    assert feature_network_name(path) == v1_name
    with safe_open(str(path), framework="pt") as handle:
        assert not handle.metadata()


def test_cdm_commands_refuse_a_bad_classifier_in_one_line(tmp_path, capsys) -> None:
    from cascaded_diffusion.cli import main

    images = tmp_path / "images.npz"
    np.savez(images, arr_0=IMAGES[:4, :16, :16], arr_1=np.arange(4))
    v1 = tmp_path / "v1.safetensors"
    _save_v1(_tiny_model(), v1, {})
    edited, edited_description = _pair(tmp_path)
    _edit_json(edited_description, config={**json.loads(edited_description.read_text())["config"], "resolution": 32})
    for path, message in ((v1, "old v1 format"), (edited, "does not match c.json"),
                          (tmp_path / "none.safetensors", "classifier not found")):
        rc = main(["stats", f"npz:{images}", "--features", f"classifier:{path}", "--out", str(tmp_path / "s.npz"),
                   "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err


def test_patch_stem_classifier_round_trips_and_sees_full_resolution_detail(tmp_path) -> None:
    """A stride-4 patch stem at 256 px: saved and loaded with its stride (a default-stride config stores no such
    key, so older fingerprints hold), and a one-pixel checkerboard -- gone after any 4x downsampling -- moves
    its features."""
    torch.manual_seed(0)
    config = ClassifierConfig(num_classes=3, in_channels=3, resolution=256, widths=(8, 16), stem_stride=4)
    assert "stem_stride" not in ClassifierConfig(num_classes=3, in_channels=3).to_dict()
    model = ResNetClassifier(config).eval()
    save_classifier(model, tmp_path / "c.safetensors")
    loaded, _ = load_classifier(tmp_path / "c.safetensors")
    assert loaded.config == config and loaded.config.to_dict()["stem_stride"] == 4
    flat = torch.zeros(1, 3, 256, 256)
    checker = flat.clone()
    checker[..., ::2, ::2] = 0.5
    checker[..., 1::2, 1::2] = -0.5  # the mean of every 2x2 (and 4x4) block is unchanged
    with torch.no_grad():
        assert torch.allclose(loaded.features(flat), model.features(flat))
        assert (loaded.features(checker) - loaded.features(flat)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="stem_stride"):
        ClassifierConfig(resolution=30, stem_stride=4)
