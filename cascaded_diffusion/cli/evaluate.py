"""``cdm stats | eval | classifier train | cas | sweep``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ..cascade import Cascade
from ..data import load_images
from ..distributed import distributed_from_env
from ..errors import UserError, check_distinct_paths, check_output_file
from ..data.readers import ResolutionMismatch
from ..evaluation.cas import classification_accuracy_score
from ..evaluation.classifier.files import classifier_paths
from ..evaluation.classifier import (ClassifierConfig, ClassifierRecipe, evaluate_classifier, save_classifier,
                                    train_classifier)
from ..evaluation.evaluate import evaluate_images, load_samples, reference_stats
from ..evaluation.features import get_feature_extractor
from ..evaluation.sweep import augmentation_sweep, plot_sweep
from ..fileio import atomic_write_text
from ..hardware import resolve_device
from .common import (add_precision_arg, add_sampling_args, check_image_path, class_proportions_labels,
                     nonneg_int_list, positive_int, report_precision)


def _write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))


# The feature networks (Inception, the classifier's features) always run in fp32: FID and friends compare against
# reference statistics, and bf16 features would move them. stats and eval say so rather than take --precision.
FEATURES_FP32 = "precision fp32 (feature networks always run in fp32: exact features for the metrics)"


def cmd_stats(args: argparse.Namespace) -> int:

    out = check_output_file(args.out, "--out")
    check_distinct_paths({"--out": out}, {"REF": args.ref, "--features": args.features})
    with distributed_from_env(args.device) as (rank, world_size, local_rank):  # split over torchrun's processes
        extractor = get_feature_extractor(args.features, resolve_device(args.device, local_rank))
        if rank == 0:
            print(f"cdm stats: {FEATURES_FP32}", flush=True)
        start = time.time()
        stats = reference_stats(args.ref, extractor, resolution=args.resolution, channels=args.channels,
                                num=args.num)
    if rank != 0:
        return 0
    stats.save(out)  # atomic: a full disk or a kill leaves the previous file intact
    print(f"wrote {out}: {stats.num} images, {stats.dim}-d {extractor.name} features ({time.time() - start:.0f} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    check_output_file(args.out, "--out")
    check_distinct_paths({"--out": args.out}, {"SAMPLES": args.samples, "--ref": args.ref, "--features": args.features})
    images, _ = load_samples(args.samples, args.num)
    with distributed_from_env(args.device) as (rank, world_size, local_rank):  # split over torchrun's processes
        extractor = get_feature_extractor(args.features, resolve_device(args.device, local_rank))
        if rank == 0:
            print(f"cdm eval: {FEATURES_FP32}", flush=True)
        try:
            reference = reference_stats(args.ref, extractor, resolution=images.shape[1], channels=images.shape[-1],
                                        resize="any" if args.resize else "exact")
        except ResolutionMismatch as e:  # e.g. the cascade's base output scored against its final resolution
            raise UserError(f"--ref {args.ref}: {e} to the samples' size; pass --resize to do that anyway") from None
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        result = evaluate_images(images, reference, extractor, metrics, source=str(args.samples))
    if rank != 0:
        return 0
    result["reference"]["spec"] = args.ref
    _write_json(args.out, result)
    shown = {k: result[k] for k in ("fid", "kid", "is", "precision", "recall") if k in result}
    print(f"{args.samples} vs {args.ref} ({result['num_samples']} samples, {extractor.name}): {json.dumps(shown)}")
    return 0


def cmd_classifier_train(args: argparse.Namespace) -> int:

    check_output_file(args.out, "--out")
    weights, description = classifier_paths(args.out)  # the pair save_classifier writes
    check_distinct_paths({"--out": weights, "--out (its JSON)": description},
                         {"--data": args.data, "--test": args.test})
    train = load_images(args.data, args.resolution, channels=args.channels)
    test_spec = args.test or (args.data.split(":")[0] + ":test" if args.data.startswith("fashion-mnist") else None)
    test = load_images(test_spec, args.resolution, channels=train.images.shape[-1]) if test_spec else None
    # --resolution is the network's input size, not only the loading size: a 64x64 data set keeps its detail
    config = ClassifierConfig(num_classes=train.num_classes, in_channels=train.images.shape[-1],
                              resolution=args.resolution, stem_stride=args.stem_stride)
    start = time.time()
    device = resolve_device(args.device)
    precision = report_precision("classifier train", args.precision, device)
    recipe = ClassifierRecipe(seed=args.seed, flip=not args.no_flip, bf16=precision.bf16,
                              **{name: getattr(args, name) for name in ("epochs", "steps", "batch_size")
                                 if getattr(args, name) is not None})
    evaluation = {}
    if test is not None and args.eval_every_epoch:
        evaluation = dict(eval_images=test.images, eval_labels=test.labels)
    model, history = train_classifier(train.images, train.labels, train.num_classes, recipe, config=config,
                                      device=device, progress=True, **evaluation)
    minutes = (time.time() - start) / 60
    accuracy = None
    if test is not None:
        accuracy = evaluate_classifier(model, test.images, test.labels)
    save_classifier(model, args.out, metadata={
        "train_data": train.source, "test_data": test.source if test is not None else None,
        "test_top1": accuracy["top1"] if accuracy else None,
        "test_top5": accuracy["top5"] if accuracy else None, "train_minutes": minutes,
        "recipe": history.recipe,
    })
    msg = f"trained classifier on {train.source} ({len(train.images)} images, {history.steps} steps) in {minutes:.1f} min"
    if accuracy:
        msg += f"; {test.source} top-1 {100 * accuracy['top1']:.2f}%"
    print(msg + f"; saved {args.out}")
    return 0


def cmd_cas(args: argparse.Namespace) -> int:

    if args.out:
        check_output_file(args.out, "--out")
    check_distinct_paths({"--out": args.out}, {"SAMPLES": args.samples, "--test": args.test, "--real": args.real})
    images, labels = load_samples(args.samples, args.num)
    if labels is None:
        raise ValueError(f"{args.samples} has no arr_1 labels: CAS needs the class each sample was generated for")
    resize = "any" if args.resize else "exact"
    try:
        test = load_images(args.test, images.shape[1], channels=images.shape[-1], resize=resize)
    except ResolutionMismatch as e:
        raise UserError(f"--test {args.test}: {e} to the samples' size; pass --resize to do that anyway") from None
    num_classes = test.num_classes
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if len(outside):
        raise UserError(f"{args.samples}: arr_1 has label {int(outside[0])}, but the test set {test.source} has "
                        f"classes 0..{num_classes - 1}")
    if int(test.labels.max()) > int(labels.max()):
        raise UserError(
            f"--test {args.test} has label {int(test.labels.max())}, but the samples' labels go up to "
            f"{int(labels.max())}: a classifier trained on them could never predict it"
        )
    device = resolve_device(args.device)
    precision = report_precision("cas", args.precision, device)
    recipe = ClassifierRecipe(seed=args.seed, bf16=precision.bf16,
                              **({"epochs": args.epochs} if args.epochs is not None else {}))
    start = time.time()
    generated = classification_accuracy_score(images, labels, test.images, test.labels, num_classes, recipe,
                                              device=device)
    result = {"samples": str(args.samples), "test": test.source, "generated": generated,
              "precision": precision.name}
    line = f"CAS on {test.source}: generated top-1 {100 * generated['top1']:.2f}% top-5 {100 * generated['top5']:.2f}%"
    if args.real:
        try:
            real = load_images(args.real, images.shape[1], channels=images.shape[-1], resize=resize)
        except ResolutionMismatch as e:
            raise UserError(f"--real {args.real}: {e} to the samples' size; pass --resize to do that anyway") from None
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(len(real.images), size=min(len(images), len(real.images)), replace=False))
        baseline = classification_accuracy_score(
            np.asarray(real.images[pick]), np.asarray(real.labels[pick]), test.images, test.labels, num_classes, recipe,
            device=device,
        )
        result["real"] = {**baseline, "source": real.source}
        line += f"; real-data baseline ({baseline['n_train']} images) top-1 {100 * baseline['top1']:.2f}% top-5 {100 * baseline['top5']:.2f}%"
    result["minutes"] = (time.time() - start) / 60
    if args.out:
        _write_json(args.out, result)
    print(line)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:

    check_output_file(args.out, "--out")
    if args.plot:
        check_image_path(args.plot, "--plot")
    check_distinct_paths({"--out": args.out, "--plot": args.plot},
                         {"--ref": args.ref, "--ground-truth": args.ground_truth,
                          "--class-proportions": args.class_proportions, "--features": args.features})
    with distributed_from_env(args.device) as (rank, world_size, local_rank):  # split over torchrun's processes
        device = resolve_device(args.device, local_rank)
        precision = report_precision("sweep", args.precision, device, rank)
        cascade = Cascade.load(args.run_dirs, pretrained=args.pretrained, device=device, weights=args.weights)
        extractor = get_feature_extractor(args.features, device)
        final = cascade.stages[-1]
        reference = reference_stats(args.ref, extractor, resolution=final.resolution, channels=final.channels)
        ground_truth = None if args.no_ground_truth else (args.ground_truth or (args.ref if ":" in args.ref or not args.ref.endswith(".npz") else None))
        sampling = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance, eta=args.eta,
                        autocast=precision.bf16)
        labels = None
        if args.class_proportions:
            labels = class_proportions_labels(args.class_proportions, args.num, cascade.num_classes,
                                              cascade.stages[0].resolution)
        result = augmentation_sweep(
            cascade, args.aug_levels, num=args.num, reference=reference, extractor=extractor, labels=labels,
            ground_truth=ground_truth, truncated=bool(args.truncated), seed=args.seed, batch_size=args.batch_size,
            sampling={k: v for k, v in sampling.items() if v is not None},
        )
    if rank != 0:
        return 0
    result["sampling"] = {k: v for k, v in sampling.items() if v is not None}
    _write_json(args.out, result)
    if args.plot:
        plot_sweep(result, args.plot)
    print(f"best level s={result['best_level']} (FID {result['best_fid']:.3f}, {extractor.name}); wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("stats", help="reference feature statistics of a dataset")
    p.add_argument("ref", help="fashion-mnist | fashion-mnist:test | imagefolder:PATH | npz:PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--features", default="inception", help="inception[:WEIGHTS] | classifier[:PATH]")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image resolution (that of the samples you score)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None)
    p.add_argument("--num", type=positive_int, default=None, help="use the first N images")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("eval", help="FID / KID / IS / precision-recall of a samples .npz")
    p.add_argument("samples")
    p.add_argument("--ref", required=True, help="dataset spec or stats .npz from `cdm stats`")
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument("--metrics", default="fid,kid,is,pr")
    p.add_argument("--resize", action="store_true",
                   help="resize an npz reference of another resolution to the samples' (refused otherwise)")
    p.add_argument("--features", default="inception", help="inception[:WEIGHTS] | classifier[:PATH]")
    p.add_argument("--num", type=positive_int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("classifier", help="the evaluation classifier")
    csub = p.add_subparsers(dest="classifier_command", required=True)
    c = csub.add_parser("train", help="train the small ResNet on real data (features for FID/KID/PR, IS, CAS)")
    c.add_argument("--data", default="fashion-mnist")
    c.add_argument("--test", default=None, help="test split (default: DATA:test for fashion-mnist)")
    c.add_argument("--out", required=True, help=".safetensors path")
    c.add_argument("--resolution", type=positive_int, default=32,
                   help="the network's input side (images are loaded at it; samples of another size are resized)")
    c.add_argument("--channels", type=int, choices=[1, 3], default=None, help="default: the data's own")
    c.add_argument("--stem-stride", type=positive_int, default=1,
                   help="a patch-embedding stem of this stride (e.g. 4 at 256 px: full-resolution detail reaches "
                        "the features at the cost of a 64 px network); 1: a 3x3 stem at full size")
    c.add_argument("--epochs", type=positive_int, default=None)
    c.add_argument("--steps", type=positive_int, default=None, help="overrides --epochs (small data sets)")
    c.add_argument("--batch-size", type=positive_int, default=None)
    c.add_argument("--no-flip", action="store_true",
                   help="no horizontal flips in training (data whose mirror image is another thing: flags, text)")
    c.add_argument("--eval-every-epoch", action="store_true", help="print the test split's top-1 after each epoch")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    add_precision_arg(c)
    c.set_defaults(func=cmd_classifier_train)

    p = sub.add_parser("cas", help="Classification Accuracy Score of a samples .npz")
    p.add_argument("samples")
    p.add_argument("--test", default="fashion-mnist:test")
    p.add_argument("--real", default=None, help="also train on this many real images (e.g. fashion-mnist)")
    p.add_argument("--resize", action="store_true",
                   help="resize npz --test/--real data of another resolution to the samples' (refused otherwise)")
    p.add_argument("--out", default=None, help="JSON result")
    p.add_argument("--num", type=positive_int, default=None)
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_precision_arg(p)
    p.set_defaults(func=cmd_cas)

    p = sub.add_parser("sweep", help="FID over the conditioning-augmentation level s")
    p.add_argument("run_dirs", nargs="*")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--aug-levels", required=True, type=nonneg_int_list)
    p.add_argument("--num", type=positive_int, default=1000)
    p.add_argument("--ref", required=True, help="dataset spec or stats .npz")
    p.add_argument("--ground-truth", default=None, help="dataset for the ground-truth low-res curve (default: --ref)")
    p.add_argument("--no-ground-truth", action="store_true")
    p.add_argument("--class-proportions", default=None, metavar="DATA",
                   help="generate the classes in this data set's proportions (default: equally often)")
    p.add_argument("--features", default="inception")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    add_sampling_args(p)
    p.set_defaults(func=cmd_sweep)
