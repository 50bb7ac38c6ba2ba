"""``cdm push`` (export a cascade and upload it to the Hugging Face Hub) and ``cdm upscale`` (a cascade's SR stages
on your own images)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cascade import Cascade
from ..checkpoint import STAGE_FILE, list_checkpoints
from ..errors import UserError, check_output_dir
from ..hardware import resolve_device
from ..rundir import is_run_dir
from .common import add_precision_arg, nonneg_int_list, positive_int, report_precision, sampler_list
from .train import add_cascade_export_args, cascade_export_options


def cmd_push(args: argparse.Namespace) -> int:
    from ..sharing import push_cascade

    if not args.run_dirs and not args.pretrained:
        raise UserError("give the run directories of a cascade (base first) or --pretrained NAME")
    options = cascade_export_options(args)
    url, result = push_cascade(args.repo, options.pop("run_dirs"), private=args.private, branch=args.revision,
                               **options)
    size = sum(entry["size"] for entry in result.files.values())
    print(f"pushed the cascade {' -> '.join(result.stages)} ({size / 1e6:.1f} MB, model card, "
          f"{len(result.files)} hashed files) to {args.repo}" + (f" (branch {args.revision})" if args.revision else "")
          + f": {url}\nload it with: cdm sample --pretrained hf://{args.repo}"
          + (f"@{args.revision}" if args.revision else "") + " --num 64 --out s.npz --grid s.png")
    return 0


def _is_stage_dir(path: Path) -> bool:
    return path.is_dir() and ((path / STAGE_FILE).is_file() or (path / "state.json").is_file()
                              or bool(list_checkpoints(path)) or is_run_dir(path))


def cmd_upscale(args: argparse.Namespace) -> int:
    from ..upscale import OutputsExistError, read_labels_csv, upscale_files

    run_dirs = [p for p in args.paths if _is_stage_dir(Path(p))]
    images = [p for p in args.paths if p not in run_dirs]
    if args.pretrained and run_dirs:
        raise UserError(f"give either run directories ({run_dirs[0]}, ...) or --pretrained, not both")
    if not run_dirs and not args.pretrained:
        raise UserError("give the cascade: its run directories (base first) after the images, or --pretrained NAME")
    if not images:
        raise UserError("give the images to upscale (files or folders)")
    if (args.label is None) == (args.labels is None):
        raise UserError("give --label N (every image) or --labels CSV (name,label per line)")
    labels = read_labels_csv(args.labels) if args.labels else None
    check_output_dir(args.out, "--out")
    device = resolve_device(args.device)
    cascade = Cascade.load(run_dirs, pretrained=args.pretrained, device=device, weights=args.weights)
    aug = cascade.aug_levels(args.aug_level)  # refused here, before any image is decoded, if the count is wrong

    def log(line: str) -> None:
        print(f"cdm upscale: {line}", file=sys.stderr)

    precision = report_precision("upscale", args.precision, device)
    try:
        report = upscale_files(cascade, images, args.out, label=args.label, labels=labels, seed=args.seed,
                               overwrite=args.force, save_stages=args.save_stages, batch_size=args.batch_size,
                               log=log, progress=not args.quiet, aug_levels=aug, steps=args.steps,
                               sampler=args.sampler, autocast=precision.bf16)
    except OutputsExistError as e:
        raise UserError(f"--out: {e}; pass --force to overwrite") from None
    done = len(report.written) // (1 + (len(cascade.stages) - 1 if args.save_stages else 0))
    levels = ", ".join(str(s) for s in aug)
    print(f"upscaled {done} of {done + len(report.failed)} images {report.input_resolution}px -> "
          f"{report.resolution}px into {args.out} (aug level {levels}, seed {args.seed}) in {report.seconds:.1f} s"
          + (f"; failed: {', '.join(path for path, _ in report.failed)}" if report.failed else ""))
    return 1 if report.failed else 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "push", help="export a cascade and upload it to the Hugging Face Hub, model card included",
        description="Export the cascade (as `cdm export --cascade`: fp16 EMA weights, cascade.json with the sha256 "
                    "of every loaded file, a model card README.md with the Hub's metadata, the per-stage grid.png) "
                    "into a temporary folder and upload it with huggingface_hub's HfApi.upload_folder. The token is "
                    "the standard Hugging Face login's (`hf auth login`, or HF_TOKEN); there is no token option. "
                    "Needs the optional extra: pip install -e '.[hub]'. Load the result with "
                    "`cdm sample --pretrained hf://OWNER/REPO`.")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="the cascade's run or stage directories, base first")
    p.add_argument("--repo", required=True, metavar="OWNER/REPO", help="the Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its "
                                                          "visibility)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="upload to this branch (created from main if "
                                                                      "missing); default main")
    add_cascade_export_args(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="weights' dtype (run directories)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_push, set=None)

    p = sub.add_parser(
        "upscale", help="run a cascade's super-resolution stages on your own images",
        description="Each image (PNG, JPEG, ... files, or folders of them) is converted to the cascade's channels "
                    "and brought to the first SR stage's input size by the training data's rule (ADM centre crop + "
                    "resize), then every SR stage runs; OUT/<stem>.png is written at the top resolution. Unreadable "
                    "files are reported and skipped (exit status 1, the others are written). Nothing is overwritten "
                    "without --force. The result depends only on the image, its label, --seed and its file stem.")
    p.add_argument("paths", nargs="+", metavar="IMAGES... [RUN_DIR...]",
                   help="image files or folders, then (without --pretrained) the cascade's run directories, base first")
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="a bundled cascade, hf://OWNER/REPO[@REVISION] or an exported cascade folder")
    p.add_argument("--label", type=int, default=None, help="the class of every image")
    p.add_argument("--labels", default=None, metavar="CSV", help="name,label per line (file name or stem)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--aug-level", type=nonneg_int_list, default=None,
                   help="level s per SR stage (default: the stage's measured default, its sample_s)")
    p.add_argument("--save-stages", action="store_true",
                   help="also write <stem>_<N>px.png: the input as fed and every intermediate stage")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=nonneg_int_list, default=None, help="sampling steps per stage (0 = all)")
    p.add_argument("--sampler", type=sampler_list, default=None, help="ddpm | ddim | dpmpp per stage")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    add_precision_arg(p)
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_upscale)
