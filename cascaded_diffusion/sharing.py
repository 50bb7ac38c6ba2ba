"""Sharing a cascade: export it as one self-describing folder (weights, manifest with file hashes, model card,
per-stage grid) and publish that folder on the Hugging Face Hub.

An exported folder is what ``Cascade.load(pretrained=PATH)`` and ``hf://OWNER/REPO`` load: ``cascade.json``
(stages base first, sampling mode, the card's facts, the sha256 and size of every loaded file), one directory per
stage with ``model.safetensors`` (EMA weights, fp16 by default) and ``stage.json``, the bundled classifier when the
source has one, ``README.md`` (:mod:`cascaded_diffusion.modelcard`) and ``grid.png``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cascade import Cascade, sample_in_batches
from .labels import balanced_labels
from .checkpoint import STAGE_FILE, CheckpointError, export_stage, list_checkpoints, resolve_checkpoint
from .errors import UserError
from .fileio import atomic_write_bytes, atomic_write_text
from .images import grid_by_class, save_grid
from .hub import HUB_PREFIX, check_logged_in, check_repo_id, push_folder
from .modelcard import CARD_FILE, GRID_FILE, eval_metrics, render_card
from .pretrained import MANIFEST, find_cascade, hash_files, loaded_files

FORMAT_VERSION = 1


@dataclass
class ExportResult:
    out: Path
    stages: list[str]
    files: dict[str, dict]
    grid: Path | None
    seconds: float


def _stage_name(run_dir: Path, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir.resolve().name).strip("._") or "stage"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def _convert(path: Path, dtype: torch.dtype | None) -> None:
    from safetensors.torch import load_file, save

    if dtype is None:
        return
    tensors = load_file(str(path))
    tensors = {k: v.to(dtype).contiguous() if v.is_floating_point() else v for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors))


def _export_stage_dir(run_dir: Path, dest: Path, dtype: torch.dtype | None, weights: str) -> None:
    """One stage into ``dest``: from a run directory (its newest readable checkpoint), one checkpoint directory, or
    an exported stage (copied, converted to ``dtype``)."""
    if (run_dir / STAGE_FILE).is_file() and not list_checkpoints(run_dir):
        dest.mkdir(parents=True)
        for name in (STAGE_FILE, "model.safetensors"):
            if not (run_dir / name).is_file():
                raise CheckpointError(f"{run_dir}: an exported stage without {name}")
            shutil.copyfile(run_dir / name, dest / name)
        _convert(dest / "model.safetensors", dtype)
        return

    def export(ckpt: Path) -> Path:
        return export_stage(ckpt, dest, dtype=dtype, weights=weights)

    _, ckpt = resolve_checkpoint(run_dir, export, stems=(weights,))
    # stage.json records where it came from; an absolute local path says nothing on the Hub (and may say too much)
    meta = json.loads((dest / STAGE_FILE).read_text())
    meta["source"] = f"{run_dir.resolve().name}/{ckpt.relative_to(run_dir).as_posix()}" if ckpt != run_dir else run_dir.name
    atomic_write_text(dest / STAGE_FILE, json.dumps(meta, indent=1))


def _describe(cascade: Cascade) -> str:
    parts = []
    for stage in cascade.stages:
        c = stage.config
        aug = f", {c.conditioning.augmentation} conditioning augmentation" if c.is_sr else ""
        parts.append(f"{c.stage.low_res}->{c.stage.resolution} SR{aug}" if c.is_sr
                     else f"{c.stage.resolution}x{c.stage.resolution} class-conditional base")
    return "Cascade: " + " -> ".join(parts) + "."


def grid_command(name: str, num_classes: int, per_class: int, seed: int) -> str:
    return (f"cdm sample --pretrained {name} --num {num_classes * per_class} --seed {seed} --grid-per-class "
            f"{per_class} --out grid.npz --grid {GRID_FILE}")


def load_names(repo_id: str | None, pretrained: str | None, out: Path) -> list[str]:
    names = [f"{HUB_PREFIX}{repo_id}"] if repo_id else []
    if pretrained and not pretrained.startswith(HUB_PREFIX) and "/" not in pretrained:
        names.append(pretrained)  # the same cascade, bundled in the package
    return names or [str(out)]


def _write_stage_files(out: Path, run_dirs: Sequence[str | Path], pretrained: str | None, repo_id: str | None,
                       name: str | None, dtype: torch.dtype | None, weights: str) -> dict:
    """The stages' files written into ``out`` (copied from ``pretrained``, or exported from ``run_dirs``), and the
    manifest so far: the source's without its file list and format version, or a new one for run directories."""
    if pretrained:
        source = find_cascade(pretrained)
        manifest = {k: copy.deepcopy(v) for k, v in source.manifest.items() if k not in ("files", "format_version")}
        for rel in loaded_files(source.root, source.manifest):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.root / rel, out / rel)
        return manifest
    taken: set[str] = set()
    stages = []
    for run_dir in run_dirs:
        stage = _stage_name(Path(run_dir), taken)
        _export_stage_dir(Path(run_dir), out / stage, dtype, weights)
        stages.append(stage)
    return {"name": name or (repo_id.split("/")[1] if repo_id else out.resolve().name),
            "stages": stages, "sampling": {"truncated": False}}


def export_cascade(
    out: str | Path,
    run_dirs: Sequence[str | Path] = (),
    *,
    pretrained: str | None = None,
    repo_id: str | None = None,
    name: str | None = None,
    dtype: torch.dtype | None = torch.float16,
    weights: str = "ema",
    card: dict | None = None,
    metrics: Sequence[dict] = (),
    grid_per_class: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ExportResult:
    """Write the cascade of ``run_dirs`` (base first) or of ``pretrained`` (a bundled name, an exported folder,
    ``hf://...``) into the new or empty directory ``out``. A bundled or exported source's weights are copied
    byte for byte (so it samples exactly as the source); run directories give their newest readable checkpoint's
    ``weights`` in ``dtype``. ``card`` adds to or replaces the manifest's ``card`` facts (``license``, ``data``,
    ``classes``, ...); ``metrics``: ``cdm eval`` results to show. ``grid_per_class`` > 0 samples the card's
    per-stage grid (seed ``seed``, the default settings). On failure nothing is left in ``out``."""
    start = time.time()
    out = Path(out)
    if bool(pretrained) == bool(run_dirs):
        raise UserError("export either run directories or a pretrained cascade")
    if repo_id:
        check_repo_id(repo_id)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not an empty directory; export a cascade into a new one (an old export's files "
                        "would be mixed in)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        manifest = _write_stage_files(out, run_dirs, pretrained, repo_id, name, dtype, weights)
        if name:
            manifest["name"] = name
        if card:
            manifest["card"] = {**(manifest.get("card") or {}), **card}
        if metrics:
            manifest.setdefault("card", {})["metrics"] = [r for result in metrics for r in eval_metrics(result)]
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = hash_files(out, loaded_files(out, manifest))
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        # loading the written folder checks the hashes just written and that the stages form a cascade
        cascade = Cascade.load(pretrained=str(out), device=device)
        if "description" not in manifest:
            manifest["description"] = _describe(cascade)
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        grid = None
        names = load_names(repo_id, pretrained, out)
        if grid_per_class > 0:
            labels = balanced_labels(cascade.num_classes * grid_per_class, cascade.num_classes)
            # the defaults of `cdm sample` (bf16 autocast, the stages' samplers), so grid_command draws this grid
            stages_out, label_array = sample_in_batches(cascade, labels, batch_size=64, seed=seed, progress=progress)
            grid = out / GRID_FILE
            save_grid(grid_by_class(stages_out, label_array.astype(np.int64), per_class=grid_per_class)[None], grid,
                      nrow=1, padding=0)
        command = grid_command(names[0], cascade.num_classes, grid_per_class, seed) if grid else None
        atomic_write_text(out / CARD_FILE, render_card(out, manifest, load_names=names,
                                                       grid=GRID_FILE if grid else None, grid_command=command))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        raise
    return ExportResult(out, list(manifest["stages"]), manifest["files"], grid, time.time() - start)


def push_cascade(repo_id: str, run_dirs: Sequence[str | Path] = (), *, pretrained: str | None = None,
                 private: bool = False, branch: str | None = None, **export_options) -> tuple[str, ExportResult]:
    """Export (as :func:`export_cascade`, into a temporary folder) and upload to the Hub model repository
    ``repo_id``; returns the commit's URL and the export. The token is the standard Hugging Face login's, checked
    before the export starts."""
    check_repo_id(repo_id)
    check_logged_in()
    with tempfile.TemporaryDirectory(prefix="cdm-push-") as tmp:
        result = export_cascade(Path(tmp) / "cascade", run_dirs, pretrained=pretrained, repo_id=repo_id,
                                **export_options)
        what = pretrained or ", ".join(result.stages)
        url = push_folder(result.out, repo_id, private=private, branch=branch,
                          commit_message=f"Upload cascade {what} ({len(result.stages)} stages) with cdm push")
    return url, result
