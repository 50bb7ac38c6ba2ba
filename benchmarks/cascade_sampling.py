#!/usr/bin/env python
"""Samples per second through a whole cascade, eager against ``torch.compile`` modes and bf16 against fp32, at
the stages' defaults; with ``--train-steps`` also one training step of each stage's network in each precision.

Each mode gets its own copy of the cascade (loaded once per mode), one untimed warm-up batch (which pays the
compilation and, with ``reduce-overhead``, the CUDA-graph capture), then ``--batches`` timed batches, interleaved
across modes (ABBA order) so that a change of machine load hits every mode alike. Every batch samples the same
class-balanced labels from its own seeded generator; the script also reports the largest pixel difference
between each mode's last batch and eager's, so a compiled path that silently computes something else shows.
``--precisions bf16,fp32`` (default ``auto``: what ``cdm sample`` picks on this machine) runs every mode in each
precision, interleaved like the modes; the summary says which precision ``auto`` chose and why
(:func:`cascaded_diffusion.hardware.choose_precision`). ``--train-steps N`` then times N training steps (forward,
MSE backward, fused AdamW step; batch ``--train-batch``) of every stage's network in each precision, interleaved
(ABBA), after one untimed step. The last line of output is one JSON object.

Examples::

    python benchmarks/cascade_sampling.py --pretrained fashion-mnist --device cuda --batch-size 1000 \\
        --modes eager,reduce-overhead
    python benchmarks/cascade_sampling.py --pretrained fashion-mnist --device cpu --batch-size 64 --batches 2
    python benchmarks/cascade_sampling.py --precisions bf16,fp32 --batch-size 32 --batches 3 --train-steps 4
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:  # run from a checkout without installing the package
    import cascaded_diffusion  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.hardware import PRECISIONS, bf16_autocast, choose_precision, device_name
from cascaded_diffusion.pretrained import available_pretrained

MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", choices=available_pretrained(), default="fashion-mnist")
    src.add_argument("--stages", nargs="+", metavar="DIR", help="run or exported stage directories, base first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="timed batches per mode")
    p.add_argument("--modes", default="eager", help=f"comma-separated, from {','.join(MODES)}")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--sampler", default=None, help="default: each stage's own")
    p.add_argument("--steps", default=None, help="default: each stage's own; an int or per-stage 'B/S'")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precisions", default="auto", help=f"comma-separated, from {','.join(PRECISIONS)}")
    p.add_argument("--train-steps", type=int, default=0, help="also time this many training steps per stage")
    p.add_argument("--train-batch", type=int, default=32)
    args = p.parse_args(argv)
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not args.precisions or any(x not in PRECISIONS for x in args.precisions):
        p.error(f"--precisions: choose from {PRECISIONS}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; choose from {MODES}")
    if args.batch_size < 1 or args.batches < 1:
        p.error("--batch-size and --batches must be >= 1")
    if args.steps is not None:
        args.steps = [int(s) for s in args.steps.split("/")] if "/" in args.steps else int(args.steps)
    return args


def load(args: argparse.Namespace, mode: str) -> Cascade:
    if args.stages:
        cascade = Cascade.load(args.stages, device=args.device)
    else:
        cascade = Cascade.load(pretrained=args.pretrained, device=args.device)
    if mode != "eager":
        cascade.compile(mode=mode, backend=args.compile_backend)
    return cascade


def sample_batch(cascade: Cascade, labels: torch.Tensor, args: argparse.Namespace, seed: int,
                 autocast: bool | None = None) -> torch.Tensor:
    generator = torch.Generator(cascade.stages[0].device).manual_seed(seed)
    images = cascade.sample(labels, generator=generator, sampler=args.sampler, steps=args.steps,
                            autocast=autocast).images
    return images.float().cpu()  # a host copy ends the batch: the timing includes all its device work


def train_step_seconds(cascade: Cascade, precisions: dict, args: argparse.Namespace) -> dict:
    """Median seconds of one training step of each stage's network per precision: forward under the precision's
    autocast, MSE on the predicted noise, backward, fused AdamW (as ``cdm train``), at batch ``--train-batch``.
    Inputs are random: the cost of a step does not depend on what the images show."""
    result = {}
    device = cascade.stages[0].device
    for i, stage in enumerate(cascade.stages):
        g = torch.Generator().manual_seed(args.seed + i)
        b, c, r = args.train_batch, stage.channels, stage.resolution
        x = torch.randn(b, c, r, r, generator=g).to(device)
        t = torch.rand(b, generator=g).to(device) * 1000
        y = (torch.arange(b) % cascade.num_classes).to(device)
        low = torch.randn(b, c, stage.low_res, stage.low_res, generator=g).to(device) if stage.is_sr else None
        aug = torch.rand(b, generator=g).to(device) if stage.uses_noise_augmentation else None
        runs = {}
        for key, precision in precisions.items():
            net = copy.deepcopy(stage.net).float().train().requires_grad_(True)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
            runs[key] = (net, opt, precision)

        def step(key: str) -> float:
            net, opt, precision = runs[key]
            start = time.perf_counter()
            with bf16_autocast(device, precision):
                out = net(x, t, y=y, aug_level=aug, low_res=low)
            loss = torch.nn.functional.mse_loss(out[:, :c].float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        for key in runs:
            step(key)  # warm-up: allocations, oneDNN primitive creation
        times = {key: [] for key in runs}
        for j in range(args.train_steps):
            for key in (list(runs) if j % 2 == 0 else list(runs)[::-1]):
                times[key].append(step(key))
        name = f"stage{i + 1}_{stage.resolution}px"
        result[name] = {key: round(statistics.median(ts), 4) for key, ts in times.items()}
        print(f"train step {name}: " + "  ".join(f"{k} {v:.3f} s" for k, v in result[name].items()), flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = {p: choose_precision(p, device) for p in args.precisions}
    for p, chosen in precisions.items():
        print(f"{p}: {chosen.describe()}", flush=True)
    # one variant per (mode, precision); named by the mode alone when one precision is run (the old output)
    variants = {(m if len(precisions) == 1 else f"{m}/{p}"): (m, p) for m in args.modes for p in precisions}
    loaded = {m: load(args, m) for m in args.modes}
    cascades = {key: loaded[m] for key, (m, _) in variants.items()}
    autocast = {key: precisions[p].bf16 for key, (_, p) in variants.items()}
    first = next(iter(cascades.values()))
    labels = balanced_labels(args.batch_size, first.num_classes)
    warmup_s, last = {}, {}
    for mode, cascade in cascades.items():
        start = time.perf_counter()
        last[mode] = sample_batch(cascade, labels, args, args.seed, autocast[mode])
        warmup_s[mode] = time.perf_counter() - start
        print(f"warm-up {mode:28s} {warmup_s[mode]:8.2f} s", flush=True)
    times: dict[str, list[float]] = {m: [] for m in cascades}
    for i in range(args.batches):
        order = list(cascades) if i % 2 == 0 else list(cascades)[::-1]
        for mode in order:
            start = time.perf_counter()
            last[mode] = sample_batch(cascades[mode], labels, args, args.seed + 1, autocast[mode])
            times[mode].append(time.perf_counter() - start)
            print(f"batch {i} {mode:28s} {times[mode][-1]:8.3f} s", flush=True)
    rate = {m: args.batch_size / statistics.median(ts) for m, ts in times.items()}
    reference = last.get("eager", last.get(f"eager/{args.precisions[0]}"))
    summary = {
        "samples_per_s": rate,
        "speedup_vs_eager": {m: r / rate["eager"] for m, r in rate.items()} if "eager" in rate else None,
        "precision": {p: {"name": c.name, "reason": c.reason} for p, c in precisions.items()},
        "train_step_seconds": (train_step_seconds(first, precisions, args) if args.train_steps > 0 else None),
        "train_batch": args.train_batch if args.train_steps > 0 else None,
        "batch_seconds": {m: [round(t, 4) for t in ts] for m, ts in times.items()},
        "warmup_seconds": {m: round(s, 2) for m, s in warmup_s.items()},
        # same seed, same labels: compiled kernels (and another precision) round differently: small, not zero
        "max_abs_diff_vs_eager": ({m: float((x - reference).abs().max()) for m, x in last.items()}
                                  if reference is not None else None),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "steps": [s.config.sample.steps for s in first.stages] if args.steps is None else args.steps,
        "samplers": [s.config.sample.sampler for s in first.stages] if args.sampler is None else args.sampler,
        "resolutions": first.resolutions,
        "device": args.device,
        "device_name": device_name(args.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for m, r in rate.items():
        print(f"{m:28s} {r:10.1f} samples/s", flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
