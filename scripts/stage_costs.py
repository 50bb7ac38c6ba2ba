#!/usr/bin/env python
"""What each stage of a cascade costs to train and to sample: forward FLOPs per image from
``torch.utils.flop_counter`` (counted on the meta device, so a 256×256 ImageNet network costs no compute here),
times the training schedule in the stage's config (steps × global batch × 3 for forward + backward) and the
sampling steps.

    python scripts/stage_costs.py configs/imagenet/*.toml [--global-batch 2048,2048,1024,1024] \
        [--sample-steps 4000,4000,100,100] [--markdown]

``--global-batch`` defaults to ``train.batch_size`` × ``train.grad_accum`` (one process); the paper's ImageNet
schedule uses a global batch of 2048 (base 32, SR 32→64) and 1024 (the high-resolution SR models).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def forward_flops(config, size: int | None = None) -> float:
    """Forward FLOPs of one image at ``size`` (default: the stage's training size, the crop if it trains on crops)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cascaded_diffusion.stage import build_network

    net = build_network(config, "meta").eval()
    s = config.stage
    size = size or config.train.crop or s.resolution
    with torch.device("meta"):
        x = torch.zeros(1, s.channels, size, size)
        kwargs = {"y": torch.zeros(1, dtype=torch.long)} if s.num_classes else {}
        if config.is_sr:
            kwargs["low_res"] = torch.zeros(1, s.channels, size, size)  # the upsampled conditioning input
            if config.conditioning.augmentation == "noise":
                kwargs["aug_level"] = torch.zeros(1)
        t = torch.zeros(1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, **kwargs)
    return float(counter.get_total_flops())


def stage_cost(path: Path, global_batch: int | None = None, sample_steps: int | None = None) -> dict:
    from cascaded_diffusion.config import load_config

    config = load_config(path)
    t = config.train
    batch = global_batch or t.batch_size * t.grad_accum
    train_fwd = forward_flops(config)
    sample_fwd = forward_flops(config, config.stage.resolution)
    steps = sample_steps or config.sample.steps or config.diffusion.timesteps
    return {
        "config": str(path), "name": config.stage.name, "resolution": config.stage.resolution,
        "params": sum(p.numel() for p in __import__("cascaded_diffusion.stage", fromlist=["x"])
                      .build_network(config, "meta").parameters()),
        "train_gflop_per_image": train_fwd / 1e9, "train_steps": t.steps, "global_batch": batch,
        "train_flops": 3 * train_fwd * t.steps * batch,
        "sample_steps": steps, "sample_flops_per_image": sample_fwd * steps,
    }


def si(flops: float) -> str:
    """FLOPs with an SI prefix: 1.14 PFLOP, 633.7 EFLOP."""
    for prefix, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--global-batch", help="one per config, comma-separated")
    p.add_argument("--sample-steps", help="one per config, comma-separated")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    n = len(args.configs)
    batches = [int(b) for b in args.global_batch.split(",")] if args.global_batch else [None] * n
    steps = [int(s) for s in args.sample_steps.split(",")] if args.sample_steps else [None] * n
    if len(batches) != n or len(steps) != n:
        p.error("--global-batch and --sample-steps need one value per config")
    rows = [stage_cost(c, b, s) for c, b, s in zip(args.configs, batches, steps)]
    if not args.markdown:
        print(json.dumps(rows, indent=1))
        return
    print("| stage | params | forward GFLOP / training image | steps × global batch | training | sampling steps | "
          "sampling / image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['train_gflop_per_image']:.3g} | "
              f"{r['train_steps']} × {r['global_batch']} | {si(r['train_flops'])} | {r['sample_steps']} | "
              f"{si(r['sample_flops_per_image'])} |")
    total = sum(r["sample_flops_per_image"] for r in rows)
    print(f"\nSum over the stages listed: training {si(sum(r['train_flops'] for r in rows))}; sampling "
          f"{si(total)} per image, {si(total * 50000)} for 50k.")


if __name__ == "__main__":
    main()
