"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of a run directory::

    RUN_DIR/.lock                         held (flock) by the trainer writing this run (rundir.RunLock)
    RUN_DIR/config.toml                   resolved config of the run (human-readable)
    RUN_DIR/log.jsonl                     one JSON object per logged step, appended (see rundir.read_log)
    RUN_DIR/checkpoints/step_00001000/    one complete checkpoint
        model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors  state.json

A checkpoint is assembled in a hidden temporary directory, every file fsynced, then renamed into place in
one atomic step, so a process killed mid-write (or a full disk) never damages the previous checkpoint.
Nothing is ever unpickled: tensors come from safetensors and metadata from JSON. What a killed process leaves
behind (``.tmp-step_*`` directories, half-deleted ``step_*`` directories) is removed by :func:`clean_run_dir`
on the next start, and a corrupt newest checkpoint is skipped in favour of the newest valid one
(:func:`latest_valid_checkpoint`).

An exported stage (``export_stage``) is a directory with ``model.safetensors`` (EMA weights) and
``stage.json`` (the resolved config); it loads like a run directory for sampling.
"""

# Longer than ~400 lines: the checkpoint format, its verification, the run directory's leftovers and the readers'
# retry while a trainer prunes are one protocol about one directory (its lock and log are rundir.py); split, each
# part would re-derive the others' invariants (state.json written last and deleted first).

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch
from safetensors.torch import load_file, save

from .fileio import (
    TMP_FILE_PATTERN,
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    unlink_quietly,
    write_bytes_durably,
)

T = TypeVar("T")

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
STAGE_FILE = "stage.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not belong to the stage it is loaded into."""


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# --- optimizer state <-> flat tensors + JSON -------------------------------------------------------------


def optimizer_state_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-storable tensors and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- run-directory checkpoints ---------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[5:]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


TRAINING_STEMS = ("model", "ema", "optimizer", "rng")


def _check_safetensors_file(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a complete safetensors file (header parses, size matches)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"only {size} bytes")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e})") from None
    if size != 8 + n + end:
        raise CheckpointError(f"{path} is truncated or corrupt ({size} bytes, its header describes {8 + n + end})")


def verify_checkpoint(checkpoint_dir: str | Path, stems: tuple[str, ...] = TRAINING_STEMS) -> dict[str, Any]:
    """Check that a checkpoint is complete and readable without loading its tensors: ``state.json`` parses and
    names a step and a config, and each ``STEM.safetensors`` is whole. Returns the state; raises CheckpointError."""
    ckpt = Path(checkpoint_dir)
    state = load_state(ckpt)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt: no step or config")
    # the step decides the learning rate, the data position and where training stops: one that is negative or
    # differs from the directory's name (an edit, a copy between checkpoints) would resume somewhere else
    step = state["step"]
    named = ckpt.name[len("step_"):] if ckpt.name.startswith("step_") else None
    if isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt: its step {step!r} is not a step number >= 0")
    if named is not None and named.isdigit() and int(named) != step:
        raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt: its step {step} is not that of {ckpt.name}")
    for stem in stems:
        _check_safetensors_file(ckpt / f"{stem}.safetensors")
    return state


def latest_valid_checkpoint(
    run_dir: str | Path, stems: tuple[str, ...] = TRAINING_STEMS
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes :func:`verify_checkpoint`, and the newer ones that did not (with why)."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt, stems)
        except CheckpointError as e:
            skipped.append((ckpt, str(e)))
            continue
        return ckpt, skipped
    return None, skipped


def read_newest_checkpoint(
    run_dir: str | Path, stems: tuple[str, ...], read: Callable[[Path], T], attempts: int = 20
) -> tuple[T | None, Path | None, list[tuple[Path, str]]]:
    """``read(ckpt)`` of the newest valid checkpoint of a run a trainer may be writing: ``(result, ckpt,
    corrupt)``, or ``(None, None, corrupt)`` when there is none. A checkpoint pruned between being chosen and
    being read (the trainer wrote a newer one; ``state.json`` goes first) is not an error: the next newest is
    tried. One pruned while it was verified is not reported as corrupt either."""
    for _ in range(attempts):
        ckpt, corrupt = latest_valid_checkpoint(run_dir, stems)
        corrupt = [(p, why) for p, why in corrupt if (p / STATE_FILE).is_file()]  # the rest were pruned
        if ckpt is None:
            return None, None, corrupt
        try:
            return read(ckpt), ckpt, corrupt
        except CheckpointError:
            if (ckpt / STATE_FILE).is_file():
                raise  # still there: really unreadable, not pruned
    raise CheckpointError(f"{run_dir}: every checkpoint chosen was pruned before it could be read ({attempts} "
                          "tries); the trainer is pruning faster than it can be read: retry, or raise train.keep_last")


def resolve_checkpoint(
    path: str | Path,
    read: Callable[[Path], T] | None = None,
    *,
    stems: tuple[str, ...] = TRAINING_STEMS,
    set_aside: bool = False,
    required: bool = True,
    warn: Callable[[str], None] | None = None,
    expected: str = "a run directory written by `cdm train` (with checkpoints/step_*/) or one of its checkpoints",
) -> tuple[T | Path | None, Path | None]:
    """The one way to pick a checkpoint: ``(read(ckpt), ckpt)`` (``read`` defaults to returning ``ckpt``) for
    ``path`` itself when it is one checkpoint directory (``state.json`` in it), else for the newest checkpoint of
    the run directory ``path`` whose ``stems`` pass :func:`verify_checkpoint`, retried while a trainer prunes
    (:func:`read_newest_checkpoint`).

    Newer corrupt checkpoints are skipped, each with a warning (``warn``, default :func:`warnings.warn`), or with
    ``set_aside`` (the run's own trainer, holding its lock) renamed ``corrupt-step_*`` and announced on stderr.
    No checkpoint at all: :class:`CheckpointError` (saying the run holds ``expected``), or ``(None, None)`` where
    not ``required``; only corrupt ones: always :class:`CheckpointError`, and nothing is renamed."""
    import warnings

    path = Path(path)
    read = read if read is not None else (lambda ckpt: ckpt)
    if (path / STATE_FILE).is_file():
        return read(path), path
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    result, ckpt, corrupt = read_newest_checkpoint(path, stems, read)
    if ckpt is None and corrupt:
        raise CheckpointError(f"{path} holds no valid checkpoint: " + "; ".join(reason for _, reason in corrupt)
                              + (". Nothing was changed; move the run directory away to start over." if set_aside
                                 else ""))
    for bad, reason in corrupt:
        if set_aside:
            aside = set_aside_checkpoint(bad)
            print(f"warning: {reason}; renamed {bad.name} to {aside.name} and resuming from the newest valid "
                  f"checkpoint, {ckpt.name}", file=sys.stderr, flush=True)
        else:
            message = f"skipping the unreadable checkpoint {bad} ({reason}); using {ckpt}"
            warn(message) if warn is not None else warnings.warn(message, stacklevel=2)
    if ckpt is None and required:
        raise CheckpointError(f"{path} holds no checkpoint: expected {expected}")
    return result, ckpt


_TMP_FILE = re.compile(TMP_FILE_PATTERN)


def clean_run_dir(run_dir: str | Path) -> list[Path]:
    """Remove what an interrupted trainer leaves behind; returns what was removed.

    Only our own leftovers go: ``checkpoints/.tmp-step_*`` directories (a checkpoint being written),
    ``checkpoints/step_*`` directories without ``state.json`` (a checkpoint being pruned or replaced), and the
    ``.NAME.tmp-XXXXXXXX`` files of :func:`atomic_write_bytes` (``.NAME.tmp-PID`` before). Call it only while holding the run's lock."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and not p.is_symlink() and (
                p.name.startswith(".tmp-step_") or (p.name.startswith("step_") and not (p / STATE_FILE).exists())
            ):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if run_dir.is_dir():
        for p in sorted(run_dir.iterdir()):
            if _TMP_FILE.fullmatch(p.name) and p.is_file():
                unlink_quietly(p)
                removed.append(p)
    return removed


def set_aside_checkpoint(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the way (``corrupt-step_*``, never deleted) and return the new path."""
    target = path.with_name(f"corrupt-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"corrupt-{path.name}-{n}")
    os.replace(path, target)
    return target


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensor_files: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep_last: int = 3,
    keep_steps: Iterable[int] = (),
) -> Path:
    """Write ``tensor_files`` (file stem -> tensors) and ``state`` (JSON) as checkpoint ``step``.

    Returns the final directory. Older checkpoints beyond ``keep_last`` are removed only after the new one
    is complete. On any error (disk full, ...) the temporary directory is removed and the error re-raised
    with the previous checkpoints untouched.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir()
        for stem, tensors in tensor_files.items():
            write_bytes_durably(tmp / f"{stem}.safetensors", save(_contiguous_cpu(tensors)))
        full_state = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(), **state}
        write_bytes_durably(tmp / STATE_FILE, json.dumps(full_state, indent=1).encode())
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            _remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {final} ({e.strerror or e}); "
            f"the previous checkpoint is intact: {previous}"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = {checkpoint_name(k) for k in keep_steps}
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.name not in kept:
            _remove_checkpoint(old)
    return final


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, ``state.json`` first: a kill midway leaves a directory that no longer
    reads as a checkpoint (and that :func:`clean_run_dir` removes), never a half-deleted "complete" one."""
    try:
        (path / STATE_FILE).unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None


def _read_stage_meta(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / STAGE_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} is not an exported stage (no config)")
    return meta


def load_tensors(checkpoint_dir: str | Path, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(checkpoint_dir) / f"{stem}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def load_weights_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that says which stage/checkpoint did not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            details.append(f"{len(mismatched)} with a different shape (e.g. {mismatched[0]})")
        raise CheckpointError(
            f"the weights in {source} do not fit this network: {'; '.join(details)}. "
            "Was this checkpoint trained with a different config or for a different stage?"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})


# --- exported stages -------------------------------------------------------------------------------------


def is_exported_stage(path: str | Path) -> bool:
    """An exported sampling-only stage (``stage.json`` + weights), not a checkpoint or a run directory."""
    path = Path(path)
    return (path / STAGE_FILE).is_file() and not (path / STATE_FILE).is_file() and not list_checkpoints(path)


def export_stage(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    weights: str = "ema",
    config_overrides: list[str] | None = None,
) -> Path:
    """Write a self-contained sampling-only stage: EMA weights + resolved config.

    ``checkpoint_dir`` is one checkpoint, or an exported stage (re-exported: a bundled stage with another sampling
    default, say); ``config_overrides`` (``section.key=value``) may change sampling defaults such as
    ``sample.steps`` or ``conditioning.sample_s``; the result is validated like any config.
    """
    from .config import StageConfig, apply_overrides

    if is_exported_stage(checkpoint_dir):
        state = _read_stage_meta(checkpoint_dir)
        if weights != state.get("weights", "ema"):
            raise CheckpointError(f"{checkpoint_dir} is an exported stage holding only its {state.get('weights', 'ema')} "
                                  f"weights; export {weights} weights from its training checkpoint")
        stem = "model"
    else:
        state, stem = load_state(checkpoint_dir), weights
    if config_overrides:
        state["config"] = StageConfig.from_dict(
            apply_overrides(state["config"], config_overrides), source=f"{checkpoint_dir} + overrides"
        ).to_dict()
    tensors = load_tensors(checkpoint_dir, stem)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "model.safetensors", save(_contiguous_cpu(tensors)))
    meta = {
        "format_version": FORMAT_VERSION,
        "config": state["config"],
        "step": state["step"],
        "weights": weights,
        "source": str(checkpoint_dir),
    }
    if "distillation" in state:  # a `cdm distill` student: its teacher, round, step grid (distillation.py)
        meta["distillation"] = state["distillation"]
    atomic_write_text(out / STAGE_FILE, json.dumps(meta, indent=1))
    return out
