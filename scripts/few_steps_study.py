#!/usr/bin/env python
"""Quality against sampling steps for progressively distilled stages, against the undistilled stages sampled with
DPM-Solver++ at the same step count (docs/results.md, "Few steps"; scripts/distill_fashion_mnist.sh runs it).

Points, each ``--num`` class-balanced samples (seed 0, the bundle's non-truncated mode) scored at the final
resolution with the classifier's features against ``--ref``: FID with a bootstrap standard error, KID (mean ± std
over subsets) and, for a distilled point and its DPM-Solver++ point at the same steps, the paired-bootstrap FID
difference (the same sample indices resampled for both: the same seeds, labels and, for SR points, the same base
samples):

* ``base/pdN`` | ``base/dpmppN`` | ``base/dpmppNt``: the base with N steps (its distilled N-step student, or the
  teacher with DPM-Solver++ on the default grid, or on the distillation's "trailing" grid), then the teacher SR stage
  at its default (DPM-Solver++ 10): the base's own effect, the SR stage fixed;
* ``sr/pdN`` | ``sr/dpmppN`` | ``sr/dpmppNt``: the SR stage with N steps on one fixed set of base samples (the
  teacher base at its default, DPM-Solver++ 20);
* ``cascade/pdB+pdS`` (any mix of pd, dpmpp, dpmpp…t per stage): both stages as given.

Every distilled point is compared with both DPM-Solver++ twins (``paired_gaps``): at a few steps the default grid
spends its last evaluation at index 0, next to clean data, so the trailing grid can be the stronger baseline.

``--runs`` holds the distillations ``base8/`` and ``sr8to32_noaug/`` (``cdm distill`` outputs); their rounds are
exported to ``OUT/stages/`` (fp32). Samples go to ``OUT/samples/`` (resumable shards), scores to ``OUT/results.json``
(a rerun skips scored points), the cost of every round (CPU-hours from the checkpoints' records) too. ``--speed``
times the cascades of ``--speed-points`` interleaved (samples per second; the speed target compares the shipped
cascade with the distilled one on the same batches).

    python scripts/few_steps_study.py --runs /work/runs/distill --ref ref_fmnist_train_32.npz --num 5000 \
        --out /work/runs/distill/study --plot docs/images/few_steps.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cascaded_diffusion.cascade import Cascade, balanced_labels  # noqa: E402
from cascaded_diffusion.checkpoint import export_stage  # noqa: E402
from cascaded_diffusion.distillation import distill_report, finished_students  # noqa: E402
from cascaded_diffusion.evaluation.evaluate import load_samples, reference_stats  # noqa: E402
from cascaded_diffusion.evaluation.features import extract, get_feature_extractor  # noqa: E402
from cascaded_diffusion.evaluation.metrics import FeatureStats, fid_from_stats, kid  # noqa: E402
from cascaded_diffusion.hardware import choose_precision, device_name  # noqa: E402
from cascaded_diffusion.pretrained import pretrained_stage_dirs  # noqa: E402
from cascaded_diffusion.sharded_sampling import sample_sharded  # noqa: E402
from cascaded_diffusion.stage import Stage  # noqa: E402

STAGES = ("base8", "sr8to32_noaug")  # the distillations' names in --runs, base first
DEFAULTS = (("dpmpp", 20), ("dpmpp", 10))  # the shipped cascade's samplers
SETTING = re.compile(r"^(pd|dpmpp)(\d+)(t?)$")


def students(runs: Path, out: Path) -> list[dict[int, Path]]:
    """Per stage: student steps -> its exported stage (every finished round, exported once)."""
    found: list[dict[int, Path]] = []
    for name in STAGES:
        per: dict[int, Path] = {}
        for steps, ckpt in finished_students(runs / name).items():
            target = out / "stages" / f"{name}_pd{steps}"
            if not (target / "stage.json").is_file():
                export_stage(ckpt, target)
            per[steps] = target
        found.append(per)
    return found


def stage_for(setting: str, index: int, teachers: list[Path], distilled: list[dict[int, Path]]):
    """(stage directory, sampler, steps, spacing) of one stage's setting: pdN, dpmppN, dpmppNt."""
    m = SETTING.match(setting)
    if not m:
        raise SystemExit(f"bad setting {setting!r}: use pdN, dpmppN or dpmppNt")
    kind, steps, trailing = m.group(1), int(m.group(2)), bool(m.group(3))
    if kind == "pd":
        if steps not in distilled[index]:
            return None
        return distilled[index][steps], None, None, None
    return teachers[index], "dpmpp", steps, "trailing" if trailing else None


def load_cascade(parts, device) -> Cascade:
    stages = []
    for path, _, _, spacing in parts:
        stage = Stage.load(path, device=device)
        if spacing:
            stage.config.sample.spacing = spacing
        stages.append(stage)
    return Cascade(stages)


def parse_point(point: str) -> tuple[str, list[str]]:
    kind, _, rest = point.partition("/")
    settings = rest.split("+")
    if kind not in ("base", "sr", "cascade") or (kind == "cascade") != (len(settings) == 2) or not all(settings):
        raise SystemExit(f"bad point {point!r}: base/SETTING, sr/SETTING or cascade/SETTING+SETTING")
    return kind, settings


def samples_path(study: Path, point: str) -> Path:
    return study / "samples" / f"{point.replace('/', '_').replace('+', '_')}.npz"


def sample_point(point: str, args, teachers, distilled, precision, fixed_base: Path | None) -> Path | None:
    kind, settings = parse_point(point)
    if kind == "base":
        settings = [settings[0], f"{DEFAULTS[1][0]}{DEFAULTS[1][1]}"]
    elif kind == "sr":
        settings = [f"{DEFAULTS[0][0]}{DEFAULTS[0][1]}", settings[0]]
    parts = [stage_for(s, i, teachers, distilled) for i, s in enumerate(settings)]
    if any(p is None for p in parts):
        print(f"{point}: no such student yet, skipped", flush=True)
        return None
    out = samples_path(args.out, point)
    if out.is_file():
        return out
    cascade = load_cascade(parts, args.device)
    labels = balanced_labels(args.num, cascade.num_classes)
    kwargs = dict(steps=[p[2] for p in parts], sampler=[p[1] for p in parts], truncated=False,
                  autocast=precision.bf16, seed=args.seed, batch_size=args.batch_size)
    start = time.time()
    if kind == "sr":  # every SR point runs on the same base samples
        base_images, base_labels = load_samples(fixed_base)
        sample_sharded(cascade, torch.from_numpy(base_labels), out, low_res=base_images, start_stage=1, **kwargs)
    else:
        stage_paths = [out.with_suffix(".base.npz"), out.with_suffix(".final.npz")] if point == "base/dpmpp20" else None
        sample_sharded(cascade, labels, out, stage_paths=stage_paths, **kwargs)
    seconds = time.time() - start
    (out.with_suffix(".time.json")).write_text(json.dumps({"seconds": seconds, "num": args.num}))
    return out


def features_of(path: Path, extractor) -> np.ndarray:
    cached = path.with_suffix(".features.npy")
    if cached.is_file():
        return np.load(cached)
    images, _ = load_samples(path)
    feats = extract(images, extractor)[0]
    np.save(cached, feats)
    return feats


def fid_of(feats: np.ndarray, name: str, reference: FeatureStats) -> float:
    return fid_from_stats(FeatureStats.from_features(feats, name, keep_features=False), reference)


def score(feats: np.ndarray, name: str, reference: FeatureStats, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    boot = [fid_of(feats[rng.integers(0, len(feats), len(feats))], name, reference) for _ in range(rounds)]
    mean, std = kid(feats, reference.features, num_subsets=100, subset_size=min(1000, len(feats)))
    return {"fid": fid_of(feats, name, reference), "fid_bootstrap_std": float(np.std(boot, ddof=1)),
            "kid": {"mean": mean, "std": std}, "num": int(len(feats))}


def paired_gap(fa: np.ndarray, fb: np.ndarray, name: str, reference: FeatureStats, rounds: int) -> dict:
    rng = np.random.default_rng(1)
    gaps = []
    for _ in range(rounds):
        pick = rng.integers(0, len(fa), len(fa))
        gaps.append(fid_of(fa[pick], name, reference) - fid_of(fb[pick], name, reference))
    return {"gap": fid_of(fa, name, reference) - fid_of(fb, name, reference), "paired_std": float(np.std(gaps, ddof=1))}


def dpmpp_twins(point: str) -> tuple[str, str]:
    """A distilled point's DPM-Solver++ twins at the same steps: on the default grid and on the trailing grid."""
    return re.sub(r"pd(\d+)", r"dpmpp\1", point), re.sub(r"pd(\d+)", r"dpmpp\1t", point)


def cascade_rows(results: dict) -> list[tuple[str, int, dict]]:
    """Every whole-cascade point as (base + SR label, network evaluations, record), best FID first, then the shipped
    30-evaluation cascade (the point base/dpmpp20) for reference."""
    rows = []
    for pt in sorted((pt for pt in results["points"] if pt.startswith("cascade/")),
                     key=lambda pt: results["points"][pt]["fid"]):
        settings = parse_point(pt)[1]
        rows.append((" + ".join(settings), sum(int(SETTING.match(x).group(2)) for x in settings), results["points"][pt]))
    if "base/dpmpp20" in results["points"]:
        rows.append(("dpmpp20 + dpmpp10", 30, results["points"]["base/dpmpp20"]))
    return rows


def default_points(distilled: list[dict[int, Path]]) -> list[str]:
    points = ["base/dpmpp20"]  # also the shipped cascade (dpmpp 20 + 10) and the SR points' fixed base samples
    for kind, per in (("base", distilled[0]), ("sr", distilled[1])):
        for steps in sorted(per, reverse=True):  # DPM-Solver++ on both grids: the better one is the baseline
            points += [f"{kind}/pd{steps}", f"{kind}/dpmpp{steps}", f"{kind}/dpmpp{steps}t"]
    for b in sorted(distilled[0], reverse=True):
        for s in sorted(distilled[1], reverse=True):
            if b + s <= 8:
                points += [f"cascade/pd{b}+pd{s}", f"cascade/dpmpp{b}+dpmpp{s}", f"cascade/dpmpp{b}t+dpmpp{s}t"]
    return points


def speed(args, teachers, distilled, precision) -> dict:
    """Samples per second of each --speed-points cascade, batches interleaved, best of --speed-repeats."""
    cascades = {}
    for point in args.speed_points.split(","):
        _, settings = parse_point(point)
        parts = [stage_for(s, i, teachers, distilled) for i, s in enumerate(settings)]
        if any(p is None for p in parts):
            continue
        cascades[point] = (load_cascade(parts, args.device), [p[2] for p in parts], [p[1] for p in parts])
    labels = balanced_labels(args.batch_size, 10)
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in cascades}
    for repeat in range(args.speed_repeats + 1):
        for point, (cascade, steps, sampler) in cascades.items():
            gen = torch.Generator().manual_seed(repeat)
            wall, cpu = time.perf_counter(), time.process_time()
            cascade.sample(labels, steps=steps, sampler=sampler, truncated=False, autocast=precision.bf16, generator=gen)
            if repeat:  # the first round warms up
                times[point].append((time.perf_counter() - wall, time.process_time() - cpu))
    # wall clock and CPU time of this process (beside other jobs the CPU time is the steadier of the two)
    return {p: {"samples_per_s": args.batch_size / min(w for w, _ in t),
                "samples_per_cpu_s": args.batch_size / min(c for _, c in t), "seconds": [w for w, _ in t],
                "cpu_seconds": [c for _, c in t], "batch": args.batch_size, "threads": torch.get_num_threads()}
            for p, t in times.items() if t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True, help="holds the distillations base8/ and sr8to32_noaug/")
    p.add_argument("--pretrained", default="fashion-mnist", help="the teachers' cascade")
    p.add_argument("--ref", required=True, help="reference stats (.npz from cdm stats) or a data spec")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--points", help="comma-separated points (default: every student, its DPM-Solver++ twins, and "
                                    "the cascades of at most 8 evaluations); none: only --speed")
    p.add_argument("--bootstrap", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    p.add_argument("--tables", type=Path, help="also write the results as markdown tables (docs/results.md)")
    p.add_argument("--paired-with", type=Path, metavar="STUDY",
                   help="also the paired FID gap of each point against the same point in another --out (e.g. the "
                        "same layout with a longer round: same labels and seeds, so the noise cancels)")
    p.add_argument("--speed", action="store_true", help="also time --speed-points (interleaved)")
    p.add_argument("--speed-points", default="cascade/dpmpp20+dpmpp10,cascade/pd4+pd4")
    p.add_argument("--speed-repeats", type=int, default=3)
    args = p.parse_args()

    precision = choose_precision(args.precision, args.device)
    teachers = pretrained_stage_dirs(args.pretrained)
    distilled = students(args.runs, args.out)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"points": {}}
    extractor = get_feature_extractor("classifier", device=args.device)
    reference = reference_stats(args.ref, extractor, resolution=32, channels=1)
    results.update({"num": args.num, "seed": args.seed, "feature_network": extractor.name, "reference": reference.source,
                    "device": device_name(args.device), "precision": precision.name, "torch": torch.__version__,
                    "cost": {name: distill_report(args.runs / name) for name in STAGES}})
    points = [] if args.points == "none" else args.points.split(",") if args.points else default_points(distilled)
    if any(parse_point(pt)[0] == "sr" for pt in points) and "base/dpmpp20" not in points:
        points.insert(0, "base/dpmpp20")
    fixed_base = args.out / "samples" / "base_dpmpp20.base.npz"
    feats = {}
    for point in points:
        path = sample_point(point, args, teachers, distilled, precision, fixed_base)
        if path is None:
            continue
        feats[point] = features_of(path, extractor)
        if point not in results["points"]:
            timing = json.loads(path.with_suffix(".time.json").read_text()) if path.with_suffix(".time.json").is_file() else {}
            results["points"][point] = {**score(feats[point], extractor.name, reference, args.bootstrap), **timing}
            rec = results["points"][point]
            print(f"{point}: FID {rec['fid']:.3f} ± {rec['fid_bootstrap_std']:.3f}, KID×10³ {1e3 * rec['kid']['mean']:.2f}",
                  flush=True)
            results_path.write_text(json.dumps(results, indent=1))
    for point in feats:  # distilled against DPM-Solver++ at the same steps (either grid): FID(pd) - FID(twin), paired
        gaps = results["points"][point].setdefault("paired_gaps", {}) if "/pd" in point else {}
        for twin in dpmpp_twins(point):
            if "/pd" in point and twin in feats and twin not in gaps:
                gaps[twin] = paired_gap(feats[point], feats[twin], extractor.name, reference, args.bootstrap)
    if args.paired_with:  # the same points of another study (other students, same labels and seeds): FID(here) - FID(there)
        for point in feats:
            there = samples_path(args.paired_with, point)
            if there.is_file():
                rec = paired_gap(feats[point], features_of(there, extractor), extractor.name, reference, args.bootstrap)
                results["points"][point].setdefault("paired_with", {})[str(args.paired_with)] = rec
                print(f"{point} against {there}: {rec['gap']:+.3f} ± {rec['paired_std']:.3f}", flush=True)
    if args.speed:
        results["speed"] = speed(args, teachers, distilled, precision)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    if args.tables:
        args.tables.write_text(tables(results))


def _cell(results: dict, point: str) -> str:
    rec = results["points"].get(point)
    return f"{rec['fid']:.2f} ± {rec['fid_bootstrap_std']:.2f}" if rec else "–"


def tables(results: dict) -> str:
    """Markdown: per kind (base, sr, cascade) one row per step count, distilled against both DPM-Solver++ grids
    (FID ± bootstrap std) and the paired gaps; then each round's cost."""
    out = [f"FID (classifier features) ± bootstrap std, {results['num']} samples per point; gap = FID(distilled) − "
           "FID(DPM-Solver++) ± paired bootstrap std (negative: distillation wins).", ""]
    for kind, title in (("base", "base steps (SR stage: DPM-Solver++ 10)"), ("sr", "SR steps (base: DPM-Solver++ 20)")):
        rows = sorted({pt.split("/", 1)[1].replace("dpmpp", "pd").replace("t", "") for pt in results["points"]
                       if pt.startswith(kind + "/") and pt != "base/dpmpp20"},
                      key=lambda s: [-int(n) for n in re.findall(r"\d+", s)])
        if not rows:
            continue
        out += [f"| {title} | distilled | DPM-Solver++ | DPM-Solver++, trailing grid | gap vs DPM-Solver++ | gap vs trailing |",
                "|---|---|---|---|---|---|"]
        for row in rows:
            pd = f"{kind}/{row}"
            twin, trailing = dpmpp_twins(pd)
            gaps = results["points"].get(pd, {}).get("paired_gaps", {})
            gap = [f"{gaps[t]['gap']:+.2f} ± {gaps[t]['paired_std']:.2f}" if t in gaps else "–" for t in (twin, trailing)]
            label = " + ".join(re.findall(r"\d+", row))
            out.append(f"| {label} | {_cell(results, pd)} | {_cell(results, twin)} | {_cell(results, trailing)} | "
                       f"{gap[0]} | {gap[1]} |")
        out.append("")
    rows = cascade_rows(results)
    if rows:
        out += ["| cascade (base + SR) | evaluations | FID | KID×10³ |", "|---|---|---|---|"]
        for label, evaluations, rec in rows:
            shipped = " (the shipped cascade)" if label == "dpmpp20 + dpmpp10" else ""
            out.append(f"| {label}{shipped} | {evaluations} | {rec['fid']:.2f} ± {rec['fid_bootstrap_std']:.2f} | "
                       f"{1e3 * rec['kid']['mean']:.1f} ± {1e3 * rec['kid']['std']:.1f} |")
        out.append("")
    out += ["| stage | round | teacher → student steps | optimizer steps | CPU-hours |", "|---|---|---|---|---|"]
    for stage, rounds in results.get("cost", {}).items():
        for r in rounds:
            done = "" if r["step"] >= r["of"] else f" (of {r['of']}, unfinished)"
            out.append(f"| {stage} | {r['round']} | {r['teacher_steps']} → {r['student_steps']} | {r['step']}{done} | "
                       f"{r['cpu_hours']:.2f} |")
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    series = (("distilled (DDIM on its grid)", "pd", ""), ("DPM-Solver++, undistilled", "dpmpp", ""),
              ("DPM-Solver++, undistilled, trailing grid", "dpmpp", "t"))
    for ax, kind in zip(axes, ("base", "sr")):
        for label, pattern, grid in series:
            rows = []
            for point, rec in results["points"].items():
                k, settings = parse_point(point)
                if k != kind or not all(SETTING.match(s) and SETTING.match(s).group(1) == pattern
                                        and SETTING.match(s).group(3) == grid for s in settings):
                    continue
                rows.append((int(SETTING.match(settings[0]).group(2)), rec["fid"], rec["fid_bootstrap_std"]))
            if rows:
                x, y, e = zip(*sorted(rows))
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # DPM-Solver++ at 2 steps is two orders of magnitude off
        ax.set_xlabel({"base": "base steps (SR: DPM-Solver++ 10)", "sr": "SR steps (base: DPM-Solver++ 20)"}[kind])
        ax.set_ylabel("FID (classifier features)")
        ax.grid(alpha=0.3)
    # every whole-cascade point, best first, and the 30-evaluation cascade for reference
    ax = axes[2]
    rows = [(rec["fid"], rec["fid_bootstrap_std"], label) for label, _, rec in cascade_rows(results)]
    if rows:
        y, e, names = zip(*rows)
        ax.errorbar(range(len(rows)), y, yerr=e, fmt="o", capsize=3, color="k")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
    ax.set_xlabel("cascade (base + SR setting; pd = distilled)")
    ax.set_ylabel("FID (classifier features)")
    ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
