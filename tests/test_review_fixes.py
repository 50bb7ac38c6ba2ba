"""Small correctness items and structural checks: a broken import is loud, the default level of a
fixed-s stage, truncated --save-stages, guidance without label dropout, learn_sigma with the simple loss."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bit_identity_cases import TINY
from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.cli import main
from cascaded_diffusion.config import ConfigError, StageConfig
from cascaded_diffusion.stage import Stage, build_network


def test_a_broken_evaluation_import_is_loud():
    code = ("import sys; sys.modules['cascaded_diffusion.evaluation.features'] = None\n"
            "from cascaded_diffusion.cli import main\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "evaluation.features" in proc.stderr


def _stage(raw: dict) -> Stage:
    config = StageConfig.from_dict(raw)
    return Stage(config, build_network(config).eval())


TINY_MODEL = {"channels": 4, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
              "norm_groups": 2}


def test_a_fixed_s_stage_is_sampled_at_its_trained_level_by_default():
    base = _stage({"stage": {"kind": "base", "resolution": 8, "channels": 1}, "model": TINY_MODEL})
    cond = {"augmentation": "noise", "fixed_s": 123}
    sr = _stage({"stage": {"kind": "sr", "resolution": 16, "low_res": 8, "channels": 1}, "model": TINY_MODEL,
                 "conditioning": cond})
    assert Cascade([base, sr]).default_aug_levels() == [123]
    amortized = _stage({"stage": {"kind": "sr", "resolution": 16, "low_res": 8, "channels": 1}, "model": TINY_MODEL,
                        "conditioning": {"augmentation": "noise", "sample_s": 7}})
    assert Cascade([base, amortized]).default_aug_levels() == [7]


def test_truncated_save_stages_skips_the_noisy_base_output(tmp_path, capsys):
    stages = tmp_path / "stages"
    assert main(["sample", *map(str, TINY), "--out", str(tmp_path / "s.npz"), "--num", "2", "--steps", "2",
                 "--truncated", "--aug-level", "10", "--save-stages", str(stages), "--quiet"]) == 0
    assert sorted(p.name for p in stages.iterdir()) == ["stage2_16px.npz"]
    assert "stage 1 handed its noisy z_s on" in capsys.readouterr().out
    assert main(["sample", *map(str, TINY), "--out", str(tmp_path / "t.npz"), "--num", "2", "--steps", "2",
                 "--save-stages", str(tmp_path / "all"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["stage1_8px.npz", "stage2_16px.npz"]


def test_guidance_needs_a_stage_trained_with_label_dropout():
    stage = _stage({"stage": {"kind": "base", "resolution": 8, "channels": 1}, "model": TINY_MODEL})
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="label_dropout"):
        stage.sample(labels, steps=2, guidance=2.0)
    assert stage.sample(labels, steps=2, guidance=1.0).shape == (2, 1, 8, 8)
    guided = _stage({"stage": {"kind": "base", "resolution": 8, "channels": 1},
                     "model": {**TINY_MODEL, "label_dropout": 0.1}})
    assert np.isfinite(guided.sample(labels, steps=2, guidance=2.0).numpy()).all()


def test_learned_variances_need_the_hybrid_loss(tmp_path):
    from cascaded_diffusion.training import Trainer

    config = StageConfig.from_dict({"stage": {"kind": "base", "resolution": 8, "channels": 1}, "model": TINY_MODEL,
                                    "diffusion": {"learn_sigma": True, "loss": "simple"}})  # still loads (old runs)
    with pytest.raises(ConfigError, match="variance head untrained"):
        Trainer(config, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
