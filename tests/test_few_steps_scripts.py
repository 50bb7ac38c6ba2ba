"""The few-step pipeline of docs/results.md "Few steps", end to end on the bundled Fashion-MNIST teachers: a one-round
distillation of each stage (two optimizer steps: the numbers mean nothing, the plumbing does), the study
(scripts/few_steps_study.py) scoring distilled and DPM-Solver++ points with paired gaps and the rounds' cost, and the
bundle (scripts/ship_fashion_mnist_distilled.py) sampling with exactly base + SR network evaluations by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cascaded_diffusion.pretrained as pretrained
from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.cli.main import main

QUICK = ["--set", "train.batch_size=4", "--set", "train.ckpt_every=2", "--set", "train.warmup_steps=1",
         "--set", "train.progress=false", "--set", "train.precision=fp32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """RUNS/base8 and RUNS/sr8to32_noaug as scripts/distill_fashion_mnist.sh lays them out: 8 -> 4 steps each."""
    root = tmp_path_factory.mktemp("distill")
    for stage in ("base8", "sr8to32_noaug"):
        assert main(["distill", f"pretrained:fashion-mnist/{stage}", "--out", str(root / stage), "--rounds", "1",
                     "--start-steps", "8", "--round-steps", "2", *QUICK]) == 0
    return root


def test_the_study_scores_students_against_their_dpmpp_twins_and_the_bundle_takes_8_evaluations(
        runs, tmp_path, run_script, monkeypatch):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"  # any 32 px grey images: the scores' values are not under test here
    np.savez(ref, arr_0=rng.integers(0, 256, size=(64, 32, 32, 1), dtype=np.uint8), arr_1=np.arange(64) % 10)
    out = tmp_path / "study"
    points = "base/pd4,base/dpmpp4,base/dpmpp4t,cascade/pd4+pd4,cascade/pd4+dpmpp4"
    status, log = run_script("few_steps_study.py", "--runs", runs, "--ref", f"npz:{ref}", "--num", "20",
                             "--bootstrap", "4", "--batch-size", "20", "--points", points, "--out", out,
                             "--plot", out / "few_steps.png", "--tables", out / "tables.md", "--precision", "fp32")
    assert status == 0, log
    results = json.loads((out / "results.json").read_text())
    for point in points.split(","):
        rec = results["points"][point]
        assert np.isfinite(rec["fid"]) and rec["fid_bootstrap_std"] >= 0 and "mean" in rec["kid"], point
    # the paired gaps: the distilled base against both DPM-Solver++ grids at the same 4 steps
    assert set(results["points"]["base/pd4"]["paired_gaps"]) == {"base/dpmpp4", "base/dpmpp4t"}
    # each round's cost comes from its checkpoints' records: one round, two optimizer steps, for each stage
    for stage in ("base8", "sr8to32_noaug"):
        (row,) = results["cost"][stage]
        assert row["step"] == 2 and row["student_steps"] == 4 and row["cpu_hours"] > 0, row
    assert (out / "few_steps.png").stat().st_size > 0
    table = (out / "tables.md").read_text()  # the markdown of docs/results.md: the base row at 4 steps, every cascade
    base_row = next(line for line in table.splitlines() if line.startswith("| 4 | "))
    assert f"{results['points']['base/pd4']['fid']:.2f} ± " in base_row and base_row.count("±") == 5, base_row
    assert "| pd4 + dpmpp4 | 8 | " in table and "| base8 | 1 | 8 → 4 | 2 |" in table
    # --paired-with: the same point of another study; the same students, labels and seeds give the same samples
    status, log = run_script("few_steps_study.py", "--runs", runs, "--ref", f"npz:{ref}", "--num", "20",
                             "--bootstrap", "4", "--batch-size", "20", "--points", "base/pd4", "--out",
                             tmp_path / "again", "--paired-with", out, "--precision", "fp32")
    assert status == 0, log
    again = json.loads((tmp_path / "again" / "results.json").read_text())["points"]["base/pd4"]
    assert again["fid"] == results["points"]["base/pd4"]["fid"]
    assert again["paired_with"][str(out)] == {"gap": 0.0, "paired_std": 0.0}

    # ship into a bundle folder the library finds by name, then sample it with its defaults and count evaluations
    bundles = tmp_path / "pretrained"
    bundles.mkdir()
    status, log = run_script("ship_fashion_mnist_distilled.py", runs, "--base-steps", "4", "--sr-steps", "4",
                             "--study", out / "results.json", "--bundle", bundles / "fashion-mnist-distilled")
    assert status == 0, log
    manifest = json.loads((bundles / "fashion-mnist-distilled" / "cascade.json").read_text())
    assert manifest["study"]["setting"] == "cascade/pd4+pd4"
    assert manifest["study"]["fid"] == results["points"]["cascade/pd4+pd4"]["fid"]
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", bundles)
    cascade = Cascade.load(pretrained="fashion-mnist-distilled")
    calls = []
    for i, stage in enumerate(cascade.stages):
        assert next(stage.net.parameters()).dtype in (torch.float16, torch.float32)
        stage.net.register_forward_hook(lambda *_, i=i: calls.append(i))
    images = cascade.sample(torch.arange(3), generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (3, 1, 32, 32)
    assert calls == [0] * 4 + [1] * 4

    # the SR stage undistilled (where the solver at 4 steps beats the 4-step student): the teacher's weights as they
    # are, its stage.json sampling DPM-Solver++ 4; the base still the distilled student
    status, log = run_script("ship_fashion_mnist_distilled.py", runs, "--base-steps", "4", "--sr-steps", "4",
                             "--sr-sampler", "dpmpp", "--study", out / "results.json",
                             "--bundle", bundles / "fashion-mnist-distilled")
    assert status == 0, log
    bundle = bundles / "fashion-mnist-distilled"
    manifest = json.loads((bundle / "cascade.json").read_text())
    assert manifest["study"]["setting"] == "cascade/pd4+dpmpp4" and list(manifest["distillation"]) == ["base8"]
    teacher_sr = Path(pretrained.__file__).parent / "pretrained" / "fashion-mnist" / "sr8to32_noaug"
    assert (bundle / "sr8to32_noaug" / "model.safetensors").read_bytes() == \
        (teacher_sr / "model.safetensors").read_bytes()
    cascade = Cascade.load(pretrained="fashion-mnist-distilled")
    assert [(s.config.sample.sampler, s.config.sample.steps) for s in cascade.stages] == [("ddim", 4), ("dpmpp", 4)]
    calls.clear()
    for i, stage in enumerate(cascade.stages):
        stage.net.register_forward_hook(lambda *_, i=i: calls.append(i))
    cascade.sample(torch.arange(3), generator=torch.Generator().manual_seed(0))
    assert calls == [0] * 4 + [1] * 4
