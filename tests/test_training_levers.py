"""Training levers of the convergence study: SR crop training, kept checkpoints, loading one checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cascaded_diffusion.augment import downsample
from cascaded_diffusion.checkpoint import list_checkpoints
from cascaded_diffusion.config import ConfigError, StageConfig
from cascaded_diffusion.stage import Stage
from cascaded_diffusion.training import Trainer


def sr_config(tmp_path: Path, **train) -> StageConfig:
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    np.savez(npz, arr_0=rng.integers(0, 256, size=(24, 16, 16, 1), dtype=np.uint8),
             arr_1=rng.integers(0, 3, size=24).astype(np.int64))
    raw = {
        "stage": {"name": "sr", "kind": "sr", "resolution": 16, "low_res": 4, "channels": 1, "num_classes": 3},
        "data": {"source": f"npz:{npz}"},
        "diffusion": {"timesteps": 40, "prediction": "v", "learn_sigma": True, "loss": "hybrid",
                      "loss_weighting": "min_snr"},
        "model": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8],
                  "norm_groups": 4},
        "conditioning": {"augmentation": "noise", "noise_timesteps": 40, "s_max": 20},
        "train": {"steps": 4, "batch_size": 6, "lr": 1e-3, "bf16": False, "log_every": 2, "ckpt_every": 2,
                  "progress": False, "sample_every": 0, "sample_steps": 2, **train},
    }
    return StageConfig.from_dict(raw)


def test_crop_is_the_same_region_of_image_and_conditioning(tmp_path):
    trainer = Trainer(sr_config(tmp_path, crop=8), tmp_path / "run", device="cpu")
    trainer._build()
    x0 = torch.randn(5, 1, 16, 16)
    low = downsample(x0, 4)
    full_cond = trainer.net.upsample_low_res(low, (16, 16))
    crops, cond = trainer._crop(x0, low)
    assert crops.shape == cond.shape == (5, 1, 8, 8)
    for i in range(5):
        # find the crop's offset in the image and check the conditioning comes from the same place
        hits = [(r, c) for r in range(0, 9) for c in range(0, 9) if torch.equal(x0[i, :, r:r + 8, c:c + 8], crops[i])]
        assert len(hits) == 1
        r, c = hits[0]
        assert r % 4 == 0 and c % 4 == 0  # aligned with low-res pixels (ratio 4) and the network's 2x levels
        assert torch.equal(cond[i], full_cond[i, :, r:r + 8, c:c + 8])
    # offsets vary over the batch (two positions per axis: 4 combinations for 5 examples)
    again, _ = trainer._crop(x0.repeat(4, 1, 1, 1), low.repeat(4, 1, 1, 1))
    assert len({tuple(a.flatten()[:3].tolist()) for a in again}) > 1


def test_crop_trained_model_samples_at_full_size(tmp_path):
    summary = Trainer(sr_config(tmp_path, crop=8), tmp_path / "run", device="cpu").train()
    assert summary.last_loss is not None and np.isfinite(summary.last_loss)
    stage = Stage.load(tmp_path / "run")
    low = torch.zeros(2, 1, 4, 4)
    out = stage.sample(torch.tensor([0, 1]), low_res=low, aug_level=torch.full((2,), 125.0), steps=2)
    assert out.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("crop, message", [(6, "resolution / low_res = 4"), (32, r"\(0, 16\]"), (-4, r"\(0, 16\]")])
def test_bad_crop_names_the_key(tmp_path, crop, message):
    with pytest.raises(ConfigError, match=rf"train\.crop.*{message}"):
        sr_config(tmp_path, crop=crop)


def test_crop_refused_for_a_base_stage(tmp_path):
    raw = sr_config(tmp_path).to_dict()
    raw["stage"].update(kind="base", low_res=0)
    raw["train"]["crop"] = 8
    with pytest.raises(ConfigError, match="train.crop.*SR stages"):
        StageConfig.from_dict(raw)


def test_keep_steps_survive_pruning_and_load_as_stages(tmp_path):
    config = sr_config(tmp_path, steps=7, ckpt_every=4, keep_last=1, keep_steps=[1, 3])
    Trainer(config, tmp_path / "run", device="cpu").train()
    kept = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert kept == ["step_00000001", "step_00000003", "step_00000007"]  # step 4 pruned, 1 and 3 kept
    early = Stage.load(tmp_path / "run" / "checkpoints" / "step_00000003")
    latest = Stage.load(tmp_path / "run")
    assert (early.step, latest.step) == (3, 7)
    assert not torch.equal(next(early.net.parameters()), next(latest.net.parameters()))
