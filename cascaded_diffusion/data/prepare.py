"""``cdm prepare``: decode an image folder once into a prepared dataset (memory-mappable uint8 arrays; the format
and its reader are :mod:`.prepared`).

Preparation decodes every image once (ADM/BigGAN preprocessing, :func:`.readers.center_crop_resize`, the same
pixels as the ``imagefolder:`` path) and resizes it to every requested resolution: into full-size arrays under
``DATA_DIR/.partial/``, chunk by chunk, resumable (:mod:`.partial`). At the end the rows of unreadable files are
squeezed out in place, the arrays are renamed into ``DATA_DIR`` and the manifest is written atomically, last: it
is the commit point. ``DATA_DIR/.prepare.lock`` keeps out a second process.

The ``imagefolder:PATH`` source prepares the folder at the one resolution it needs into the cache directory
(:func:`load_imagefolder_cached`), so there is one way to decode a folder, not two.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..version import __version__
from .imagefolder import fingerprint, list_image_folder, warn_skipped
from .partial import OUT, decode_chunks, read_journal, start_partial
from .readers import ImageArray
from .prepared import (FORMAT, FORMAT_VERSION, LABELS, LOCK, MANIFEST, PARTIAL, _npy_header, _read_json, array_name,
                       load_prepared, read_manifest)
from ..errors import UserError, check_output_dir, naming
from ..fileio import (FileLock, LockBusy, atomic_write_bytes, atomic_write_text, cache_dir as cache_root,
                     cache_setting, check_cache_dir)

__all__ = [
    "PREPROCESSING",
    "PrepareResult",
    "prepare_dataset",
    "read_manifest",
    "load_prepared",
    "load_imagefolder_cached",
    "array_name",
]

DEFAULT_CHUNK_SIZE = 256  # files per resumable unit of work (ImageNet: ~5,000 chunks)
PREPROCESSING = (
    "ADM/BigGAN: decode, 16-bit grey scaled to 8 bits, convert to RGB (or L); BOX-halve while the short side "
    ">= 2*R, BICUBIC to short side R, center crop R x R"
)
_COMPACT_BLOCK_BYTES = 64 << 20


@dataclass
class PrepareResult:
    out: Path
    manifest: dict[str, Any]
    decoded: int  # files decoded by this call (0 when the directory was already complete)
    seconds: float
    already_prepared: bool = False

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def skipped(self) -> list[str]:
        return list(self.manifest["skipped"])


# --------------------------------------------------------------------------------------------------------
# .npy helpers: in-place row count change (compaction), atomic small arrays
# --------------------------------------------------------------------------------------------------------


def _set_npy_rows(path: Path, rows: int) -> None:
    """Make the .npy at ``path`` hold its first ``rows`` rows: rewrite the header's shape in place (same header
    length) and truncate the data. Idempotent, so a finalisation cut short can be repeated."""
    shape, dtype, offset, version = _npy_header(path)
    if shape[0] != rows:
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                       "shape": (rows, *shape[1:])})
        prefix = 10 if version == (1, 0) else 12
        pad = offset - prefix - len(header) - 1
        if pad < 0:  # cannot happen: a smaller row count never needs more digits
            raise ValueError(f"{path}: no room in the header for shape {(rows, *shape[1:])}")
        length = struct.pack("<H" if version == (1, 0) else "<I", offset - prefix)
        raw = np.lib.format.MAGIC_PREFIX + bytes(version) + length + (header + " " * pad + "\n").encode("latin1")
        with open(path, "r+b") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    os.truncate(path, offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------------
# Directory state
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out: Path, wait: bool) -> Iterator[None]:
    """Hold ``out/.prepare.lock`` (a :class:`~cascaded_diffusion.fileio.FileLock` without a holder's record)."""
    lock = FileLock(out / LOCK, record=False)
    try:
        lock.acquire(wait=wait, on_wait=lambda: print(f"waiting for another process preparing {out} ...",
                                                      file=sys.stderr, flush=True))
    except LockBusy:
        raise naming(UserError, "{out} is being prepared by another process (its lock {lock} is held); wait for it "
                     "to finish, or prepare into another {option}", OUT, out=out, lock=out / LOCK) from None
    try:
        yield
    finally:
        lock.release()


_IDENTITY_KEYS = ("format", "format_version", "source", "fingerprint", "channels", "preprocessing")


def _describe_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str:
    if have.get("format") != FORMAT or have.get("format_version") != FORMAT_VERSION:
        return f"format {have.get('format')!r} version {have.get('format_version')!r}, not {FORMAT!r} version {FORMAT_VERSION}"
    if have.get("source") != want["source"]:
        return f"it was prepared from {have.get('source')}, not {want['source']}"
    if have.get("fingerprint") != want["fingerprint"]:
        a, b = have.get("fingerprint") or {}, want["fingerprint"]
        return (f"the source changed since (then {a.get('file_count')} files, {a.get('total_bytes')} bytes; now "
                f"{b['file_count']} files, {b['total_bytes']} bytes, or files edited)")
    if have.get("channels") != want["channels"]:
        return f"it holds {have.get('channels')}-channel images, not {want['channels']}"
    if have.get("preprocessing") != want["preprocessing"]:
        return "it was prepared with another preprocessing"
    return f"it holds resolutions {have.get('resolutions')}, not {want['resolutions']}"


def _remove_ours(out: Path) -> None:
    """Remove a stale preparation from ``out`` (manifest first, so it never describes half-removed arrays)."""
    (out / MANIFEST).unlink(missing_ok=True)
    for path in out.glob("images_*px_*ch.npy"):
        path.unlink()
    (out / LABELS).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


def _foreign_entries(out: Path) -> list[str]:
    ours = {MANIFEST, LABELS, PARTIAL, LOCK}
    return sorted(p.name for p in out.iterdir()
                  if p.name not in ours and not (p.name.startswith("images_") and p.name.endswith("ch.npy")))


def _check_resolutions(resolutions: Any) -> list[int]:
    try:
        values = [int(r) for r in resolutions]
    except (TypeError, ValueError):
        raise UserError(f"resolutions must be positive integers, got {resolutions!r}") from None
    if not values or any(r < 1 for r in values) or any(isinstance(r, bool) for r in resolutions):
        raise UserError(f"resolutions must be one or more positive integers, got {list(resolutions)!r}")
    if len(set(values)) != len(values):
        raise UserError(f"resolutions must not repeat, got {values}")
    return sorted(values)


def _image_folder(spec: str | os.PathLike) -> Path:
    text = os.fspath(spec)
    kind, sep, arg = text.partition(":")
    if sep and kind.strip().lower() == "imagefolder":
        text = arg
    elif sep and kind.strip().lower() in ("fashion-mnist", "npz", "prepared"):
        raise UserError(f"cdm prepare reads image folders (imagefolder:PATH); {text!r} needs no preparation")
    if not text:
        raise UserError(f"{spec!r} is missing its PATH; expected 'imagefolder:PATH'")
    return Path(os.path.expanduser(text)).resolve()


# --------------------------------------------------------------------------------------------------------
# prepare_dataset
# --------------------------------------------------------------------------------------------------------


def prepare_dataset(
    source: str | os.PathLike,
    resolutions: list[int] | tuple[int, ...],
    out: str | os.PathLike,
    *,
    channels: int = 3,
    workers: int | None = None,
    on_corrupt: str = "skip",
    progress: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    replace_stale: bool = False,
    wait_for_lock: bool = False,
) -> PrepareResult:
    """Decode the image folder ``source`` (``imagefolder:PATH`` or a path) once into ``out`` at ``resolutions``.

    Args:
        channels: 3 (RGB) or 1 (PIL's ``convert("L")`` before resizing, as the ``imagefolder:`` path does).
        workers: decoding processes (default: the CPUs this process may use); 1 decodes in this process.
        on_corrupt: ``"skip"`` leaves unreadable files out and lists them in the manifest; ``"error"`` stops
            at the first one, naming it (the chunks finished so far are kept for a resume).
        chunk_size: files per resumable unit of work (a resumed preparation keeps the one it started with).
        replace_stale: a directory prepared (or half-prepared) from another source or with other settings is
            removed and prepared again, instead of refused (the ``imagefolder:`` cache does this).
        wait_for_lock: wait for another process preparing ``out``, instead of refusing.

    Returns:
        A :class:`PrepareResult`; its manifest is the one written to ``out/manifest.json``.

    Raises:
        UserError / ValueError / OSError, with a one-line message, before any decoding for bad input (no such
        folder, no class subfolders, a directory prepared from something else, too little disk space).
    """
    start_time = time.perf_counter()
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if on_corrupt not in ("skip", "error"):
        raise UserError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if int(workers) < 1 or int(chunk_size) < 1:
        raise UserError(f"workers and chunk_size must be >= 1, got {workers} and {chunk_size}")
    folder, relpaths, all_labels, plan = _plan(source, resolutions, channels)
    out = Path(os.path.expanduser(os.fspath(out)))
    if out.resolve() == folder or folder in out.resolve().parents:
        raise naming(UserError, "{option} {out} is inside the image folder {folder}; its arrays would become part of "
                     "the source", OUT, out=out, folder=folder)
    check_output_dir(out, "out")
    with _locked(out, wait_for_lock):
        manifest, partial_plan = _claim(out, plan, replace_stale, len(relpaths), int(chunk_size))
        if manifest is not None:
            return PrepareResult(out, manifest, 0, time.perf_counter() - start_time, already_prepared=True)
        decoded = decode_chunks(out, folder, relpaths, partial_plan, int(workers), on_corrupt, progress)
        manifest = _finalize(out, plan, relpaths, all_labels)
    return PrepareResult(out, manifest, decoded, time.perf_counter() - start_time)


def _plan(source: str | os.PathLike, resolutions, channels: int) -> tuple[Path, list[str], np.ndarray, dict[str, Any]]:
    """What a preparation of ``source`` makes: the folder, its files and labels, and the plan (what the manifest
    records of the source and the settings; a directory holding another plan is not this preparation)."""
    resolutions = _check_resolutions(resolutions)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    folder = _image_folder(source)
    class_names, entries = list_image_folder(folder)
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": f"imagefolder:{folder}",
        "fingerprint": fingerprint(folder, entries),
        "preprocessing": PREPROCESSING,
        "resolutions": resolutions,
        "channels": channels,
        "class_names": class_names,
    }
    return folder, [r for r, _ in entries], np.array([label for _, label in entries], dtype=np.int64), plan


def _claim(out: Path, plan: dict[str, Any], replace_stale: bool, file_count: int,
           chunk_size: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Under the lock, what ``out`` holds decides: ``(manifest, None)`` when it is already prepared with this
    plan, else ``(None, partial plan)`` of the preparation to resume or start. A directory of another plan is
    refused (or, with ``replace_stale``, our files in it are removed); one holding other files is refused."""
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:
        same = all(manifest.get(k) == plan[k] for k in _IDENTITY_KEYS)
        if same and set(plan["resolutions"]) <= set(manifest.get("resolutions", [])):
            read_manifest(out)  # complete and consistent
            return manifest, None
        if not replace_stale:
            raise naming(UserError, "{option} {out} already holds a prepared dataset and {mismatch}; prepare "
                         "into another {option}, or remove it first", OUT, out=out,
                         mismatch=_describe_mismatch(manifest, plan))
        _remove_ours(out)
    partial_plan = _read_json(out / PARTIAL / "plan.json")
    if partial_plan is not None and any(partial_plan.get(k) != plan[k] for k in (*_IDENTITY_KEYS, "resolutions")):
        if not replace_stale:
            raise naming(UserError, "{option} {out} holds an interrupted preparation, and {mismatch}; rerun "
                         "the original command to finish it, or remove {out} first", OUT, out=out,
                         mismatch=_describe_mismatch(partial_plan, plan))
        _remove_ours(out)
        partial_plan = None
    if partial_plan is None:
        foreign = _foreign_entries(out)
        if foreign:
            raise naming(UserError, "{option} {out} is not empty and holds no prepared dataset ({foreign}); give "
                         "a new or empty directory", OUT, out=out,
                         foreign=", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else ""))
        _remove_ours(out)  # arrays left by a preparation whose .partial was removed by hand
        partial_plan = start_partial(out, plan, file_count, chunk_size)
    return None, partial_plan


def _finalize(out: Path, plan: dict[str, Any], relpaths: list[str], all_labels: np.ndarray) -> dict[str, Any]:
    """Squeeze out the rows of unreadable files, move the arrays into ``out``, write labels and manifest last."""
    partial = out / PARTIAL
    names = [array_name(r, plan["channels"]) for r in plan["resolutions"]]
    compacted = _read_json(partial / "compacted.json")
    if compacted is None:
        failures: dict[int, str] = {}
        for chunk_failures in read_journal(partial / "done.jsonl").values():
            failures.update(chunk_failures)
        if len(failures) == len(relpaths):
            raise ValueError(f"none of the {len(relpaths)} image files could be decoded; first: {failures[min(failures)]}")
        keep = np.array([i for i in range(len(relpaths)) if i not in failures], dtype=np.int64)
        if failures:
            first = min(failures)
            atomic_write_text(partial / "compacting.json", json.dumps({"first": first}))
            for name in names:
                _compact(partial / name, keep, first)
        compacted = {"num_images": len(keep), "skipped": [failures[i] for i in sorted(failures)],
                     "skipped_indices": sorted(failures)}
        atomic_write_text(partial / "compacted.json", json.dumps(compacted))
        (partial / "compacting.json").unlink(missing_ok=True)
    num_images = int(compacted["num_images"])
    keep_mask = np.ones(len(relpaths), dtype=bool)
    keep_mask[np.asarray(compacted["skipped_indices"], dtype=np.int64)] = False
    labels = all_labels[keep_mask]
    arrays = {}
    for resolution, name in zip(plan["resolutions"], names):
        source, target = partial / name, out / name
        if source.is_file():
            _set_npy_rows(source, num_images)
            _fsync_file(source)
            os.replace(source, target)
        elif not target.is_file():
            raise ValueError(f"{out}: {name} is missing from an interrupted preparation; remove {out} and prepare again")
        arrays[str(resolution)] = {"file": name, "shape": [num_images, resolution, resolution, plan["channels"]],
                                   "dtype": "uint8"}
    atomic_write_bytes(out / LABELS, _npy_bytes(labels))
    manifest = {
        **plan,
        "complete": True,
        "num_images": num_images,
        "file_count": len(relpaths),
        "num_classes": len(plan["class_names"]),
        "class_counts": np.bincount(labels, minlength=len(plan["class_names"])).tolist(),
        "skipped": compacted["skipped"],
        "arrays": arrays,
        "labels": {"file": LABELS, "shape": [num_images], "dtype": "int64"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": __version__,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # the commit point
    shutil.rmtree(partial, ignore_errors=True)
    return manifest


def _compact(path: Path, keep: np.ndarray, first: int) -> None:
    """Move row ``keep[d]`` to row ``d`` for every ``d >= first`` (rows only ever move towards the start, and a
    block is read whole before it is written, so nothing is overwritten before it is read)."""
    array = np.load(path, mmap_mode="r+")
    block = max(1, _COMPACT_BLOCK_BYTES // max(1, int(np.prod(array.shape[1:]))))
    for start in range(first, len(keep), block):
        rows = keep[start : start + block]
        array[start : start + len(rows)] = array[rows]
    array.flush()
    del array


# --------------------------------------------------------------------------------------------------------
# The imagefolder: source, through the same machinery
# --------------------------------------------------------------------------------------------------------


def cache_entry(folder: Path, resolution: int, channels: int, cache_dir: str | os.PathLike | None) -> Path:
    """The prepared directory that caches ``imagefolder:FOLDER`` at one resolution."""
    root = Path(os.path.expanduser(os.fspath(cache_dir))) if cache_dir is not None else cache_root("data")
    key = hashlib.sha256(f"{folder}\0{resolution}\0{channels}\0{FORMAT_VERSION}".encode()).hexdigest()[:16]
    return root / f"{folder.name}-{resolution}px-{channels}ch-{key}"


def load_imagefolder_cached(
    folder: Path,
    resolution: int,
    *,
    channels: int,
    cache_dir: str | os.PathLike | None,
    on_corrupt: str,
    progress: bool,
    num_workers: int | None,
) -> ImageArray:
    """``imagefolder:FOLDER`` at ``resolution``: a ``cdm prepare`` of the folder at that one resolution into the
    cache directory (reused while the folder's fingerprint holds, prepared again when it changes)."""
    folder = folder.resolve()
    entry = cache_entry(folder, resolution, channels, cache_dir)
    check_cache_dir(entry.parent, "data.cache_dir" if cache_dir is not None else cache_setting())
    workers = num_workers if num_workers is not None else min(32, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    result = prepare_dataset(folder, [resolution], entry, channels=channels, workers=workers, on_corrupt=on_corrupt,
                             progress=progress, replace_stale=True, wait_for_lock=True)
    data = load_prepared(entry, resolution, channels=channels, on_corrupt=on_corrupt, source=f"imagefolder:{folder}")
    if result.skipped:
        warn_skipped(folder, [str(folder / s) for s in result.skipped], result.manifest["file_count"])
    return data
