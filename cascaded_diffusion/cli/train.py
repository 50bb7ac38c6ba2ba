"""``cdm train`` and ``cdm export``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, export_stage, latest_valid_checkpoint
from ..config import load_config
from ..errors import check_output_dir
from ..hardware import PRECISIONS
from ..training import train_stage
from .common import positive_int


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.precision is not None:  # after --set: the option wins over a --set train.precision / train.bf16
        overrides.append(f"train.precision={args.precision}")
    config = load_config(args.config, overrides)
    start = time.time()
    summary = train_stage(config, args.out, device=args.device)
    minutes = (time.time() - start) / 60
    print(
        f"trained {config.stage.name} to step {summary.step} in {minutes:.1f} min; "
        f"last loss {summary.last_loss if summary.last_loss is not None else 'n/a'}; checkpoint {summary.checkpoint}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    given = Path(args.run_dir)
    if (given / "state.json").is_file():
        ckpt = given
    else:
        ckpt, corrupt = latest_valid_checkpoint(given, stems=(args.weights,))
        for path, reason in corrupt:
            print(f"warning: skipping the unreadable checkpoint {path} ({reason})", file=sys.stderr)
        if ckpt is None and corrupt:
            raise CheckpointError(f"{args.run_dir} holds no readable checkpoint")
    if ckpt is None:
        raise CheckpointError(f"{args.run_dir} holds no checkpoint (give a run directory or one checkpoints/step_* dir)")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = export_stage(ckpt, args.out, dtype=dtype, weights=args.weights, config_overrides=args.set)
    print(f"exported {ckpt} ({args.weights} weights, {args.dtype}) to {out}")
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
