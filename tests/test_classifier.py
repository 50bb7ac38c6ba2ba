"""Fashion-MNIST classifier, its feature extractor, and CAS (short runs on small subsets only)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascaded_diffusion.checkpoint import CheckpointError
from cascaded_diffusion.evaluation.cas import classification_accuracy_score
from cascaded_diffusion.evaluation.classifier import (
    ClassifierRecipe,
    DEFAULT_CLASSIFIER_PATH,
    ClassifierConfig,
    ResNetClassifier,
    classifier_outputs,
    evaluate_classifier,
    load_classifier,
    random_crop_and_flip,
    save_classifier,
    train_classifier,
    uint8_batch_to_pixels,
)
from cascaded_diffusion.evaluation.features import (
    ClassifierFeatureExtractor,
    compute_stats,
    extract,
    get_feature_extractor,
)
from cascaded_diffusion.evaluation.metrics import fid_from_stats, inception_score

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ClassifierConfig(num_classes=10, in_channels=1, resolution=32, widths=(16, 32, 64), feature_dim=64)


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def fashion_mnist() -> dict[str, np.ndarray]:
    """2000 training and 1000 test images (uint8 NHWC, 28x28x1), read straight from the idx files."""
    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST idx files not found in {FASHION_MNIST}")
    images = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")[:2000, :, :, None]
    labels = read_idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")[:2000].astype(np.int64)
    test_images = read_idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:1000, :, :, None]
    test_labels = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:1000].astype(np.int64)
    return {"images": images, "labels": labels, "test_images": test_images, "test_labels": test_labels}


@pytest.fixture(scope="module")
def trained(fashion_mnist):
    model, history = train_classifier(
        fashion_mnist["images"], fashion_mnist["labels"], 10,
        ClassifierRecipe(steps=120, batch_size=64, lr=0.1, seed=0), config=TINY, progress=False,
        eval_images=fashion_mnist["test_images"], eval_labels=fashion_mnist["test_labels"],
    )
    return model, history


# ----------------------------------------------------------------------------------------------
# Model and inputs
# ----------------------------------------------------------------------------------------------


def test_default_architecture_size_and_shapes() -> None:
    model = ResNetClassifier(ClassifierConfig())
    num_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= num_params <= 1_000_000
    x = torch.zeros(2, 1, 32, 32)
    assert model.features(x).shape == (2, 128)
    assert model(x).shape == (2, 10)


def test_inputs_are_resized_and_channel_checked() -> None:
    gray = np.full((2, 28, 28, 1), 200, dtype=np.uint8)
    pixels = uint8_batch_to_pixels(gray, 32, 3)
    assert pixels.shape == (2, 3, 32, 32)
    torch.testing.assert_close(pixels, torch.full_like(pixels, 200.0))  # constant image stays constant
    big = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    assert uint8_batch_to_pixels(big, 32, 3).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="expects 1-channel images, got 3"):
        uint8_batch_to_pixels(big, 32, 1)


def test_random_crop_and_flip_only_translates_and_mirrors() -> None:
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(1, 256, (16, 1, 6, 6)).astype(np.float32))
    padding = 2
    out = random_crop_and_flip(pixels, padding, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(pixels, (padding,) * 4)
    seen_offsets = set()
    for i in range(len(pixels)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for flip in (False, True)
            if torch.equal(out[i], (padded[i, :, dy : dy + 6, dx : dx + 6].flip(-1) if flip else padded[i, :, dy : dy + 6, dx : dx + 6]))
        ]
        assert matches, f"sample {i} is not a translated (and possibly flipped) copy"
        seen_offsets.add(matches[0])
    assert len(seen_offsets) > 3  # actually random, not a fixed shift


def test_bad_inputs_are_rejected_with_clear_errors() -> None:
    images = np.zeros((4, 28, 28, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="must be uint8"):
        train_classifier(images.astype(np.float32), np.zeros(4, dtype=np.int64), 10, ClassifierRecipe(steps=1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        train_classifier(images, np.array([0, 1, 2, 10]), 10, ClassifierRecipe(steps=1))
    with pytest.raises(ValueError, match="one label per image"):
        train_classifier(images, np.zeros(3, dtype=np.int64), 10, ClassifierRecipe(steps=1))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, C\)"):
        train_classifier(np.zeros((4, 28, 28), dtype=np.uint8), np.zeros(4, dtype=np.int64), 10,
                         ClassifierRecipe(steps=1))
    with pytest.raises(ValueError, match="nothing to train"):  # the recipe is validated when it is made
        ClassifierRecipe(steps=0)
    with pytest.raises(ValueError, match="ClassifierRecipe.lr"):
        ClassifierRecipe(lr=float("nan"))


# ----------------------------------------------------------------------------------------------
# Training, save / load
# ----------------------------------------------------------------------------------------------


def test_short_training_beats_chance_by_a_wide_margin(trained, fashion_mnist) -> None:
    model, history = trained
    scores = evaluate_classifier(model, fashion_mnist["test_images"], fashion_mnist["test_labels"])
    assert scores["top1"] > 0.7  # chance is 0.1
    assert scores["top5"] >= scores["top1"]
    assert history.steps == 120
    assert history.losses[-1] < history.losses[0]
    assert history.epochs[-1]["eval_top1"] == pytest.approx(scores["top1"])


def test_training_is_deterministic_given_the_seed(fashion_mnist) -> None:
    kwargs = dict(recipe=ClassifierRecipe(steps=3, batch_size=32, seed=5), config=TINY, progress=False)
    a, _ = train_classifier(fashion_mnist["images"][:256], fashion_mnist["labels"][:256], 10, **kwargs)
    b, _ = train_classifier(fashion_mnist["images"][:256], fashion_mnist["labels"][:256], 10, **kwargs)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_save_load_round_trip_gives_identical_outputs(trained, fashion_mnist, tmp_path) -> None:
    model, _ = trained
    path = tmp_path / "clf" / "classifier.safetensors"
    save_classifier(model, path, metadata={"dataset": "fashion-mnist", "test_top1": 0.5})
    loaded, metadata = load_classifier(path)
    assert loaded.config == model.config
    assert metadata == {"dataset": "fashion-mnist", "test_top1": 0.5}
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config"]["widths"] == [16, 32, 64] and sidecar["metadata"]["test_top1"] == 0.5
    images = fashion_mnist["test_images"][:50]
    features_a, logits_a = classifier_outputs(model, images)
    features_b, logits_b = classifier_outputs(loaded, images)
    np.testing.assert_array_equal(features_a, features_b)
    np.testing.assert_array_equal(logits_a, logits_b)


def test_load_rejects_other_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="has no other.json next to it"):
        load_classifier(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_classifier(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# Feature extractor and CAS
# ----------------------------------------------------------------------------------------------


def test_classifier_feature_extractor_and_stats(trained, fashion_mnist, tmp_path) -> None:
    model, _ = trained
    path = tmp_path / "fm.safetensors"
    save_classifier(model, path)
    extractor = get_feature_extractor(f"classifier:{path}")
    assert isinstance(extractor, ClassifierFeatureExtractor)
    assert extractor.name.startswith("classifier:fm.safetensors@")
    assert extractor.label == "classifier features (fm.safetensors)"
    assert extractor.dim == 64

    test_images = fashion_mnist["test_images"][:400]
    features, probs = extract(test_images, extractor, batch_size=128, with_probs=True)
    assert features.shape == (400, 64) and features.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # Batching and the iterable-of-batches input must not change the features.
    np.testing.assert_allclose(extract(iter([test_images[:150], test_images[150:]]), extractor)[0], features, rtol=1e-5, atol=1e-6)

    stats = compute_stats(test_images, extractor, source="fashion-mnist:test[:400]")
    assert stats.network == extractor.name and stats.num == 400
    assert abs(fid_from_stats(stats, stats)) < 1e-6
    # Real images of a trained classifier: confident and diverse, so well above 1.
    assert inception_score(probs, splits=4)[0] > 3.0

    # Two halves of the same data are closer than data vs. a single class.
    half_a = compute_stats(fashion_mnist["test_images"][:500], extractor)
    half_b = compute_stats(fashion_mnist["test_images"][500:], extractor)
    one_class = compute_stats(fashion_mnist["images"][fashion_mnist["labels"] == 3], extractor)
    assert fid_from_stats(half_a, half_b) < 0.2 * fid_from_stats(half_a, one_class)


def test_unknown_feature_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown feature network spec 'resnet'.*inception.*classifier"):
        get_feature_extractor("resnet")


def test_classification_accuracy_score(fashion_mnist) -> None:
    result = classification_accuracy_score(
        fashion_mnist["images"][:1000], fashion_mnist["labels"][:1000],
        fashion_mnist["test_images"], fashion_mnist["test_labels"], 10,
        ClassifierRecipe(steps=40, batch_size=64, seed=0), config=TINY,
    )
    assert set(result) == {"top1", "top5", "n_train", "n_test"}
    assert (result["n_train"], result["n_test"]) == (1000, 1000)
    assert 0.3 < result["top1"] <= result["top5"] <= 1.0
    # Labels carry the signal: training on shuffled labels must do much worse than on real ones.
    shuffled = np.random.default_rng(0).permutation(fashion_mnist["labels"][:1000])
    chance = classification_accuracy_score(
        fashion_mnist["images"][:1000], shuffled,
        fashion_mnist["test_images"], fashion_mnist["test_labels"], 10,
        ClassifierRecipe(steps=40, batch_size=64, seed=0), config=TINY,
    )
    assert chance["top1"] < result["top1"] - 0.2
    with pytest.raises(TypeError, match="eval_images"):  # the real test split is scored once, after training
        classification_accuracy_score(
            fashion_mnist["images"][:10], fashion_mnist["labels"][:10],
            fashion_mnist["test_images"][:10], fashion_mnist["test_labels"][:10], 10,
            eval_images=fashion_mnist["test_images"][:10],
        )


@pytest.mark.skipif(not DEFAULT_CLASSIFIER_PATH.exists(), reason="shipped classifier not trained yet")
def test_shipped_fashion_mnist_classifier(fashion_mnist) -> None:
    extractor = get_feature_extractor("classifier")
    assert extractor.metadata["test_top1"] >= 0.92
    scores = evaluate_classifier(extractor.model, fashion_mnist["test_images"], fashion_mnist["test_labels"])
    assert scores["top1"] >= 0.9
