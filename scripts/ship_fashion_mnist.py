"""Replace the bundled Fashion-MNIST cascade with the best cascade of a finished study (docs/results.md).

    python scripts/ship_fashion_mnist.py RUNS_DIR [--bundle cascaded_diffusion/pretrained/fashion-mnist]

Reads what scripts/fashion_mnist_study.sh wrote in RUNS_DIR (the 10k-sample metrics of every cascade setting and
the non-truncated sweep), picks the setting with the lowest FID, exports its two stages as fp16 EMA weights with
the augmentation level s the study chose, and writes cascade.json with the numbers and the sampler they were
measured with. The sampler and steps `cdm sample --pretrained fashion-mnist` uses by default are each stage's
own `[sample]` (the configs' ancestral DDPM 50 steps) unless `--default-sampler/--default-steps` say otherwise;
the shipped bundle was exported with `--default-sampler dpmpp --default-steps 20,10`, the study's sampler, which
on the 20000-step bundle beat DDPM 50 + 50 at a third of the cost (FID 1.05 against 1.67, 2000 samples;
docs/results.md).
The evaluation classifier files of the bundle are kept. Nothing is changed unless every export succeeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from cdm_command import cdm  # noqa: E402
from study_tables import cas_top1_over_seeds, load_cas  # noqa: E402

# name in the study -> (SR run directory, s used at sampling: None = the sweep's best level)
CANDIDATES = {
    "cascade_noise": ("sr8to32", None),
    "cascade_noise_s0": ("sr8to32", 0),
    "cascade_noaug": ("sr8to32_noaug", 0),
}
KEEP = ("classifier.json", "classifier.safetensors")


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def choose(runs: Path) -> tuple[str, str, int, dict]:
    scored = {name: load(runs / f"{name}.metrics.json") for name in CANDIDATES}
    scored = {name: m for name, m in scored.items() if m}
    if not scored:
        sys.exit(f"{runs}: no cascade_*.metrics.json; run scripts/fashion_mnist_study.sh first")
    best = min(scored, key=lambda name: scored[name]["fid"])
    sr_run, level = CANDIDATES[best]
    if level is None:
        level = int(load(runs / "sweep_nontruncated.json")["best_level"])
    return best, sr_run, level, scored[best]


def export(run: Path, out: Path, sampler: str | None, steps: int | None, level: int | None) -> None:
    overrides = [f"sample.sampler={sampler}"] if sampler else []
    overrides += [f"sample.steps={steps}"] if steps else []
    if level is not None:
        overrides.append(f"conditioning.sample_s={level}")
    cdm("export", str(run), "--out", str(out), "--dtype", "fp16", *[x for item in overrides for x in ("--set", item)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--bundle", type=Path, default=ROOT / "cascaded_diffusion" / "pretrained" / "fashion-mnist")
    p.add_argument("--sampler", default="dpmpp", help="as the study sampled (fashion_mnist_study.sh SAMPLER)")
    p.add_argument("--steps", default="20,10", help="base,SR steps as the study sampled (SAMPLE_STEPS)")
    p.add_argument("--default-sampler", help="the bundle's default sampler (default: each stage's [sample])")
    p.add_argument("--default-steps", help="the bundle's default base,SR steps (default: each stage's [sample])")
    args = p.parse_args()
    best, sr_run, level, metrics = choose(args.runs)
    base_steps, sr_steps = (int(x) for x in args.steps.split(","))
    cas = load_cas(args.runs, best) or {}
    cas_seeds = cas_top1_over_seeds(args.runs, best)  # one CAS hides the classifier's own spread
    augmented = sr_run == "sr8to32"
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        default_steps = [int(x) for x in args.default_steps.split(",")] if args.default_steps else [None, None]
        export(args.runs / "base8", staged / "base8", args.default_sampler, default_steps[0], None)
        export(args.runs / sr_run, staged / sr_run, args.default_sampler, default_steps[1], level if augmented else None)
        for name in KEEP:
            shutil.copy2(args.bundle / name, staged / name)
        cas_text = f", CAS top-1 {100 * cas['generated']['top1']:.1f} %" if cas.get("generated") else ""
        if len(cas_seeds) > 1:
            cas_text = (f", CAS top-1 {statistics.mean(cas_seeds):.1f} ± {statistics.stdev(cas_seeds):.1f} % "
                        f"over {len(cas_seeds)} classifier seeds")
        manifest = {
            "name": "fashion-mnist",
            "description": (
                f"Fashion-MNIST cascade: 8x8 class-conditional base -> 8->32 SR (v-prediction), EMA weights, fp16. "
                f"The best cascade of the convergence study in docs/results.md: {best} "
                f"({'noise conditioning augmentation, s = ' + str(level) if augmented else 'SR trained without augmentation'}"
                f"; FID {metrics['fid']:.2f} with classifier features, {metrics['num_samples']} samples{cas_text}, "
                f"measured with {args.sampler} {base_steps}+{sr_steps} steps; the default sampler is each stage's "
                f"[sample] in stage.json)."
            ),
            "stages": ["base8", sr_run],
            # the sampler, steps and s are each stage's own defaults (stage.json); the mode is the cascade's
            "sampling": {"truncated": False},
            "study": {"setting": best, "sampler": args.sampler, "steps": [base_steps, sr_steps],
                      "aug_level": level if augmented else 0, "fid": metrics["fid"], "kid": metrics.get("kid"),
                      "num_samples": metrics["num_samples"], "feature_network": metrics.get("feature_network"),
                      "cas": cas.get("generated"), "cas_top1_over_classifier_seeds": cas_seeds},
        }
        previous = args.bundle / "cascade.json"
        if previous.is_file() and "card" in json.loads(previous.read_text()):
            # the model card's facts (licences, data, class names) outlive a reship; its numbers come from "study"
            manifest["card"] = json.loads(previous.read_text())["card"]
        (staged / "cascade.json").write_text(json.dumps(manifest, indent=2) + "\n")
        old = Path(tmp) / "old"
        args.bundle.rename(old)
        staged.rename(args.bundle)
    print(f"shipped {best}: base8 + {sr_run} (s = {level if augmented else 0}, measured with {args.sampler} {args.steps}) "
          f"FID {metrics['fid']:.2f} -> {args.bundle}; rewrite its model card: python scripts/write_bundle_cards.py")


if __name__ == "__main__":
    main()
