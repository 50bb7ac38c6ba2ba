#!/usr/bin/env python
"""The 256 px emoji cascade's evaluation (docs/results.md, "256 px"): the three paired ablations, the s sweep of
the 16 → 64 stage, the top stage's sampler and step count, memorisation at 256 px, per-stage grids.

    python scripts/emoji256_study.py --runs /work/runs/emoji256 --data /work/data \
        --features classifier:/work/runs/emoji256/clf/classifier64.safetensors \
        --features-256 classifier:/work/runs/emoji256/clf/classifier256.safetensors

``--runs`` holds the six training runs of configs/emoji256/ (base16, sr16to64, sr16to64_noaug, sr64to256,
sr64to256_noaug, sr64to256_noise); ``--data`` the prepared splits ``emoji256-train`` and ``emoji256-test``
(``cdm prepare`` of scripts/prepare_emoji256.py's folders). Every setting is sampled once into ``RUNS/study/``
and skipped when its file exists (a rerun resumes). Pairing: every 64 px setting super-resolves the same base
samples; every 256 px setting of one comparison super-resolves the same 64 px images with the same seed, so a
difference between two settings is one stage's doing and a *paired* bootstrap (the same resampled indices for
both) removes the inputs' own spread from its error bar.

Settings (file name: what it is)
  base16                      the base model's samples (classes in the training split's proportions)
  x64_{aug,noaug}             SR 16 → 64 with / without noise augmentation on base16; x64_aug_s{S}: the s sweep
  gt64_{aug_s{S},noaug}       the same SR models on held-out real 16 px inputs
  x256_{blur,noaug,noise}     SR 64 → 256 trained with blur / no / noise augmentation, on the first --num-256
                              images of x64_aug (the top-stage ablations)
  x256_blur_on_noaug          the blur top stage on x64_noaug: the middle-stage ablation seen at 256 px
  x256_{blur,noaug,noise}_s{S} the top stages on the first --num-256 images of x64_aug_s{S} (--top-levels): the
                              ablation on the inputs a bundle sampling the middle stage at s = S hands on
  gt256_{blur,noaug,noise}    the top stages on held-out real 64 px inputs (no generated-input mismatch)
  x256_blur_{sampler}{steps}  the top stage's sampler curve (--top-samplers), on the same inputs

Scores: KID (primary; unbiased at a few hundred images) and FID against the training split and the held-out
split at each setting's own resolution, with the feature network ``--features`` (and ``--features-256`` for
256 px images: a classifier with a patch stem that sees every pixel; never Inception here), the share of samples
the network assigns to their requested class, nearest-training-neighbour distances (memorisation) and, for each
ablation pair, the paired-bootstrap difference. Results: ``RUNS/study/metrics.json`` and ``tables.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from cdm_command import cdm  # noqa: E402

RUNS = ("base16", "sr16to64", "sr16to64_noaug", "sr64to256", "sr64to256_noaug", "sr64to256_noise")
# the shippable chain; an ablation run that does not exist (yet) is skipped, its settings and pairs with it
REQUIRED_RUNS = ("base16", "sr16to64", "sr64to256")
# the top stage's ablation: setting suffix -> its run
TOP_RUNS = (("blur", "sr64to256"), ("noaug", "sr64to256_noaug"), ("noise", "sr64to256_noise"))
# (setting A, setting B): each row of the ablation table is KID(A) - KID(B), paired
PAIRS = (
    ("x256_noaug", "x256_blur", "top stage: none − blur (generated 64 px inputs)"),
    ("x256_noise", "x256_blur", "top stage: noise − blur (generated 64 px inputs)"),
    ("gt256_noaug", "gt256_blur", "top stage: none − blur (held-out real 64 px inputs)"),
    ("gt256_noise", "gt256_blur", "top stage: noise − blur (held-out real 64 px inputs)"),
    ("x256_noise", "x256_noaug", "top stage: noise − none (generated 64 px inputs)"),
    ("gt256_noise", "gt256_noaug", "top stage: noise − none (held-out real 64 px inputs)"),
    ("x64_noaug", "x64_aug", "middle stage: none − noise (at 64 px)"),
    ("x256_blur_on_noaug", "x256_blur", "middle stage: none − noise (seen at 256 px)"),
)


def level_pairs(levels: list[int], top_levels: list[int]) -> tuple[tuple[str, str, str], ...]:
    """The pairs that depend on the levels swept: the unaugmented middle stage against the augmented one at each
    swept s, and the top stages against each other on the augmented middle stage's outputs at each --top-levels s."""
    pairs = [("x64_noaug", f"x64_aug_s{s}", f"middle stage: none − noise at s = {s} (at 64 px)") for s in levels]
    for s in top_levels:
        pairs += [(f"x256_{a}_s{s}", f"x256_{b}_s{s}", f"top stage: {wa} − {wb} (generated 64 px inputs at s = {s})")
                  for a, b, wa, wb in (("noaug", "blur", "none", "blur"), ("noise", "blur", "noise", "blur"),
                                       ("noise", "noaug", "noise", "none"))]
    return tuple(pairs)


def save_subset(src: Path, dst: Path, num: int) -> Path:
    """The first ``num`` images (and labels) of an npz: the same inputs for every setting of a comparison."""
    if not dst.exists():
        with np.load(src) as f:
            np.savez(dst, arr_0=f["arr_0"][:num], arr_1=f["arr_1"][:num])
    return dst


def save_real(path: Path, prepared: Path, resolution: int, num: int | None = None) -> Path:
    from cascaded_diffusion.data import load_images

    if not path.exists():
        data = load_images(f"prepared:{prepared}", resolution, channels=3)
        np.savez(path, arr_0=np.asarray(data.images[:num]), arr_1=np.asarray(data.labels[:num], dtype=np.int64))
    return path


def main() -> None:
    # FID of a few hundred 128-d features is rank-limited and says so once per set; KID is the primary metric here
    warnings.filterwarnings("ignore", message=".*covariance is rank-deficient.*")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="holds emoji256-train/ and emoji256-test/ (cdm prepare)")
    p.add_argument("--features", required=True, help="classifier:PATH for 16 and 64 px images")
    p.add_argument("--features-256", default=None, help="classifier:PATH for 256 px images (default --features)")
    p.add_argument("--num", type=int, default=1000, help="samples per 16 and 64 px setting")
    p.add_argument("--num-256", type=int, default=300, help="samples per 256 px setting (~2 s each on one core)")
    p.add_argument("--levels", default="0,100,250,500", help="the s sweep of the augmented 16 → 64 stage")
    p.add_argument("--steps", default=None, help="cdm sample --steps for base,sr64,sr256 (default: stage.json)")
    p.add_argument("--sampler", default=None, help="cdm sample --sampler for base,sr64,sr256")
    p.add_argument("--top-levels", default="",
                   help="also run the top-stage ablation on x64_aug_s{S} for each of these --levels")
    p.add_argument("--top-samplers", default="dpmpp:2,dpmpp:4,dpmpp:8,dpmpp:16,ddpm:50",
                   help="the top stage's sampler curve: SAMPLER:STEPS,...")
    p.add_argument("--step", action="append", default=[], metavar="RUN=STEP",
                   help="score this checkpoint of a run instead of its newest (repeatable)")
    p.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap rounds")
    p.add_argument("--out", type=Path, default=None, help="default RUNS/study")
    p.add_argument("--grid-per-class", type=int, default=2)
    p.add_argument("--sample-only", action="store_true",
                   help="sample every setting and stop (score later, e.g. while a feature network still trains)")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="sample and score only up to this size (64 while the 256 px stages train)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out or args.runs / "study"
    out.mkdir(parents=True, exist_ok=True)
    steps_at = {k: int(v) for k, v in (item.split("=") for item in args.step)}
    stage = {n: str(args.runs / n / "checkpoints" / f"step_{steps_at[n]:08d}") if n in steps_at else str(args.runs / n)
             for n in RUNS}
    missing = [n for n in RUNS if not Path(stage[n]).is_dir()]
    if any(n in missing for n in REQUIRED_RUNS):
        raise SystemExit(f"{args.runs} lacks {', '.join(n for n in REQUIRED_RUNS if n in missing)}: the study needs "
                         f"at least {', '.join(REQUIRED_RUNS)}")
    for n in missing:
        print(f"{n}: no run at {stage[n]}; its settings are skipped", flush=True)
    train_dir, test_dir = args.data / "emoji256-train", args.data / "emoji256-test"
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    top_levels = [int(v) for v in args.top_levels.split(",") if v.strip()]
    if not set(top_levels) <= set(levels):
        raise SystemExit(f"--top-levels {args.top_levels}: each must be one of --levels {args.levels}")

    def sampling(num_stages: int) -> list[str]:
        flags = []
        for flag, value in (("--sampler", args.sampler), ("--steps", args.steps)):
            if value:
                flags += [flag, ",".join(value.split(",")[:num_stages])]
        return flags

    timings_path = out / "timings.json"  # a rerun adds to the timings of earlier runs' samples
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def sample(name: str, stages: list[str], *extra: str, num: int, seed: int = 1) -> Path:
        path = out / f"{name}.npz"
        if not path.exists():
            start = time.time()
            cdm("sample", *stages, "--num", str(num), "--out", str(path), "--seed", str(seed), "--quiet",
                "--device", "cpu", *(extra if "--sampler" in extra else (*sampling(len(stages)), *extra)), echo=True)
            timings[name] = time.time() - start
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        return path

    b, m, t = stage["base16"], stage["sr16to64"], stage["sr64to256"]
    settings: dict[str, Path] = {}
    settings["base16"] = base = sample("base16", [b], "--class-proportions", f"prepared:{train_dir}",
                                       num=args.num, seed=0)
    real16 = save_real(out / "real16_test.npz", test_dir, 16)
    real64 = save_real(out / "real64_test.npz", test_dir, 64)
    held_out = int(np.load(real16)["arr_1"].shape[0])
    low = ["--low-res-samples", str(base)]
    settings["x64_aug"] = sample("x64_aug", [b, m], *low, num=args.num)
    if "sr16to64_noaug" not in missing:
        settings["x64_noaug"] = sample("x64_noaug", [b, stage["sr16to64_noaug"]], *low, num=args.num)
    for s in levels:
        settings[f"x64_aug_s{s}"] = sample(f"x64_aug_s{s}", [b, m], *low, "--aug-level", str(s), num=args.num)
    num_gt = min(args.num, held_out)
    gt16 = ["--low-res-samples", str(real16)]
    for s in levels:
        settings[f"gt64_aug_s{s}"] = sample(f"gt64_aug_s{s}", [b, m], *gt16, "--aug-level", str(s), num=num_gt)
    if "sr16to64_noaug" not in missing:
        settings["gt64_noaug"] = sample("gt64_noaug", [b, stage["sr16to64_noaug"]], *gt16, num=num_gt)

    if args.max_resolution is None or args.max_resolution >= 256:
        n256 = min(args.num_256, args.num)
        inputs = {"aug": save_subset(settings["x64_aug"], out / "in64_aug.npz", n256),
                  "real": save_subset(real64, out / "in64_real.npz", min(n256, held_out))}
        for top, run in TOP_RUNS:
            if run in missing:
                continue
            three = [b, m, stage[run]]
            settings[f"x256_{top}"] = sample(f"x256_{top}", three, "--low-res-samples", str(inputs["aug"]), num=n256)
            settings[f"gt256_{top}"] = sample(f"gt256_{top}", three, "--low-res-samples", str(inputs["real"]),
                                              num=min(n256, held_out))
        for s in top_levels:
            at_s = save_subset(settings[f"x64_aug_s{s}"], out / f"in64_aug_s{s}.npz", n256)
            for top, run in TOP_RUNS:
                if run not in missing:
                    settings[f"x256_{top}_s{s}"] = sample(f"x256_{top}_s{s}", [b, m, stage[run]],
                                                          "--low-res-samples", str(at_s), num=n256)
        if "sr16to64_noaug" not in missing:
            inputs["noaug"] = save_subset(settings["x64_noaug"], out / "in64_noaug.npz", n256)
            settings["x256_blur_on_noaug"] = sample("x256_blur_on_noaug", [b, stage["sr16to64_noaug"], t],
                                                    "--low-res-samples", str(inputs["noaug"]), num=n256)
        for item in (v for v in args.top_samplers.split(",") if v.strip()):
            # the inputs are 64 px, so only the top stage runs: one --sampler/--steps value reaches it
            sampler, n_steps = item.split(":")
            settings[f"x256_blur_{sampler}{n_steps}"] = sample(
                f"x256_blur_{sampler}{n_steps}", [b, m, t], "--low-res-samples", str(inputs["aug"]),
                "--sampler", sampler, "--steps", n_steps, num=n256)
        grid = out / "grid_stages.png"
        if not grid.exists():
            with np.load(base) as f:
                num_classes = int(f["arr_1"].max()) + 1
            sample("grid_stages", [b, m, t], "--grid-per-class", str(args.grid_per_class), "--grid", str(grid),
                   num=num_classes * args.grid_per_class)

    if args.sample_only:
        print(f"sampled {len(settings)} settings into {out}; rerun without --sample-only to score them")
        return
    results = score(settings, args, train_dir, test_dir)
    results["_pairs"] = paired_differences(results, args.bootstrap, PAIRS + level_pairs(levels, top_levels))
    results["_meta"] = {"num": args.num, "num_256": args.num_256, "num_ground_truth": num_gt,
                        "missing_runs": missing, "levels": levels, "top_levels": top_levels,
                        "sampling": sampling(3) or "stage defaults", "stages": stage,
                        "features": args.features, "features_256": args.features_256 or args.features}
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in results.items()
                                                  if k not in ("_features", "_reference_features")},
                                                 indent=2, default=str) + "\n")
    table = tables(results)
    (out / "tables.md").write_text(table)
    print(table)


def score(settings: dict[str, Path], args, train_dir: Path, test_dir: Path) -> dict:
    from cascaded_diffusion.data import load_images
    from cascaded_diffusion.evaluation.evaluate import evaluate_features, load_samples
    from cascaded_diffusion.evaluation.features import extract, get_feature_extractor
    from cascaded_diffusion.evaluation.memorisation import memorisation_report
    from cascaded_diffusion.evaluation.stats import FeatureStats

    extractors = {"low": get_feature_extractor(args.features, "cpu")}
    extractors["256"] = get_feature_extractor(args.features_256, "cpu") if args.features_256 else extractors["low"]
    results: dict = {"_features": {}}
    real: dict[int, dict] = {}
    for name, path in settings.items():
        images, labels = load_samples(path)
        res = images.shape[1]
        extractor = extractors["256" if res == 256 else "low"]
        if res not in real:
            train = load_images(f"prepared:{train_dir}", res, channels=3)
            test = load_images(f"prepared:{test_dir}", res, channels=3)
            feats = {s: extract(np.asarray(d.images), extractor, with_probs=True) for s, d in
                     (("train", train), ("test", test))}
            real[res] = {"train": train, "test": test, "features": {s: f[0] for s, f in feats.items()},
                         "stats": {s: FeatureStats.from_features(f[0], extractor.name, f"{s} split @ {res}")
                                   for s, f in feats.items()}}
            # the real-data floor: the held-out images scored like samples against the training split
            floor = evaluate_features(feats["test"][0], None, real[res]["stats"]["train"], extractor.name,
                                      ("fid", "kid"), source=f"held-out real @ {res}")
            results[f"real{res}_test"] = {
                "resolution": res, "num": len(test.images),
                "recognised": float(np.mean(feats["test"][1].argmax(1) == np.asarray(test.labels))),
                "vs_train": {"fid": floor["fid"], "kid": floor["kid"]}, "network": extractor.name}
        ref = real[res]
        features, probs = extract(images, extractor, with_probs=True)
        results["_features"][name] = features
        entry = {"resolution": res, "num": len(images), "file": path.name, "network": extractor.name,
                 "recognised": float(np.mean(probs.argmax(1) == labels))}
        for split in ("train", "test"):
            metrics = evaluate_features(features, None, ref["stats"][split], extractor.name, ("fid", "kid"),
                                        source=path.name)
            entry[f"vs_{split}"] = {"fid": metrics["fid"], "kid": metrics["kid"]}
        entry["memorisation"] = memorisation_report(images, np.asarray(ref["train"].images),
                                                    np.asarray(ref["test"].images))
        results[name] = entry
        results.setdefault("_reference_features", {})[res] = ref["features"]["train"]
        print(f"{name}: KID(train) {1e3 * entry['vs_train']['kid']['mean']:.2f}e-3  FID(train) "
              f"{entry['vs_train']['fid']:.2f}  recognised {100 * entry['recognised']:.1f} %", flush=True)
    return results


def paired_differences(results: dict, rounds: int, pairs_to_score=PAIRS, seed: int = 0) -> dict:
    """KID(A) − KID(B) and FID(A) − FID(B) against the training split, with a paired bootstrap: one resampling
    of sample indices applies to both sets, which super-resolve the same inputs in the same order."""
    from cascaded_diffusion.evaluation.metrics import fid_from_stats, kid
    from cascaded_diffusion.evaluation.stats import FeatureStats

    pairs = {}
    for a, b, what in pairs_to_score:
        if a not in results["_features"] or b not in results["_features"]:
            continue
        fa, fb = results["_features"][a], results["_features"][b]
        if len(fa) != len(fb):
            raise SystemExit(f"{a} and {b} hold {len(fa)} and {len(fb)} samples: not a paired comparison")
        reference = results["_reference_features"][results[a]["resolution"]]
        network = results[a]["network"]
        ref_stats = FeatureStats.from_features(reference, network, keep_features=False)

        def gap(pick):
            ka = kid(fa[pick], reference, num_subsets=20, subset_size=len(pick), seed=seed)[0]
            kb = kid(fb[pick], reference, num_subsets=20, subset_size=len(pick), seed=seed)[0]
            da = fid_from_stats(FeatureStats.from_features(fa[pick], network, keep_features=False), ref_stats)
            db = fid_from_stats(FeatureStats.from_features(fb[pick], network, keep_features=False), ref_stats)
            return ka - kb, da - db

        rng = np.random.default_rng(seed)
        boot = np.array([gap(rng.integers(0, len(fa), len(fa))) for _ in range(rounds)])
        kid_gap, fid_gap = gap(np.arange(len(fa)))
        pairs[f"{a} - {b}"] = {"what": what, "num": int(len(fa)), "kid_gap": kid_gap,
                               "kid_gap_std": float(boot[:, 0].std(ddof=1)), "fid_gap": fid_gap,
                               "fid_gap_std": float(boot[:, 1].std(ddof=1))}
        print(f"{a} − {b}: KID {1e3 * kid_gap:+.2f} ± {1e3 * boot[:, 0].std(ddof=1):.2f} e-3, "
              f"FID {fid_gap:+.2f} ± {boot[:, 1].std(ddof=1):.2f} (paired, n = {len(fa)})", flush=True)
    return pairs


def tables(results: dict) -> str:
    networks = sorted({r["network"] for k, r in results.items() if not k.startswith("_")})
    lines = [f"Feature networks: {', '.join(networks)} (emoji classifiers trained on the training split, not "
             "Inception).", "",
             "| setting | px | n | KID×10³ vs train | KID×10³ vs held-out | FID vs train | FID vs held-out "
             "| recognised | NN dist. (median) | held-out NN (median) | closer than any held-out |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if name.startswith("_"):
            continue
        kt = r["vs_train"]["kid"]
        if name.startswith("real"):
            lines.append(f"| {name} (real data floor) | {r['resolution']} | {r['num']} | {1e3 * kt['mean']:.2f} ± "
                         f"{1e3 * kt['std']:.2f} | — | {r['vs_train']['fid']:.2f} | — | "
                         f"{100 * r['recognised']:.1f} % | | | |")
            continue
        kh, m = r["vs_test"]["kid"], r["memorisation"]
        held_out = ("— (its inputs)", "—") if name.startswith("gt") else (
            f"{1e3 * kh['mean']:.2f} ± {1e3 * kh['std']:.2f}", f"{r['vs_test']['fid']:.2f}")
        lines.append(
            f"| {name} | {r['resolution']} | {r['num']} | {1e3 * kt['mean']:.2f} ± {1e3 * kt['std']:.2f} | "
            f"{held_out[0]} | {r['vs_train']['fid']:.2f} | {held_out[1]} | {100 * r['recognised']:.1f} % | "
            f"{m['samples_median']:.1f} | {m['held_out_median']:.1f} | {100 * m['closer_than_any_held_out']:.1f} % |")
    pairs = results.get("_pairs") or {}
    if pairs:
        lines += ["", "Paired ablations (A − B against the training split; negative: A is better; ± paired "
                  "bootstrap std):", "", "| comparison | n | ΔKID×10³ | ΔFID |", "|---|---:|---:|---:|"]
        for key, g in pairs.items():
            lines.append(f"| {g['what']} (`{key}`) | {g['num']} | {1e3 * g['kid_gap']:+.2f} ± "
                         f"{1e3 * g['kid_gap_std']:.2f} | {g['fid_gap']:+.2f} ± {g['fid_gap_std']:.2f} |")
    missing = (results.get("_meta") or {}).get("missing_runs")
    if missing:
        lines += ["", f"Not trained, so not in these tables: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
