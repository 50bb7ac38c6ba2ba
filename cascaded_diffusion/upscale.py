"""Upscaling image files with a cascade's super-resolution stages: ``cdm upscale`` and its Python function.

Files or folders of PNG/JPEG/... images in; each is decoded and brought to the first SR stage's input size by the
training data's rule (:meth:`Cascade.upscale`), then every SR stage runs, and ``OUT/<stem>.png`` is written at the
top resolution. A file that cannot be read is reported and skipped, the others are processed. Every check that can
refuse the whole job (duplicate names, missing labels, outputs that exist) runs before any file is decoded.
Image k's noise depends on the seed and its file stem only, so an image comes out the same whatever other files
are upscaled with it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .cascade import Cascade
from .errors import UserError
from .fileio import atomic_write_bytes
from .stage import Stage
from .data.imagefolder import IMAGE_EXTENSIONS, preprocess_image

# An input whose short side is over this many times the SR stage's input size loses most of its pixels to the
# resize (the cascade's output is then smaller than the input): worth a warning, not an error.
MUCH_LARGER = 4


class OutputsExistError(UserError):
    """Outputs of an upscale job already exist and overwriting was not asked for."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
        super().__init__(f"{paths[0]} exists{more}; nothing was overwritten")


@dataclass
class UpscaleReport:
    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)
    warnings: list[str] = field(default_factory=list)
    input_resolution: int = 0
    resolution: int = 0
    seconds: float = 0.0


def list_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files to process (a folder gives its own image files, by extension, sorted; not its
    subfolders) and the paths that do not exist."""
    files, missing = [], []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            files.append(path)  # named explicitly: tried whatever its extension
        else:
            missing.append((str(path), "no such file or directory"))
    return files, missing


def read_labels_csv(path: str | os.PathLike) -> dict[str, int]:
    """``name,label`` rows (a header row is allowed): the name is a file name or its stem."""
    labels: dict[str, int] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise UserError(f"{path}:{number}: expected 'name,label', got {','.join(row)!r}")
            try:
                labels[row[0].strip()] = int(row[1])
            except ValueError:
                if number == 1:
                    continue  # a header
                raise UserError(f"{path}:{number}: label {row[1]!r} is not an integer") from None
    return labels


def image_key(stem: str) -> int:
    """The per-image noise index: from the file's stem, so its result does not depend on the other inputs."""
    return int.from_bytes(hashlib.sha256(stem.encode()).digest()[:7], "big")


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _labels_by_file(files: list[Path], label: int | None, labels: dict[str, int] | None,
                    num_classes: int) -> dict[Path, int]:
    """Each file's class: ``label`` for all, or its row in ``labels`` by file name, else by stem."""
    wanted = {}
    for path in files:
        value = label if labels is None else labels.get(path.name, labels.get(path.stem))
        if value is None:
            raise UserError(f"no label for {path} in the labels table (by file name {path.name!r} or stem "
                            f"{path.stem!r})")
        if not 0 <= value < num_classes:
            raise UserError(f"label {value} for {path} is outside the cascade's classes 0..{num_classes - 1}")
        wanted[path] = value
    return wanted


def _read_inputs(files: list[Path], first: Stage, resolution: int, report: UpscaleReport,
                 say: Callable[[str], None]) -> tuple[list[np.ndarray], list[Path]]:
    """The readable files as the first SR stage takes them, and those files; an unreadable one goes to
    ``report.failed`` and one much larger than that stage takes to ``report.warnings``, each said as it happens."""
    mode = "RGB" if first.channels == 3 else "L"
    fed, good = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()  # raises on truncated data instead of decoding a partly grey image
                size = image.size
                fed.append(preprocess_image(image, first.low_res, mode))
        except Exception as e:  # any decoder failure means "unreadable file": report it, go on with the rest
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            report.failed.append((str(path), f"cannot read the image ({type(e).__name__}: {reason[:200]})"))
            say(f"skipped {path}: {report.failed[-1][1]}")
            continue
        good.append(path)
        if min(size) > MUCH_LARGER * first.low_res:
            report.warnings.append(f"{path} is {size[0]}x{size[1]}, much larger than the {first.low_res}x"
                                   f"{first.low_res} the first SR stage takes: it is centre-cropped and shrunk to "
                                   f"that, and the {resolution}px result has less detail than the input")
            say(f"warning: {report.warnings[-1]}")
    return fed, good


def upscale_files(
    cascade: Cascade,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    label: int | None = None,
    labels: dict[str, int] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    save_stages: bool = False,
    batch_size: int = 64,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    **kwargs,
) -> UpscaleReport:
    """Upscale the image files and folders ``inputs`` into ``out_dir`` (``<stem>.png`` at the top resolution; with
    ``save_stages`` also ``<stem>_<N>px.png`` for the input as fed and every intermediate stage). One class for all
    (``label``) or per file name or stem (``labels``). ``log`` receives one line per unreadable file and warning as
    it happens. Other keyword arguments go to :meth:`Cascade.sample` (``aug_levels``, ``steps``, ...)."""
    start = time.time()
    say = log or (lambda line: None)
    if (label is None) == (labels is None):
        raise UserError("give one label for every image or a table of labels, not both or neither")
    if len(cascade.stages) < 2:
        raise UserError("upscaling needs a cascade with at least one super-resolution stage")
    first, top = cascade.stages[1], cascade.stages[-1]
    report = UpscaleReport(input_resolution=first.low_res, resolution=top.resolution)
    files, report.failed = list_inputs(inputs)
    for path, reason in report.failed:
        say(f"skipped {path}: {reason}")
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise UserError(f"{stems[path.stem]} and {path} would both be written as {path.stem}.png; rename one")
        stems[path.stem] = path
    wanted = _labels_by_file(files, label, labels, cascade.num_classes)
    out = Path(out_dir)
    stage_sizes = [first.low_res] + [s.resolution for s in cascade.stages[1:-1]] if save_stages else []

    def outputs(path: Path) -> list[Path]:
        return [out / f"{path.stem}.png"] + [out / f"{path.stem}_{size}px.png" for size in stage_sizes]

    existing = [p for path in files for p in outputs(path) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise OutputsExistError(existing)

    fed, good = _read_inputs(files, first, top.resolution, report, say)
    if not good:
        return report
    out.mkdir(parents=True, exist_ok=True)
    stages = cascade.upscale(np.stack(fed), [wanted[p] for p in good], seed=seed,
                             keys=[image_key(p.stem) for p in good], batch_size=batch_size, progress=progress,
                             **kwargs)
    shown = [stages[-1]] + (stages[:-1] if save_stages else [])
    for k, path in enumerate(good):
        for target, images in zip(outputs(path), shown):
            atomic_write_bytes(target, _png_bytes(images[k]))
            report.written.append(target)
    report.seconds = time.time() - start
    return report
