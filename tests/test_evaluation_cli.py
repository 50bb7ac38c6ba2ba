"""`cdm stats / eval / cas / sweep` end to end, with a small classifier trained here as feature network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion.cli import main
from cascaded_diffusion.data import load_images

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fmnist():
    if not FMNIST.exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    return load_images("fashion-mnist", 32), load_images("fashion-mnist:test", 32)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, fmnist):
    from cascaded_diffusion.evaluation import ClassifierRecipe, save_classifier, train_classifier

    train, _ = fmnist
    model, _ = train_classifier(train.images[:3000], train.labels[:3000], 10,
                                ClassifierRecipe(steps=60, batch_size=64, seed=0), progress=False)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(model, path, metadata={"note": "test classifier"})
    return path


def npz(path, images, labels):
    np.savez(path, arr_0=images, arr_1=labels)
    return path


def run_eval(samples, ref, features, out, metrics="fid,kid,is,pr", extra=()):
    assert main(["eval", str(samples), "--ref", str(ref), "--out", str(out), "--features", features,
                 "--metrics", metrics, "--device", "cpu", *extra]) == 0
    return json.loads(Path(out).read_text())


def test_identical_sets_score_zero_and_test_split_beats_noise(fmnist, classifier, tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    train, test = fmnist
    feats = f"classifier:{classifier}"
    real = npz(tmp_path / "real.npz", test.images[:1000], test.labels[:1000])
    ref = npz(tmp_path / "ref.npz", train.images[:2000], train.labels[:2000])
    # reference statistics through `cdm stats`, then reused as --ref
    assert main(["stats", f"npz:{ref}", "--out", str(tmp_path / "ref_stats.npz"), "--features", feats,
                 "--device", "cpu"]) == 0
    same = run_eval(real, f"npz:{real}", feats, tmp_path / "same.json")
    assert same["fid"] < 1e-3
    assert same["num_samples"] == 1000 and same["feature_network"].startswith("classifier")
    assert same["precision"] > 0.99 and same["recall"] > 0.99
    good = run_eval(real, tmp_path / "ref_stats.npz", feats, tmp_path / "good.json")
    rng = np.random.default_rng(0)
    noise = npz(tmp_path / "noise.npz", rng.integers(0, 256, (1000, 32, 32, 1), dtype=np.uint8), test.labels[:1000])
    bad = run_eval(noise, tmp_path / "ref_stats.npz", feats, tmp_path / "bad.json")
    assert good["fid"] * 10 < bad["fid"]
    assert good["kid"]["mean"] < bad["kid"]["mean"]
    # the unbiased KID of a set against itself is ~0 (slightly negative: the diagonal is left out)
    assert abs(same["kid"]["mean"]) < 0.05 * bad["kid"]["mean"]
    assert good["precision"] > bad["precision"]
    assert good["is"]["mean"] > 1.0


def test_bad_sample_files_are_explained(classifier, tmp_path, capsys):
    np.savez(tmp_path / "nokey.npz", images=np.zeros((4, 32, 32, 1), np.uint8))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 32, 32, 1), np.float32))
    for name, message in (("nokey.npz", "no 'arr_0' array"), ("float.npz", "expected uint8")):
        rc = main(["eval", str(tmp_path / name), "--ref", "fashion-mnist", "--out", str(tmp_path / "m.json"),
                   "--features", f"classifier:{classifier}", "--device", "cpu"])
        assert rc == 2 and message in capsys.readouterr().err


def test_feature_dimension_mismatch_is_refused(fmnist, classifier, tmp_path, capsys):
    from cascaded_diffusion.evaluation import FeatureStats

    other = FeatureStats.from_features(np.random.default_rng(0).normal(size=(50, 7)), network="other")
    other.save(tmp_path / "other.npz")
    train, _ = fmnist
    samples = npz(tmp_path / "s.npz", train.images[:100], train.labels[:100])
    rc = main(["eval", str(samples), "--ref", str(tmp_path / "other.npz"), "--out", str(tmp_path / "m.json"),
               "--features", f"classifier:{classifier}", "--metrics", "fid", "--device", "cpu"])
    assert rc == 2 and "feature dimensions differ" in capsys.readouterr().err


def test_cas_trains_on_samples_and_reports_real_baseline(fmnist, tmp_path):
    train, test = fmnist
    samples = npz(tmp_path / "s.npz", train.images[:500], train.labels[:500])
    real = npz(tmp_path / "real.npz", train.images[500:3000], train.labels[500:3000])
    test_split = npz(tmp_path / "test.npz", test.images[:1000], test.labels[:1000])
    out = tmp_path / "cas.json"
    assert main(["cas", str(samples), "--test", f"npz:{test_split}", "--real", f"npz:{real}", "--out", str(out),
                 "--epochs", "15", "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["generated"]["n_train"] == 500 and result["real"]["n_train"] == 500
    assert result["generated"]["n_test"] == 1000
    # here the "samples" are real images too, so both runs are the same recipe on equally good data:
    # both must be far above chance (10%)
    for run in ("generated", "real"):
        assert 0.3 < result[run]["top1"] <= result[run]["top5"] <= 1


def test_sweep_over_levels_with_both_curves(fmnist, classifier, tmp_path, monkeypatch):
    """A tiny untrained cascade: the sweep machinery (both curves, plot, best level) runs end to end."""
    from conftest import make_stage, stage_config
    from cascaded_diffusion.cascade import Cascade
    from cascaded_diffusion.evaluation import get_feature_extractor
    from cascaded_diffusion.evaluation.evaluate import reference_stats
    from cascaded_diffusion.evaluation.sweep import augmentation_sweep, plot_sweep

    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    train, _ = fmnist
    ref = npz(tmp_path / "ref.npz", train.images[:300], train.labels[:300])
    cascade = Cascade([make_stage(stage_config("base", 8, classes=10)),
                       make_stage(stage_config("sr", 32, 8, classes=10))])
    extractor = get_feature_extractor(f"classifier:{classifier}")
    reference = reference_stats(f"npz:{ref}", extractor, resolution=32, channels=1)
    result = augmentation_sweep(cascade, [0, 10, 40], num=40, reference=reference, extractor=extractor,
                                ground_truth=f"npz:{ref}", batch_size=40, metrics=("fid",),
                                sampling={"steps": 3}, log=lambda *_: None)
    assert [r["level"] for r in result["generated"]] == [0, 10, 40]
    assert [r["level"] for r in result["ground_truth"]] == [0, 10, 40]
    assert result["best_level"] in (0, 10, 40)
    assert all(np.isfinite(r["fid"]) for r in result["generated"] + result["ground_truth"])
    plot_sweep(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    truncated = augmentation_sweep(cascade, [0, 10], num=20, reference=reference, extractor=extractor,
                                   ground_truth=None, truncated=True, batch_size=20, metrics=("fid",),
                                   sampling={"steps": 3}, log=lambda *_: None)
    assert truncated["truncated"] and len(truncated["generated"]) == 2 and not truncated["ground_truth"]


def test_classifier_train_command_writes_a_loadable_classifier(fmnist, tmp_path, capsys):
    from cascaded_diffusion.evaluation import load_classifier

    train, test = fmnist
    tr = npz(tmp_path / "tr.npz", train.images[:600], train.labels[:600])
    te = npz(tmp_path / "te.npz", test.images[:300], test.labels[:300])
    out = tmp_path / "clf.safetensors"
    assert main(["classifier", "train", "--data", f"npz:{tr}", "--test", f"npz:{te}", "--out", str(out),
                 "--epochs", "2", "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out
    model, meta = load_classifier(out)
    assert meta["train_data"].startswith("npz:") and 0.0 <= meta["test_top1"] <= 1.0
