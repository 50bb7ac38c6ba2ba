"""Bundle the three-design emoji cascade 16 → 64 → 256 (docs/emoji256.md) as `cdm sample --pretrained emoji-256`.

    python scripts/ship_emoji256.py /work/runs/emoji256 --classifier /work/runs/emoji256/clf/classifier256.safetensors \
        --attribution /work/data/emoji256/ATTRIBUTION.md [--bundle cascaded_diffusion/pretrained/emoji-256]

Reads RUNS/study/metrics.json (scripts/emoji256_study.py) and decides by its numbers, each by the lower KID against
the held-out split (new emoji, never seen in training), the setting's own feature network:

- the 16 → 64 stage: noise-augmented (at the s of the sweep's lowest KID) or unaugmented, compared at 64 px on
  the same base samples (``x64_aug_s{S}`` against ``x64_noaug``);
- the 64 → 256 stage: blur, none or noise augmentation in training, on the same 64 px inputs: the augmented middle
  stage's outputs at the chosen s (``x256_{blur,noaug,noise}_s{S}``, the study's ``--top-levels``) where the study
  has them, else at its default level (``x256_blur``, ``x256_noaug``, ``x256_noise``);
- the top stage's sampler and steps: the fewest network evaluations on the top-stage curve (``x256_blur_*``) whose
  KID is within one standard error (the KID subsets' std) of the curve's best.

The base and 16 → 64 stages keep the sampler and steps the study sampled them with (``--sampler``/``--steps`` of
the study, or each stage's own). Exports fp16 EMA weights, copies the 256 px classifier beside them (``--features
classifier:emoji-256``) and the data's ATTRIBUTION.md (CC-BY and CC BY-SA require the credit), writes cascade.json
with the study's numbers, and refuses a bundle over ``--max-mb``. Nothing is changed unless every step succeeds.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ship_fashion_mnist import export  # noqa: E402

from cascaded_diffusion.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPS = {"x256_blur": "sr64to256", "x256_noaug": "sr64to256_noaug", "x256_noise": "sr64to256_noise"}
CLASSES = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities",
           "Objects", "Symbols", "Flags"]


def per_stage(values: list[str]) -> list[str | None]:
    """`cdm sample`'s per-stage list: one value means every stage; a shorter list leaves the rest at the default."""
    return values * 3 if len(values) == 1 else (values + [None] * 3)[:3]


def held_out_kid(entry: dict) -> float:
    return entry["vs_test"]["kid"]["mean"]


def top_sampler(metrics: dict, stage_default: tuple[str, int]) -> dict:
    """The cheapest point of the top stage's sampler curve within one KID std of the best point."""
    curve = {}
    for name, entry in metrics.items():
        m = re.fullmatch(r"x256_blur_(ddpm|ddim|dpmpp)(\d+)", name)
        if m:
            curve[(m.group(1), int(m.group(2)))] = entry
    if "x256_blur" in metrics:
        curve.setdefault(stage_default, metrics["x256_blur"])
    if not curve:
        return {"sampler": stage_default[0], "steps": stage_default[1], "curve": {}}
    best = min(curve.values(), key=held_out_kid)
    bar = held_out_kid(best) + best["vs_test"]["kid"]["std"]
    sampler, steps = min((k for k, e in curve.items() if held_out_kid(e) <= bar), key=lambda k: (k[1], k[0]))
    return {"sampler": sampler, "steps": steps, "kid_bar": bar,
            "curve": {f"{s}:{n}": held_out_kid(e) for (s, n), e in sorted(curve.items(), key=lambda kv: kv[0][1])}}


def choose(metrics: dict, stage_default: tuple[str, int]) -> dict:
    """The stages to ship, the s of the augmented 16 -> 64 stage, and the top stage's sampling, from the study."""
    sweep = {int(k.rsplit("_s", 1)[1]): v for k, v in metrics.items() if re.fullmatch(r"x64_aug_s\d+", k)}
    level = min(sweep, key=lambda s: held_out_kid(sweep[s])) if sweep else None
    augmented = sweep[level] if sweep else metrics.get("x64_aug")
    # the middle stage at 64 px, where both were scored on the same base samples: the unaugmented stage against
    # the augmented one at the s it would ship with
    middle = "sr16to64"
    if "x64_noaug" in metrics and augmented and held_out_kid(metrics["x64_noaug"]) < held_out_kid(augmented):
        middle, level = "sr16to64_noaug", None
    # the top stage on the inputs the shipped middle stage hands on, where the study ran the ablation on them
    # (--top-levels); else on its default-level inputs
    on_level = {k: f"{k}_s{level}" for k in TOPS if f"{k}_s{level}" in metrics} if level is not None else {}
    candidates = on_level or {k: k for k in TOPS if k in metrics}
    top_setting = min(candidates, key=lambda k: held_out_kid(metrics[candidates[k]]))
    # the shipped chain as measured: the blur top stage on the unaugmented middle stage, or the chosen top stage
    # on the augmented middle stage's outputs (the study pairs each ablation with the paper's recipe)
    setting = "x256_blur_on_noaug" if middle == "sr16to64_noaug" else candidates[top_setting]
    return {"stages": ["base16", middle, TOPS[top_setting]], "aug_level": level, "setting": setting,
            "top": top_sampler(metrics, stage_default)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--classifier", type=Path, required=True, help="the 256 px emoji classifier (.safetensors + .json)")
    p.add_argument("--attribution", type=Path, required=True, help="ATTRIBUTION.md of prepare_emoji256.py's output")
    p.add_argument("--bundle", type=Path, default=ROOT / "cascaded_diffusion" / "pretrained" / "emoji-256")
    p.add_argument("--top-sampler", help="override the study's choice for the top stage, e.g. dpmpp:8")
    p.add_argument("--max-mb", type=float, default=40.0, help="refuse a bundle larger than this")
    args = p.parse_args()
    metrics = json.loads((args.runs / "study" / "metrics.json").read_text())
    sampling = metrics["_meta"]["sampling"]
    flags = dict(zip(sampling[::2], sampling[1::2])) if isinstance(sampling, list) else {}
    samplers = per_stage(flags["--sampler"].split(",")) if flags.get("--sampler") else [None] * 3
    steps = [int(s) if s else None for s in per_stage(flags["--steps"].split(","))] if flags.get("--steps") \
        else [None] * 3
    # x256_blur was sampled with the study's third --sampler/--steps value, else the top stage's own [sample]
    top_config = load_config(args.runs / "sr64to256" / "config.toml").sample
    top_default = (samplers[2] or top_config.sampler, steps[2] or top_config.steps)
    choice = choose(metrics, top_default)
    if args.top_sampler:
        sampler, n = args.top_sampler.split(":")
        choice["top"].update(sampler=sampler, steps=int(n), overridden=True)
    measured = metrics[choice["setting"]]
    args.bundle.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.bundle.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        for i, name in enumerate(choice["stages"]):
            if i < 2:
                level = choice["aug_level"] if name == "sr16to64" else None
                export(args.runs / name, staged / name, samplers[i], steps[i], level)
            else:
                export(args.runs / name, staged / name, choice["top"]["sampler"], choice["top"]["steps"], None)
        shutil.copy2(args.classifier, staged / "classifier.safetensors")
        shutil.copy2(args.classifier.with_suffix(".json"), staged / "classifier.json")
        shutil.copy2(args.attribution, staged / "ATTRIBUTION.md")
        size_mb = sum(f.stat().st_size for f in staged.rglob("*") if f.is_file()) / 2**20
        if size_mb > args.max_mb:
            raise SystemExit(f"the bundle would be {size_mb:.1f} MB, over --max-mb {args.max_mb:g}")
        kid = held_out_kid(measured)
        middle_text = (f"noise conditioning augmentation, s = {choice['aug_level']}" if choice["stages"][1] == "sr16to64"
                       else "no augmentation")
        top_text = {"sr64to256": "blur conditioning augmentation in training", "sr64to256_noaug": "no augmentation",
                    "sr64to256_noise": "noise conditioning augmentation"}[choice["stages"][2]]
        manifest = {
            "name": "emoji-256",
            "description": (
                "Three-design emoji cascade (Twemoji, Noto, OpenMoji; docs/emoji256.md): 16x16 class-conditional base "
                f"(9 Unicode categories) -> 16->64 SR ({middle_text}) -> 64->256 SR ({top_text}; trained on 64x64 "
                f"crops, no attention, sampled with {choice['top']['sampler']} {choice['top']['steps']} steps), "
                f"v-prediction, EMA weights, fp16. KID {1e3 * kid:.2f}e-3 against the held-out split (emoji never "
                f"seen in training) with the bundled 256 px emoji classifier's features ({measured['num']} samples; "
                "docs/results.md)."),
            "stages": choice["stages"],
            "sampling": {"truncated": False},
            "study": {"setting": choice["setting"], "aug_level": choice["aug_level"], "num_samples": measured["num"],
                      "vs_train": measured["vs_train"], "vs_held_out": measured["vs_test"],
                      "recognised": measured["recognised"], "memorisation": measured["memorisation"],
                      "feature_network": measured["network"], "top_sampler": choice["top"],
                      "sampling": sampling},
            "card": {
                "title": "Three-design emoji cascaded diffusion model (16 -> 64 -> 256)",
                # the most restrictive of the data's licences: OpenMoji's share-alike (docs/emoji256.md)
                "license": "cc-by-sa-4.0",
                "classes": CLASSES,
                "data": {
                    "name": "Twemoji 15.0, Noto Emoji and OpenMoji 17.0 artwork rendered at 256 px",
                    "license": "cc-by-4.0 (Twemoji), apache-2.0 (Noto), cc-by-sa-4.0 (OpenMoji)",
                    "attribution": "see ATTRIBUTION.md",
                    "preprocessing": ("each SVG rendered with resvg at 256x256 over white (scripts/prepare_emoji256.py); "
                                      "16 and 64 px by BOX resizing (cdm prepare); held-out split by emoji across designs"),
                    "reference_split": "test",
                },
                "docs": "docs/emoji256.md and docs/results.md",
            },
        }
        (staged / "cascade.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if args.bundle.exists():
            args.bundle.rename(Path(tmp) / "old")
        staged.rename(args.bundle)
    print(f"shipped {choice['setting']} ({' + '.join(choice['stages'])}, s = {choice['aug_level']}, top "
          f"{choice['top']['sampler']}:{choice['top']['steps']}): KID vs held-out {1e3 * kid:.2f}e-3, "
          f"{size_mb:.1f} MB -> {args.bundle}; write its model card: python scripts/write_bundle_cards.py emoji-256")


if __name__ == "__main__":
    main()
