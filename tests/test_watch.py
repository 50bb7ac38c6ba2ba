"""Training you can watch: TensorBoard image summaries of the sample grids, loss by timestep quartile,
EMA warm-up and learning rate scalars, and the optional periodic KID, from a short real run's event file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cascaded_diffusion.checkpoint import latest_checkpoint, load_state, load_tensors
from cascaded_diffusion.config import ConfigError, StageConfig
from cascaded_diffusion.rundir import read_log
from cascaded_diffusion.training import Trainer
from cascaded_diffusion.watch import LossByTimestep

from conftest import tiny_config

pytest.importorskip("tensorboard", reason="reading event files needs tensorboard (in the test extra)")


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_loss_by_timestep_quartiles():
    q = LossByTimestep(100, torch.device("cpu"))
    q.add(torch.tensor([0, 24, 25, 99, 99]), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0]))
    totals = q.take().tolist()
    assert LossByTimestep.means(totals) == {"loss_q0": 2.0, "loss_q1": 5.0, "loss_q3": 8.0}  # q2 saw no t
    assert q.take().tolist() == [0.0] * 8  # taken means reset


def test_short_run_event_file_has_image_summaries_quartiles_ema_and_kid(tmp_path):
    config = tiny_config(tmp_path, steps=6, sample_every=3, tensorboard=True, eval_every=3, eval_num=16,
                         eval_features="classifier")
    Trainer(config, tmp_path / "run", device="cpu").train()
    acc = events(tmp_path / "run")
    images = acc.Images("samples")
    assert [e.step for e in images] == [3, 6]
    for event in images:  # the summary is the PNG grid the run writes, pixel for pixel
        png = np.asarray(Image.open(tmp_path / "run" / "samples" / f"step_{event.step:08d}.png").convert("RGB"))
        summary = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert (event.width, event.height) == png.shape[1::-1] and np.array_equal(summary, png)
    scalars = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/ema_rate", "train/loss_q0", "train/loss_q3", "eval/kid"):
        assert tag in scalars, (tag, scalars)
    ema = [e.value for e in acc.Scalars("train/ema_rate")]
    assert ema == pytest.approx([2 / 11, 4 / 13, 6 / 15])  # warm-up (1+n)/(10+n) at updates n = 1, 3, 5
    kid = acc.Scalars("eval/kid")
    assert [e.step for e in kid] == [3, 6] and all(abs(e.value) < 10 for e in kid)
    log = read_log(tmp_path / "run")
    kid_records = [r for r in log if "kid" in r]
    assert [r["step"] for r in kid_records] == [3, 6]
    assert kid_records[0]["eval_num"] == 16 and kid_records[0]["eval_features"].startswith("classifier")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    assert all({"ema_rate", "lr"} <= r.keys() and any(f"loss_q{k}" in r for k in range(4)) for r in steps)
    # the stored config records the eval keys (they are set)
    assert load_state(latest_checkpoint(tmp_path / "run"))["config"]["train"]["eval_every"] == 3


def test_watching_changes_neither_the_weights_nor_the_stored_config(tmp_path):
    """TensorBoard, grids and KID draw from their own generators: the trained weights are bit-identical to a run
    without them, and a run that does not set the eval keys stores a config without them (old bytes kept)."""
    plain = tiny_config(tmp_path, steps=4, sample_every=0)
    watched = tiny_config(tmp_path, steps=4, sample_every=2, tensorboard=True, eval_every=2, eval_num=8,
                          eval_features="classifier")
    Trainer(plain, tmp_path / "plain", device="cpu").train()
    Trainer(watched, tmp_path / "watched", device="cpu").train()
    a, b = (latest_checkpoint(tmp_path / d) for d in ("plain", "watched"))
    for stem in ("model", "ema"):
        ta, tb = load_tensors(a, stem), load_tensors(b, stem)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), stem
    stored = load_state(a)["config"]["train"]
    assert not {"eval_every", "eval_num", "eval_features"} & stored.keys()
    assert "eval_" not in json.dumps(plain.to_dict())
    first = [r for r in read_log(tmp_path / "plain") if "loss" in r][0]
    assert {"loss_q0", "loss_q1", "loss_q2", "loss_q3"} & first.keys() and 0 < first["ema_rate"] < 1


def test_eval_needs_a_feature_network():
    base = StageConfig().to_dict()
    base["train"].update(eval_every=100)
    with pytest.raises(ConfigError, match="train.eval_every > 0 needs a feature network"):
        StageConfig.from_dict(base)
    base["train"].update(eval_features="classifier", eval_num=1)
    with pytest.raises(ConfigError, match="train.eval_num"):
        StageConfig.from_dict(base)
