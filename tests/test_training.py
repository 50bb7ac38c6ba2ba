"""The trainer: bitwise resume, non-finite loss handling, run-dir checks, 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascaded_diffusion.checkpoint import latest_checkpoint, list_checkpoints, load_state, load_tensors
from cascaded_diffusion.config import ConfigError, StageConfig
from cascaded_diffusion.rundir import read_log
from cascaded_diffusion.training import NonFiniteLossError, Trainer

from conftest import all_tensors, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    config = tiny_config(tmp_path)
    Trainer(config, tmp_path / "straight", device="cpu").train()
    # interrupted after 4 steps (a checkpoint exists at step 3), resumed to 6
    Trainer(config, tmp_path / "resumed", device="cpu", stop_after=4).train()
    # simulate preemption: lose everything after the step-3 checkpoint
    for ckpt in list_checkpoints(tmp_path / "resumed"):
        if load_state(ckpt)["step"] > 3:
            import shutil

            shutil.rmtree(ckpt)
    Trainer(config, tmp_path / "resumed", device="cpu").train()
    a = all_tensors(latest_checkpoint(tmp_path / "straight"))
    b = all_tensors(latest_checkpoint(tmp_path / "resumed"))
    assert load_state(latest_checkpoint(tmp_path / "resumed"))["step"] == 6
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log is appended to, never rewritten: the records of the lost step 4 stay in the file, voided by the
    # resume record, so read_log gives each step once, as logged by the run that kept it
    lines = [json.loads(l) for l in (tmp_path / "resumed/log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in lines if "event" in r] == [("start", 0), ("resume", 3)]
    records = [r for r in lines if "event" not in r]
    assert [r["step"] for r in records] == [2, 4, 4, 6]
    assert read_log(tmp_path / "resumed") == [records[0], records[2], records[3]]
    # the sample grid at the end of the run was written
    assert (tmp_path / "resumed/samples/step_00000006.png").is_file()


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, steps=12)
    trainer = Trainer(config, tmp_path / "run", device="cpu")
    real_step = trainer.train_step

    def poisoned_step():
        loss, norm = real_step()
        if trainer.step >= 5:  # from step 5 on the loss (and then the weights) go NaN
            with torch.no_grad():
                for p in trainer.net.parameters():
                    p.fill_(float("nan"))
            loss = loss * float("nan")
        return loss, norm

    monkeypatch.setattr(trainer, "train_step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match="non-finite.*last good checkpoint is kept"):
        trainer.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert load_state(ckpt)["step"] == 3
    assert all(torch.isfinite(v).all() for v in load_tensors(ckpt, "model").values())
    last = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[-1])
    assert last["error"] == "non-finite loss"


def test_resume_with_a_different_network_is_refused(tmp_path):
    config = tiny_config(tmp_path, steps=3)
    Trainer(config, tmp_path / "run", device="cpu").train()
    other = StageConfig.from_dict({**config.to_dict(), "model": {**config.to_dict()["model"], "channels": 64}})
    with pytest.raises(ConfigError, match="different network.*model.channels"):
        Trainer(other, tmp_path / "run", device="cpu").train()


def test_labels_beyond_num_classes_are_refused(tmp_path):
    config = tiny_config(tmp_path)
    bad = StageConfig.from_dict({**config.to_dict(), "stage": {**config.to_dict()["stage"], "num_classes": 2}})
    with pytest.raises(ConfigError, match="num_classes = 2 but the data"):
        Trainer(bad, tmp_path / "run", device="cpu").train()


def test_two_process_ddp_on_cpu(tmp_path):
    config = tiny_config(tmp_path, steps=4, ckpt_every=2)
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(config.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cascaded_diffusion.cli", "train", str(cfg_path), "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = latest_checkpoint(tmp_path / "ddp")
    state = load_state(ckpt)
    assert state["step"] == 4 and state["world_size"] == 2
    rng = load_tensors(ckpt, "rng")
    assert {"rank0.generator", "rank1.generator"} <= set(rng)
    # ranks draw different noise: their generator states differ
    assert not torch.equal(rng["rank0.generator"], rng["rank1.generator"])
    # only rank 0 wrote: one log line per logged step
    steps = [r["step"] for r in read_log(tmp_path / "ddp")]
    assert steps == [2, 4]
    assert sum("event" in json.loads(l) for l in (tmp_path / "ddp/log.jsonl").read_text().splitlines()) == 1
    # and the run resumes under DDP too
    proc = subprocess.run(cmd[:-4] + ["--steps", "6"] + cmd[-4:], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_state(latest_checkpoint(tmp_path / "ddp"))["step"] == 6


def test_prepared_source_trains_and_resumes_bitwise_with_and_without_prefetch(tmp_path):
    from PIL import Image

    from cascaded_diffusion.data.prepare import prepare_dataset

    rng = np.random.default_rng(1)
    for c in range(3):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 256, (int(rng.integers(8, 20)), int(rng.integers(8, 20)), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    prepare_dataset(tmp_path / "folder", [8, 16], tmp_path / "prepared", workers=1)
    raw = tiny_config(tmp_path, steps=4, ckpt_every=2).to_dict()
    raw["stage"]["channels"] = 3
    raw["data"]["source"] = f"prepared:{tmp_path / 'prepared'}"

    def config(prefetch: int) -> StageConfig:
        return StageConfig.from_dict({**raw, "data": {**raw["data"], "prefetch": prefetch}})

    # the batches read on the training thread (prefetch 0) ...
    Trainer(config(0), tmp_path / "straight", device="cpu").train()
    # ... equal those read ahead by the loader, across an interruption: stopped after 3 steps, the step-3
    # work lost, resumed from the step-2 checkpoint at the exact data position
    Trainer(config(2), tmp_path / "resumed", device="cpu", stop_after=3).train()
    for ckpt in list_checkpoints(tmp_path / "resumed"):
        if load_state(ckpt)["step"] > 2:
            import shutil

            shutil.rmtree(ckpt)
    Trainer(config(2), tmp_path / "resumed", device="cpu").train()
    straight, resumed = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    assert load_state(resumed)["step"] == 4 and load_state(resumed)["data_stream"] == load_state(straight)["data_stream"]
    a, b = all_tensors(straight), all_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
