"""``cdm distill``: progressive distillation of one stage into a few-step student (docs/sampling.md)."""

from __future__ import annotations

import argparse
import time

import torch

from ..checkpoint import export_stage
from ..distillation import distill, distill_report
from ..errors import check_output_dir
from ..hardware import PRECISIONS
from ..training import TrainingStopped
from .common import positive_int


def cmd_distill(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.round_steps is not None:
        overrides.append(f"distill.round_steps=[{args.round_steps}]")
    if args.precision is not None:
        overrides.append(f"train.precision={args.precision}")
    if args.export:
        check_output_dir(args.export, "--export")
    start = time.time()
    try:
        summary = distill(args.teacher, args.out, rounds=args.rounds, start_steps=args.start_steps,
                          config=args.config, overrides=overrides, device=args.device)
    except TrainingStopped as e:  # the trainer's message names `cdm train`; the rerun is this command
        raise TrainingStopped(str(e).replace("`cdm train`", "`cdm distill`"), e.signum) from None
    for row in distill_report(args.out):
        print(f"round {row['round']}: {row['teacher_steps']} -> {row['student_steps']} steps, step {row['step']} of "
              f"{row['of']}, {row['cpu_hours']:.3f} CPU-hours ({row['wall_hours']:.3f} h wall); {row['checkpoint']}")
    print(f"distilled {args.teacher} into a {summary.student_steps}-step student in {(time.time() - start) / 60:.1f} "
          f"min (this call); final checkpoint {summary.final_checkpoint}")
    if args.export:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        written = export_stage(summary.final_checkpoint, args.export, dtype=dtype)
        print(f"exported the {summary.student_steps}-step student ({args.dtype}) to {written}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "distill", help="progressive distillation: a few-step student of one stage (rerun on the same --out to resume)",
        description="Each round halves the teacher's deterministic sampling steps (Salimans & Ho 2022): --rounds K "
                    "from --start-steps N gives an N/2**K-step student. TEACHER: a training run directory, one "
                    "checkpoint directory, an exported stage directory or pretrained:CASCADE/STAGE (e.g. "
                    "pretrained:fashion-mnist/base8). OUT/round_K is round K's run directory: `cdm export OUT/round_K` "
                    "makes a stage that `cdm sample` samples with its recorded steps by default.")
    p.add_argument("teacher", metavar="TEACHER")
    p.add_argument("--out", required=True, help="distillation directory (rerun the same command to resume)")
    p.add_argument("--rounds", type=positive_int, default=None, help="halvings (distill.rounds; default 1)")
    p.add_argument("--start-steps", type=positive_int, default=None,
                   help="the teacher's DDIM steps in round 1, a multiple of 2**rounds (distill.start_steps; default 64)")
    p.add_argument("--round-steps", default=None, metavar="S[,S...]",
                   help="optimizer steps per round, one value or one per round (distill.round_steps)")
    p.add_argument("--config", default=None, help="a distillation config (TOML: [distill], [train], [data], [model])")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key: distill.*, or the student's train.* / data.* / model.* (e.g. train.lr=5e-5)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="overrides train.precision (auto = bf16 where the hardware does bf16 natively, else fp32)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="when every round is done, export the last student here (model.safetensors + stage.json)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="the export's weights' dtype")
    p.set_defaults(func=cmd_distill)
