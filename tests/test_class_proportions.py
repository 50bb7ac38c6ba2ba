"""Sampling classes in a data set's proportions (FID/KID against an imbalanced data set such as the emoji), the
classifier command's input size, flips and step options, and a bundled cascade's classifier as feature network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascaded_diffusion.labels import proportional_labels
from cascaded_diffusion.cli import main


def test_proportional_labels_follow_the_counts_to_within_one_sample():
    counts = [144, 324, 135, 111, 185, 72, 224, 190, 222]  # the emoji training split
    for num in (1, 9, 100, 1000, 1607, 5000):
        labels = proportional_labels(num, counts).numpy()
        assert len(labels) == num and np.all(np.diff(labels) >= 0)  # sorted, as balanced_labels
        got = np.bincount(labels, minlength=len(counts))
        exact = num * np.asarray(counts) / sum(counts)
        assert np.all(np.abs(got - exact) < 1.0)
    assert np.array_equal(np.bincount(proportional_labels(1607, counts).numpy()), counts)
    assert np.array_equal(proportional_labels(7, [1, 0, 1]).numpy(), [0, 0, 0, 0, 2, 2, 2])  # tie -> lower class
    assert np.array_equal(proportional_labels(77, counts), proportional_labels(77, counts))
    for bad in ([], [0, 0], [3, -1]):
        with pytest.raises(ValueError, match="class_counts"):
            proportional_labels(5, bad)


def _npz(path, images, labels):
    np.savez(path, arr_0=images, arr_1=labels)
    return path


def _imbalanced_rgb(tmp_path, n=48):
    rng = np.random.default_rng(0)
    labels = np.array([0] * (n // 2) + [1] * (n // 3) + [2] * (n - n // 2 - n // 3))
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = (labels * 100)[:, None, None].astype(np.uint8)  # a class cue in the red channel
    return _npz(tmp_path / "data.npz", images, labels), labels


def test_cdm_sample_class_proportions(tmp_path):
    from pathlib import Path

    data, labels = _imbalanced_rgb(tmp_path)
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "base"
    args = ["train", str(root / "configs/emoji/base16.toml"), "--out", str(run), "--steps", "1", "--device", "cpu"]
    for s in ["data.source=npz:" + str(data), "stage.num_classes=3", "model.channels=16", "model.norm_groups=4",
              "model.channel_mult=[1,1]", "model.num_res_blocks=1", "model.attention_resolutions=[]",
              "train.batch_size=4", "train.progress=false", "train.sample_every=0", "diffusion.timesteps=20"]:
        args += ["--set", s]
    assert main(args) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", str(run), "--num", "12", "--steps", "2", "--out", str(out), "--device", "cpu",
                 "--quiet", "--class-proportions", f"npz:{data}"]) == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (12, 16, 16, 3)
        assert np.bincount(f["arr_1"]).tolist() == np.bincount(proportional_labels(12, np.bincount(labels)).numpy()).tolist() == [6, 4, 2]
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "x.npz"), "--device", "cpu",
                 "--class-label", "1", "--class-proportions", f"npz:{data}"]) == 2  # refused: they exclude each other
    wrong = _npz(tmp_path / "wrong.npz", np.zeros((4, 16, 16, 3), np.uint8), np.array([0, 1, 2, 5]))
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "y.npz"), "--device", "cpu",
                 "--class-proportions", f"npz:{wrong}"]) == 2  # a data set with more classes than the cascade


def test_classifier_command_trains_at_its_resolution_without_flips(tmp_path, capsys):
    from cascaded_diffusion.evaluation import load_classifier

    data, _ = _imbalanced_rgb(tmp_path)
    out = tmp_path / "clf.safetensors"
    assert main(["classifier", "train", "--data", f"npz:{data}", "--test", f"npz:{data}", "--out", str(out),
                 "--resolution", "16", "--steps", "3", "--batch-size", "8", "--no-flip", "--device", "cpu"]) == 0
    assert "3 steps" in capsys.readouterr().out
    model, meta = load_classifier(out)
    # the network works at the requested size, not at the default 32 (which would upsample the 16x16 images)
    assert model.config.resolution == 16 and model.config.in_channels == 3 and model.config.num_classes == 3
    assert meta["recipe"]["flip"] is False and meta["recipe"]["steps"] == 3 and meta["recipe"]["batch_size"] == 8
    assert 0.0 <= meta["test_top1"] <= 1.0 and meta["test_top5"] == 1.0  # 3 classes: top-5 is every class


def test_random_crop_without_flip_only_translates():
    from cascaded_diffusion.evaluation.classifier import random_crop_and_flip

    pixels = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    same = random_crop_and_flip(pixels, 0, torch.Generator().manual_seed(0), flip=False)
    assert torch.equal(same, pixels)
    # the flipping draws stay where they were, so flip=True streams are those of earlier releases
    a = random_crop_and_flip(pixels, 1, torch.Generator().manual_seed(3))
    b = random_crop_and_flip(pixels, 1, torch.Generator().manual_seed(3), flip=True)
    assert torch.equal(a, b)


def test_classifier_spec_names_a_bundled_cascade(tmp_path, monkeypatch):
    from cascaded_diffusion.evaluation.classifier import DEFAULT_CLASSIFIER_PATH
    from cascaded_diffusion.evaluation.features import _classifier_location

    assert _classifier_location("") == DEFAULT_CLASSIFIER_PATH
    assert _classifier_location("fashion-mnist") == DEFAULT_CLASSIFIER_PATH
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fashion-mnist.safetensors").write_bytes(b"")  # a file of that name wins over the bundle
    assert str(_classifier_location("fashion-mnist")) == "fashion-mnist"
    assert _classifier_location("mine.safetensors") == "mine.safetensors"


def test_low_res_samples_feed_the_stage_that_takes_their_size(tmp_path):
    """In a three-stage cascade, 16x16 inputs run stages 2 and 3, 32x32 inputs (the study's 32 -> 64 ablation on
    one set of 32x32 images) only stage 3; a size no stage takes is refused before sampling."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    data = _npz(tmp_path / "d.npz", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.arange(16) % 3)
    tiny = ["stage.num_classes=3", "model.channels=16", "model.norm_groups=4", "model.channel_mult=[1,1]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "train.batch_size=4", "train.progress=false",
            "train.sample_every=0", "diffusion.timesteps=20", f"data.source=npz:{data}"]
    runs = []
    for name, config, extra in (("b", "base16.toml", ["stage.resolution=8"]),
                                ("s1", "sr16to32.toml", ["stage.low_res=8", "stage.resolution=16", "train.crop=0",
                                                         "conditioning.noise_timesteps=20", "conditioning.s_max=10",
                                                         "conditioning.sample_s=5"]),
                                ("s2", "sr32to64.toml", ["stage.low_res=16", "stage.resolution=32", "train.crop=0"])):
        args = ["train", str(root / "configs/emoji" / config), "--out", str(tmp_path / name), "--steps", "1",
                "--device", "cpu"]
        for s in tiny + extra:
            args += ["--set", s]
        assert main(args) == 0
        runs.append(str(tmp_path / name))
    low16 = _npz(tmp_path / "l16.npz", rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), np.array([2, 1, 0, 1, 2]))
    out = tmp_path / "o.npz"
    stages = tmp_path / "stages"
    assert main(["sample", *runs, "--num", "5", "--steps", "2", "--out", str(out), "--device", "cpu", "--quiet",
                 "--low-res-samples", str(low16), "--save-stages", str(stages)]) == 0
    assert sorted(p.name for p in stages.iterdir()) == ["stage3_32px.npz"]  # stage 3 alone: no 16px stage ran
    with np.load(out) as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_1"].tolist() == [2, 1, 0, 1, 2]
    low8 = _npz(tmp_path / "l8.npz", rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8), np.zeros(5, int))
    assert main(["sample", *runs, "--num", "5", "--steps", "2", "--out", str(tmp_path / "o8.npz"), "--device", "cpu",
                 "--quiet", "--low-res-samples", str(low8), "--save-stages", str(tmp_path / "st8")]) == 0
    assert sorted(p.name for p in (tmp_path / "st8").iterdir()) == ["stage2_16px.npz", "stage3_32px.npz"]
    low12 = _npz(tmp_path / "l12.npz", np.zeros((5, 12, 12, 3), np.uint8), np.zeros(5, int))
    assert main(["sample", *runs, "--num", "5", "--out", str(tmp_path / "o12.npz"), "--device", "cpu",
                 "--low-res-samples", str(low12)]) == 2
