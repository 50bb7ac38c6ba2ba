"""scripts/emoji256_study.py end to end on tiny one-step runs of the six configs/emoji256 stages and a tiny prepared
data set: every setting is sampled from the right inputs at the right size, the ablation pairs share their inputs
and get a paired bootstrap, and a rerun samples nothing new."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascaded_diffusion.cli import main

from conftest import class_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    rng = np.random.default_rng(0)
    tmp = tmp_path_factory.mktemp("emoji256")
    for split, n in (("train", 6), ("test", 3)):
        class_image_folder(tmp / "folders" / split, n, rng, 256)
        assert main(["prepare", f"imagefolder:{tmp / 'folders' / split}", "--resolutions", "16,64,256", "--out",
                     str(tmp / "data" / f"emoji256-{split}"), "--workers", "1", "--quiet"]) == 0
    tiny = ["stage.num_classes=3", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,1]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.middle_attention=false",
            "train.batch_size=2", "train.progress=false",
            "train.sample_every=0", "train.sample_steps=1", "train.keep_steps=[]", "diffusion.timesteps=20",
            f"data.source=prepared:{tmp / 'data' / 'emoji256-train'}"]
    noise = ["conditioning.noise_timesteps=20", "conditioning.s_max=10", "conditioning.sample_s=5"]
    for name in ("base16", "sr16to64", "sr16to64_noaug", "sr64to256", "sr64to256_noaug", "sr64to256_noise"):
        args = ["train", str(ROOT / "configs/emoji256" / f"{name}.toml"), "--out", str(tmp / "runs" / name),
                "--steps", "1", "--device", "cpu"]
        for s in tiny + (noise if name in ("sr16to64", "sr64to256_noise") else []):
            args += ["--set", s]
        assert main(args) == 0
    clf = {}
    for res in (16, 256):
        clf[res] = tmp / f"clf{res}.safetensors"
        extra = ["--stem-stride", "4"] if res == 256 else []
        assert main(["classifier", "train", "--data", f"prepared:{tmp / 'data' / 'emoji256-train'}", "--out",
                     str(clf[res]), "--resolution", str(res), "--steps", "2", "--batch-size", "6", "--device", "cpu",
                     *extra]) == 0
    return tmp, clf


def test_emoji256_study_pairs_every_ablation_and_resumes(tiny_runs, run_script):
    tmp, clf = tiny_runs
    cmd = ["--runs", tmp / "runs", "--data", tmp / "data", "--features", f"classifier:{clf[16]}",
           "--features-256", f"classifier:{clf[256]}", "--num", "6", "--num-256", "3", "--steps", "2,2,2",
           "--levels", "0,10", "--top-levels", "0", "--top-samplers", "dpmpp:1", "--bootstrap", "3",
           "--grid-per-class", "1"]
    study = tmp / "runs" / "study"
    status, _ = run_script("emoji256_study.py", *cmd)
    assert status == 0
    results = json.loads((study / "metrics.json").read_text())
    tops = {"x256_blur", "x256_noaug", "x256_noise", "gt256_blur", "gt256_noaug", "gt256_noise",
            "x256_blur_on_noaug", "x256_blur_dpmpp1", "x256_blur_s0", "x256_noaug_s0", "x256_noise_s0"}
    assert tops | {"base16", "x64_aug", "x64_noaug", "x64_aug_s10", "gt64_noaug"} <= set(results)
    assert {"real16_test", "real64_test", "real256_test"} <= set(results)
    for name in tops:
        with np.load(study / f"{name}.npz") as f:
            assert f["arr_0"].shape == (3, 256, 256, 3)
        assert results[name]["network"].startswith("classifier:clf256")
    assert results["x64_aug"]["network"].startswith("classifier:clf16")
    # the top-stage ablations super-resolve the same three 64 px images, labels included
    with np.load(study / "in64_aug.npz") as f:
        inputs = f["arr_1"].tolist()
    for name in ("x256_blur", "x256_noaug", "x256_noise", "x256_blur_dpmpp1"):
        with np.load(study / f"{name}.npz") as f:
            assert f["arr_1"].tolist() == inputs
    # --top-levels 0: the same ablation on the middle stage's s = 0 outputs, which differ from its default level's
    with np.load(study / "in64_aug_s0.npz") as f, np.load(study / "x64_aug_s0.npz") as g:
        assert np.array_equal(f["arr_0"], g["arr_0"][:3])
    for name in ("x256_blur_s0", "x256_noaug_s0", "x256_noise_s0"):
        with np.load(study / f"{name}.npz") as f:
            assert f["arr_0"].shape == (3, 256, 256, 3)
    pairs = results["_pairs"]
    assert set(pairs) == {"x256_noaug - x256_blur", "x256_noise - x256_blur", "gt256_noaug - gt256_blur",
                          "gt256_noise - gt256_blur", "x256_noise - x256_noaug", "gt256_noise - gt256_noaug",
                          "x64_noaug - x64_aug", "x256_blur_on_noaug - x256_blur", "x64_noaug - x64_aug_s0",
                          "x64_noaug - x64_aug_s10", "x256_noaug_s0 - x256_blur_s0", "x256_noise_s0 - x256_blur_s0",
                          "x256_noise_s0 - x256_noaug_s0"}
    for gap in pairs.values():
        assert np.isfinite(gap["kid_gap"]) and gap["kid_gap_std"] >= 0 and gap["num"] in (3, 6)
    assert "Paired ablations" in (study / "tables.md").read_text()
    assert (study / "grid_stages.png").stat().st_size > 500

    # the ablation as a picture: every top stage's drawing of the same held-out inputs, one row each
    sheet_path = tmp / "compare.png"
    status, printed = run_script("emoji256_compare.py", study, "--data", tmp / "data", "--out", sheet_path,
                                 "--indices", "0,2", "--crop", "64")
    assert status == 0 and "5 rows x 2 images" in printed
    sheet = np.asarray(Image.open(sheet_path))
    assert sheet.shape == (5 * 260, 90 + 2 * 260, 3)
    with np.load(study / "gt256_noaug.npz") as f:
        drawn = f["arr_0"][2]
    # rows: input, blur, no aug, noise, real; the no-aug row's second column is the central 64 x 64 of that
    # sample, enlarged 4x (nearest)
    tile = sheet[2 * 260:2 * 260 + 256, 90 + 260:90 + 260 + 256]
    assert np.array_equal(tile[::4, ::4], drawn[96:160, 96:160])
    mtimes = {p.name: p.stat().st_mtime_ns for p in study.glob("*.npz")}
    status, again = run_script("emoji256_study.py", *cmd)
    assert status == 0
    assert "+ cdm sample" not in again
    assert {p.name: p.stat().st_mtime_ns for p in study.glob("*.npz")} == mtimes

    # ship: the lower held-out KID decides each stage; the top stage's sampler comes from its curve; the bundle
    # carries the 256 px classifier and the data's attribution, and loads as a 16 -> 64 -> 256 cascade
    attribution = tmp / "ATTRIBUTION.md"
    attribution.write_text("Twemoji graphics CC-BY 4.0 ...\n")
    bundle = tmp / "bundle" / "emoji-256"
    status, shipped = run_script("ship_emoji256.py", tmp / "runs", "--classifier", clf[256], "--attribution",
                                 attribution, "--bundle", bundle)
    assert status == 0 and "shipped" in shipped
    manifest = json.loads((bundle / "cascade.json").read_text())
    kid = {k: v["vs_test"]["kid"]["mean"] for k, v in results.items() if not k.startswith("_") and "vs_test" in v}
    level = min((0, 10), key=lambda s: kid[f"x64_aug_s{s}"])
    augmented = kid[f"x64_aug_s{level}"] <= kid["x64_noaug"]
    assert manifest["stages"][1] == ("sr16to64" if augmented else "sr16to64_noaug")
    # on the s = 0 inputs when the bundle hands those on (the study ran the top stages there), else the default's
    suffix = "_s0" if augmented and level == 0 else ""
    top = min(("blur", "noaug", "noise"), key=lambda t: kid[f"x256_{t}{suffix}"])
    assert manifest["stages"][2] == {"blur": "sr64to256", "noaug": "sr64to256_noaug", "noise": "sr64to256_noise"}[top]
    assert (bundle / "ATTRIBUTION.md").read_text() == attribution.read_text()
    assert (bundle / "classifier.safetensors").read_bytes() == clf[256].read_bytes()
    from cascaded_diffusion.cascade import Cascade

    cascade = Cascade.load([str(bundle / s) for s in manifest["stages"]], device="cpu")
    assert cascade.resolutions == [16, 64, 256]
    # the study sampled with --steps 2,2,2: base and middle keep it; the top stage's point is on its curve
    assert [s.config.sample.steps for s in cascade.stages[:2]] == [2, 2]
    chosen = manifest["study"]["top_sampler"]
    assert (chosen["sampler"], chosen["steps"]) in {("dpmpp", 1), ("dpmpp", 2)}
    assert (cascade.stages[2].config.sample.sampler, cascade.stages[2].config.sample.steps) == (
        chosen["sampler"], chosen["steps"])


def test_emoji256_study_skips_ablation_runs_not_trained_yet(tiny_runs, run_script, tmp_path, capsys):
    tmp, clf = tiny_runs
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("base16", "sr16to64", "sr64to256", "sr64to256_noaug"):
        (runs / name).symlink_to(tmp / "runs" / name, target_is_directory=True)
    cmd = ["--runs", runs, "--data", tmp / "data", "--features", f"classifier:{clf[16]}",
           "--features-256", f"classifier:{clf[256]}", "--num", "4", "--num-256", "2", "--steps", "1,1,1",
           "--levels", "10", "--top-samplers", "", "--bootstrap", "2", "--grid-per-class", "1"]
    status, out = run_script("emoji256_study.py", *cmd, "--sample-only")
    assert status == 0, out
    assert (runs / "study" / "x256_noaug.npz").is_file() and not (runs / "study" / "metrics.json").exists()
    status, out = run_script("emoji256_study.py", *cmd)
    assert status == 0, out
    assert "+ cdm sample" not in out  # the scoring run samples nothing again
    assert "sr16to64_noaug: no run at" in out and "sr64to256_noise: no run at" in out
    results = json.loads((runs / "study" / "metrics.json").read_text())
    assert {"x256_blur", "x256_noaug", "gt256_blur", "gt256_noaug", "x64_aug"} <= set(results)
    assert not {"x64_noaug", "gt64_noaug", "x256_noise", "gt256_noise", "x256_blur_on_noaug"} & set(results)
    assert set(results["_pairs"]) == {"x256_noaug - x256_blur", "gt256_noaug - gt256_blur"}
    assert results["_meta"]["missing_runs"] == ["sr16to64_noaug", "sr64to256_noise"]
    assert "Not trained, so not in these tables: sr16to64_noaug, sr64to256_noise." in (
        runs / "study" / "tables.md").read_text()

    (runs / "sr64to256").unlink()
    capsys.readouterr()
    status, _ = run_script("emoji256_study.py", *cmd)
    assert status != 0 and "lacks sr64to256" in capsys.readouterr().err
