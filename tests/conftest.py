"""Shared test settings and the helpers several test files use.

The suite runs tiny models whose ops are dominated by per-op overhead; one intra-op thread is faster for
them than two and immune to the pathological slow-downs of spinning OpenMP threads on a busy machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascaded_diffusion.checkpoint import load_tensors
from cascaded_diffusion.cli import main
from cascaded_diffusion.config import StageConfig
from cascaded_diffusion.stage import Stage, build_network

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


# --- tiny stages built in memory --------------------------------------------------------------------------


def stage_config(kind: str, resolution: int, low_res: int = 0, *, classes: int = 3, channels: int = 1,
                 augmentation: str = "noise", timesteps: int = 40, **conditioning) -> StageConfig:
    raw = {
        "stage": {"name": f"{kind}{resolution}", "kind": kind, "resolution": resolution, "low_res": low_res,
                  "channels": channels, "num_classes": classes},
        "diffusion": {"timesteps": timesteps, "learn_sigma": kind == "base", "loss": "hybrid" if kind == "base" else "simple"},
        "model": {"channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [],
                  "norm_groups": 8},
        "sample": {"sampler": "ddim", "steps": 5},
    }
    if kind == "sr":
        raw["conditioning"] = {"augmentation": augmentation, **conditioning}
        if augmentation == "noise":
            raw["conditioning"].setdefault("noise_timesteps", timesteps)
            raw["conditioning"].setdefault("s_max", timesteps)
    return StageConfig.from_dict(raw)


def make_stage(config: StageConfig, seed: int = 0) -> Stage:
    torch.manual_seed(seed)
    net = build_network(config)
    # zero-initialised output layers make an untrained net constant; perturb so outputs depend on inputs
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return Stage(config, net.eval(), "cpu", source=config.stage.name)


# --- tiny stages trained through the command line ---------------------------------------------------------


def tiny_config(tmp_path: Path, **train) -> StageConfig:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, size=40).astype(np.int64)
    npz = tmp_path / "data.npz"
    np.savez(npz, arr_0=images, arr_1=labels)
    raw = {
        "stage": {"name": "tiny", "resolution": 8, "channels": 1, "num_classes": 3},
        "data": {"source": f"npz:{npz}"},
        "diffusion": {"timesteps": 50, "learn_sigma": True, "loss": "hybrid"},
        "model": {"channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [4], "norm_groups": 8,
                  "dropout": 0.1, "label_dropout": 0.2},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "bf16": False, "log_every": 2,
                  "ckpt_every": 3, "keep_last": 5, "progress": False, "sample_every": 0, "sample_steps": 3,
                  **train},
    }
    return StageConfig.from_dict(raw)


def tiny_raw(npz: Path, **train) -> dict:
    return {
        "stage": {"name": "tiny", "resolution": 8, "channels": 1, "num_classes": 3},
        "data": {"source": f"npz:{npz}"},
        "diffusion": {"timesteps": 20},
        "model": {"channels": 16, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [],
                  "norm_groups": 4},
        "train": {"steps": 6, "batch_size": 8, "bf16": False, "log_every": 2, "ckpt_every": 3, "keep_last": 5,
                  "progress": False, "sample_steps": 2, **train},
    }


def write_data(path: Path, n: int = 40, resolution: int = 8, channels: int = 1, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, arr_0=rng.integers(0, 256, (n, resolution, resolution, channels), dtype=np.uint8),
             arr_1=(np.arange(n) % 3).astype(np.int64))
    return path


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, StageConfig]:
    """A tiny stage config written as TOML, on 40 generated 8x8 images."""
    config = StageConfig.from_dict(tiny_raw(write_data(tmp_path / "data.npz")))
    path = tmp_path / "tiny.toml"
    path.write_text(config.to_toml())
    return path, config


def train_args(cfg: Path, out: Path, *sets: str) -> list[str]:
    args = ["train", str(cfg), "--out", str(out), "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    return args


# the Fashion-MNIST configs shrunk to a few seconds of training
TINY_SETS = ["model.channels=32", "model.norm_groups=8", "model.channel_mult=[1,1]", "model.num_res_blocks=1",
        "model.attention_resolutions=[]",
        "train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.progress=false",
        "train.sample_steps=2", "sample.steps=3", "diffusion.timesteps=50", "conditioning.noise_timesteps=50"]


def train_tiny(config: str, out: Path, data: Path, extra=()):
    """``cdm train configs/fashion-mnist/CONFIG`` for 2 steps at :data:`TINY_SETS` on the images ``data``."""
    args = ["train", str(ROOT / "configs/fashion-mnist" / config), "--out", str(out), "--steps", "2",
            "--device", "cpu", "--set", f"data.source=npz:{data}"]
    tiny = [s for s in TINY_SETS if not (s.startswith("conditioning.") and "noaug" in config)]
    for s in [*tiny, *extra]:
        args += ["--set", s]
    assert main(args) == 0


# --- scripts run in this process ------------------------------------------------------------------------

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def run_script(monkeypatch):
    """``run_script("emoji_study.py", *args) -> (exit status, stdout)``: a script of scripts/ run as ``__main__`` in
    this process (its `cdm` calls too, through scripts/cdm_command.py), not in a fresh interpreter that imports torch
    again: what a user's `python scripts/NAME.py ARGS` does, minus the start-up."""

    def run(name: str, *args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *map(str, args)])
        monkeypatch.syspath_prepend(str(SCRIPTS))
        out = io.StringIO()
        status = 0
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_path(str(SCRIPTS / name), run_name="__main__")
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if status:
                    print(e.code, file=sys.stderr)
        return status, out.getvalue()

    return run


@pytest.fixture
def readme_sample(tmp_path, monkeypatch):
    """``readme_sample("emoji", 36) -> (images, labels)``: README's ``cdm sample --pretrained NAME --num N --out
    s.npz --grid s.png`` run from a directory that is not the checkout, its grid written, its arrays read back."""

    def sample(name: str, num: int) -> tuple[np.ndarray, np.ndarray]:
        monkeypatch.chdir(tmp_path)
        assert main(["sample", "--pretrained", name, "--num", str(num), "--out", "s.npz", "--grid", "s.png",
                     "--quiet"]) == 0
        assert (tmp_path / "s.png").stat().st_size > 0
        with np.load(tmp_path / "s.npz", allow_pickle=False) as f:
            return f["arr_0"], f["arr_1"]

    return sample


def load_module(path: str, name: str):
    """The file ``ROOT/path`` (a script or a benchmark, not a package module) imported as the module ``name``, with
    its folder first on ``sys.path`` as when it runs as a script (for the scripts' ``from cdm_command import``)."""
    folder = str((ROOT / path).parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- checkpoints and data on disk -------------------------------------------------------------------------


def all_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (weights, EMA, optimizer state), keyed ``stem/name``: two runs compared
    bit for bit."""
    return {f"{stem}/{k}": v for stem in ("model", "ema", "optimizer") for k, v in load_tensors(ckpt, stem).items()}


EMOJI_CLASSES = ("0_red", "1_green", "2_blue")


def class_image_folder(root: Path, per_class: int, rng, size: int) -> None:
    """An image folder of :data:`EMOJI_CLASSES`: ``per_class`` RGB PNGs of ``size`` px each, dark noise with a
    square in the class's colour over the middle half."""
    lo, hi = size // 4, 3 * size // 4
    for k, name in enumerate(EMOJI_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            a[lo:hi, lo:hi, k] = 255
            Image.fromarray(a).save(root / name / f"{i}.png")
