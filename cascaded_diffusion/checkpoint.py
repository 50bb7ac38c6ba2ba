"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

Layout of a run directory::

    RUN_DIR/config.toml                   resolved config of the run (human-readable)
    RUN_DIR/log.jsonl                     one JSON object per logged step
    RUN_DIR/checkpoints/step_00001000/    one complete checkpoint
        model.safetensors  ema.safetensors  optimizer.safetensors  rng.safetensors  state.json

A checkpoint is assembled in a hidden temporary directory, every file fsynced, then renamed into place in
one atomic step, so a process killed mid-write (or a full disk) never damages the previous checkpoint.
Nothing is ever unpickled: tensors come from safetensors and metadata from JSON.

An exported stage (``export_stage``) is a directory with ``model.safetensors`` (EMA weights) and
``stage.json`` (the resolved config); it loads like a run directory for sampling.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
STAGE_FILE = "stage.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not belong to the stage it is loaded into."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_bytes_durably(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
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
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint (no {STATE_FILE})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None


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


def export_stage(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    weights: str = "ema",
    config_overrides: list[str] | None = None,
) -> Path:
    """Write a self-contained sampling-only stage: EMA weights + resolved config.

    ``config_overrides`` (``section.key=value``) may change sampling defaults such as ``sample.steps`` or
    ``conditioning.sample_s``; the result is validated like any config.
    """
    from .config import StageConfig, apply_overrides

    state = load_state(checkpoint_dir)
    if config_overrides:
        state["config"] = StageConfig.from_dict(
            apply_overrides(state["config"], config_overrides), source=f"{checkpoint_dir} + overrides"
        ).to_dict()
    tensors = load_tensors(checkpoint_dir, weights)
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
    atomic_write_text(out / STAGE_FILE, json.dumps(meta, indent=1))
    return out
