"""A prepared dataset (``cdm prepare``): its format, and reading it back.

A *prepared dataset* is a directory::

    DATA_DIR/manifest.json              written last: its presence means the directory is complete
    DATA_DIR/labels.npy                 int64 (N,)
    DATA_DIR/images_{R}px_{C}ch.npy     uint8 N x R x R x C, one per resolution (np.load(mmap_mode="r"))
    DATA_DIR/.prepare.lock              flock'ed while a process prepares the directory

The manifest records the source (path and a fingerprint: file count, total bytes and a hash of every file's
path, label, size and mtime), the preprocessing, the resolutions and channels, the counts, the class names,
every array's file and shape, and the files that could not be decoded (skipped, with the reason). Training
reads it with ``data.source = "prepared:DATA_DIR"`` (:func:`load_prepared`); :mod:`.prepare` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, naming
from .readers import ImageArray

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "array_name", "read_manifest", "load_prepared"]

FORMAT = "cdm-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PARTIAL = ".partial"
LOCK = ".prepare.lock"


def array_name(resolution: int, channels: int) -> str:
    """File name of the image array at one resolution: ``images_64px_3ch.npy``."""
    return f"images_{resolution}px_{channels}ch.npy"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int, tuple[int, int]]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError(f"{path}: a Fortran-ordered array; expected C order")
        return tuple(shape), dtype, f.tell(), version


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc}); remove the directory and prepare again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object; remove the directory and prepare again")
    return value



def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete prepared dataset, after checking that its arrays exist with their recorded
    shapes and dtypes; a one-line ``ValueError`` otherwise (incomplete, foreign or damaged directory)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"prepared dataset {data_dir}: no such directory (create it with `cdm prepare`)")
    manifest = _read_json(data_dir / MANIFEST)
    if manifest is None:
        if (data_dir / PARTIAL).is_dir():
            raise UserError(
                f"prepared dataset {data_dir} is incomplete (an interrupted `cdm prepare`); rerun the same "
                "`cdm prepare` command to finish it"
            )
        raise UserError(f"{data_dir} holds no {MANIFEST}: not a prepared dataset (create one with `cdm prepare`)")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{data_dir / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this version of cascaded_diffusion reads {FORMAT!r} version {FORMAT_VERSION}: prepare it again"
        )
    if manifest.get("complete") is not True:
        raise UserError(f"{data_dir / MANIFEST}: the preparation is not marked complete; rerun `cdm prepare`")
    for entry in [*manifest.get("arrays", {}).values(), manifest.get("labels", {})]:
        _check_array(data_dir, entry)
    return manifest


def _check_array(data_dir: Path, entry: dict[str, Any]) -> None:
    try:
        path = data_dir / entry["file"]
        shape, dtype, offset, _ = _npy_header(path)
    except (KeyError, TypeError):
        raise UserError(f"{data_dir / MANIFEST}: malformed array entry {entry!r}; prepare the dataset again") from None
    except FileNotFoundError:
        raise UserError(f"prepared dataset {data_dir}: {entry['file']} is missing; prepare the dataset again") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npy ({exc}); prepare the dataset again") from None
    if list(shape) != list(entry.get("shape", [])) or str(dtype) != entry.get("dtype"):
        raise UserError(
            f"{path}: holds {dtype} {list(shape)}, the manifest records {entry.get('dtype')} {entry.get('shape')}; "
            "the directory was modified: prepare the dataset again"
        )
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise UserError(f"{path}: {actual} bytes, expected {expected} (truncated or modified); prepare the dataset again")


def load_prepared(
    data_dir: str | os.PathLike,
    resolution: int,
    *,
    channels: int | None = None,
    on_corrupt: str = "skip",
    source: str | None = None,
) -> ImageArray:
    """The memory-mapped images of a prepared dataset at ``resolution`` (and ``channels``, default: those it
    holds). A resolution or channel count it was not prepared with is a one-line error naming what it has."""
    data_dir = Path(os.path.expanduser(os.fspath(data_dir))).resolve()
    manifest = read_manifest(data_dir)
    have = sorted(int(r) for r in manifest["arrays"])
    if channels is not None and channels != manifest["channels"]:
        raise naming(UserError, "prepared dataset {data_dir} holds {have}-channel images, the stage needs {channels}; "
                     "prepare it with {option} {channels}", {"option": "channels"}, data_dir=data_dir,
                     have=manifest["channels"], channels=channels)
    if resolution not in have:
        raise naming(UserError, "prepared dataset {data_dir} holds resolutions {have}, not {resolution}px; prepare "
                     "it with {option} {wanted} (into a new {out})", {"option": "resolutions", "out": "out"},
                     data_dir=data_dir, have=", ".join(f"{r}px" for r in have), resolution=resolution,
                     wanted=",".join(str(r) for r in sorted({*have, resolution})))
    skipped = manifest.get("skipped", [])
    if skipped and on_corrupt == "error":
        raise ValueError(
            f"cannot decode image {manifest['source'].partition(':')[2]}/{skipped[0]} ({len(skipped)} of "
            f"{manifest['file_count']} files were unreadable when {data_dir} was prepared; "
            "on_corrupt = 'error' refuses them)"
        )
    images = np.load(data_dir / manifest["arrays"][str(resolution)]["file"], mmap_mode="r")
    labels = np.load(data_dir / manifest["labels"]["file"])
    class_names = list(manifest["class_names"])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(f"prepared dataset {data_dir}: labels outside 0..{len(class_names) - 1}; prepare it again")
    return ImageArray(images, labels, len(class_names), class_names, source or f"prepared:{data_dir}")
