"""What the commands share: list and number parsers (a bad value is refused while parsing, before anything is
loaded or computed), the sampling options, image output paths."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError, check_output_file
from ..hardware import PRECISIONS, Precision, choose_precision
from ..samplers import SAMPLERS


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def str_list(text: str) -> list[str]:
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
nonneg_int = _int_at_least(0)


def nonneg_int_list(text: str) -> list[int]:
    values = int_list(text)
    if not values:  # an empty list would reach min() or a per-stage count check far from the option
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated integers >= 0, got {text!r}")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return values


def nonneg_float_list(text: str) -> list[float]:
    values = float_list(text)
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def sampler_list(text: str) -> list[str]:
    values = str_list(text)
    bad = [v for v in values if v not in SAMPLERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sampler {bad[0]!r} (valid: {', '.join(SAMPLERS)})")
    return values


def check_image_path(path: str, option: str) -> None:
    """An image output path: writable, with an extension PIL can write."""
    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise UserError(f"{option} {path}: unknown image extension {Path(path).suffix!r}; use .png")
    check_output_file(path, option)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network precision: bf16 autocast or fp32; auto (default) = bf16 where the hardware does "
                        "bf16 natively (CUDA, CPUs with avx512_bf16 or AMX), else fp32")


def report_precision(command: str, requested: str, device, rank: int = 0) -> Precision:
    """Decide the precision (``choose_precision``) and say which and why, once (rank 0; on stdout, since stderr
    holds only the one-line errors): a user on a CPU without native bf16 sees that fp32 was chosen, and why."""
    precision = choose_precision(requested, device)
    if rank == 0:
        print(f"cdm {command}: {precision.describe()}", flush=True)
    return precision


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=nonneg_int_list, default=None,
                   help="sampling steps, one value or one per stage (0 = all)")
    p.add_argument("--sampler", type=sampler_list, default=None, help="ddpm | ddim | dpmpp, one or one per stage")
    p.add_argument("--guidance", type=nonneg_float_list, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=nonneg_float_list, default=None, help="DDIM eta")
    p.add_argument("--truncated", action=argparse.BooleanOptionalAction, default=None,
                   help="truncated conditioning augmentation (default: a bundle's recorded mode, else off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    add_precision_arg(p)
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile every stage's network (mode; reduce-overhead = CUDA graphs on GPUs); "
                        "pays off for thousands of samples, not for a few")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")




def class_proportions_labels(spec: str, num: int, num_classes: int, resolution: int):
    """``num`` labels in the class proportions of the data set ``spec`` (``--class-proportions``)."""
    from ..labels import proportional_labels
    from ..data import load_images

    data = load_images(spec, resolution)
    counts = np.bincount(np.asarray(data.labels, dtype=np.int64), minlength=num_classes)
    if counts.size != num_classes:
        raise UserError(f"--class-proportions {spec}: labels go up to {counts.size - 1}, but the cascade has "
                        f"{num_classes} classes")
    return proportional_labels(num, counts)
