"""Assemble the few-step Fashion-MNIST cascade ``fashion-mnist-distilled`` from finished distillations.

    python scripts/ship_fashion_mnist_distilled.py RUNS --base-steps 4 --sr-steps 4 \
        [--study RUNS/study/results.json] [--bundle cascaded_diffusion/pretrained/fashion-mnist-distilled]

RUNS holds the ``cdm distill`` outputs ``base8/`` and ``sr8to32_noaug/`` (scripts/distill_fashion_mnist.sh). The
rounds whose students take ``--base-steps`` and ``--sr-steps`` are exported as fp16 EMA weights; each stage.json
records its sampler (deterministic DDIM on the distillation grid), its steps and its teacher, so
``cdm sample --pretrained fashion-mnist-distilled`` samples with base + SR steps network evaluations by default.
``--study``: the few-steps study's results (scripts/few_steps_study.py), whose point ``cascade/pdB+pdS`` (and CAS
files beside it, ``cascade_pdB_pdS.cas*.json``) go into cascade.json; the model card's facts and the evaluation
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

from cascaded_diffusion.checkpoint import export_stage, latest_valid_checkpoint, load_state  # noqa: E402
from cascaded_diffusion.distillation import distill_report, round_dir  # noqa: E402

import torch  # noqa: E402

STAGES = ("base8", "sr8to32_noaug")
PRETRAINED = ROOT / "cascaded_diffusion" / "pretrained"


def student_checkpoint(run: Path, steps: int) -> Path:
    k = 1
    while round_dir(run, k).is_dir():
        ckpt, _ = latest_valid_checkpoint(round_dir(run, k))
        if ckpt is not None:
            state = load_state(ckpt)
            if state["config"]["sample"]["steps"] == steps and state["step"] >= state["config"]["train"]["steps"]:
                return ckpt
        k += 1
    sys.exit(f"{run}: no finished round with a {steps}-step student")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--base-steps", type=int, required=True)
    p.add_argument("--sr-steps", type=int, required=True)
    p.add_argument("--study", type=Path, help="scripts/few_steps_study.py's results.json")
    p.add_argument("--bundle", type=Path, default=PRETRAINED / "fashion-mnist-distilled")
    args = p.parse_args()
    ckpts = [student_checkpoint(args.runs / name, steps) for name, steps in zip(STAGES, (args.base_steps, args.sr_steps))]
    point = f"cascade/pd{args.base_steps}+pd{args.sr_steps}"
    study = {}
    if args.study:
        results = json.loads(args.study.read_text())
        if point not in results["points"]:
            sys.exit(f"{args.study} has no point {point}")
        rec = results["points"][point]
        study = {"setting": point, "sampling": [],  # the stages' own defaults: DDIM on each student's grid
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
        for name, ckpt in zip(STAGES, ckpts):
            export_stage(ckpt, staged / name, dtype=torch.float16)
        for name in ("classifier.json", "classifier.safetensors"):  # the features its numbers were measured with
            shutil.copy2(PRETRAINED / "fashion-mnist" / name, staged / name)
        teacher = json.loads((PRETRAINED / "fashion-mnist" / "cascade.json").read_text())
        manifest = {
            "name": "fashion-mnist-distilled",
            "description": (
                f"Fashion-MNIST cascade with {evaluations} network evaluations in all: the fashion-mnist bundle's "
                f"8x8 base and 8->32 SR stage, each progressively distilled (Salimans & Ho 2022) into a "
                f"{args.base_steps}- and a {args.sr_steps}-step v-prediction student sampled by deterministic DDIM on "
                "its distillation grid (stage.json: sample, distillation); EMA weights, fp16. Measurements: "
                "docs/results.md, \"Few steps\"."),
            "stages": list(STAGES),
            "sampling": {"truncated": False},
            "distillation": {name: {"rounds": row} for name, row in
                             ((n, distill_report(args.runs / n)) for n in STAGES)},
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
