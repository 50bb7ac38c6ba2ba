"""The `cdm` command line end to end with tiny stages (real Fashion-MNIST when installed, else npz)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion.cli import main

from conftest import train_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (64, 32, 32, 1), dtype=np.uint8), arr_1=np.arange(64) % 10)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_npz):
    root = tmp_path_factory.mktemp("runs")
    train_tiny("base8.toml", root / "base", data_npz, ["conditioning.s_max=50"])
    train_tiny("sr8to32.toml", root / "sr", data_npz, ["conditioning.s_max=50", "conditioning.sample_s=10"])
    return root


def test_single_stage_sample_writes_evaluator_format_and_grid(runs, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    assert main(["sample", str(runs / "base"), "--num", "20", "--out", str(out), "--grid", str(grid),
                 "--device", "cpu", "--quiet"]) == 0
    with np.load(out) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (20, 8, 8, 1)
        assert f["arr_1"].dtype == np.int64 and sorted(set(f["arr_1"].tolist())) == list(range(10))
    from PIL import Image

    assert Image.open(grid).size[0] > 8


def test_two_stage_cascade_sampling_truncated_and_not(runs, tmp_path):
    for extra in ([], ["--truncated"], ["--aug-level", "20", "--sampler", "ddpm,ddim", "--steps", "4,3"]):
        out = tmp_path / "c.npz"
        assert main(["sample", str(runs / "base"), str(runs / "sr"), "--num", "6", "--out", str(out),
                     "--grid", str(tmp_path / "c.png"), "--device", "cpu", "--quiet",
                     "--save-stages", str(tmp_path / "stages"), *extra]) == 0
        with np.load(out) as f:
            assert f["arr_0"].shape == (6, 32, 32, 1)
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == ["stage1_8px.npz", "stage2_32px.npz"]
    # reuse the saved base samples: run only the SR stage on them
    assert main(["sample", str(runs / "base"), str(runs / "sr"), "--num", "6", "--out", str(tmp_path / "r.npz"),
                 "--low-res-samples", str(tmp_path / "stages/stage1_8px.npz"), "--device", "cpu", "--quiet"]) == 0


def test_wrong_order_is_refused_before_compute(runs, tmp_path, capsys):
    rc = main(["sample", str(runs / "sr"), str(runs / "base"), "--num", "4", "--out", str(tmp_path / "x.npz"),
               "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "super-resolution stage" in err and "Put the base model first" in err
    assert not (tmp_path / "x.npz").exists()


def test_export_then_sample_from_exported_stage(runs, tmp_path):
    assert main(["export", str(runs / "base"), "--out", str(tmp_path / "exp"), "--dtype", "fp16"]) == 0
    meta = json.loads((tmp_path / "exp/stage.json").read_text())
    assert meta["weights"] == "ema" and meta["config"]["stage"]["resolution"] == 8
    assert main(["sample", str(tmp_path / "exp"), "--num", "3", "--out", str(tmp_path / "e.npz"),
                 "--device", "cpu", "--quiet"]) == 0


def test_an_exported_or_bundled_stage_re_exports_with_new_sampling_defaults(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["export", str(runs / "base"), "--out", str(tmp_path / "exp"), "--dtype", "fp16"]) == 0
    assert main(["export", str(tmp_path / "exp"), "--out", str(tmp_path / "re"), "--set", "sample.sampler=dpmpp",
                 "--set", "sample.steps=3"]) == 0
    old, new = (json.loads((tmp_path / d / "stage.json").read_text()) for d in ("exp", "re"))
    assert new["config"]["sample"]["sampler"] == "dpmpp" and new["config"]["sample"]["steps"] == 3
    assert {k: v for k, v in new["config"].items() if k != "sample"} == \
        {k: v for k, v in old["config"].items() if k != "sample"}
    assert new["step"] == old["step"] and new["weights"] == "ema"
    # the weights as they were (fp16 kept unless --dtype says otherwise), so samples differ only by the sampler
    assert (tmp_path / "re/model.safetensors").read_bytes() == (tmp_path / "exp/model.safetensors").read_bytes()
    assert main(["export", str(tmp_path / "exp"), "--out", str(tmp_path / "f32"), "--dtype", "fp32"]) == 0
    tensors = load_file(str(tmp_path / "f32/model.safetensors")).values()
    assert all(str(t.dtype) == "torch.float32" for t in tensors if t.is_floating_point())
    assert main(["export", "pretrained:fashion-mnist/sr8to32_noaug", "--out", str(tmp_path / "sr4"),
                 "--set", "sample.steps=4"]) == 0
    bundled = ROOT / "cascaded_diffusion/pretrained/fashion-mnist/sr8to32_noaug/model.safetensors"
    assert (tmp_path / "sr4/model.safetensors").read_bytes() == bundled.read_bytes()
    assert json.loads((tmp_path / "sr4/stage.json").read_text())["config"]["sample"]["steps"] == 4
    capsys.readouterr()
    # an exported stage holds only its EMA weights, and a bad key names itself
    assert main(["export", str(tmp_path / "exp"), "--out", str(tmp_path / "m"), "--weights", "model"]) == 2
    assert "holding only its ema weights" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "exp"), "--out", str(tmp_path / "k"), "--set", "sample.stepz=3"]) == 2
    assert "sample.stepz" in capsys.readouterr().err


def test_bad_config_key_and_missing_run_dir(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs/fashion-mnist/base8.toml"), "--out", str(tmp_path / "r"),
               "--set", "train.lrr=1"])
    assert rc == 2 and "unknown key 'train.lrr'" in capsys.readouterr().err
    rc = main(["sample", str(tmp_path / "nope"), "--num", "2", "--out", str(tmp_path / "x.npz"), "--device", "cpu"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_sample_compile_flag_compiles_every_stage(tmp_path, monkeypatch):
    from cascaded_diffusion.cascade import Cascade

    modes = []
    real_compile = Cascade.compile

    def compile_cheaply(self, mode=None, backend="inductor"):
        modes.append(mode)
        # dynamo's capture alone (inductor takes minutes on a CPU, aot_eager ~30 s), and only once: the CLI's
        # wiring of the mode is what is tested here; tests/test_cascade.py checks compiled sampling itself
        if len(modes) > 1:
            return self
        return real_compile(self, mode=mode, backend="eager")

    monkeypatch.setattr(Cascade, "compile", compile_cheaply)
    # the tiny fixture cascade (4-channel networks): tracing the bundled one took 36 s of the suite
    tiny = [str(ROOT / "tests/fixtures/tiny_run" / name) for name in ("base8", "sr8to16")]
    for flag, expected in ((["--compile"], None), (["--compile", "reduce-overhead"], "reduce-overhead")):
        out = tmp_path / f"s{len(modes)}.npz"
        assert main(["sample", *tiny, "--num", "4", "--steps", "2", "--out", str(out), "--quiet", *flag]) == 0
        assert modes[-1] == expected and np.load(out)["arr_0"].shape == (4, 16, 16, 1)
    with pytest.raises(SystemExit):
        main(["sample", "--pretrained", "fashion-mnist", "--num", "4", "--out", str(tmp_path / "x.npz"),
              "--compile", "fastest"])
