"""The ``.partial/`` directory of a preparation under way (:mod:`.prepare`): full-size memory-mapped arrays,
decoded chunk by chunk (in worker processes, or in this one), and the journal of finished chunks.

Each chunk is decoded with the one image decoder (:func:`.imagefolder.open_image`, then the ADM/BigGAN crop and
resize to every resolution), flushed to disk, and only then recorded in ``.partial/done.jsonl``; a killed
preparation decodes again exactly the chunks not recorded. The arrays are sparse until written, so the disk
space they need is checked before anything is written (a write into a page the full disk cannot back kills the
process with SIGBUS).
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, naming
from ..fileio import atomic_write_text
from .imagefolder import open_image
from .prepared import PARTIAL, _read_json, array_name
from .readers import center_crop_resize

OUT = {"option": "out"}  # the setting naming the output directory, as errors name it


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


def start_partial(out: Path, plan: dict[str, Any], file_count: int, chunk_size: int) -> dict[str, Any]:
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


def read_journal(path: Path) -> dict[int, dict[int, str]]:
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


def decode_chunks(
    out: Path, folder: Path, relpaths: list[str], plan: dict[str, Any], workers: int, on_corrupt: str, progress: bool
) -> int:
    """Decode every chunk not yet recorded as done into the partial arrays; return the number of files decoded."""
    from tqdm.auto import tqdm

    partial = out / PARTIAL
    if (partial / "compacted.json").is_file():
        return 0
    journal = partial / "done.jsonl"
    done = read_journal(journal)
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
