"""Trained cascades that ship inside the package (EMA weights only), usable with no training."""

from __future__ import annotations

import json
from pathlib import Path

PRETRAINED_ROOT = Path(__file__).parent / "pretrained"
MANIFEST = "cascade.json"


def available_pretrained() -> list[str]:
    if not PRETRAINED_ROOT.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_ROOT.iterdir() if (p / MANIFEST).is_file())


def pretrained_manifest(name: str) -> dict:
    path = PRETRAINED_ROOT / name / MANIFEST
    if not path.is_file():
        names = ", ".join(available_pretrained()) or "none are installed"
        raise FileNotFoundError(f"no pretrained cascade named {name!r} (available: {names})")
    return json.loads(path.read_text())


def pretrained_stage_dirs(name: str) -> list[Path]:
    """The stage directories of a pretrained cascade, base first."""
    manifest = pretrained_manifest(name)
    return [PRETRAINED_ROOT / name / stage for stage in manifest["stages"]]


def pretrained_file(name: str, filename: str) -> Path:
    path = PRETRAINED_ROOT / name / filename
    if not path.is_file():
        raise FileNotFoundError(f"the pretrained bundle {name!r} has no {filename}")
    return path
