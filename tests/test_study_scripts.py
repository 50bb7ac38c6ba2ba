"""The convergence-study scripts' bookkeeping: training FLOPs per image, CPU time from a resumed log, the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
convergence_study = pytest.importorskip("convergence_study")
stage_costs = pytest.importorskip("stage_costs")


def test_flops_counted_on_meta_equal_a_real_forward():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cascaded_diffusion.stage import build_network

    config = load_config(ROOT / "configs" / "fashion-mnist" / "sr8to32.toml")
    net = build_network(config, "cpu").eval()
    x = torch.zeros(1, 1, 16, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1), y=torch.zeros(1, dtype=torch.long), low_res=x, aug_level=torch.zeros(1))
    # within 0.2 %: the U-Net's CPU-only fast paths count a few elementwise FLOPs differently from the generic
    # path that the meta device (and a GPU) takes
    assert stage_costs.forward_flops(config) == pytest.approx(counter.get_total_flops(), rel=2e-3)
    # the sampling cost is counted at full size: 4x the pixels of the 16x16 training crop (less the per-image
    # embedding MLPs, which do not scale; more for attention over 4x the tokens)
    assert 3.7 < stage_costs.forward_flops(config, 32) / stage_costs.forward_flops(config) < 4.5


def test_stage_costs_multiply_out_the_schedule():
    row = stage_costs.stage_cost(ROOT / "configs" / "fashion-mnist" / "base8.toml", global_batch=128, sample_steps=10)
    assert row["global_batch"] == 128 and row["train_steps"] == 30000
    assert row["train_flops"] == pytest.approx(3 * row["train_gflop_per_image"] * 1e9 * 30000 * 128)
    assert row["sample_flops_per_image"] == pytest.approx(row["train_gflop_per_image"] * 1e9 * 10)
    assert stage_costs.si(1.14e15) == "1.14 PFLOP" and stage_costs.si(633.7e18) == "634 EFLOP"


def test_crop_training_flops_scale_with_pixels():
    config = load_config(ROOT / "configs" / "fashion-mnist" / "sr8to32.toml")
    cropped = convergence_study.forward_flops_per_image(config)
    config.train.crop = 0
    whole = convergence_study.forward_flops_per_image(config)
    # convolutions scale with the pixel count (1/4), attention over 4x fewer tokens by less; the per-image
    # time/class/level embedding MLPs do not scale at all
    assert 0.2 < cropped / whole < 0.27


def test_cpu_hours_count_only_the_work_that_stands(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"event": "start", "step": 0},
        {"step": 10, "img_per_s": 32.0},  # 10 steps x 32 images at 32 img/s = 10 s
        {"step": 20, "img_per_s": 32.0},  # lost: the run was killed and resumed from step 10
        {"event": "resume", "step": 10},
        {"step": 20, "img_per_s": 16.0},  # redone at half the speed: 20 s
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config(ROOT / "configs" / "fashion-mnist" / "sr8to32.toml")
    config.train.batch_size = 32
    monkeypatch.setattr(convergence_study, "run_config", lambda _run: config)
    assert convergence_study.cpu_hours_at(run, 20) == pytest.approx(30 / 3600)
    assert convergence_study.cpu_hours_at(run, 10) == pytest.approx(10 / 3600)


def test_plot_takes_the_best_s_per_checkpoint(tmp_path):
    records = [
        {"model": "sr8to32", "step": 470, "s": 100, "fid": 9.0, "fid_bootstrap_std": 0.2, "train_flops": 1e15},
        {"model": "sr8to32", "step": 470, "s": 250, "fid": 8.0, "fid_bootstrap_std": 0.2, "train_flops": 1e15},
        {"model": "sr8to32_noaug", "step": 470, "s": None, "fid": 8.5, "fid_bootstrap_std": 0.2, "train_flops": 1e15},
        {"model": "single32", "step": 290, "s": None, "fid": 20.0, "fid_bootstrap_std": None, "train_flops": 1e14},
    ]
    out = tmp_path / "plot.png"
    convergence_study.plot(records, out)
    assert out.stat().st_size > 1000


def test_convergence_table_marks_the_best_level_per_budget(tmp_path, capsys):
    study_tables = pytest.importorskip("study_tables")
    recs = [
        {"model": "sr8to32", "step": 470, "s": 100, "fid": 9.0},
        {"model": "sr8to32", "step": 470, "s": 250, "fid": 8.5},
        {"model": "sr8to32_noaug", "step": 470, "s": None, "fid": 9.5},
        {"model": "sr8to32", "step": 940, "s": 250, "fid": 7.0},
        {"model": "single32", "step": 290, "s": None, "fid": 20.0},
    ]
    for r in recs:
        r.update(num=5000, epochs=r["step"] * 64 / 60000, train_flops=1e15, cpu_hours=0.1, fid_bootstrap_std=0.1)
    (tmp_path / "convergence.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    study_tables.main(str(tmp_path))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 470 ") or line.startswith("| 940 ")]
    assert rows[0].split(" | ")[4:] == ["9.00 ± 0.10", "**8.50 ± 0.10**", "9.50 ± 0.10", "-1.00 |"]  # best s − noaug
    assert rows[1].split(" | ")[4:] == ["", "**7.00 ± 0.10**", "", " |"]  # no unaugmented point: no gap
    assert "| 290 | 0.3 | 1.00 | 0.10 | 20.00 ± 0.10 |" in out


def test_cas_over_classifier_seeds_is_mean_and_sample_std_of_that_setting_only(tmp_path):
    study_tables = pytest.importorskip("study_tables")

    def cas(name, top1):
        (tmp_path / name).write_text(json.dumps({"generated": {"top1": top1, "top5": 0.99}}))

    cas("cascade_noise.cas.json", 0.85)
    cas("cascade_noise.cas_seed1.json", 0.86)
    cas("cascade_noise.cas_seed2.json", 0.84)
    cas("cascade_noise.cas_seed0.json", 0.85)  # seed 0 again under the other name: counted once
    cas("cascade_noise_s0.cas.json", 0.50)  # another setting whose name extends this one's: not counted
    cas("cascade_noise_s0.cas_seed1.json", 0.50)
    assert study_tables.cas_over_seeds(tmp_path, "cascade_noise") == "85.0 ± 1.0 (3 seeds)"
    assert study_tables.cas_over_seeds(tmp_path, "cascade_noise_s0") == "50.0 ± 0.0 (2 seeds)"
    cas("single32.cas.json", 0.8)
    assert study_tables.cas_over_seeds(tmp_path, "single32") == ""  # one seed: no spread to report
    cas("mix.cas_seed0.json", 0.80)  # every seed under the --seed K naming, none as NAME.cas.json
    cas("mix.cas_seed1.json", 0.82)
    assert study_tables.cas_top1_over_seeds(tmp_path, "mix") == pytest.approx([80.0, 82.0])
    assert study_tables.cas_over_seeds(tmp_path, "cascade_noaug") == ""


def test_ship_exports_the_best_setting_with_its_sampling_defaults(tmp_path, monkeypatch):
    """The shipping script picks the lowest-FID cascade, exports both stages as fp16 with the study's s, records
    the sampler the numbers were measured with, keeps the classifier files, and the result loads as a bundle that
    samples with the stages' own [sample] defaults, or the ones --default-sampler/--default-steps give."""
    import shutil

    import torch

    import cascaded_diffusion.pretrained as pretrained
    from cascaded_diffusion.cascade import Cascade

    ship = pytest.importorskip("ship_fashion_mnist")
    tiny = ROOT / "tests" / "fixtures" / "tiny_run"
    runs = tmp_path / "study"
    runs.mkdir()
    shutil.copytree(tiny / "base8", runs / "base8")
    shutil.copytree(tiny / "sr8to16", runs / "sr8to32")         # the augmented SR run (noise augmentation)
    shutil.copytree(tiny / "sr8to16", runs / "sr8to32_noaug")
    for name, fid in (("cascade_noise", 5.0), ("cascade_noise_s0", 7.0), ("cascade_noaug", 6.0)):
        (runs / f"{name}.metrics.json").write_text(json.dumps({"fid": fid, "num_samples": 10000}))
    (runs / "cascade_noise.cas.json").write_text(json.dumps({"generated": {"top1": 0.9, "top5": 0.99}}))
    (runs / "cascade_noise.cas_seed2.json").write_text(json.dumps({"generated": {"top1": 0.8, "top5": 0.99}}))
    (runs / "sweep_nontruncated.json").write_text(json.dumps({"best_level": 30}))
    bundle = tmp_path / "pretrained" / "fashion-mnist"
    bundle.mkdir(parents=True)
    for name in ship.KEEP:
        (bundle / name).write_text(name)
    monkeypatch.setattr(sys, "argv", ["ship", str(runs), "--bundle", str(bundle), "--steps", "3,2"])
    ship.main()

    manifest = json.loads((bundle / "cascade.json").read_text())
    assert manifest["stages"] == ["base8", "sr8to32"] and manifest["sampling"] == {"truncated": False}
    assert manifest["study"]["setting"] == "cascade_noise" and manifest["study"]["aug_level"] == 30
    assert manifest["study"]["sampler"] == "dpmpp" and manifest["study"]["steps"] == [3, 2]  # as measured
    assert manifest["study"]["cas"]["top1"] == 0.9
    assert manifest["study"]["cas_top1_over_classifier_seeds"] == pytest.approx([90.0, 80.0])
    assert "CAS top-1 85.0 ± 7.1 % over 2 classifier seeds" in manifest["description"]
    assert all((bundle / name).read_text() == name for name in ship.KEEP)
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", bundle.parent)
    cascade = Cascade.load(pretrained="fashion-mnist")
    assert cascade.aug_levels() == [30]
    trained = Cascade.load([runs / "base8", runs / "sr8to32"])
    assert [(s.config.sample.sampler, s.config.sample.steps) for s in cascade.stages] == \
        [(s.config.sample.sampler, s.config.sample.steps) for s in trained.stages]  # the runs' own [sample]

    monkeypatch.setattr(sys, "argv", ["ship", str(runs), "--bundle", str(bundle), "--steps", "3,2",
                                      "--default-sampler", "ddim", "--default-steps", "4,2"])
    ship.main()
    cascade = Cascade.load(pretrained="fashion-mnist")
    assert [(s.config.sample.sampler, s.config.sample.steps) for s in cascade.stages] == [("ddim", 4), ("ddim", 2)]
    weights = (bundle / "sr8to32" / "model.safetensors")
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}


def test_paired_gap_cancels_what_both_sets_share(tmp_path):
    """The gap of a set against itself is exactly 0 with no spread; against a shifted copy, the paired spread is
    well below the unpaired one (measured 0.55 of it here; 0.3 on the study's samples), because the variation that
    both sets share cancels."""
    from cascaded_diffusion.evaluation.stats import FeatureStats

    rng = np.random.default_rng(0)
    # images that differ a lot from each other (a brightness ramp at a random angle and level), so that which
    # images a resampling picks moves FID much more than the small shift between the two sets does
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    angle, level = rng.uniform(0, np.pi, (400, 1, 1)), rng.uniform(0, 200, (400, 1, 1))
    ramps = level + 55 * (np.cos(angle) * xx + np.sin(angle) * yy)
    images = np.clip(ramps + rng.normal(0, 8, ramps.shape), 0, 255).astype(np.uint8)[..., None]
    shifted = np.clip(images.astype(np.int16) + 6, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "a.npz", arr_0=images)
    np.savez(tmp_path / "b.npz", arr_0=shifted)
    features, name = convergence_study.classifier_features(tmp_path / "a.npz")
    FeatureStats.from_features(features[::-1].copy(), name).save(tmp_path / "ref.npz")
    same = convergence_study.paired_gap(tmp_path / "a.npz", tmp_path / "a.npz", tmp_path / "ref.npz", 10)
    assert same["gap"] == 0.0 and same["gap_paired_std"] == 0.0
    paired = convergence_study.paired_gap(tmp_path / "b.npz", tmp_path / "a.npz", tmp_path / "ref.npz", 20)
    alone = convergence_study.fid_with_bootstrap(tmp_path / "b.npz", tmp_path / "ref.npz", 20)
    unpaired = np.sqrt(2) * alone["fid_bootstrap_std"]  # two independent resamplings of sets this alike
    assert paired["gap"] > 0 and paired["gap_paired_std"] < 0.75 * unpaired, (paired, unpaired)
