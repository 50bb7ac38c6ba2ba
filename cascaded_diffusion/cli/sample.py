"""``cdm sample``: a cascade (run directories or a bundled one) to a samples ``.npz``, per-stage files and a grid."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..cascade import Cascade
from ..labels import grid_indices
from ..data import load_images
from ..distributed import distributed_from_env
from ..errors import UserError, check_distinct_paths, check_output_dir, check_output_file
from ..fileio import npz_array_shape
from ..images import grid_by_class, save_grid
from ..hardware import SamplingMemoryError, check_sampling_memory, resolve_device
from ..sharded_sampling import sample_sharded
from .common import (add_sampling_args, check_image_path, class_proportions_labels, nonneg_int_list, positive_int,
                     report_precision)


def low_res_start_stage(cascade: Cascade, path: str) -> int:
    """The stage that takes ``path``'s images as its input: the first SR stage whose input size they have (a
    three-stage cascade fed 32x32 images runs only its 32 -> 64 stage)."""
    if len(cascade.stages) < 2:
        raise UserError("--low-res-samples needs at least one SR stage")
    try:
        shape = npz_array_shape(path)
    except ValueError as e:
        raise UserError(f"--low-res-samples: {e}") from None
    if len(shape) != 4:
        raise UserError(f"--low-res-samples {path}: arr_0 has shape {shape}, expected N x H x W x C images")
    size = shape[1]
    for i, stage in enumerate(cascade.stages[1:], start=1):
        if stage.low_res == size:
            return i
    inputs = ", ".join(f"{s.low_res}px" for s in cascade.stages[1:])
    raise UserError(f"--low-res-samples {path} holds {size}px images; this cascade's SR stages take {inputs}")


def check_outputs(args: argparse.Namespace) -> dict:
    """Every output is checked before anything is loaded or sampled; returns the inputs (option -> path) that no
    output may overwrite."""
    check_output_file(args.out, "--out")
    if args.grid:
        check_image_path(args.grid, "--grid")
    if args.save_stages:
        check_output_dir(args.save_stages, "--save-stages")
    if args.low_res_samples and not Path(args.low_res_samples).is_file():
        raise UserError(f"--low-res-samples {args.low_res_samples}: no such file")
    inputs = {"--low-res-samples": args.low_res_samples, "--class-proportions": args.class_proportions}
    check_distinct_paths({"--out": args.out, "--grid": args.grid}, inputs)
    if args.pretrained and args.run_dirs:
        raise UserError("give either run directories or --pretrained, not both")
    return inputs


def labels_and_inputs(args: argparse.Namespace, cascade: Cascade, start_stage: int):
    """The labels to sample and, with ``--low-res-samples``, the given inputs of the first stage run."""
    if args.class_proportions:
        if args.class_label:
            raise UserError("--class-label and --class-proportions exclude each other")
        labels = class_proportions_labels(args.class_proportions, args.num, cascade.num_classes,
                                          cascade.stages[0].resolution)
    else:
        labels = cascade.labels_for(args.num, class_labels=args.class_label)
    if not args.low_res_samples:
        return labels, None
    first = cascade.stages[start_stage]
    data = load_images(f"npz:{args.low_res_samples}", first.low_res, channels=first.channels)
    if len(data.images) < args.num:
        raise UserError(f"--low-res-samples has {len(data.images)} images, fewer than --num {args.num}")
    labels = torch.from_numpy(data.labels[: args.num])
    if len(labels) and int(labels.max()) >= cascade.num_classes:  # else an IndexError once sampling ran
        raise UserError(f"--low-res-samples {args.low_res_samples}: arr_1 has label {int(labels.max())}, but "
                        f"the cascade has classes 0..{cascade.num_classes - 1}")
    return labels, data.images[: args.num]


def stage_outputs(args: argparse.Namespace, cascade: Cascade, start_stage: int, options: dict,
                  inputs: dict) -> list[Path | None] | None:
    """``--save-stages``: one file per stage run, None for a stage that hands its noisy z_s on (truncated
    sampling), which is not an image and is not written."""
    if not args.save_stages:
        return None
    noisy = cascade.noisy_outputs(options["aug_levels"], options["truncated"])
    paths = [None if noisy[i] else Path(args.save_stages) / f"stage{i + 1}_{cascade.stages[i].resolution}px.npz"
             for i in range(start_stage, len(cascade.stages))]
    check_distinct_paths({"--out": args.out, "--grid": args.grid,
                          **{f"--save-stages ({p.name})": p for p in paths if p is not None}}, inputs)
    return paths


def cmd_sample(args: argparse.Namespace) -> int:
    """Under ``torchrun`` the samples are split over the processes (docs/sampling.md); a killed job resumes from
    ``OUT.shards``."""
    inputs = check_outputs(args)
    with distributed_from_env(args.device) as (rank, world_size, local_rank):
        device = resolve_device(args.device, local_rank)
        precision = report_precision("sample", args.precision, device, rank)
        cascade = Cascade.load(args.run_dirs, pretrained=args.pretrained, device=device, weights=args.weights)
        if args.compile:
            cascade.compile(mode=None if args.compile == "default" else args.compile)
        start_stage = low_res_start_stage(cascade, args.low_res_samples) if args.low_res_samples else 0
        try:  # before the labels or a batch are allocated: 10**8 of them grow until the kernel kills the process
            check_sampling_memory(cascade, args.num, args.batch_size, start_stage=start_stage, world_size=world_size)
        except SamplingMemoryError as e:
            flag = "--batch-size" if e.option == "batch_size" else "--num"
            raise UserError(f"{e.detail}; lower {flag} (it is {e.value})") from None
        labels, low_res = labels_and_inputs(args, cascade, start_stage)
        options = cascade.sampling_options(steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                                           eta=args.eta, truncated=args.truncated, aug_levels=args.aug_level,
                                           autocast=precision.bf16)
        stage_paths = stage_outputs(args, cascade, start_stage, options, inputs)
        label_array = labels.numpy().astype(np.int64)
        select = grid_indices(label_array, per_class=args.grid_per_class) if args.grid else None
        result = sample_sharded(
            cascade, labels, args.out, seed=args.seed, batch_size=args.batch_size, low_res=low_res,
            start_stage=start_stage, stage_paths=stage_paths, select=select, settings={"weights": args.weights},
            progress=not args.quiet, **options
        )
    if rank != 0:
        return 0
    if args.grid:
        grid = grid_by_class(result.selected, label_array[select], per_class=args.grid_per_class)
        save_grid(grid[None], args.grid, nrow=1, padding=0)
    res = "→".join(str(s.resolution) for s in cascade.stages[start_stage:])
    resumed = f"; {result.resumed} resumed from {args.out}.shards" if result.resumed else ""
    processes = f" on {world_size} processes" if world_size > 1 else ""
    notes = [f"stage {i + 1 + start_stage} handed its noisy z_s on (truncated) and is not saved"
             for i, path in enumerate(stage_paths or []) if path is None]
    print(
        f"wrote {result.num} samples ({res}px) to {args.out} in {result.seconds:.1f} s: "
        f"{result.new} sampled at {result.rate:.1f} samples/s{processes}{resumed}"
        + (f"; grid {args.grid}" if args.grid else "")
        + "".join(f"; {note}" for note in notes)
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="sample from one stage or a cascade (base first)")
    p.add_argument("run_dirs", nargs="*", help="run or exported stage directories, base first")
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="a bundled cascade (fashion-mnist, emoji), hf://OWNER/REPO[@REVISION] from the Hugging Face "
                        "Hub or its cache (pip install -e '.[hub]'), or the path of an exported cascade folder")
    p.add_argument("--num", type=positive_int, default=64)
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
    p.add_argument("--grid", default=None, help="PNG grid: one row per class, every stage side by side")
    p.add_argument("--grid-per-class", type=positive_int, default=8)
    p.add_argument("--class-label", type=int, action="append", default=None, help="sample these classes (repeatable)")
    p.add_argument("--class-proportions", default=None, metavar="DATA",
                   help="sample the classes in the proportions of this data set (for FID/KID against it) "
                        "instead of equally often")
    p.add_argument("--aug-level", type=nonneg_int_list, default=None,
                   help="level s per SR stage (default: its sample_s, or the level a fixed-s stage was trained at)")
    p.add_argument("--save-stages", default=None,
                   help="directory for every stage's output (.npz); with --truncated the stages that hand a noisy "
                        "z_s on are skipped")
    p.add_argument("--low-res-samples", default=None,
                   help="npz of a lower stage's outputs (labels in arr_1): run only the stages above them "
                        "(picked by size: 32x32 images in a 16 -> 32 -> 64 cascade run the 32 -> 64 stage)")
    p.add_argument("--quiet", action="store_true")
    add_sampling_args(p)
    p.set_defaults(func=cmd_sample)
