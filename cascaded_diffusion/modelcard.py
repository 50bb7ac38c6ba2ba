"""The model card of a cascade folder: ``README.md`` with the Hugging Face Hub's YAML metadata on top.

Everything in it is read from the folder: the stages' configs (``stage.json``), their weights' shapes, and the
manifest's ``card`` section (licence, training data, class names) and measured numbers (``study`` for the
bundled cascades, ``card.metrics`` for an export given ``cdm eval`` results). Every metric names the network
its features came from: an FID on this project's small classifier's features is not comparable to the
Inception FIDs of the literature, and the card says so next to the number.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from .config import StageConfig
from .pretrained import ATTRIBUTION_FILE, STAGE_FILES

LIBRARY_NAME = "cascaded-diffusion"
CARD_FILE = "README.md"
GRID_FILE = "grid.png"
SAMPLE_COMMAND = "cdm sample --pretrained {name} --num 64 --out samples.npz --grid samples.png"


# --------------------------------------------------------------------------------------------------------
# Metrics: one record per number, each with its feature network
# --------------------------------------------------------------------------------------------------------


def feature_label(network: str | None) -> str:
    if not network:
        return ""
    if network.startswith("classifier"):
        return "classifier features, not Inception"
    if network.startswith("inception"):
        return "Inception features"
    return f"{network} features"


def _study_sampling(study: dict) -> str:
    args = study.get("sampling")
    if isinstance(args, list):  # the recorded command-line options, e.g. ["--sampler", "dpmpp", "--steps", "20,10,10"]
        text = " ".join(str(a) for a in args)
    elif study.get("sampler"):
        text = f"--sampler {study['sampler']} --steps {','.join(str(s) for s in study.get('steps', []))}"
    else:
        text = ""
    if study.get("aug_level"):
        text += f" --aug-level {study['aug_level']}"
    return text.strip()


def study_metrics(study: dict, data: dict) -> list[dict]:
    """The numbers of a bundled cascade's ``study`` (the format this project's study scripts write) as records."""
    records: list[dict] = []
    network, num = study.get("feature_network"), study.get("num_samples")
    sampling = _study_sampling(study)
    groups = [(data.get("reference_split", "train"), study)] if ("fid" in study or "kid" in study) else []
    groups += [(k[3:].replace("_", "-"), v) for k, v in study.items() if k.startswith("vs_") and isinstance(v, dict)]
    for split, values in groups:
        common = {"feature_network": network, "split": split, "num_samples": num, "sampling": sampling}
        if "fid" in values:
            records.append({"type": "fid", "value": values["fid"], **common})
        if isinstance(values.get("kid"), dict):
            records.append({"type": "kid", "value": values["kid"]["mean"], "std": values["kid"].get("std"), **common})
    seeds = study.get("cas_top1_over_classifier_seeds")
    if seeds:
        records.append({"type": "cas_top1", "value": statistics.mean(seeds) / 100, "std": statistics.stdev(seeds) / 100
                        if len(seeds) > 1 else None, "split": "test", "num_samples": num, "sampling": sampling,
                        "note": f"mean over {len(seeds)} classifier seeds"})
    elif isinstance(study.get("cas"), dict):
        records.append({"type": "cas_top1", "value": study["cas"]["top1"], "split": "test", "num_samples": num,
                        "sampling": sampling})
    if "recognised" in study:
        # the classifier's predicted class, not its features: no feature network to name
        records.append({"type": "recognised", "value": study["recognised"], "num_samples": num, "sampling": sampling})
    return records


def eval_metrics(result: dict, sampling: str = "") -> list[dict]:
    """The numbers of one ``cdm eval`` result (its JSON) as records."""
    common = {"feature_network": result.get("feature_network"), "num_samples": result.get("num_samples"),
              "split": str((result.get("reference") or {}).get("spec") or (result.get("reference") or {}).get("source")
                           or "reference"), "sampling": sampling}
    records = []
    if "fid" in result:
        records.append({"type": "fid", "value": result["fid"], **common})
    if isinstance(result.get("kid"), dict):
        records.append({"type": "kid", "value": result["kid"]["mean"], "std": result["kid"].get("std"), **common})
    for key in ("precision", "recall"):
        if key in result:
            records.append({"type": key, "value": result[key], **common})
    if isinstance(result.get("is"), dict):
        records.append({"type": "is", "value": result["is"]["mean"], "std": result["is"].get("std"), **common})
    return records


def card_metrics(manifest: dict) -> list[dict]:
    card = manifest.get("card") or {}
    if card.get("metrics"):
        return list(card["metrics"])
    return study_metrics(manifest.get("study") or {}, card.get("data") or {})


_METRIC_NAMES = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall", "is": "Inception Score",
                 "cas_top1": "CAS top-1 accuracy", "recognised": "recognised"}
_METRIC_HELP = {
    "cas_top1": "a classifier trained on samples only, tested on the real test split",
    "recognised": "share of samples the bundled classifier assigns to the requested class",
}


def metric_name(record: dict) -> str:
    label = feature_label(record.get("feature_network"))
    return _METRIC_NAMES.get(record["type"], record["type"]) + (f" ({label})" if label else "")


def _number(value: float) -> float:
    return float(f"{value:.4g}")


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------


def _parameter_count(path: Path) -> int:
    from safetensors import safe_open  # reads the header only

    with safe_open(str(path), framework="np") as f:
        total = 0
        for key in f.keys():
            count = 1
            for dim in f.get_slice(key).get_shape():
                count *= int(dim)
            total += count
    return total


def stage_summaries(root: Path, manifest: dict) -> list[dict]:
    out = []
    for name in manifest["stages"]:
        meta = json.loads((root / name / STAGE_FILES[0]).read_text())
        config = StageConfig.from_dict(meta["config"], source=str(root / name / STAGE_FILES[0]))
        out.append({"name": name, "config": config, "step": meta.get("step"), "distillation": meta.get("distillation"),
                    "parameters": _parameter_count(root / name / STAGE_FILES[1])})
    return out


def augmentation_text(config: StageConfig) -> tuple[str, str]:
    """(how the stage was trained, what sampling uses by default) for its conditioning augmentation."""
    if not config.is_sr:
        return "— (base)", "—"
    c = config.conditioning
    if c.augmentation == "noise":
        trained = (f"Gaussian noise, fixed s = {c.fixed_s}" if c.fixed_s >= 0 else f"Gaussian noise, s in "
                   f"[{c.s_min}, {c.s_max}]") + f" ({c.noise_schedule} schedule, T = {c.noise_timesteps})"
        return trained, f"s = {c.fixed_s if c.fixed_s >= 0 else c.sample_s}"
    if c.augmentation == "blur":
        return (f"Gaussian blur, sigma in [{c.blur_sigma_min}, {c.blur_sigma_max}], kernel {c.blur_kernel}, "
                f"p = {c.blur_prob}"), "clean input"
    return "none", "clean input"


# --------------------------------------------------------------------------------------------------------
# YAML (the subset the metadata needs: nested mappings and lists of strings, numbers and booleans)
# --------------------------------------------------------------------------------------------------------


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += to_yaml(item, indent + (2 if isinstance(item, dict) else 0))
            else:
                lines.append(f"{pad}{key}: {_yaml_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, dict):
                inner = to_yaml(item, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    return lines


def card_metadata(manifest: dict, stages: list[dict], metrics: list[dict]) -> dict:
    card = manifest.get("card") or {}
    data = card.get("data") or {}
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME}
    if card.get("license"):
        meta["license"] = card["license"]
    tags = [LIBRARY_NAME, "diffusion", "cascaded-diffusion-models", "class-conditional", "image-generation"]
    if len(stages) > 1:
        tags += ["super-resolution", "conditioning-augmentation"]
    tags += [f"{s['config'].stage.resolution}px" for s in stages[-1:]]
    if data.get("license"):
        tags.append(f"training-data-license:{data['license']}")  # the Hub has no field for it; a tag is searchable
    meta["tags"] = tags
    if data.get("hub_id"):
        meta["datasets"] = [data["hub_id"]]
    results = []
    for split in dict.fromkeys(m.get("split") for m in metrics if m["type"] in _METRIC_NAMES):
        chosen = [m for m in metrics if m.get("split") == split]
        dataset = {"name": data.get("name", "training data"), "type": data.get("hub_id") or manifest.get("name", "data")}
        if split:
            dataset["split"] = split
        results.append({
            "task": {"type": "unconditional-image-generation", "name": "Class-conditional image generation"},
            "dataset": dataset,
            "metrics": [{"type": m["type"], "value": _number(m["value"]), "name": metric_name(m), "verified": False}
                        for m in chosen],
        })
    if results:
        meta["model-index"] = [{"name": manifest.get("name", "cascade"), "results": results}]
    return meta


# --------------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------------


def _value_text(m: dict) -> str:
    value, std = m["value"], m.get("std")
    if m["type"] in ("cas_top1", "recognised"):
        return f"{100 * value:.1f} %" + (f" ± {100 * std:.1f}" if std else "")
    if m["type"] == "kid":
        return f"{1000 * value:.2f}e-3" + (f" ± {1000 * std:.2f}e-3" if std else "")
    return f"{value:.3g}" + (f" ± {std:.2g}" if std else "")


def _intro_lines(manifest: dict, stages: list[dict], chain: str, grid: str | None,
                 grid_command: str | None) -> list[str]:
    card = manifest.get("card") or {}
    first = stages[0]["config"]
    title = card.get("title") or f"{manifest.get('name', 'cascade')}: cascaded diffusion model ({chain} px)"
    lines = [f"# {title}", ""]
    if manifest.get("description"):
        lines += [manifest["description"], ""]
    lines += [f"A class-conditional cascaded diffusion model (Ho et al., *Cascaded Diffusion Models for High Fidelity "
              f"Image Generation*, JMLR 2022): {len(stages)} stage{'s' if len(stages) > 1 else ''}, {chain} px, "
              f"{first.stage.channels} channel{'s' if first.stage.channels > 1 else ''}, {first.stage.num_classes} "
              f"classes, trained with the `{LIBRARY_NAME}` library (`cdm`).", ""]
    if grid:
        lines += [f"![samples, one row per class, every stage side by side]({grid})", "",
                  f"*{grid}: one row per class; each sample at every stage ({chain} px), low resolution to high, "
                  "drawn with the default sampling settings below."
                  + (f" The same grid: `{grid_command}`.*" if grid_command else "*"), ""]
    return lines


def _use_lines(stages: list[dict], load_names: Sequence[str]) -> list[str]:
    lines = ["## Use", "", "Install `cascaded-diffusion` with its Hub extra (`pip install -e '.[hub]'` in its source "
             "tree), then:", "", "```bash"]
    for name in load_names:
        lines.append(SAMPLE_COMMAND.format(name=name))
    name = load_names[0]
    if len(stages) > 1:
        lines.append(f"cdm upscale my_images/ --pretrained {name} --label 0 --out upscaled/   # your own "
                     f"{stages[1]['config'].stage.low_res} px images through the SR stages")
    lines += ["```", "", "```python", "from cascaded_diffusion.cascade import Cascade, balanced_labels", "",
              f"cascade = Cascade.load(pretrained={name!r})",
              "out = cascade.sample(balanced_labels(16, cascade.num_classes))   # out.images in [-1, 1], NCHW",
              "```", ""]
    if any(n.startswith("hf://") for n in load_names):
        lines += ["The download goes into the standard Hugging Face cache (`HF_HOME`), works offline from there "
                  "(`HF_HUB_OFFLINE=1`), and `hf://OWNER/REPO@REVISION` pins a branch, tag or commit. Before anything "
                  "is loaded, every weight and config file is checked against the sha256 in `cascade.json`.", ""]
    return lines


def _steps_trained(summary: dict) -> str:
    """A distilled stage's optimizer steps are those of its last round only: say so, with the stage it came from."""
    step = summary["step"] if summary["step"] is not None else "?"
    d = summary.get("distillation")
    if not d:
        return str(step)
    origin = (d.get("original_teacher") or {}).get("step")
    return (f"{step} in distillation round {d.get('round', '?')} ({d.get('teacher_steps', '?')} → "
            f"{d.get('student_steps', '?')} sampling steps)" + (f" of a {origin}-step stage" if origin else ""))


def _stage_lines(manifest: dict, stages: list[dict]) -> list[str]:
    """The stages table, then the sampling defaults table and the conditioning augmentation mode."""
    lines = ["## Stages", "",
             "| stage | kind | resolution | prediction | conditioning augmentation (training) | sampling default "
             "| steps trained | parameters |", "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        c = s["config"]
        trained, sampled = augmentation_text(c)
        res = f"{c.stage.low_res} → {c.stage.resolution}" if c.is_sr else f"{c.stage.resolution}"
        pred = c.diffusion.prediction + (", learned variance" if c.diffusion.learn_sigma else "")
        lines.append(f"| `{s['name']}` | {'super-resolution' if c.is_sr else 'base'} | {res} | {pred} | {trained} "
                     f"| {sampled} | {_steps_trained(s)} | {s['parameters'] / 1e6:.2f} M |")
    truncated = bool((manifest.get("sampling") or {}).get("truncated", False))
    lines += ["", "## Sampling defaults", "",
              "| stage | sampler | steps | guidance |", "|---|---|---|---|"]
    for s in stages:
        c = s["config"].sample
        lines.append(f"| `{s['name']}` | {c.sampler} | {c.steps if c.steps else 'all'} | {c.guidance:g} |")
    lines += ["", f"Conditioning augmentation at sampling is {'truncated' if truncated else 'non-truncated'} (the "
              "previous stage " + ("stops at level s and hands its noisy z_s on" if truncated else
                                   "samples to clean data, re-noised to level s where a stage takes noise") + "). "
              "Every option of `cdm sample` overrides these (`--sampler`, `--steps`, `--aug-level`, `--truncated`).", ""]
    return lines


def _evaluation_lines(metrics: list[dict], data: dict) -> list[str]:
    lines = ["## Evaluation", "", "| metric | value | features | against | samples | sampling |",
             "|---|---|---|---|---|---|"]
    for m in metrics:
        against = f"{data.get('name', 'data')} {m['split']} split" if m.get("split") else "—"
        features = feature_label(m.get("feature_network")) or _METRIC_HELP.get(m["type"], "—")
        extra = f" ({m['note']})" if m.get("note") else ""
        lines.append(f"| {_METRIC_NAMES.get(m['type'], m['type'])} | {_value_text(m)}{extra} | {features} | "
                     f"{against} | {m.get('num_samples') or '?'} | `{m.get('sampling') or 'defaults'}` |")
    networks = sorted({m["feature_network"] for m in metrics if m.get("feature_network")})
    if any(n.startswith("classifier") for n in networks):
        lines += ["", "*Classifier features, not Inception*: these FID/KID values use the features of this "
                  "project's small classifier for the training data (`" + "`, `".join(
                      n for n in networks if n.startswith("classifier")) + "`, bundled here), not of Inception: "
                  "they are not comparable to the Inception-feature FIDs of the literature."]
    lines.append("")
    return lines


def _training_data_lines(root: Path, stages: list[dict], data: dict) -> list[str]:
    lines = ["## Training data", ""]
    if data:
        lines += [f"- **{data.get('name', 'training data')}**" + (f", <{data['url']}>" if data.get("url") else ""),
                  f"- licence: {data.get('license', 'not stated')}"
                  + (f"; {data['attribution']}" if data.get("attribution") else "")]
        if data.get("preprocessing"):
            lines.append(f"- preprocessing: {data['preprocessing']}")
        if (root / ATTRIBUTION_FILE).is_file():
            lines.append(f"- attribution: [{ATTRIBUTION_FILE}]({ATTRIBUTION_FILE}), shipped with the weights")
    else:
        sources = sorted({s["config"].data.source for s in stages})
        lines.append(f"- `{'`, `'.join(sources)}` (the stages' data.source); licence not stated")
    return lines


def _licence_and_files_lines(root: Path, card: dict, data: dict, grid: str | None) -> list[str]:
    lines = ["", "## Licence", "",
             f"Weights: {card.get('license', 'not stated')}. Training data: {data.get('license', 'not stated')}"
             " (see above).", "",
             "## Files", "",
             "- `cascade.json`: the stages (base first), the sampling mode, the measured numbers, and the sha256 and "
             "size of every file below that is loaded",
             "- `STAGE/model.safetensors` (EMA weights) and `STAGE/stage.json` (the resolved training config)"]
    if (root / "classifier.safetensors").is_file():
        lines.append("- `classifier.safetensors`, `classifier.json`: the classifier whose features the metrics use")
    if (root / ATTRIBUTION_FILE).is_file():
        lines.append(f"- `{ATTRIBUTION_FILE}`: the credit the training data's licences require; keep it with the "
                     "weights")
    lines += [f"- `{CARD_FILE}` (this card)" + (f", `{grid}`" if grid else ""), ""]
    return lines


def render_card(root: str | Path, manifest: dict, *, load_names: Sequence[str], grid: str | None = GRID_FILE,
                grid_command: str | None = None) -> str:
    """``README.md`` for the cascade folder ``root``. ``load_names``: what to pass to ``--pretrained`` (a Hub
    name first, then e.g. the bundled name); ``grid``: the per-stage grid image beside it, if any, and
    ``grid_command`` the ``cdm sample`` command that draws the same grid."""
    root = Path(root)
    card = manifest.get("card") or {}
    data = card.get("data") or {}
    stages = stage_summaries(root, manifest)
    metrics = card_metrics(manifest)
    chain = " → ".join(str(s["config"].stage.resolution) for s in stages)
    lines = ["---", *to_yaml(card_metadata(manifest, stages, metrics)), "---", ""]
    lines += _intro_lines(manifest, stages, chain, grid, grid_command)
    lines += _use_lines(stages, load_names)
    lines += _stage_lines(manifest, stages)
    if card.get("classes"):
        lines += ["## Classes", "", ", ".join(f"{i} {n}" for i, n in enumerate(card["classes"])), ""]
    if metrics:
        lines += _evaluation_lines(metrics, data)
    if card.get("docs"):
        lines += [f"How these numbers were measured: {card['docs']} in the `{LIBRARY_NAME}` source.", ""]
    lines += _training_data_lines(root, stages, data)
    lines += _licence_and_files_lines(root, card, data, grid)
    return "\n".join(lines)
