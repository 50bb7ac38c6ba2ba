#!/usr/bin/env python
"""Quality against training compute for the Fashion-MNIST cascade (docs/results.md, "At convergence").

For every kept checkpoint (``train.keep_steps``) of the noise-augmented SR model, the SR model trained
without augmentation, and the single 32×32 model, sample ``--num`` images and score FID with classifier
features against the Fashion-MNIST training set, with a bootstrap standard error over the samples. Every
cascade point runs its SR model on the *same* base samples (the final base checkpoint); the augmented model
is scored at each ``--levels`` s and its best s is reported per budget.

Training compute per point: forward FLOPs per image (``torch.utils.flop_counter`` at the size the stage
trained on: the crop for crop-trained SR stages) × 3 (forward + backward) × images seen; a cascade point adds
the whole base run. CPU-hours come from the runs' logs (images per second of each logged interval).

Results append to ``RUNS/convergence.jsonl`` (one line per scored point; rerunning skips scored points), and
``--plot`` draws FID against training FLOPs.

    python scripts/convergence_study.py --runs /work/runs/conv --num 5000 --levels 100,250,400 \
        --plot docs/images/convergence.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage_costs, cdm_command
from cdm_command import cdm  # noqa: E402

SAMPLER = ("dpmpp", "20,10")  # base steps, SR (or single-model) steps


def checkpoints(run: Path) -> list[Path]:
    from cascaded_diffusion.checkpoint import list_checkpoints

    return list_checkpoints(run)


def run_config(run: Path):
    from cascaded_diffusion.checkpoint import load_state
    from cascaded_diffusion.config import StageConfig

    return StageConfig.from_dict(load_state(checkpoints(run)[-1])["config"])


def forward_flops_per_image(config) -> float:
    """Forward FLOPs of one training image (at the crop size when the stage trains on crops)."""
    from stage_costs import forward_flops

    return forward_flops(config)


def cpu_hours_at(run: Path, step: int) -> float:
    """Training time up to ``step`` from the log (one thread per run: wall-clock time = CPU time), counting
    only the records that stand after every resume (work lost to an interruption is not counted)."""
    from cascaded_diffusion.rundir import read_log

    config = run_config(run)
    per_step = config.train.batch_size * config.train.grad_accum
    seconds, last_step = 0.0, 0
    for rec in sorted((r for r in read_log(run) if "img_per_s" in r and r["step"] <= step), key=lambda r: r["step"]):
        seconds += (rec["step"] - last_step) * per_step / max(rec["img_per_s"], 1e-9)
        last_step = rec["step"]
    return seconds / 3600


def classifier_features(samples: Path):
    from cascaded_diffusion.evaluation.evaluate import load_samples
    from cascaded_diffusion.evaluation.features import extract, get_feature_extractor

    images, _ = load_samples(samples)
    extractor = get_feature_extractor("classifier")
    return extract(images, extractor)[0], extractor.name


def fid_of(features, name: str, reference) -> float:
    from cascaded_diffusion.evaluation.metrics import fid_from_stats
    from cascaded_diffusion.evaluation.stats import FeatureStats

    return fid_from_stats(FeatureStats.from_features(features, name, keep_features=False), reference)


def paired_gap(a: Path, b: Path, ref: Path, rounds: int, seed: int = 0) -> dict:
    """FID(a) − FID(b) with a *paired* bootstrap: both sample sets super-resolve the same base samples in the
    same order, so one resampling of indices applies to both, and the base samples' own spread cancels."""
    from cascaded_diffusion.evaluation.stats import FeatureStats

    fa, name = classifier_features(a)
    fb, _ = classifier_features(b)
    if len(fa) != len(fb):
        raise SystemExit(f"{a} and {b} hold {len(fa)} and {len(fb)} samples: not a paired comparison")
    reference = FeatureStats.load(ref)

    def gap(pick):
        return fid_of(fa[pick], name, reference) - fid_of(fb[pick], name, reference)

    rng = np.random.default_rng(seed)
    boot = [gap(rng.integers(0, len(fa), len(fa))) for _ in range(rounds)]
    return {"gap": gap(np.arange(len(fa))), "gap_paired_std": float(np.std(boot, ddof=1)), "num": int(len(fa))}


def fid_with_bootstrap(samples: Path, ref: Path, rounds: int, seed: int = 0) -> dict:
    from cascaded_diffusion.evaluation.stats import FeatureStats

    features, name = classifier_features(samples)
    reference = FeatureStats.load(ref)
    fid = fid_of(features, name, reference)
    rng = np.random.default_rng(seed)
    boot = [fid_of(features[rng.integers(0, len(features), len(features))], name, reference) for _ in range(rounds)]
    # FID is biased upward under resampling (duplicates shrink the covariance); the spread is what we report
    return {"fid": fid, "fid_bootstrap_std": float(np.std(boot, ddof=1)) if rounds > 1 else None,
            "feature_network": name, "num": int(len(features))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="holds base8, sr8to32, sr8to32_noaug, single32")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--levels", default="100,250,400", help="s levels for the augmented SR model's newest checkpoint")
    p.add_argument("--levels-early", help="s levels at the earlier (kept) checkpoints; default: --levels")
    p.add_argument("--models", default="sr8to32,sr8to32_noaug,single32",
                   help="which runs to score (two lanes can score different models side by side)")
    p.add_argument("--kept-only", action="store_true",
                   help="score only kept checkpoints, not the newest one (while the trainings still run)")
    p.add_argument("--only-steps", help="score only these checkpoint steps (e.g. the ones a longer run added)")
    p.add_argument("--base-step", type=int,
                   help="base checkpoint whose samples every cascade point uses (default: the newest); keep it fixed "
                        "when the base trains on, so that new points stay comparable with the scored ones")
    p.add_argument("--bootstrap", type=int, default=20)
    p.add_argument("--gaps", action="store_true",
                   help="paired bootstrap of FID(augmented at its best s) − FID(without augmentation) per budget "
                        "-> RUNS/convergence_gaps.json")
    p.add_argument("--plot", type=Path)
    p.add_argument("--only-plot", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runs = args.runs
    out = runs / "convergence"
    out.mkdir(parents=True, exist_ok=True)
    results_file = runs / "convergence.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["model"], rec["step"], rec.get("s"))] = rec

    ref = out / "ref32.npz"
    if not args.only_plot:
        if not ref.exists():
            cdm("stats", "fashion-mnist", "--resolution", "32", "--features", "classifier", "--out", str(ref))
        base_run = runs / "base8"
        base_ckpt = checkpoints(base_run)[-1]
        if args.base_step is not None:
            base_ckpt = base_run / "checkpoints" / f"step_{args.base_step:08d}"
        base_step = int(base_ckpt.name[5:])
        base_samples = out / f"base_samples_step{base_ckpt.name[5:]}.npz"
        if not base_samples.exists():
            if not base_ckpt.is_dir():  # the samples outlive a rolling checkpoint; without them it is needed
                raise SystemExit(f"--base-step {args.base_step}: neither {base_samples} nor {base_ckpt} exists")
            cdm("sample", str(base_ckpt), "--num", str(args.num), "--sampler", SAMPLER[0], "--steps",
                SAMPLER[1].split(",")[0], "--seed", "0", "--out", str(base_samples), "--quiet")
        base_flops = forward_flops_per_image(run_config(base_run)) * 3
        base_cfg = run_config(base_run)
        base_total = base_flops * base_step * base_cfg.train.batch_size * base_cfg.train.grad_accum
        base_hours = cpu_hours_at(base_run, base_step)
        plan = []
        for model in args.models.split(","):
            run = runs / model
            if not run.is_dir():
                continue
            config = run_config(run)
            flops = forward_flops_per_image(config) * 3
            # the kept checkpoints (doubling budgets) and the newest; the rolling ones in between are skipped
            kept = set(config.train.keep_steps or ())
            ckpts = [c for c in checkpoints(run) if int(c.name[5:]) in kept]
            if not args.kept_only:
                ckpts += checkpoints(run)[-1:]
            if args.only_steps:
                wanted = {int(x) for x in args.only_steps.split(",")}
                ckpts = [c for c in ckpts if int(c.name[5:]) in wanted]
            for ckpt in dict.fromkeys(ckpts):
                step = int(ckpt.name[5:])
                levels = [None]
                if model == "sr8to32":
                    spec = args.levels if ckpt == ckpts[-1] else (args.levels_early or args.levels)
                    levels = [int(s) for s in spec.split(",")]
                for s in levels:
                    plan.append((model, run, config, flops, ckpt, step, s))
        for model, run, config, flops, ckpt, step, s in plan:
            if (model, step, s) in done:
                if model != "single32" and done[(model, step, s)].get("base_step", base_step) != base_step:
                    raise SystemExit(f"{model} step {step} was scored on base step "
                                     f"{done[(model, step, s)]['base_step']} samples, this run uses {base_step}: "
                                     "pass --base-step, or move convergence.jsonl aside to rescore everything")
                continue
            name = f"{model}_step{step}" + (f"_s{s}" if s is not None else "")
            samples = out / f"{name}.npz"
            if not samples.exists():
                if model == "single32":
                    cdm("sample", str(ckpt), "--num", str(args.num), "--sampler", SAMPLER[0], "--steps",
                        SAMPLER[1].split(",")[1], "--seed", "1", "--out", str(samples), "--quiet")
                else:
                    extra = ["--aug-level", str(s)] if s is not None else []
                    cdm("sample", str(base_run), str(ckpt), "--low-res-samples", str(base_samples), "--num",
                        str(args.num), "--sampler", SAMPLER[0], "--steps", SAMPLER[1], "--seed", "1",
                        "--out", str(samples), "--quiet", *extra)
            images = step * config.train.batch_size * config.train.grad_accum
            cascade = model != "single32"
            rec = {
                "model": model, "step": step, "s": s, "images_seen": images,
                "base_step": base_step if cascade else None,
                "epochs": images / 60000,
                "train_flops": flops * images + (base_total if cascade else 0.0),
                "stage_flops": flops * images,
                "cpu_hours": cpu_hours_at(run, step) + (base_hours if cascade else 0.0),
                "sampler": SAMPLER, **fid_with_bootstrap(samples, ref, args.bootstrap),
            }
            with open(results_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            done[(model, step, s)] = rec
            print(f"{name}: FID {rec['fid']:.2f} ± {rec['fid_bootstrap_std'] or 0:.2f}", flush=True)
    if args.gaps:
        gaps = {}
        for step in sorted({step for (model, step, _s) in done if model == "sr8to32_noaug"}):
            augmented = [r for (m, st, _s), r in done.items() if m == "sr8to32" and st == step]
            if not augmented:
                continue
            best = min(augmented, key=lambda r: r["fid"])
            gaps[str(step)] = {"s": best["s"], **paired_gap(out / f"sr8to32_step{step}_s{best['s']}.npz",
                                                            out / f"sr8to32_noaug_step{step}.npz", ref, 200)}
            print(f"step {step}: augmented (s = {best['s']}) − without: {gaps[str(step)]['gap']:+.2f} "
                  f"± {gaps[str(step)]['gap_paired_std']:.2f} (paired)", flush=True)
        (runs / "convergence_gaps.json").write_text(json.dumps(gaps, indent=2) + "\n")
    if args.plot:
        plot(list(done.values()), args.plot)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {
        "cascade, noise-augmented SR (best s)": [r for r in records if r["model"] == "sr8to32"],
        "cascade, SR without augmentation": [r for r in records if r["model"] == "sr8to32_noaug"],
        "single 32×32 model": [r for r in records if r["model"] == "single32"],
    }
    for label, recs in series.items():
        best: dict[int, dict] = {}
        for r in recs:  # best s per checkpoint
            if r["step"] not in best or r["fid"] < best[r["step"]]["fid"]:
                best[r["step"]] = r
        pts = sorted(best.values(), key=lambda r: r["train_flops"])
        if not pts:
            continue
        ax.errorbar([r["train_flops"] / 1e15 for r in pts], [r["fid"] for r in pts],
                    yerr=[r["fid_bootstrap_std"] or 0 for r in pts], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute, PFLOP (cascade: base + SR)")
    ax.set_ylabel("FID (classifier features, lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
