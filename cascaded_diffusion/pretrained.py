"""Cascade folders: the ones that ship inside the package (``pretrained/NAME``), exported ones (``cdm export``) and
exported ones downloaded from the Hugging Face Hub (``hf://OWNER/REPO[@REVISION]``, :mod:`cascaded_diffusion.hub`).

A cascade folder holds ``cascade.json`` (the manifest: stage directories base first, sampling mode, the study's
numbers, what the model card says) and one ``model.safetensors`` + ``stage.json`` per stage. An exported folder's
manifest also lists the sha256 and size of every file the loader reads (``files``), and such a folder is checked
against it before anything in it is parsed (:func:`verify_cascade_dir`): a download that was cut short or altered
is refused, not half-loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError
from .hub import HUB_PREFIX, download_cascade  # huggingface_hub itself is imported only for an hf:// name

PRETRAINED_ROOT = Path(__file__).parent / "pretrained"
MANIFEST = "cascade.json"
STAGE_FILES = ("stage.json", "model.safetensors")
CLASSIFIER_FILES = ("classifier.json", "classifier.safetensors")
# The attribution the training data's licences require (e.g. CC-BY's credit line): not read by the loader, but it
# travels with the weights wherever the folder is exported or pushed, under the same hash check.
ATTRIBUTION_FILE = "ATTRIBUTION.md"


class CascadeIntegrityError(UserError):
    """A cascade folder's files do not match the hashes in its manifest (refused before anything is loaded)."""


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


# --------------------------------------------------------------------------------------------------------
# File hashes
# --------------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loaded_files(root: Path, manifest: dict) -> list[str]:
    """The files (relative, ``/``-separated) the loader reads from a cascade folder: every stage's two files and
    the bundled classifier's if there is one; with them the data's attribution file, if there is one. The model card and its grid are not among them: a card edited on
    the Hub must not make the weights unloadable."""
    files = [f"{stage}/{name}" for stage in manifest.get("stages", []) for name in STAGE_FILES]
    return files + [name for name in (*CLASSIFIER_FILES, ATTRIBUTION_FILE) if (root / name).is_file()]


def hash_files(root: Path, relpaths: list[str]) -> dict[str, dict]:
    return {rel: {"sha256": file_sha256(root / rel), "size": (root / rel).stat().st_size} for rel in relpaths}


def _safe_relpath(rel: str, source: str) -> None:
    """A manifest names files inside its folder only: no absolute path, no ``..`` (a crafted manifest must not
    make the loader hash, or later read, files elsewhere)."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or ".." in parts or (parts and ":" in parts[0]):
        raise CascadeIntegrityError(f"{source}: cascade.json names the file {rel!r}, outside the cascade folder")


def read_manifest(root: Path, source: str) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{source}: no {MANIFEST}; not an exported cascade folder")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CascadeIntegrityError(f"{source}: {MANIFEST} is not valid JSON ({e})") from None
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise CascadeIntegrityError(f"{source}: {MANIFEST} has no list of stage directories ('stages')")
    for stage in stages:
        _safe_relpath(stage, source)
    return manifest


def verify_cascade_dir(root: str | os.PathLike, source: str | None = None) -> dict:
    """Check every file the loader will read against the sha256 and size in ``cascade.json`` and return the
    manifest. Raises :class:`CascadeIntegrityError` (nothing in the folder but the manifest has been read) for a
    manifest without hashes, a loaded file it does not list, a missing file, or a size or hash that differs."""
    root = Path(root)
    source = source or str(root)
    manifest = read_manifest(root, source)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CascadeIntegrityError(f"{source}: {MANIFEST} lists no file hashes ('files'), so its weights cannot "
                                    "be verified; export the cascade again with this version of cascaded-diffusion")
    unlisted = [rel for rel in loaded_files(root, manifest) if rel not in files]
    if unlisted:
        raise CascadeIntegrityError(f"{source}: {MANIFEST} has no hash for {unlisted[0]}"
                                    + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                                    + "; refusing to load an unverified file")
    for rel, entry in sorted(files.items()):
        _safe_relpath(rel, source)
        path = root / rel
        if not path.is_file():
            raise CascadeIntegrityError(f"{source}: {rel} is missing (cascade.json lists it); the download is "
                                        "incomplete")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(expected, str):
            raise CascadeIntegrityError(f"{source}: cascade.json has no sha256 for {rel}")
        size = path.stat().st_size
        if "size" in entry and size != entry["size"]:
            raise CascadeIntegrityError(f"{source}: {rel} has {size} bytes, cascade.json says {entry['size']}; the "
                                        "file is truncated or was changed after export. Nothing was loaded")
        got = file_sha256(path)
        if got != expected:
            raise CascadeIntegrityError(f"{source}: {rel} does not match its hash in cascade.json (sha256 "
                                        f"{got[:12]}..., expected {expected[:12]}...); the file is corrupt or was "
                                        "changed after export. Nothing was loaded")
    return manifest


# --------------------------------------------------------------------------------------------------------
# Names: a bundle, an exported folder, a Hub repository
# --------------------------------------------------------------------------------------------------------


@dataclass
class CascadeFolder:
    """A cascade folder found by name: where it is, its manifest, and what it was called."""

    root: Path
    manifest: dict
    name: str
    bundled: bool = False  # shipped inside the package (its manifest carries no hashes: the wheel is the unit)

    @property
    def stage_dirs(self) -> list[Path]:
        return [self.root / stage for stage in self.manifest["stages"]]

    @property
    def truncated(self) -> bool:
        return bool(self.manifest.get("sampling", {}).get("truncated", False))


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith(".") or Path(name).is_dir()


def find_cascade(name: str) -> CascadeFolder:
    """``name``: a bundled cascade (``fashion-mnist``), ``hf://OWNER/REPO[@REVISION]`` (downloaded into the
    Hugging Face cache, or taken from it offline) or the path of an exported cascade folder. Exported and
    downloaded folders are verified against their manifest's hashes before they are returned."""
    if name.startswith(HUB_PREFIX):
        root = download_cascade(name)
        return CascadeFolder(root, verify_cascade_dir(root, name), name)
    if name in available_pretrained():
        return CascadeFolder(PRETRAINED_ROOT / name, pretrained_manifest(name), name, bundled=True)
    if _looks_like_path(name):
        root = Path(os.path.expanduser(name))
        if not root.is_dir():
            raise UserError(f"{name}: no such cascade folder")
        return CascadeFolder(root, verify_cascade_dir(root, name), name)
    names = ", ".join(available_pretrained()) or "none are installed"
    raise UserError(f"no pretrained cascade named {name!r} (bundled: {names}; or hf://OWNER/REPO for one on the "
                    "Hugging Face Hub, or the path of an exported cascade folder)")
