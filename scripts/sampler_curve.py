#!/usr/bin/env python
"""FID against sampling steps for DDPM, DDIM and DPM-Solver++ on a whole cascade (docs/performance.md).

Every point samples ``--num`` class-balanced images through every stage with the same sampler and step count
(``--base-steps`` pins the base stage instead), times it, and scores the final images against ``--ref``.
Points are written to ``--out`` as they finish, so an interrupted run keeps what it measured and a rerun
skips the points already there.

    python scripts/sampler_curve.py runs/base8 runs/sr8to32 --ref runs/ref.npz --num 1000 \
        --points ddpm:1000,ddpm:100,ddim:50,ddim:20,dpmpp:20,dpmpp:10 --out curve.json --plot curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cascaded_diffusion.cascade import Cascade, sample_in_batches
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.evaluation.evaluate import evaluate_images, reference_stats
from cascaded_diffusion.evaluation.features import get_feature_extractor
from cascaded_diffusion.hardware import device_name, resolve_device


def steps_label(steps: int | list[int] | tuple[int, ...]) -> str:
    """``20`` for one count for every stage, ``20/10`` for per-stage counts: a point's name in output and plot."""
    return str(steps) if isinstance(steps, int) else "/".join(map(str, steps))


def parse_points(text: str) -> list[tuple[str, int | tuple[int, ...]]]:
    """``SAMPLER:STEPS`` (every stage) or ``SAMPLER:S1/S2/...`` (steps per stage, base first)."""
    points: list[tuple[str, int | tuple[int, ...]]] = []
    for item in text.split(","):
        name, _, steps = item.strip().partition(":")
        parts = steps.split("/")
        if name not in ("ddpm", "ddim", "dpmpp") or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise SystemExit(f"bad point {item!r}: use SAMPLER:STEPS or SAMPLER:BASE_STEPS/SR_STEPS with SAMPLER "
                             "in ddpm, ddim, dpmpp")
        points.append((name, int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts)))
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="stage directories, base first")
    p.add_argument("--pretrained", help="a bundled cascade instead of run_dirs")
    p.add_argument("--ref", required=True, help="reference stats .npz or dataset spec")
    p.add_argument("--features", default="classifier")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--points", default="ddpm:1000,ddpm:100,ddpm:50,ddim:100,ddim:50,ddim:20,dpmpp:50,dpmpp:20,dpmpp:10")
    p.add_argument("--base-steps", help="SAMPLER:STEPS for the base stage at every point (default: same as SR)")
    p.add_argument("--aug-level", type=int, help="level s of the SR stages (default: their sample_s)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True)
    p.add_argument("--plot")
    args = p.parse_args()

    device = resolve_device(args.device)
    cascade = Cascade.load(args.run_dirs, pretrained=args.pretrained, device=device)
    n_stages = len(cascade.stages)
    extractor = get_feature_extractor(args.features, device=device)
    reference = reference_stats(args.ref, extractor, resolution=cascade.resolutions[-1],
                                channels=cascade.stages[-1].channels)
    base = parse_points(args.base_steps)[0] if args.base_steps else None
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"points": []}
    for row in result["points"]:  # points resumed from a run on another machine keep their machine's name
        row.setdefault("device_name", result.get("device_name"))
    hardware = device_name(device)
    result.update({
        "stages": [s.source for s in cascade.stages], "num_samples": args.num, "feature_network": extractor.name,
        "reference": reference.source, "device": str(device),
        "device_name": hardware, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "base_point": list(base) if base else None,
        "aug_levels": [args.aug_level] * (n_stages - 1) if args.aug_level is not None else cascade.default_aug_levels(),
    })
    done = {(r["sampler"], steps_label(r["steps"])) for r in result["points"]}
    labels = balanced_labels(args.num, cascade.num_classes)
    for sampler, steps in parse_points(args.points):
        if (sampler, steps_label(steps)) in done:
            continue
        samplers = [sampler] * n_stages
        if isinstance(steps, tuple):
            if len(steps) != n_stages:
                raise SystemExit(f"point {sampler}:{steps_label(steps)} gives {len(steps)} step counts for "
                                 f"{n_stages} stages")
            steps_l = list(steps)
        else:
            steps_l = [steps] * n_stages
        if base:
            samplers[0], steps_l[0] = base
        start = time.perf_counter()
        stages, _ = sample_in_batches(cascade, labels, batch_size=args.batch_size, seed=args.seed,
                                      sampler=samplers, steps=steps_l, aug_levels=result["aug_levels"])
        seconds = time.perf_counter() - start
        scores = evaluate_images(stages[-1], reference, extractor, ("fid", "kid"))
        row = {"sampler": sampler, "steps": steps if isinstance(steps, int) else list(steps), "stage_samplers": samplers, "stage_steps": steps_l,
               "fid": scores["fid"], "kid": scores.get("kid"), "seconds": seconds,
               "samples_per_s": args.num / seconds, "device_name": hardware}
        result["points"].append(row)
        print(f"{sampler:5s} {steps_label(steps):>7s} steps  FID {row['fid']:8.3f}  {row['samples_per_s']:7.2f} samples/s", flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out)
    if args.plot:
        plot(result, args.plot)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler, marker in (("ddpm", "o"), ("ddim", "s"), ("dpmpp", "^")):
        name = {"dpmpp": "DPM-Solver++(2M)"}.get(sampler, sampler.upper())
        rows = sorted((r for r in result["points"] if r["sampler"] == sampler and isinstance(r["steps"], int)),
                      key=lambda r: r["steps"])
        if rows:
            ax.plot([r["steps"] for r in rows], [r["fid"] for r in rows], marker + "-", label=name)
        for r in result["points"]:  # per-stage step counts: a star at the last stage's steps
            if r["sampler"] == sampler and not isinstance(r["steps"], int):
                ax.plot([r["steps"][-1]], [r["fid"]], "*", markersize=11,
                        label=f"{name} {steps_label(r['steps'])} (base/SR)")
    full = [r for r in result["points"] if r["sampler"] == "ddpm" and isinstance(r["steps"], int) and r["steps"] >= 1000]
    if full:
        ax.axhline(1.05 * full[0]["fid"], color="gray", linestyle="--", linewidth=1,
                   label=f"{full[0]['steps']}-step DDPM FID + 5 %")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per stage")
    ax.set_ylabel(f"FID ({result['feature_network'].split(':')[0]} features, N={result['num_samples']})")
    ax.set_title(f"{len(result['stages'])}-stage cascade, {result.get('device_name', result['device'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
