#!/usr/bin/env python
"""The emoji cascade's evaluation (docs/results.md, "The emoji cascade"): per-stage ablations, the s sweep of the
16 → 32 stage, memorisation, grids.

    python scripts/emoji_study.py --runs /work/runs/emoji --data /work/data/emoji \
        --features classifier:/work/runs/emoji/clf/classifier64.safetensors --num 1000

``--runs`` holds the five training runs of configs/emoji/ (base16, sr16to32, sr16to32_noaug, sr32to64,
sr32to64_noblur). Every setting is sampled once into ``RUNS/study/`` and skipped when its file exists (a rerun
resumes; delete a file to redo it). All cascade settings share one set of base samples, and both 32 → 64
settings share the same 32×32 inputs, so each comparison differs in one stage only. Classes are drawn in the
training split's proportions (``cdm sample --class-proportions``).

Settings (file name: what it is)
  base16               the base model's 16×16 samples
  x32_{aug,noaug}      SR 16 → 32 with / without noise augmentation on base16 (the augmented one at its sample_s)
  x32_aug_s{S}         the augmented model at level S (the sweep), on the same base16 samples
  gt32_aug_s{S}, gt32_noaug   the same SR models on held-out real 16×16 inputs (the ground-truth curve)
  x64_{aug,noaug}_{blur,noblur}   SR 32 → 64 with / without blur augmentation on x32_aug / x32_noaug

Every setting is scored against the training split and against the held-out split at its own resolution: KID
(primary: unbiased at these sizes) and FID with the feature network ``--features`` (a classifier trained on the
training split; never Inception here), the fraction of samples that network assigns to their requested class,
and the nearest-training-neighbour distances of the samples beside those of held-out images (memorisation).
Results go to ``RUNS/study/metrics.json`` and a Markdown table to ``RUNS/study/tables.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from cdm_command import cdm  # noqa: E402

RUNS = ("base16", "sr16to32", "sr16to32_noaug", "sr32to64", "sr32to64_noblur")


def stage_dir(runs: Path, name: str, step: int | None) -> str:
    """A run directory (its newest checkpoint) or, with ``step``, that checkpoint."""
    if step is None:
        return str(runs / name)
    return str(runs / name / "checkpoints" / f"step_{step:08d}")


def save_real(path: Path, spec: str, resolution: int) -> None:
    from cascaded_diffusion.data import load_images

    if not path.exists():
        data = load_images(spec, resolution, channels=3)
        np.savez(path, arr_0=np.asarray(data.images), arr_1=np.asarray(data.labels, dtype=np.int64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the --out of scripts/prepare_emoji.py")
    p.add_argument("--features", required=True, help="classifier:PATH (the emoji classifier)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--levels", default="0,100,250,400,500", help="the s sweep of the augmented 16 → 32 stage")
    p.add_argument("--sampler", default=None, help="cdm sample --sampler (default: every stage's [sample])")
    p.add_argument("--steps", default=None, help="cdm sample --steps")
    p.add_argument("--step", action="append", default=[], metavar="RUN=STEP",
                   help="score this checkpoint of a run instead of its newest (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="default RUNS/study")
    p.add_argument("--grid-per-class", type=int, default=6)
    p.add_argument("--max-resolution", type=int, default=None,
                   help="sample and score only settings up to this size (e.g. 32 while the 32 -> 64 runs still "
                        "train); a later run without it adds the rest")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out or args.runs / "study"
    out.mkdir(parents=True, exist_ok=True)
    steps = {k: int(v) for k, v in (item.split("=") for item in args.step)}
    stage = {name: stage_dir(args.runs, name, steps.get(name)) for name in RUNS}
    train_spec, test_spec = f"imagefolder:{args.data / 'train'}", f"imagefolder:{args.data / 'test'}"
    def sampling(num_stages: int) -> list[str]:
        """--sampler/--steps for a command over the first ``num_stages`` stages: a per-stage list (base first,
        e.g. 20,10,10) is cut to that many entries, one value applies to every stage."""
        out = []
        for flag, value in (("--sampler", args.sampler), ("--steps", args.steps)):
            if value:
                out += [flag, ",".join(value.split(",")[:num_stages])]
        return out

    timings = {}

    def sample(name: str, stages: list[str], *extra: str, num: int | None = None, seed: int = 1) -> Path:
        """``RUNS/study/NAME.npz`` from ``cdm sample`` over ``stages``, unless it exists (a rerun resumes)."""
        path = out / f"{name}.npz"
        if not path.exists():
            start = time.time()
            cdm("sample", *stages, "--num", str(args.num if num is None else num), "--out", str(path), "--seed",
                str(seed), "--quiet", "--device", "cpu", *sampling(len(stages)), *extra, echo=True)
            timings[name] = time.time() - start
        return path

    # one set of base samples for every cascade setting
    base = sample("base16", [stage["base16"]], "--class-proportions", train_spec, seed=0)
    with np.load(base) as f:
        base_res, num_classes = int(f["arr_0"].shape[1]), int(f["arr_1"].max()) + 1
    real16 = out / f"real{base_res}_test.npz"
    save_real(real16, test_spec, base_res)
    held_out = int(np.load(real16)["arr_1"].shape[0])

    settings = {"base16": base}
    low = ["--low-res-samples", str(base)]
    settings["x32_aug"] = sample("x32_aug", [stage["base16"], stage["sr16to32"]], *low)
    settings["x32_noaug"] = sample("x32_noaug", [stage["base16"], stage["sr16to32_noaug"]], *low)
    for s in (int(v) for v in args.levels.split(",")):
        settings[f"x32_aug_s{s}"] = sample(f"x32_aug_s{s}", [stage["base16"], stage["sr16to32"]], *low,
                                           "--aug-level", str(s))
    # ground-truth inputs: the held-out images at 16x16 (the training images would flatter a model that saw
    # each of them ~400 times)
    num_gt = min(args.num, held_out)
    gt_low = ["--low-res-samples", str(real16)]
    for s in (int(v) for v in args.levels.split(",")):
        settings[f"gt32_aug_s{s}"] = sample(f"gt32_aug_s{s}", [stage["base16"], stage["sr16to32"]], *gt_low,
                                            "--aug-level", str(s), num=num_gt)
    settings["gt32_noaug"] = sample("gt32_noaug", [stage["base16"], stage["sr16to32_noaug"]], *gt_low, num=num_gt)
    with_64 = args.max_resolution is None or args.max_resolution >= 64
    for low_name in ("aug", "noaug") if with_64 else ():
        inputs = ["--low-res-samples", str(settings[f"x32_{low_name}"])]
        for top, run in (("blur", "sr32to64"), ("noblur", "sr32to64_noblur")):
            if low_name == "noaug" and top == "noblur":
                continue  # the 32 -> 64 ablation is measured on the augmented cascade's inputs
            # 32x32 inputs: cdm sample runs only the cascade's 32 -> 64 stage on them
            settings[f"x64_{low_name}_{top}"] = sample(f"x64_{low_name}_{top}",
                                                       [stage["base16"], stage["sr16to32"], stage[run]], *inputs)

    if with_64:
        sample("grid_stages", [stage["base16"], stage["sr16to32"], stage["sr32to64"]], "--grid-per-class",
               str(args.grid_per_class), "--grid", str(out / "grid_stages.png"),
               num=num_classes * args.grid_per_class)
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n") if timings else None

    results = score(settings, args, train_spec, test_spec)
    results["_meta"] = {"num": args.num, "num_ground_truth": num_gt, "sampling": sampling(3) or "stage defaults",
                        "stages": stage, "features": args.features}
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    table = tables(results)
    (out / "tables.md").write_text(table)
    print(table)


def score(settings: dict[str, Path], args, train_spec: str, test_spec: str) -> dict:
    from cascaded_diffusion.data import load_images
    from cascaded_diffusion.evaluation.evaluate import evaluate_features, load_samples, reference_stats
    from cascaded_diffusion.evaluation.features import extract, get_feature_extractor
    from cascaded_diffusion.evaluation.memorisation import memorisation_report

    extractor = get_feature_extractor(args.features, "cpu")

    def features_and_recognised(images, labels):
        """One extraction per image set: its features (scored against both splits) and the share recognised."""
        features, probs = extract(images, extractor, with_probs=True)
        return features, float(np.mean(probs.argmax(1) == labels))

    def distances(features, ref, source):
        metrics = evaluate_features(features, None, ref, extractor.name, ("fid", "kid"), source=source)
        return {"fid": metrics["fid"], "kid": metrics["kid"]}

    results = {}
    real = {}
    for name, path in settings.items():
        images, labels = load_samples(path)
        res = images.shape[1]
        if res not in real:
            train = load_images(train_spec, res, channels=3)
            test = load_images(test_spec, res, channels=3)
            refs = {"train": reference_stats(train_spec, extractor, resolution=res, channels=3),
                    "test": reference_stats(test_spec, extractor, resolution=res, channels=3)}
            real[res] = (np.asarray(train.images), np.asarray(test.images), refs)
            # the real-data floor: the held-out images scored like samples against the training split
            features, recognised = features_and_recognised(np.asarray(test.images), np.asarray(test.labels))
            results[f"real{res}_test"] = {"resolution": res, "num": len(test.images), "recognised": recognised,
                                          "vs_train": distances(features, refs["train"], f"held-out real @ {res}")}
        train_images, test_images, refs = real[res]
        features, recognised = features_and_recognised(images, labels)
        entry = {"resolution": res, "num": len(images), "file": path.name}
        for split, ref in refs.items():
            entry[f"vs_{split}"] = distances(features, ref, path.name)
        entry["recognised"] = recognised
        entry["memorisation"] = memorisation_report(images, train_images, test_images)
        results[name] = entry
        print(f"{name}: KID(train) {1e3 * entry['vs_train']['kid']['mean']:.2f}e-3  FID(train) "
              f"{entry['vs_train']['fid']:.2f}  recognised {100 * entry['recognised']:.1f} %", flush=True)
    results["_feature_network"] = extractor.name
    return results


def tables(results: dict) -> str:
    lines = [f"Feature network: {results.get('_feature_network')} (the emoji classifier, not Inception).", "",
             "| setting | px | n | KID×10³ vs train | KID×10³ vs held-out | FID vs train | FID vs held-out "
             "| recognised | NN dist. (median) | held-out NN (median) | closer than any held-out |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        if name.startswith("real"):
            kid = r["vs_train"]["kid"]
            lines.append(f"| {name} (real data) | {r['resolution']} | {r['num']} | {1e3 * kid['mean']:.2f} ± "
                         f"{1e3 * kid['std']:.2f} | — | {r['vs_train']['fid']:.2f} | — | {100 * r['recognised']:.1f} % "
                         "| | | |")
            continue
        kt, kh, m = r["vs_train"]["kid"], r["vs_test"]["kid"], r["memorisation"]
        # a ground-truth setting super-resolves the held-out images themselves: against that split it measures
        # reconstruction of its own inputs, not a distance between distributions, so the table leaves it out
        held_out = ("— (its inputs)", "—") if name.startswith("gt") else (
            f"{1e3 * kh['mean']:.2f} ± {1e3 * kh['std']:.2f}", f"{r['vs_test']['fid']:.2f}")
        lines.append(
            f"| {name} | {r['resolution']} | {r['num']} | {1e3 * kt['mean']:.2f} ± {1e3 * kt['std']:.2f} | "
            f"{held_out[0]} | {r['vs_train']['fid']:.2f} | "
            f"{held_out[1]} | {100 * r['recognised']:.1f} % | {m['samples_median']:.1f} | "
            f"{m['held_out_median']:.1f} | {100 * m['closer_than_any_held_out']:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
