"""``cdm prepare``: decode an image folder once into memory-mappable uint8 arrays, and read them back.

A *prepared dataset* is a directory::

    DATA_DIR/manifest.json              written last: its presence means the directory is complete
    DATA_DIR/labels.npy                 int64 (N,)
    DATA_DIR/images_{R}px_{C}ch.npy     uint8 N x R x R x C, one per resolution (np.load(mmap_mode="r"))
    DATA_DIR/.prepare.lock              flock'ed while a process prepares the directory

The manifest records the source (path and a fingerprint: file count, total bytes and a hash of every file's
path, label, size and mtime), the preprocessing, the resolutions and channels, the counts, the class names,
every array's file and shape, and the files that could not be decoded (skipped, with the reason).

Preparation decodes every image once (ADM/BigGAN preprocessing, :func:`cascaded_diffusion.readers.center_crop_resize`,
the same pixels as the ``imagefolder:`` path) and resizes it to every requested resolution. Worker processes
decode *chunks* of files straight into full-size memory-mapped arrays under ``DATA_DIR/.partial/``; each
finished chunk is flushed and then recorded in ``.partial/done.jsonl``, so a killed preparation resumes with the
chunks not yet recorded. At the end the rows of unreadable files are squeezed out in place, the arrays are
renamed into ``DATA_DIR`` and the manifest is written atomically (``fileio.atomic_write_text``).

Training reads it with ``data.source = "prepared:DATA_DIR"`` (:func:`load_prepared`); the ``imagefolder:PATH``
source prepares the folder at the one resolution it needs into the cache directory
(:func:`load_imagefolder_cached`), so there is one way to decode a folder, not two.
"""

# Longer than ~400 lines: one crash-safe, resumable pipeline (plan, chunked decoding, journal, compaction, manifest
# as the commit point) whose steps only make sense together; decoding itself lives in imagefolder.py.

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .version import __version__
from .imagefolder import fingerprint, list_image_folder, open_image, warn_skipped
from .readers import ImageArray, center_crop_resize
from .errors import UserError, check_output_dir, naming
from .fileio import (FileLock, LockBusy, atomic_write_bytes, atomic_write_text, cache_dir as cache_root,
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

FORMAT = "cdm-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.npy"
PARTIAL = ".partial"
LOCK = ".prepare.lock"
OUT = {"option": "out"}  # the setting naming the output directory, as errors name it
DEFAULT_CHUNK_SIZE = 256  # files per resumable unit of work (ImageNet: ~5,000 chunks)
PREPROCESSING = (
    "ADM/BigGAN: decode, 16-bit grey scaled to 8 bits, convert to RGB (or L); BOX-halve while the short side "
    ">= 2*R, BICUBIC to short side R, center crop R x R"
)
_COMPACT_BLOCK_BYTES = 64 << 20


def array_name(resolution: int, channels: int) -> str:
    """File name of the image array at one resolution: ``images_64px_3ch.npy``."""
    return f"images_{resolution}px_{channels}ch.npy"


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
# Decoding (runs in worker processes, or in-process with one worker)
# --------------------------------------------------------------------------------------------------------


_WORKER_ARRAYS: dict[str, np.memmap] = {}  # per process: the partial arrays, opened once


def _partial_array(path: str) -> np.memmap:
    if path not in _WORKER_ARRAYS:
        _WORKER_ARRAYS[path] = np.load(path, mmap_mode="r+")
    return _WORKER_ARRAYS[path]


def _release_arrays() -> None:
    for array in _WORKER_ARRAYS.values():
        array.flush()
    _WORKER_ARRAYS.clear()


def _decode_chunk(job: tuple) -> tuple[int, dict[int, str]]:
    """Decode files ``start .. start + len(relpaths)`` into row ``i`` of every partial array, flush them, and
    return ``(chunk, {index: 'relpath: reason'})`` for the files that could not be decoded."""
    chunk, folder, relpaths, start, targets, mode = job
    failures: dict[int, str] = {}
    arrays = [(resolution, _partial_array(path)) for resolution, path in targets]
    for offset, relpath in enumerate(relpaths):
        try:
            image = open_image(os.path.join(folder, relpath), mode)
            for resolution, array in arrays:
                pixels = center_crop_resize(image, resolution)
                array[start + offset] = pixels.reshape(array.shape[1:])
        except Exception as exc:  # any decoder failure means "unreadable file"; never abort a long run
            failures[start + offset] = f"{relpath}: {type(exc).__name__}: {exc}"
    for _, array in arrays:
        array.flush()  # on disk before the parent records the chunk as done
    return chunk, failures


# --------------------------------------------------------------------------------------------------------
# .npy helpers: in-place row count change (compaction), atomic small arrays
# --------------------------------------------------------------------------------------------------------


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
    resolutions = _check_resolutions(resolutions)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if on_corrupt not in ("skip", "error"):
        raise UserError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if int(workers) < 1 or int(chunk_size) < 1:
        raise UserError(f"workers and chunk_size must be >= 1, got {workers} and {chunk_size}")
    folder = _image_folder(source)
    class_names, entries = list_image_folder(folder)
    relpaths = [relpath for relpath, _ in entries]
    all_labels = np.array([label for _, label in entries], dtype=np.int64)
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
    out = Path(os.path.expanduser(os.fspath(out)))
    if out.resolve() == folder or folder in out.resolve().parents:
        raise naming(UserError, "{option} {out} is inside the image folder {folder}; its arrays would become part of "
                     "the source", OUT, out=out, folder=folder)
    check_output_dir(out, "out")
    with _locked(out, wait_for_lock):
        manifest = _read_json(out / MANIFEST)
        if manifest is not None:
            same = all(manifest.get(k) == plan[k] for k in _IDENTITY_KEYS)
            if same and set(resolutions) <= set(manifest.get("resolutions", [])):
                read_manifest(out)  # complete and consistent
                return PrepareResult(out, manifest, 0, time.perf_counter() - start_time, already_prepared=True)
            if not replace_stale:
                raise naming(UserError, "{option} {out} already holds a prepared dataset and {mismatch}; prepare "
                             "into another {option}, or remove it first", OUT, out=out,
                             mismatch=_describe_mismatch(manifest, plan))
            _remove_ours(out)
        partial_plan = _read_json(out / PARTIAL / "plan.json")
        if partial_plan is not None:
            if any(partial_plan.get(k) != plan[k] for k in (*_IDENTITY_KEYS, "resolutions")):
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
            partial_plan = _start_partial(out, plan, len(entries), int(chunk_size))
        decoded = _run(out, folder, relpaths, partial_plan, int(workers), on_corrupt, progress)
        manifest = _finalize(out, plan, relpaths, all_labels)
    return PrepareResult(out, manifest, decoded, time.perf_counter() - start_time)


def _size(num_bytes: float) -> str:
    """GiB, or MiB / KiB below that (``0.00 GiB`` would hide how small the shortfall is)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes / 2**10:.1f} KiB"


def _check_space_to_finish(out: Path, targets: list[tuple[int, str]], pending: int) -> None:
    """Before a resumed preparation writes into its arrays: they are sparse memory maps, and a write into a page
    the full disk cannot back kills the process with SIGBUS (exit 135, no message, no Python exception). What
    still needs disk is the part of each array with no blocks yet (``st_blocks``); the check at the start covers
    a fresh preparation, this one a resume after the disk filled up meanwhile."""
    if not pending:
        return
    needed = 0
    for _, path in targets:
        info = os.stat(path)
        needed += max(0, info.st_size - getattr(info, "st_blocks", 0) * 512)
    free = shutil.disk_usage(out / PARTIAL).free
    if needed > free:
        raise naming(UserError, "{option} {out}: finishing the interrupted preparation ({pending} files to decode) "
                     "needs {needed} more, but only {free} are free there; free some space and rerun the same command",
                     OUT, out=out, pending=pending, needed=_size(needed), free=_size(free))


def _start_partial(out: Path, plan: dict[str, Any], file_count: int, chunk_size: int) -> dict[str, Any]:
    partial = out / PARTIAL
    partial.mkdir()
    row_bytes = sum(r * r * plan["channels"] for r in plan["resolutions"])
    needed = file_count * row_bytes
    free = shutil.disk_usage(partial).free
    if needed > free:
        shutil.rmtree(partial, ignore_errors=True)
        raise naming(UserError, "{option} {out}: the arrays need {needed} for {count} files at {resolutions} px, but "
                     "only {free} are free there", OUT, out=out, needed=_size(needed), count=file_count,
                     resolutions=plan["resolutions"], free=_size(free))
    for resolution in plan["resolutions"]:  # sparse until written
        shape = (file_count, resolution, resolution, plan["channels"])
        array = np.lib.format.open_memmap(partial / array_name(resolution, plan["channels"]), mode="w+",
                                          dtype=np.uint8, shape=shape)
        del array
    partial_plan = {**plan, "chunk_size": chunk_size, "file_count": file_count}
    atomic_write_text(partial / "plan.json", json.dumps(partial_plan, indent=1))  # written last: the partial is valid
    return partial_plan


def _read_journal(path: Path) -> dict[int, dict[int, str]]:
    done: dict[int, dict[int, str]] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return done
    for line in lines:
        try:
            record = json.loads(line)
            done[int(record["chunk"])] = {int(k): str(v) for k, v in record["failed"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut by a kill: that chunk is decoded again
    return done


def _run(
    out: Path, folder: Path, relpaths: list[str], plan: dict[str, Any], workers: int, on_corrupt: str, progress: bool
) -> int:
    """Decode every chunk not yet recorded as done; return the number of files decoded."""
    from tqdm.auto import tqdm

    partial = out / PARTIAL
    if (partial / "compacted.json").is_file():
        return 0
    journal = partial / "done.jsonl"
    done = _read_journal(journal)
    marker = _read_json(partial / "compacting.json")
    if marker is not None:  # compaction was cut short: rows from the first failure on must be decoded again
        first_chunk = int(marker["first"]) // plan["chunk_size"]
        done = {c: f for c, f in done.items() if c < first_chunk}
        atomic_write_text(journal, "".join(json.dumps({"chunk": c, "failed": f}) + "\n" for c, f in sorted(done.items())))
        (partial / "compacting.json").unlink()
    size = plan["chunk_size"]
    targets = [(r, str(partial / array_name(r, plan["channels"]))) for r in plan["resolutions"]]
    mode = "RGB" if plan["channels"] == 3 else "L"
    pending = [c for c in range(-(-len(relpaths) // size)) if c not in done]
    if on_corrupt == "error":
        for chunk in sorted(done):
            if done[chunk]:
                _raise_corrupt(folder, done[chunk])
    jobs = [(c, str(folder), relpaths[c * size : (c + 1) * size], c * size, targets, mode) for c in pending]
    total = sum(len(job[2]) for job in jobs)
    _check_space_to_finish(out, targets, total)
    workers = min(workers, len(jobs))
    with tqdm(total=len(relpaths), initial=len(relpaths) - total, desc=f"preparing {folder.name}", unit="img",
              disable=not progress, dynamic_ncols=True) as bar, open(journal, "a") as log:

        def record(chunk: int, failures: dict[int, str], count: int) -> None:
            if failures and on_corrupt == "error":
                _raise_corrupt(folder, failures)
            log.write(json.dumps({"chunk": chunk, "failed": failures}) + "\n")
            log.flush()
            bar.update(count)

        if workers <= 1:
            try:
                for job in jobs:
                    chunk, failures = _decode_chunk(job)
                    record(chunk, failures, len(job[2]))
            finally:
                _release_arrays()
        else:
            context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
            pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)
            try:
                futures = {pool.submit(_decode_chunk, job): len(job[2]) for job in jobs}
                for future in concurrent.futures.as_completed(futures):
                    chunk, failures = future.result()
                    record(chunk, failures, futures[future])
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    return total


def _raise_corrupt(folder: Path, failures: dict[int, str]) -> None:
    first = failures[min(failures)]
    raise ValueError(f"cannot decode image {folder / first} (on_corrupt = 'error')")


def _finalize(out: Path, plan: dict[str, Any], relpaths: list[str], all_labels: np.ndarray) -> dict[str, Any]:
    """Squeeze out the rows of unreadable files, move the arrays into ``out``, write labels and manifest last."""
    partial = out / PARTIAL
    names = [array_name(r, plan["channels"]) for r in plan["resolutions"]]
    compacted = _read_json(partial / "compacted.json")
    if compacted is None:
        failures: dict[int, str] = {}
        for chunk_failures in _read_journal(partial / "done.jsonl").values():
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
# Reading a prepared dataset
# --------------------------------------------------------------------------------------------------------


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
