"""The ``cdm`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# --- train -----------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import train_stage

    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    config = load_config(args.config, overrides)
    start = time.time()
    summary = train_stage(config, args.out, device=args.device)
    minutes = (time.time() - start) / 60
    print(
        f"trained {config.stage.name} to step {summary.step} in {minutes:.1f} min; "
        f"last loss {summary.last_loss if summary.last_loss is not None else 'n/a'}; checkpoint {summary.checkpoint}"
    )
    return 0


# --- sample ----------------------------------------------------------------------------------------------


def load_cascade(run_dirs: list[str], pretrained: str | None, device: str, weights: str = "ema"):
    from .cascade import Cascade

    if pretrained and run_dirs:
        raise SystemExit("give either run directories or --pretrained, not both")
    if pretrained:
        return Cascade.from_pretrained(pretrained, device=device)
    if not run_dirs:
        raise SystemExit("give one or more run directories (base first), or --pretrained NAME")
    return Cascade.from_run_dirs(run_dirs, device=device, weights=weights)


def save_npz(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    from .checkpoint import atomic_write_bytes
    import io

    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=labels.astype(np.int64))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .cascade import balanced_labels, grid_by_class, sample_in_batches
    from .data import load_images, save_grid
    from .training import resolve_device

    device = resolve_device(args.device)
    cascade = load_cascade(args.run_dirs, args.pretrained, device, weights=args.weights)
    if args.compile:
        cascade.compile(mode=None if args.compile == "default" else args.compile)
    labels = balanced_labels(args.num, cascade.num_classes, args.class_label)
    low_res = None
    start_stage = 0
    if args.low_res_samples:
        if len(cascade.stages) < 2:
            raise SystemExit("--low-res-samples needs at least one SR stage")
        first = cascade.stages[1]
        data = load_images(f"npz:{args.low_res_samples}", first.low_res, channels=first.channels)
        if len(data.images) < args.num:
            raise SystemExit(f"--low-res-samples has {len(data.images)} images, fewer than --num {args.num}")
        low_res, labels, start_stage = data.images[: args.num], torch.from_numpy(data.labels[: args.num]), 1
    kwargs = dict(
        steps=args.steps,
        sampler=args.sampler,
        guidance=args.guidance,
        eta=args.eta,
        truncated=args.truncated,
        aug_levels=args.aug_level,
        autocast=args.precision == "bf16",
    )
    start = time.time()
    stage_images, label_array = sample_in_batches(
        cascade, labels, batch_size=args.batch_size, seed=args.seed, low_res=low_res, start_stage=start_stage,
        progress=not args.quiet, **kwargs
    )
    seconds = time.time() - start
    save_npz(args.out, stage_images[-1], label_array)
    if args.save_stages:
        out_dir = Path(args.save_stages)
        for i, imgs in enumerate(stage_images):
            save_npz(out_dir / f"stage{i + 1 + start_stage}_{imgs.shape[1]}px.npz", imgs, label_array)
    if args.grid:
        grid = grid_by_class(stage_images, label_array, per_class=args.grid_per_class)
        save_grid(grid[None], args.grid, nrow=1, padding=0)
    res = "→".join(str(s.resolution) for s in cascade.stages[start_stage:])
    print(
        f"wrote {len(label_array)} samples ({res}px) to {args.out} in {seconds:.1f} s "
        f"({len(label_array) / max(seconds, 1e-9):.1f} img/s)"
        + (f"; grid {args.grid}" if args.grid else "")
    )
    return 0


# --- export ----------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import export_stage, latest_checkpoint

    given = Path(args.run_dir)
    ckpt = given if (given / "state.json").is_file() else latest_checkpoint(given)
    if ckpt is None:
        raise SystemExit(f"{args.run_dir} holds no checkpoint (give a run directory or one checkpoints/step_* dir)")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = export_stage(ckpt, args.out, dtype=dtype, weights=args.weights, config_overrides=args.set)
    print(f"exported {ckpt} ({args.weights} weights, {args.dtype}) to {out}")
    return 0


# --- parser ----------------------------------------------------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_int_list, default=None, help="sampling steps, one value or one per stage (0 = all)")
    p.add_argument("--sampler", type=_str_list, default=None, help="ddpm | ddim | dpmpp, one or one per stage")
    p.add_argument("--guidance", type=_float_list, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=_float_list, default=None, help="DDIM eta")
    p.add_argument("--truncated", action="store_true", help="truncated conditioning augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="network precision (autocast)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile every stage's network (mode; reduce-overhead = CUDA graphs on GPUs); "
                        "pays off for thousands of samples, not for a few")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description="Cascaded Diffusion Models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one stage (rerun on the same --out to resume)")
    p.add_argument("config", help="stage config (TOML)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=None, help="total steps (overrides train.steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=2e-4")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from one stage or a cascade (base first)")
    p.add_argument("run_dirs", nargs="*", help="run or exported stage directories, base first")
    p.add_argument("--pretrained", default=None, help="a bundled cascade, e.g. fashion-mnist")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--grid", default=None, help="PNG grid: one row per class, every stage side by side")
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--class-label", type=int, action="append", default=None, help="sample these classes (repeatable)")
    p.add_argument("--aug-level", type=_int_list, default=None, help="level s per SR stage (default: its sample_s)")
    p.add_argument("--save-stages", default=None, help="directory for every stage's output (.npz)")
    p.add_argument("--low-res-samples", default=None, help="npz of stage-1 outputs: run only the SR stages on them")
    p.add_argument("--quiet", action="store_true")
    add_sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a sampling-only stage (EMA weights + config)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a sampling default, e.g. sample.steps=25")
    p.set_defaults(func=cmd_export)

    try:
        from .evaluation.cli import add_evaluation_commands
    except ImportError:  # pragma: no cover - the evaluation package is part of the distribution
        add_evaluation_commands = None
    if add_evaluation_commands is not None:
        add_evaluation_commands(sub, add_sampling_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .training import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, NonFiniteLossError) as e:
        if os.environ.get("CDM_DEBUG"):
            raise
        print(f"cdm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
