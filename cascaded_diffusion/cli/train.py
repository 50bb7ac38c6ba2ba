"""``cdm train`` and ``cdm export`` (one stage, or a whole cascade as a shareable folder with its model card)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import export_stage, is_exported_stage, list_checkpoints, resolve_checkpoint
from ..config import load_config
from ..distill_config import PRETRAINED_PREFIX, pretrained_stage_dir
from ..errors import UserError, check_output_dir
from ..hardware import PRECISIONS
from ..rundir import is_run_dir
from ..training import train_stage
from .common import nonneg_int, positive_int


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
    if args.pretrained or len(args.run_dirs) > 1 or args.cascade:
        return cmd_export_cascade(args)
    if not args.run_dirs:
        raise UserError("give a run directory (one stage), several (a cascade, base first) or --pretrained NAME")
    for option in ("repo", "card", "metrics", "name"):
        if getattr(args, option):
            raise UserError(f"--{option} is for a cascade export (several run directories, --pretrained or --cascade)")
    given, out = Path(args.run_dirs[0]), Path(args.out)
    if args.run_dirs[0].startswith(PRETRAINED_PREFIX):
        given = pretrained_stage_dir(args.run_dirs[0])
    if out.exists() and (is_run_dir(out) or list_checkpoints(out) or os.path.realpath(out) == os.path.realpath(given)):
        # `cdm sample RUN` would keep using the export while the run's newer checkpoints went unused
        raise UserError(f"--out {out} is a training run directory; export into a directory of its own "
                        f"(e.g. {out.parent / (out.name + '-export')})")
    check_output_dir(args.out, "--out")
    # no --dtype: the weights' stored dtype (fp32 in a checkpoint; an exported stage's own, fp16 in a bundle)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype] if args.dtype else None

    def export(source: Path) -> Path:
        return export_stage(source, args.out, dtype=dtype, weights=args.weights, config_overrides=args.set)

    if is_exported_stage(given):  # a stage re-exported, e.g. with another sampling default
        written, source = export(given), given
    else:  # a trainer may prune the chosen checkpoint while it is read: the next newest is taken
        written, source = resolve_checkpoint(given, export, stems=(args.weights,),
                                             warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    print(f"exported {source} ({args.weights} weights, {args.dtype or 'stored dtype'}) to {written}")
    return 0


def read_json_files(paths: list[str] | None, option: str) -> list[dict]:
    results = []
    for path in paths or []:
        try:
            value = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{option} {path}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise UserError(f"{option} {path}: expected a JSON object")
        results.append(value)
    return results


def cascade_export_options(args: argparse.Namespace) -> dict:
    """What ``cdm export`` (cascade) and ``cdm push`` pass to :func:`~cascaded_diffusion.sharing.export_cascade`."""
    if args.pretrained and args.run_dirs:
        raise UserError("give either run directories or --pretrained, not both")
    if getattr(args, "set", None):
        raise UserError("--set changes one exported stage; export a cascade's stages with their recorded defaults "
                        "(use cdm export RUN --set ... per stage, then export those stage directories)")
    card = read_json_files([args.card] if args.card else None, "--card")
    return dict(run_dirs=args.run_dirs, pretrained=args.pretrained, name=args.name, card=card[0] if card else None,
                metrics=read_json_files(args.metrics, "--metrics"), grid_per_class=args.grid_per_class,
                dtype={"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype or "fp16"],
                weights=args.weights, progress=not getattr(args, "quiet", False))


def cmd_export_cascade(args: argparse.Namespace) -> int:
    from ..sharing import export_cascade

    options = cascade_export_options(args)
    existed = Path(args.out).exists()
    check_output_dir(args.out, "--out")  # creates it: a failed export then removes it again, leaving nothing
    try:
        result = export_cascade(args.out, options.pop("run_dirs"), repo_id=args.repo, **options)
    except BaseException:
        if not existed and Path(args.out).is_dir() and not any(Path(args.out).iterdir()):
            Path(args.out).rmdir()
        raise
    size = sum(entry["size"] for entry in result.files.values())
    print(f"exported the cascade {' -> '.join(result.stages)} to {result.out} ({size / 1e6:.1f} MB of weights, "
          f"manifest with sha256 per file, model card {result.out / 'README.md'}"
          + (f", grid {result.grid}" if result.grid else "") + f") in {result.seconds:.1f} s")
    return 0


def add_cascade_export_args(p: argparse.ArgumentParser) -> None:
    """The options ``cdm export`` (cascade) and ``cdm push`` share."""
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="export a bundled cascade (fashion-mnist), an exported folder or hf://OWNER/REPO instead of "
                        "run directories (its files are copied byte for byte)")
    p.add_argument("--name", default=None, help="the cascade's name in its manifest and card (default: the "
                                                "repository's or folder's name)")
    p.add_argument("--card", default=None, metavar="JSON",
                   help="facts for the model card: {\"license\": \"apache-2.0\", \"data\": {\"name\": ..., "
                        "\"license\": ..., \"hub_id\": ..., \"url\": ...}, \"classes\": [...], \"title\": ...}")
    p.add_argument("--metrics", action="append", default=None, metavar="EVAL_JSON",
                   help="a `cdm eval` result to show on the card with its feature network (repeatable)")
    p.add_argument("--grid-per-class", type=nonneg_int, default=4,
                   help="samples per class in the card's per-stage grid (0 = no grid)")


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

    p = sub.add_parser(
        "export", help="write a sampling-only stage (one run directory), or a whole cascade as a shareable folder",
        description="One RUN_DIR: a sampling-only stage (model.safetensors + stage.json). Several RUN_DIRs (base "
                    "first), --pretrained NAME or --cascade: a cascade folder that `cdm sample --pretrained DIR` and "
                    "`cdm push` take: cascade.json with the sha256 of every loaded file, one directory per stage "
                    "(fp16 EMA weights by default), a model card README.md and its per-stage grid.png.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--cascade", action="store_true", help="write a cascade folder even for one run directory")
    p.add_argument("--repo", default=None, metavar="OWNER/REPO",
                   help="the Hub repository the card's commands name (cdm push sets it)")
    add_cascade_export_args(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="weights' dtype (default: fp32 for one stage, fp16 for a cascade)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a sampling default, e.g. sample.steps=25")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)
