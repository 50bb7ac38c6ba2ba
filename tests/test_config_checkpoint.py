"""Config validation and atomic, pickle-free checkpoints."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from cascaded_diffusion.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_state,
    load_tensors,
    load_weights_into,
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    save_checkpoint,
)
from cascaded_diffusion.config import ConfigError, StageConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]
# stage configs; the distillation configs (distill_*.toml) are checked in tests/test_distillation.py
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.toml") if not p.name.startswith("distill_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load_and_round_trip(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shipped config may trip a validation warning
        config = load_config(path)
    again = StageConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    import tomllib

    assert StageConfig.from_dict(tomllib.loads(config.to_toml())) == config


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'"):
        load_config(write(tmp_path, "[train]\nlrr = 1e-4\n"))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[trian\]"):
        load_config(write(tmp_path, "[trian]\nlr = 1e-4\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size must be int, got str"):
        load_config(write(tmp_path, '[train]\nbatch_size = "64"\n'))
    with pytest.raises(ConfigError, match=r"train\.channels_last must be bool"):
        load_config(write(tmp_path, "[train]\nchannels_last = 1\n"))
    with pytest.raises(ConfigError, match=r"train\.bf16 must be true or false"):  # the old spelling of precision
        load_config(write(tmp_path, "[train]\nbf16 = 1\n"))


def test_bad_choice_and_semantics(tmp_path):
    with pytest.raises(ConfigError, match=r"diffusion\.prediction = 'score' is not one of"):
        load_config(write(tmp_path, '[diffusion]\nprediction = "score"\n'))
    with pytest.raises(ConfigError, match=r"stage\.low_res"):
        load_config(write(tmp_path, '[stage]\nkind = "sr"\nresolution = 32\nlow_res = 32\n'))
    with pytest.raises(ConfigError, match=r"diffusion\.loss.*learn_sigma"):
        load_config(write(tmp_path, '[diffusion]\nloss = "hybrid"\nlearn_sigma = false\n'))


def test_one_channel_per_norm_group_warns(tmp_path):
    # 32 channels in 32 groups: every group norm would strip each feature map's mean (the samples' brightness)
    with pytest.warns(UserWarning, match=r"model\.norm_groups = 32 puts one channel in each group"):
        load_config(write(tmp_path, "[model]\nchannels = 32\nchannel_mult = [1, 2]\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(write(tmp_path, "[model]\nchannels = 32\nchannel_mult = [1, 2]\nnorm_groups = 8\n"))


def test_overrides():
    assert parse_override("train.lr=2e-4") == (["train", "lr"], 2e-4)
    assert parse_override("data.source=npz:/x/y.npz") == (["data", "source"], "npz:/x/y.npz")
    assert parse_override("model.channel_mult=[1,2]") == (["model", "channel_mult"], [1, 2])
    config = load_config(ROOT / "configs/fashion-mnist/base8.toml", ["train.steps=7", "model.dropout=0.0"])
    assert config.train.steps == 7 and config.model.dropout == 0.0
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_config(ROOT / "configs/fashion-mnist/base8.toml", ["train.stepz=7"])


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_state_to_flat(opt.state_dict())
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, {"model": model.state_dict(), "optimizer": tensors},
                        {"optimizer": meta, "config": {}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    ckpt = latest_checkpoint(tmp_path)
    state = load_state(ckpt)
    assert state["step"] == 40
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(optimizer_state_from_flat(load_tensors(ckpt, "optimizer"), state["optimizer"]))
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    # checkpoints hold no pickles: every tensor file is safetensors, metadata is JSON
    assert all(f.suffix in (".safetensors", ".json") for f in ckpt.iterdir())


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, {"config": {}})
    import cascaded_diffusion.checkpoint as ck

    calls = {"n": 0}
    real = ck.write_bytes_durably

    def disk_full(path, data):
        calls["n"] += 1
        if calls["n"] == 1:
            real(path, data[: len(data) // 2])  # a half-written file, then the disk is full
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "write_bytes_durably", disk_full)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoint is intact"):
        save_checkpoint(tmp_path, 2, {"model": model.state_dict()}, {"config": {}})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    loaded = load_tensors(latest_checkpoint(tmp_path), "model")
    assert torch.equal(loaded["weight"], model.weight)


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    """A process killed mid-write (SIGKILL, no cleanup) leaves a hidden temp dir that is ignored."""
    import subprocess
    import sys
    import textwrap

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 1, {"model": model.state_dict()}, {"config": {}})
    script = textwrap.dedent(f"""
        import os, signal, torch
        import cascaded_diffusion.checkpoint as ck
        real = ck.write_bytes_durably
        def die(path, data):
            real(path, data[:10])
            os.kill(os.getpid(), signal.SIGKILL)
        ck.write_bytes_durably = die
        ck.save_checkpoint({str(tmp_path)!r}, 2, {{"model": torch.nn.Linear(3, 2).state_dict()}}, {{"config": {{}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert torch.equal(load_tensors(latest_checkpoint(tmp_path), "model")["weight"], model.weight)


def test_wrong_weights_are_refused_clearly(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": torch.nn.Linear(3, 2).state_dict()}, {"config": {}})
    with pytest.raises(CheckpointError, match="do not fit this network.*different shape"):
        load_weights_into(torch.nn.Linear(4, 2), load_tensors(latest_checkpoint(tmp_path), "model"), "x")
    with pytest.raises(CheckpointError, match="missing"):
        load_weights_into(torch.nn.Sequential(torch.nn.Linear(3, 2)), load_tensors(latest_checkpoint(tmp_path), "model"), "x")


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, {"model": torch.nn.Linear(3, 2).state_dict()}, {"config": {}})
    f = latest_checkpoint(tmp_path) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_tensors(latest_checkpoint(tmp_path), "model")


def test_cudnn_benchmark_switch(tmp_path):
    """train.cudnn_benchmark (default on, as the GPU benchmark runs) sets cuDNN's autotuning for a CUDA training
    process; a config stored before the key existed loads with the default."""
    from cascaded_diffusion.hardware import configure_cuda_backends

    assert load_config(write(tmp_path, "[train]\nsteps = 3\n")).train.cudnn_benchmark is True
    with pytest.raises(ConfigError, match=r"train\.cudnn_benchmark must be bool"):
        load_config(write(tmp_path, '[train]\ncudnn_benchmark = "yes"\n'))
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        for enabled in (False, True):
            config = load_config(write(tmp_path, f"[train]\ncudnn_benchmark = {str(enabled).lower()}\n"))
            configure_cuda_backends(config.train.cudnn_benchmark)
            assert torch.backends.cudnn.benchmark is enabled
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved
