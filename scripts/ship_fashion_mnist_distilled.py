"""Assemble the few-step Fashion-MNIST cascade ``fashion-mnist-distilled`` from finished distillations.

    python scripts/ship_fashion_mnist_distilled.py RUNS --base-steps 4 --sr-steps 4 [--sr-sampler dpmpp] \
        [--study RUNS/study/results.json] [--bundle cascaded_diffusion/pretrained/fashion-mnist-distilled]

RUNS holds the ``cdm distill`` outputs ``base8/`` and ``sr8to32_noaug/`` (scripts/distill_fashion_mnist.sh). The
rounds whose students take ``--base-steps`` and ``--sr-steps`` are exported as fp16 EMA weights; each stage.json
records its sampler (deterministic DDIM on the distillation grid), its steps and its teacher, so
``cdm sample --pretrained fashion-mnist-distilled`` samples with base + SR steps network evaluations by default.
``--base-sampler dpmpp`` / ``--sr-sampler dpmpp`` ship that stage undistilled instead: the teacher bundle's stage,
its weights as they are, its stage.json sampling DPM-Solver++ with that many steps (for a stage where the study
finds the solver at N steps better than the N-step student). ``--study``: the few-steps study's results
(scripts/few_steps_study.py), whose point ``cascade/B+S`` (B, S: ``pdN`` or ``dpmppN``; and CAS files beside it,
``cascade_B_S.cas*.json``) go into cascade.json; the model card's facts and the evaluation
classifier come from the ``fashion-mnist`` bundle. Nothing is changed unless every export succeeds; rewrite the
card afterwards with scripts/write_bundle_cards.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cascaded_diffusion.checkpoint import export_stage  # noqa: E402
from cascaded_diffusion.distillation import distill_report, finished_students  # noqa: E402

import torch  # noqa: E402

STAGES = ("base8", "sr8to32_noaug")
PRETRAINED = ROOT / "cascaded_diffusion" / "pretrained"


def student_checkpoint(run: Path, steps: int) -> Path:
    ckpt = finished_students(run).get(steps)
    if ckpt is None:
        sys.exit(f"{run}: no finished round with a {steps}-step student")
    return ckpt


def describe(name: str, steps: int, sampler: str) -> str:
    what = {"base8": "8x8 base", "sr8to32_noaug": "8->32 SR stage"}[name]
    if sampler == "distilled":
        return (f"{what} progressively distilled (Salimans & Ho 2022) into a {steps}-step v-prediction student sampled "
                "by deterministic DDIM on its distillation grid (stage.json: sample, distillation)")
    return f"{what} undistilled, sampled by DPM-Solver++ with {steps} steps"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--base-steps", type=int, required=True)
    p.add_argument("--sr-steps", type=int, required=True)
    for stage in ("base", "sr"):
        p.add_argument(f"--{stage}-sampler", choices=("distilled", "dpmpp"), default="distilled",
                       help="the distilled student (DDIM on its grid), or the undistilled stage with DPM-Solver++")
    p.add_argument("--study", type=Path, help="scripts/few_steps_study.py's results.json")
    p.add_argument("--bundle", type=Path, default=PRETRAINED / "fashion-mnist-distilled")
    args = p.parse_args()
    choices = list(zip(STAGES, (args.base_steps, args.sr_steps), (args.base_sampler, args.sr_sampler)))
    ckpts = [student_checkpoint(args.runs / name, steps) if sampler == "distilled" else None
             for name, steps, sampler in choices]
    settings = [f"{'pd' if sampler == 'distilled' else 'dpmpp'}{steps}" for _, steps, sampler in choices]
    point = f"cascade/{settings[0]}+{settings[1]}"
    study = {}
    if args.study:
        results = json.loads(args.study.read_text())
        if point not in results["points"]:
            sys.exit(f"{args.study} has no point {point}")
        rec = results["points"][point]
        study = {"setting": point, "sampling": [],  # each stage's own default in its stage.json
                 "steps": [args.base_steps, args.sr_steps], "fid": rec["fid"],
                 "fid_bootstrap_std": rec["fid_bootstrap_std"], "kid": rec["kid"], "num_samples": rec["num"],
                 "feature_network": results["feature_network"], "shipped_cascade": results["points"].get("base/dpmpp20"),
                 "speed": results.get("speed")}
        cas = sorted(args.study.parent.glob(f"samples/{point.replace('/', '_').replace('+', '_')}.cas*.json"))
        if cas:
            study["cas_top1_over_classifier_seeds"] = [100 * json.loads(c.read_text())["generated"]["top1"] for c in cas]
    evaluations = args.base_steps + args.sr_steps
    args.bundle.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        for (name, steps, _), ckpt in zip(choices, ckpts):
            if ckpt is None:  # the teacher's stage, its weights as they are, sampled by DPM-Solver++ by default
                export_stage(PRETRAINED / "fashion-mnist" / name, staged / name,
                             config_overrides=["sample.sampler=dpmpp", f"sample.steps={steps}"])
            else:
                export_stage(ckpt, staged / name, dtype=torch.float16)
        for name in ("classifier.json", "classifier.safetensors"):  # the features its numbers were measured with
            shutil.copy2(PRETRAINED / "fashion-mnist" / name, staged / name)
        teacher = json.loads((PRETRAINED / "fashion-mnist" / "cascade.json").read_text())
        manifest = {
            "name": "fashion-mnist-distilled",
            "description": (
                f"Fashion-MNIST cascade with {evaluations} network evaluations in all: the fashion-mnist bundle's "
                + ", and its ".join(describe(name, steps, sampler) for name, steps, sampler in choices)
                + "; EMA weights, fp16. Measurements: docs/results.md, \"Few steps\"."),
            "stages": list(STAGES),
            "sampling": {"truncated": False},
            "distillation": {name: {"rounds": distill_report(args.runs / name)}
                             for name, _, sampler in choices if sampler == "distilled"},
            "study": study,
            "card": {**teacher.get("card", {}),
                     "title": f"Fashion-MNIST cascaded diffusion model, {evaluations} network evaluations (8x8 -> 32x32)"},
        }
        (staged / "cascade.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if args.bundle.exists():
            args.bundle.rename(Path(tmp) / "old")
        staged.rename(args.bundle)
    print(f"shipped {point} -> {args.bundle} ({evaluations} network evaluations by default); rewrite its model card: "
          "python scripts/write_bundle_cards.py")


if __name__ == "__main__":
    main()
