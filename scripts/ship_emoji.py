"""Bundle the emoji cascade (docs/results.md, "The emoji cascade") as `cdm sample --pretrained emoji`.

    python scripts/ship_emoji.py /work/runs/emoji --classifier /work/runs/emoji/clf/classifier64.safetensors \
        [--bundle cascaded_diffusion/pretrained/emoji] [--default-sampler dpmpp --default-steps 25,20,20]

Reads RUNS/study/metrics.json (scripts/emoji_study.py) and picks, per SR stage, the run with the lower KID against
the held-out split of the full cascade's 64×64 output (the noise-augmented or unaugmented 16 → 32 stage, each
under the blurred 32 → 64 stage; the blurred or unblurred 32 → 64 stage on the augmented 16 → 32 outputs).
Exports the three stages as fp16 EMA weights (the augmented 16 → 32 stage with the s of the sweep's lowest KID),
copies the emoji classifier beside them (``--features classifier:emoji``), and writes cascade.json with the
study's numbers. Nothing is changed unless every export succeeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ship_fashion_mnist import export  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def held_out_kid(entry: dict) -> float:
    return entry["vs_test"]["kid"]["mean"]


def choose(metrics: dict) -> dict:
    """The stages to ship and the s of the augmented 16 -> 32 stage, from the study's numbers."""
    sr32 = "sr16to32" if held_out_kid(metrics["x64_aug_blur"]) <= held_out_kid(metrics["x64_noaug_blur"]) \
        else "sr16to32_noaug"
    sr64 = "sr32to64" if held_out_kid(metrics["x64_aug_blur"]) <= held_out_kid(metrics["x64_aug_noblur"]) \
        else "sr32to64_noblur"
    sweep = {int(k.rsplit("_s", 1)[1]): v for k, v in metrics.items() if k.startswith("x32_aug_s")}
    level = min(sweep, key=lambda s: held_out_kid(sweep[s])) if sweep else None
    setting = f"x64_{'aug' if sr32 == 'sr16to32' else 'noaug'}_{'blur' if sr64 == 'sr32to64' else 'noblur'}"
    return {"stages": ["base16", sr32, sr64], "aug_level": level if sr32 == "sr16to32" else 0, "setting": setting}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--classifier", type=Path, required=True, help="the emoji classifier (.safetensors + .json)")
    p.add_argument("--bundle", type=Path, default=ROOT / "cascaded_diffusion" / "pretrained" / "emoji")
    p.add_argument("--default-sampler", help="the bundle's default sampler (default: each stage's [sample])")
    p.add_argument("--default-steps", help="the bundle's default steps per stage, e.g. 25,20,20")
    args = p.parse_args()
    metrics = json.loads((args.runs / "study" / "metrics.json").read_text())
    choice = choose(metrics)
    measured = metrics[choice["setting"]]
    steps = [int(x) for x in args.default_steps.split(",")] if args.default_steps else [None, None, None]
    args.bundle.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        for i, name in enumerate(choice["stages"]):
            level = choice["aug_level"] if name == "sr16to32" else None
            export(args.runs / name, staged / name, args.default_sampler, steps[i], level)
        shutil.copy2(args.classifier, staged / "classifier.safetensors")
        shutil.copy2(args.classifier.with_suffix(".json"), staged / "classifier.json")
        kid = measured["vs_test"]["kid"]["mean"]
        manifest = {
            "name": "emoji",
            "description": (
                "Noto emoji cascade (docs/emoji.md): 16x16 class-conditional base (9 Unicode categories) -> "
                f"16->32 SR ({'noise conditioning augmentation, s = ' + str(choice['aug_level']) if choice['stages'][1] == 'sr16to32' else 'no augmentation'}) -> "
                f"32->64 SR ({'blur conditioning augmentation in training' if choice['stages'][2] == 'sr32to64' else 'no augmentation'}), "
                f"v-prediction, EMA weights, fp16. KID {1e3 * kid:.2f}e-3 against the held-out split with the bundled "
                f"emoji classifier's features ({measured['num']} samples; docs/results.md)."
            ),
            "stages": choice["stages"],
            "sampling": {"truncated": False},
            "study": {"setting": choice["setting"], "aug_level": choice["aug_level"], "num_samples": measured["num"],
                      "vs_train": measured["vs_train"], "vs_held_out": measured["vs_test"],
                      "recognised": measured["recognised"], "memorisation": measured["memorisation"],
                      "feature_network": metrics.get("_feature_network"), "sampling": metrics["_meta"]["sampling"]},
        }
        previous = args.bundle / "cascade.json"
        if previous.is_file() and "card" in json.loads(previous.read_text()):
            # the model card's facts (licences, data, class names) outlive a reship; its numbers come from "study"
            manifest["card"] = json.loads(previous.read_text())["card"]
        (staged / "cascade.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if args.bundle.exists():
            args.bundle.rename(Path(tmp) / "old")
        staged.rename(args.bundle)
    print(f"shipped {choice['setting']} ({' + '.join(choice['stages'])}, s = {choice['aug_level']}): KID vs held-out "
          f"{1e3 * kid:.2f}e-3 -> {args.bundle}; rewrite its model card: python scripts/write_bundle_cards.py")


if __name__ == "__main__":
    main()
