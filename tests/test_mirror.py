"""The mirror-symmetry check behind data.flip: one-way classes found, symmetric ones not, and training warns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion.config import StageConfig
from cascaded_diffusion.data import load_images
from cascaded_diffusion.data.mirror import MirrorPatterns, flip_warning, one_way_fractions
from cascaded_diffusion.training import Trainer


def blobs(n: int, side: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """Noisy images with a bright blob on the left ("left"), the right ("right"), or either ("both")."""
    images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    left = np.full(n, side == "left") if side != "both" else rng.random(n) < 0.5
    for i in range(n):
        lo = 2 if left[i] else size - 6
        images[i, 4:12, lo : lo + 4] = 220
    return images


def one_way_and_symmetric(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = np.concatenate([blobs(n, "left", rng), blobs(n, "both", rng)])
    labels = np.repeat([0, 1], n)
    return images, labels


def test_one_way_class_found_symmetric_class_not():
    images, labels = one_way_and_symmetric()
    fractions = one_way_fractions(images, labels)
    assert fractions[0] == 1.0
    assert 0.35 < fractions[1] < 0.65  # fitted on the other half, so a symmetric class is not over-fitted to > 0.5
    warning = flip_warning(images, labels, ["boot", "shirt"])
    assert warning is not None and "class 0 (boot) 100 %" in warning and "shirt" not in warning


def test_symmetrised_data_gets_no_warning():
    images, labels = one_way_and_symmetric()
    both = np.concatenate([images, images[:, :, ::-1]])
    assert flip_warning(both, np.concatenate([labels, labels])) is None
    assert max(one_way_fractions(both, np.concatenate([labels, labels])).values()) < 0.65


def test_patterns_fitted_on_real_images_score_generated_ones():
    """What scripts/base_quality.py reports: a model trained with flips mirrors half its one-way class."""
    images, labels = one_way_and_symmetric()
    patterns = MirrorPatterns.fit(images, labels)
    rng = np.random.default_rng(1)
    mirrored_half = blobs(400, "both", rng)
    assert 0.4 < patterns.one_way(mirrored_half, np.zeros(400, int))[0] < 0.6
    assert patterns.one_way(blobs(50, "right", rng), np.zeros(50, int))[0] == 0.0


def test_small_classes_and_many_classes_raise_no_false_alarm():
    rng = np.random.default_rng(0)
    # 1000 classes of noise, 30 images each: too few per class to judge, so none is judged
    noise = rng.integers(0, 256, (30000, 8, 8, 3), dtype=np.uint8)
    assert one_way_fractions(noise, rng.integers(0, 1000, 30000)) == {}
    # 60 symmetric classes of 150 images: a subset is checked (at most 5000 images read), none flagged
    sym = blobs(9000, "both", rng)
    fractions = one_way_fractions(sym, np.arange(9000) % 60)
    assert 0 < len(fractions) < 60 and flip_warning(sym, np.arange(9000) % 60) is None


def test_fashion_mnist_boots_and_sneakers_face_one_way():
    data = load_images("fashion-mnist:test", 8, channels=1)
    fractions = one_way_fractions(data.images, data.labels)
    assert fractions[9] > 0.97 and fractions[7] > 0.97  # ankle boot, sneaker
    assert all(fractions[c] < 0.85 for c in (0, 2, 3, 4, 6))  # tops, pullovers, dresses, coats, shirts


def _config(tmp_path: Path, flip: bool, kind: str = "base") -> StageConfig:
    images, labels = one_way_and_symmetric(150)
    npz = tmp_path / "data.npz"
    np.savez(npz, arr_0=images, arr_1=labels)
    return StageConfig.from_dict({
        "stage": {"name": "tiny", "kind": kind, "resolution": 16, "channels": 1, "num_classes": 2,
                  **({"low_res": 8} if kind == "sr" else {})},
        "data": {"source": f"npz:{npz}", "flip": flip},
        "diffusion": {"timesteps": 20},
        "model": {"channels": 16, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
                  "norm_groups": 4},
        "train": {"steps": 1, "batch_size": 8, "bf16": False, "progress": False, "sample_every": 0,
                  "ckpt_every": 1},
    })


@pytest.mark.parametrize("flip,kind", [(True, "base"), (False, "base"), (True, "sr")])
def test_training_warns_about_flips_on_one_way_data(tmp_path, capsys, flip, kind):
    """Only a base stage is warned: an SR stage's input is flipped with its target, so it follows the base."""
    Trainer(_config(tmp_path, flip, kind), tmp_path / "run", device="cpu").train()
    err = capsys.readouterr().err
    assert ("warning: data.flip = true" in err) == (flip and kind == "base")
