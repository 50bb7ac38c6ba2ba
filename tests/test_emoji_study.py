"""scripts/emoji_study.py end to end on tiny one-step runs of the five emoji configs and a tiny image folder:
every setting is sampled from the right inputs, scored against both splits, and a rerun samples nothing new."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion.cli import main

from conftest import class_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("emoji")
    class_image_folder(tmp / "data" / "train", 8, rng, 64)
    class_image_folder(tmp / "data" / "test", 4, rng, 64)
    tiny = ["stage.num_classes=3", "model.channels=16", "model.norm_groups=4", "model.channel_mult=[1,1]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "train.batch_size=4", "train.progress=false",
            "train.sample_every=0", "diffusion.timesteps=20", f"data.root={tmp / 'data'}"]
    noise = ["conditioning.noise_timesteps=20", "conditioning.s_max=10", "conditioning.sample_s=5"]
    for name in ("base16", "sr16to32", "sr16to32_noaug", "sr32to64", "sr32to64_noblur"):
        args = ["train", str(ROOT / "configs/emoji" / f"{name}.toml"), "--out", str(tmp / "runs" / name),
                "--steps", "1", "--device", "cpu"]
        for s in tiny + (noise if name == "sr16to32" else []):
            args += ["--set", s]
        assert main(args) == 0
    clf = tmp / "clf.safetensors"
    assert main(["classifier", "train", "--data", f"imagefolder:{tmp / 'data' / 'train'}", "--out", str(clf),
                 "--resolution", "16", "--steps", "2", "--batch-size", "8", "--device", "cpu"]) == 0
    return tmp, clf


def test_emoji_study_runs_every_setting_and_resumes(tiny_runs, run_script):
    tmp, clf = tiny_runs
    cmd = ["--runs", tmp / "runs", "--data", tmp / "data", "--features", f"classifier:{clf}", "--num", "6",
           "--steps", "3,2,2", "--levels", "0,10", "--grid-per-class", "1"]
    study = tmp / "runs" / "study"
    # the 16 -> 32 part alone (while the 32 -> 64 runs train): nothing at 64, and the full run adds the rest
    status, _ = run_script("emoji_study.py", *cmd, "--max-resolution", "32")
    assert status == 0
    assert not list(study.glob("x64_*.npz")) and not (study / "grid_stages.png").exists()
    partial_results = json.loads((study / "metrics.json").read_text())
    assert "x32_aug_s10" in partial_results and not any(k.startswith("x64") for k in partial_results)
    status, first = run_script("emoji_study.py", *cmd)
    assert status == 0
    sampled = [line for line in first.splitlines() if line.startswith("+ cdm sample")]
    assert sampled and all("x64_" in line or "grid_stages" in line for line in sampled), sampled
    results = json.loads((study / "metrics.json").read_text())
    expected = {"base16", "x32_aug", "x32_noaug", "x32_aug_s0", "x32_aug_s10", "gt32_aug_s0", "gt32_aug_s10",
                "gt32_noaug", "x64_aug_blur", "x64_aug_noblur", "x64_noaug_blur"}
    assert expected <= set(results)
    assert {"real16_test", "real32_test", "real64_test"} <= set(results)
    assert results["_meta"]["sampling"] == ["--steps", "3,2,2"]  # base first; cut to 1 and 2 stages where fewer run
    for name in expected:
        r = results[name]
        with np.load(study / f"{name}.npz") as f:
            images, labels = f["arr_0"], f["arr_1"]
        size = 16 if name == "base16" else int(re.match(r"(x|gt)(\d+)_", name).group(2))
        assert images.shape[1] == r["resolution"] == size and images.shape[-1] == 3
        assert r["vs_train"]["kid"]["mean"] == r["vs_train"]["kid"]["mean"]  # finite, not NaN
        assert 0 <= r["memorisation"]["closer_than_any_held_out"] <= 1 and 0 <= r["recognised"] <= 1
        if name.startswith("gt"):
            # the first held-out images, in order: the ground-truth curve runs on them
            assert labels.tolist() == [0, 0, 0, 0, 1, 1]
    # the training split is 1:1:1, so proportional labels are balanced; every cascade setting shares them
    with np.load(study / "base16.npz") as f:
        base_labels = f["arr_1"].tolist()
    assert base_labels == [0, 0, 1, 1, 2, 2]
    with np.load(study / "x64_aug_noblur.npz") as f:
        assert f["arr_1"].tolist() == base_labels and f["arr_0"].shape == (6, 64, 64, 3)
    assert (study / "grid_stages.png").stat().st_size > 500 and "| x64_aug_blur | 64 |" in (study / "tables.md").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in study.glob("*.npz")}
    status, again = run_script("emoji_study.py", *cmd)
    assert status == 0
    assert "+ cdm sample" not in again  # every sample file reused
    assert {p.name: p.stat().st_mtime_ns for p in study.glob("*.npz")} == mtimes

    # ship: the lower held-out KID per SR stage, the classifier beside the stages, loadable as a cascade
    bundle = tmp / "bundle" / "emoji"
    clf_json = clf.with_suffix(".json")
    assert clf_json.is_file()
    status, _ = run_script("ship_emoji.py", tmp / "runs", "--classifier", clf, "--bundle", bundle,
                           "--default-steps", "2,2,2")
    assert status == 0
    manifest = json.loads((bundle / "cascade.json").read_text())
    kid = {k: results[k]["vs_test"]["kid"]["mean"] for k in ("x64_aug_blur", "x64_noaug_blur", "x64_aug_noblur")}
    assert manifest["stages"][0] == "base16"
    assert manifest["stages"][1] == ("sr16to32" if kid["x64_aug_blur"] <= kid["x64_noaug_blur"] else "sr16to32_noaug")
    assert manifest["stages"][2] == ("sr32to64" if kid["x64_aug_blur"] <= kid["x64_aug_noblur"] else "sr32to64_noblur")
    assert (bundle / "classifier.safetensors").is_file() and (bundle / "classifier.json").is_file()
    from cascaded_diffusion.cascade import Cascade

    cascade = Cascade.load([str(bundle / s) for s in manifest["stages"]], device="cpu")
    assert cascade.resolutions == [16, 32, 64]
    assert all(stage.config.sample.steps == 2 for stage in cascade.stages)
