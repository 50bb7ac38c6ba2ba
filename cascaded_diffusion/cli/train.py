"""``cdm train`` and ``cdm export``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, export_stage, list_checkpoints, read_newest_checkpoint
from ..config import load_config
from ..errors import UserError, check_output_dir
from ..hardware import PRECISIONS
from ..training import is_run_dir, train_stage
from .common import positive_int


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.precision is not None:  # after --set: the option wins over a --set train.precision / train.bf16
        overrides.append(f"train.precision={args.precision}")
    config = load_config(args.config, overrides)
    start = time.time()
    summary = train_stage(config, args.out, device=args.device, config_path=args.config)
    minutes = (time.time() - start) / 60
    print(
        f"trained {config.stage.name} to step {summary.step} in {minutes:.1f} min; "
        f"last loss {summary.last_loss if summary.last_loss is not None else 'n/a'}; checkpoint {summary.checkpoint}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    given, out = Path(args.run_dir), Path(args.out)
    if out.exists() and (is_run_dir(out) or list_checkpoints(out) or os.path.realpath(out) == os.path.realpath(given)):
        # `cdm sample RUN` would keep using the export while the run's newer checkpoints went unused
        raise UserError(f"--out {out} is a training run directory; export into a directory of its own "
                        f"(e.g. {out.parent / (out.name + '-export')})")
    check_output_dir(args.out, "--out")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def export(ckpt: Path) -> Path:
        return export_stage(ckpt, args.out, dtype=dtype, weights=args.weights, config_overrides=args.set)

    if (given / "state.json").is_file():
        ckpt, written = given, export(given)
    else:  # a trainer may prune the chosen checkpoint while it is read: the next newest is taken
        written, ckpt, corrupt = read_newest_checkpoint(given, (args.weights,), export)
        for path, reason in corrupt:
            print(f"warning: skipping the unreadable checkpoint {path} ({reason})", file=sys.stderr)
        if ckpt is None and corrupt:
            raise CheckpointError(f"{args.run_dir} holds no readable checkpoint")
    if ckpt is None:
        raise CheckpointError(f"{args.run_dir} holds no checkpoint (give a run directory or one checkpoints/step_* dir)")
    print(f"exported {ckpt} ({args.weights} weights, {args.dtype}) to {written}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train one stage (rerun on the same --out to resume)")
    p.add_argument("config", help="stage config (TOML)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--steps", type=positive_int, default=None, help="total steps (overrides train.steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=2e-4")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="overrides train.precision (auto = bf16 where the hardware does bf16 natively, else fp32)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="write a sampling-only stage (EMA weights + config)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a sampling default, e.g. sample.steps=25")
    p.set_defaults(func=cmd_export)
