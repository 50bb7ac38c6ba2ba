"""The ``cdm`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import math
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


# Checked while parsing, so a bad size or number is refused before anything is loaded or computed.


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = _int_at_least(1)


def nonneg_int_list(text: str) -> list[int]:
    values = _int_list(text)
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def nonneg_float_list(text: str) -> list[float]:
    values = _float_list(text)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def _samplers(text: str) -> list[str]:
    from .samplers import SAMPLERS

    values = _str_list(text)
    bad = [v for v in values if v not in SAMPLERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sampler {bad[0]!r} (valid: {', '.join(SAMPLERS)})")
    return values


def check_image_path(path: str, option: str) -> None:
    """An image output path: writable, with an extension PIL can write."""
    from PIL import Image

    from .errors import UserError, check_output_file

    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise UserError(f"{option} {path}: unknown image extension {Path(path).suffix!r}; use .png")
    check_output_file(path, option)


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
    from .errors import UserError

    if pretrained and run_dirs:
        raise UserError("give either run directories or --pretrained, not both")
    if pretrained:
        return Cascade.from_pretrained(pretrained, device=device)
    if not run_dirs:
        raise UserError("give one or more run directories (base first), or --pretrained NAME")
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
    """Under ``torchrun`` the samples are split over the processes (see docs/sampling.md)."""
    import torch

    from .cascade import balanced_labels, grid_by_class, grid_indices
    from .data import load_images, save_grid
    from .errors import UserError, check_output_dir, check_output_file
    from .sharded_sampling import distributed_from_env, sample_sharded
    from .training import resolve_device

    # every output is checked before anything is loaded or sampled
    check_output_file(args.out, "--out")
    if args.grid:
        check_image_path(args.grid, "--grid")
    if args.save_stages:
        check_output_dir(args.save_stages, "--save-stages")
    if args.low_res_samples and not Path(args.low_res_samples).is_file():
        raise UserError(f"--low-res-samples {args.low_res_samples}: no such file")
    with distributed_from_env(args.device) as (rank, world_size, local_rank):
        device = resolve_device(args.device, local_rank)
        cascade = load_cascade(args.run_dirs, args.pretrained, device, weights=args.weights)
        if args.compile:
            cascade.compile(mode=None if args.compile == "default" else args.compile)
        labels = balanced_labels(args.num, cascade.num_classes, args.class_label)
        low_res = None
        start_stage = 0
        if args.low_res_samples:
            if len(cascade.stages) < 2:
                raise UserError("--low-res-samples needs at least one SR stage")
            first = cascade.stages[1]
            data = load_images(f"npz:{args.low_res_samples}", first.low_res, channels=first.channels)
            if len(data.images) < args.num:
                raise UserError(f"--low-res-samples has {len(data.images)} images, fewer than --num {args.num}")
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
        stages_run = cascade.stages[start_stage:]
        stage_paths = None
        if args.save_stages:
            stage_paths = [Path(args.save_stages) / f"stage{i + 1 + start_stage}_{s.resolution}px.npz"
                           for i, s in enumerate(stages_run)]
        label_array = labels.numpy().astype(np.int64)
        select = grid_indices(label_array, per_class=args.grid_per_class) if args.grid else None
        result = sample_sharded(
            cascade, labels, args.out, seed=args.seed, batch_size=args.batch_size, low_res=low_res,
            start_stage=start_stage, stage_paths=stage_paths, select=select, settings={"weights": args.weights},
            progress=not args.quiet, **kwargs
        )
    if rank != 0:
        return 0
    if args.grid:
        grid = grid_by_class(result.selected, label_array[select], per_class=args.grid_per_class)
        save_grid(grid[None], args.grid, nrow=1, padding=0)
    res = "→".join(str(s.resolution) for s in stages_run)
    resumed = f"; {result.resumed} resumed from {args.out}.shards" if result.resumed else ""
    processes = f" on {world_size} processes" if world_size > 1 else ""
    print(
        f"wrote {result.num} samples ({res}px) to {args.out} in {result.seconds:.1f} s: "
        f"{result.new} sampled at {result.rate:.1f} samples/s{processes}{resumed}"
        + (f"; grid {args.grid}" if args.grid else "")
    )
    return 0


# --- export ----------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import CheckpointError, export_stage, latest_valid_checkpoint
    from .errors import check_output_dir

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


# --- parser ----------------------------------------------------------------------------------------------


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=nonneg_int_list, default=None,
                   help="sampling steps, one value or one per stage (0 = all)")
    p.add_argument("--sampler", type=_samplers, default=None, help="ddpm | ddim | dpmpp, one or one per stage")
    p.add_argument("--guidance", type=nonneg_float_list, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=nonneg_float_list, default=None, help="DDIM eta")
    p.add_argument("--truncated", action="store_true", help="truncated conditioning augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
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
    p.add_argument("--steps", type=positive_int, default=None, help="total steps (overrides train.steps)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=2e-4")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample from one stage or a cascade (base first)")
    p.add_argument("run_dirs", nargs="*", help="run or exported stage directories, base first")
    p.add_argument("--pretrained", default=None, help="a bundled cascade, e.g. fashion-mnist")
    p.add_argument("--num", type=positive_int, default=64)
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--grid", default=None, help="PNG grid: one row per class, every stage side by side")
    p.add_argument("--grid-per-class", type=positive_int, default=8)
    p.add_argument("--class-label", type=int, action="append", default=None, help="sample these classes (repeatable)")
    p.add_argument("--aug-level", type=nonneg_int_list, default=None,
                   help="level s per SR stage (default: its sample_s)")
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

    from .prepare import add_prepare_command  # `cdm prepare`: decode an image folder once (prepared:DIR)

    add_prepare_command(sub)

    try:
        from .evaluation.cli import add_evaluation_commands
    except ImportError:  # pragma: no cover - the evaluation package is part of the distribution
        add_evaluation_commands = None
    if add_evaluation_commands is not None:
        add_evaluation_commands(sub, add_sampling_args)
    return parser


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower() or "failed to allocate" in text
    )


def _out_of_memory_hint(args: argparse.Namespace) -> str:
    if args.command == "train":
        return ("lower train.batch_size (raise train.grad_accum to keep the same global batch), or set "
                "model.gradient_checkpointing = true")
    if getattr(args, "batch_size", None) is not None:
        return f"lower --batch-size (it is {args.batch_size})"
    return "use fewer images (--num) or free memory"


def user_error_message(error: BaseException, args: argparse.Namespace) -> str | None:
    """The one line to print for an error the user can act on; None for anything else (a bug: traceback)."""
    import zipfile

    from .checkpoint import CheckpointError
    from .errors import describe_os_error
    from .training import NonFiniteLossError

    if _is_out_of_memory(error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"out of memory ({first[:200]}); {_out_of_memory_hint(args)}"
    if isinstance(error, OSError):
        return describe_os_error(error)
    if isinstance(error, zipfile.BadZipFile):
        return f"not a readable zip/.npz file ({error}); it is truncated or corrupt"
    if isinstance(error, (ValueError, CheckpointError, NonFiniteLossError)):  # ConfigError, UserError included
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors the user can act on (bad config or option, unusable path, corrupt file, busy
    run directory, out of memory) are one line, ``cdm COMMAND: error: ...``, exit status 2; ``CDM_DEBUG=1``
    shows their traceback. Anything else is a bug and keeps its traceback."""
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--"]:  # `torchrun ... -m cascaded_diffusion.cli -- sample ...` (see docs/sampling.md)
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"cdm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error_message(e, args)
        if message is None or os.environ.get("CDM_DEBUG"):
            raise
        print(f"cdm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
