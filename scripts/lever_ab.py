#!/usr/bin/env python
"""Training levers for the Fashion-MNIST SR stage, A/B at a fixed CPU budget (docs/results.md, "Training levers").

Each arm trains ``configs/fashion-mnist/sr8to32.toml`` with its overrides for the same CPU time (user + system
seconds of the training process, so arms running side by side or beside other jobs get the same compute), then
super-resolves the *same* base samples at augmentation level ``--s`` and is scored with FID (classifier
features) against the Fashion-MNIST training set. The run is stopped by SIGKILL when its budget is spent —
a preemption, which the trainer survives — and the newest checkpoint is what gets scored, so an arm's
effective budget is its last checkpoint's CPU time, which is recorded.

Rerunning resumes: a finished arm (``ARM/result.json``) is skipped; an arm with a budget left continues.

    python scripts/lever_ab.py --out /work/runs/ab --budget-min 10 --parallel 2 --num 5000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from cdm_command import cdm, cdm_background  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fashion-mnist" / "sr8to32.toml"
BASE = ROOT / "cascaded_diffusion" / "pretrained" / "fashion-mnist" / "base8"

# name -> (overrides, checkpoint interval in steps: about half a CPU-minute of work each)
ARMS: dict[str, tuple[dict[str, str], int]] = {
    "A_baseline": ({}, 50),
    "B_crop16": ({"train.crop": "16", "train.batch_size": "64"}, 100),
    "C_crop16_minsnr": ({"train.crop": "16", "train.batch_size": "64", "diffusion.loss_weighting": '"min_snr"'}, 100),
    "D_crop16_minsnr_s500": (
        {"train.crop": "16", "train.batch_size": "64", "diffusion.loss_weighting": '"min_snr"',
         "conditioning.s_max": "500"}, 100),
    "E_width48": (
        {"train.crop": "16", "train.batch_size": "64", "diffusion.loss_weighting": '"min_snr"',
         "conditioning.s_max": "500", "model.channels": "48"}, 50),
    "F_width24": (
        {"train.crop": "16", "train.batch_size": "64", "diffusion.loss_weighting": '"min_snr"',
         "conditioning.s_max": "500", "model.channels": "24"}, 100),
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def train_for(arm: str, out: Path, budget_s: float) -> dict:
    """Train until the process has used ``budget_s`` CPU seconds in all (across restarts)."""
    overrides, every = ARMS[arm]
    run = out / arm
    run.mkdir(parents=True, exist_ok=True)
    spent_file = run / "cpu_seconds.json"
    spent = json.loads(spent_file.read_text())["cpu_s"] if spent_file.exists() else 0.0
    checkpoint_cpu = json.loads(spent_file.read_text()).get("by_step", {}) if spent_file.exists() else {}
    if spent < budget_s:
        sets = [x for k, v in {**overrides, "train.steps": "1000000", "train.ckpt_every": str(every),
                               "train.keep_last": "2", "train.sample_every": "0", "train.log_every": "25",
                               "train.progress": "false"}.items() for x in ("--set", f"{k}={v}")]
        with open(run / "train.out", "a") as log:
            proc = cdm_background("train", str(CONFIG), "--out", str(run), *sets, stdout=log,
                                  stderr=subprocess.STDOUT)
        start = spent
        while proc.poll() is None:
            used = start + cpu_seconds(proc.pid)
            for ckpt in (run / "checkpoints").glob("step_*"):
                checkpoint_cpu.setdefault(ckpt.name, used)  # CPU time when the checkpoint appeared
            spent_file.write_text(json.dumps({"cpu_s": used, "by_step": checkpoint_cpu}))
            if used >= budget_s:
                proc.kill()
                proc.wait()
                break
            time.sleep(1.0)
    steps = sorted((run / "checkpoints").glob("step_*"))
    last = steps[-1]
    return {"arm": arm, "overrides": overrides, "checkpoint": last.name, "step": int(last.name[5:]),
            "cpu_s_at_checkpoint": checkpoint_cpu.get(last.name), "cpu_s_total": budget_s}


def evaluate(arm: str, out: Path, s: int, num: int, train_info: dict) -> dict:
    run = out / arm
    ckpt = run / "checkpoints" / train_info["checkpoint"]
    samples = run / f"sr_s{s}.npz"
    log = run / "eval.out"
    if not samples.exists():
        cdm("sample", str(BASE), str(ckpt), "--low-res-samples", str(out / "base_samples.npz"), "--num", str(num),
            "--sampler", "dpmpp", "--steps", "20,10", "--aug-level", str(s), "--out", str(samples), "--quiet",
            log=log)
    metrics = run / f"metrics_s{s}.json"
    if not metrics.exists():
        cdm("eval", str(samples), "--ref", str(out / "ref32.npz"), "--features", "classifier",
            "--metrics", "fid,kid", "--out", str(metrics), log=log)
    return json.loads(metrics.read_text())


def run_arm(arm: str, args: argparse.Namespace) -> dict:
    result_file = args.out / arm / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    info = train_for(arm, args.out, args.budget_min * 60)
    s = 0 if "conditioning.augmentation" in ARMS[arm][0] else args.s
    result = {**info, "s": s, "num": args.num, "metrics": evaluate(arm, args.out, s, args.num, info)}
    result_file.write_text(json.dumps(result, indent=2))
    print(f"{arm}: step {info['step']}, FID {result['metrics'].get('fid')}", flush=True)
    return result


def crop_check(run: Path, num: int = 1000, seed: int = 0) -> dict:
    """Does a crop-trained SR model behave at full size? Its denoising loss on held-out images, with the network
    run on whole 32×32 images against run on the 16×16 crops it trained on, at the same timesteps, noise and
    levels, scored on the same central 16×16 region (away from where a crop's border is)."""
    import torch

    from cascaded_diffusion.augment import downsample
    from cascaded_diffusion.data import load_images
    from cascaded_diffusion.images import images_to_tensor
    from cascaded_diffusion.stage import Stage

    stage = Stage.load(run)
    cfg, net, diffusion = stage.config, stage.net, stage.diffusion
    size, res = cfg.train.crop or 16, cfg.stage.resolution
    test = load_images("fashion-mnist:test", res, channels=cfg.stage.channels)
    x0 = images_to_tensor(test.images[:num])
    labels = torch.as_tensor(np.asarray(test.labels[:num]), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    low = downsample(x0, cfg.stage.low_res)
    levels = None
    if stage.augmentation is not None and getattr(stage.augmentation, "provides_level", False):
        s = torch.randint(cfg.conditioning.s_min, cfg.conditioning.s_max + 1, (num,), generator=g)
        low = stage.augmentation.apply(low, s, generator=g)
        levels = stage.augmentation.scaled_level(s)
    t = torch.randint(0, diffusion.num_timesteps, (num,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    cond = net.upsample_low_res(low, (res, res))
    lo, hi = (res - size) // 2, (res + size) // 2
    x_t = diffusion.q_sample(x0, t, noise=noise)
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    target = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if cfg.diffusion.prediction == "v" else noise
    losses = {}
    with torch.no_grad():
        for name, sl in (("full", slice(0, res)), ("crop", slice(lo, hi))):
            out = net(x_t[:, :, sl, sl], diffusion.scale_timesteps(t), y=labels, aug_level=levels,
                      low_res=cond[:, :, sl, sl]).float()
            pred = out[:, : x0.shape[1]]
            if name == "full":
                pred = pred[:, :, lo:hi, lo:hi]
            losses[name] = float(((pred - target[:, :, lo:hi, lo:hi]) ** 2).mean())
    return {"run": str(run), "num": num, "mse_central_region_full_size_input": losses["full"],
            "mse_central_region_crop_input": losses["crop"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget-min", type=float, default=10.0, help="CPU minutes of training per arm")
    p.add_argument("--num", type=int, default=5000, help="samples per arm (on the same base samples)")
    p.add_argument("--s", type=int, default=300, help="augmentation level at sampling")
    p.add_argument("--parallel", type=int, default=2, help="arms at a time (one thread each)")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--crop-check", type=Path, nargs="*", help="only run the full-size check on these runs")
    args = p.parse_args()
    if args.crop_check:
        for run in args.crop_check:
            print(json.dumps(crop_check(run)))
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "setup.out"
    if not (args.out / "base_samples.npz").exists():
        cdm("sample", str(BASE), "--num", str(args.num), "--sampler", "dpmpp", "--steps", "20", "--seed", "0",
            "--out", str(args.out / "base_samples.npz"), "--quiet", log=log)
    if not (args.out / "ref32.npz").exists():
        cdm("stats", "fashion-mnist", "--resolution", "32", "--features", "classifier",
            "--out", str(args.out / "ref32.npz"), log=log)
    arms = args.arms.split(",")
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda a: run_arm(a, args), arms))
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"{r['arm']:24s} step {r['step']:6d}  cpu {r['cpu_s_at_checkpoint'] or 0:6.0f}s  "
              f"FID {r['metrics'].get('fid', float('nan')):.2f}")


if __name__ == "__main__":
    main()
