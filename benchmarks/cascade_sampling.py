#!/usr/bin/env python
"""Samples per second through a whole cascade, eager against ``torch.compile`` modes, at the stages' defaults.

Each mode gets its own copy of the cascade (loaded once per mode), one untimed warm-up batch (which pays the
compilation and, with ``reduce-overhead``, the CUDA-graph capture), then ``--batches`` timed batches, interleaved
across modes (ABBA order) so that a change of machine load hits every mode alike. Every batch samples the same
class-balanced labels from its own seeded generator; the script also reports the largest pixel difference
between each mode's last batch and eager's, so a compiled path that silently computes something else shows.
The last line of output is one JSON object.

Examples::

    python benchmarks/cascade_sampling.py --pretrained fashion-mnist --device cuda --batch-size 1000 \\
        --modes eager,reduce-overhead
    python benchmarks/cascade_sampling.py --pretrained fashion-mnist --device cpu --batch-size 64 --batches 2
"""

from __future__ import annotations

import argparse
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

from cascaded_diffusion.cascade import Cascade, balanced_labels
from cascaded_diffusion.hardware import device_name
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
    args = p.parse_args(argv)
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


def sample_batch(cascade: Cascade, labels: torch.Tensor, args: argparse.Namespace, seed: int) -> torch.Tensor:
    generator = torch.Generator(cascade.stages[0].device).manual_seed(seed)
    images = cascade.sample(labels, generator=generator, sampler=args.sampler, steps=args.steps).images
    return images.float().cpu()  # a host copy ends the batch: the timing includes all its device work


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cascades = {mode: load(args, mode) for mode in args.modes}
    first = next(iter(cascades.values()))
    labels = balanced_labels(args.batch_size, first.num_classes)
    warmup_s, last = {}, {}
    for mode, cascade in cascades.items():
        start = time.perf_counter()
        last[mode] = sample_batch(cascade, labels, args, args.seed)
        warmup_s[mode] = time.perf_counter() - start
        print(f"warm-up {mode:28s} {warmup_s[mode]:8.2f} s", flush=True)
    times: dict[str, list[float]] = {m: [] for m in cascades}
    for i in range(args.batches):
        order = list(cascades) if i % 2 == 0 else list(cascades)[::-1]
        for mode in order:
            start = time.perf_counter()
            last[mode] = sample_batch(cascades[mode], labels, args, args.seed + 1)
            times[mode].append(time.perf_counter() - start)
            print(f"batch {i} {mode:28s} {times[mode][-1]:8.3f} s", flush=True)
    rate = {m: args.batch_size / statistics.median(ts) for m, ts in times.items()}
    reference = last.get("eager")
    summary = {
        "samples_per_s": rate,
        "speedup_vs_eager": {m: r / rate["eager"] for m, r in rate.items()} if "eager" in rate else None,
        "batch_seconds": {m: [round(t, 4) for t in ts] for m, ts in times.items()},
        "warmup_seconds": {m: round(s, 2) for m, s in warmup_s.items()},
        # same seed, same labels: compiled kernels may round differently, so this is small, not zero
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
