"""The precision every command runs its networks in. ``auto`` (the default everywhere) is bf16 only where
the hardware does bf16 natively; ``bf16`` / ``fp32`` are always obeyed. The decision is pinned here for each kind
of hardware by mocking what torch and oneDNN report, and once for real under the AVX2 emulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascaded_diffusion import hardware
from cascaded_diffusion.config import ConfigError, StageConfig, load_config
from cascaded_diffusion.errors import UserError
from cascaded_diffusion.hardware import choose_precision

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [ROOT / "tests/fixtures/tiny_run/base8", ROOT / "tests/fixtures/tiny_run/sr8to16"]

ZEN3 = {"avx2": True, "fma3": True}  # AVX2 only: the machine
SKYLAKE_X = {**ZEN3, "avx512_f": True, "avx512_bw": True, "avx512_vl": True}  # AVX-512 without bf16 instructions
ZEN4 = {**SKYLAKE_X, "avx512_bf16": True}
SAPPHIRE_RAPIDS = {**ZEN4, "amx_tile": True, "amx_bf16": True}


def mock_cpu(monkeypatch, flags, *, onednn_bf16=None, aten="AVX512", machine="x86_64", env=None):
    """Make this process look like another CPU to :func:`choose_precision`. ``onednn_bf16`` is what
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` says (default: AVX-512 core present, as oneDNN does)."""
    if onednn_bf16 is None:
        onednn_bf16 = bool(flags.get("avx512_bw"))
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: dict(flags))
    monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (env or {}).items():
        monkeypatch.setenv(var, value)


CPU_CASES = {
    # name: (flags, extra mock arguments, auto's choice, a word its reason must contain)
    "zen3_avx2": (ZEN3, {"aten": "AVX2"}, "fp32", "no native bf16"),
    "skylake_avx512_no_bf16": (SKYLAKE_X, {}, "fp32", "no native bf16"),
    "zen4_avx512_bf16": (ZEN4, {}, "bf16", "avx512_bf16"),
    "sapphire_rapids_amx": (SAPPHIRE_RAPIDS, {}, "bf16", "AMX"),
    "zen4_onednn_capped_avx2": (ZEN4, {"env": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "onednn_bf16": False}, "fp32",
                                "ONEDNN_MAX_CPU_ISA"),
    # capped at AVX-512 core oneDNN still calls bf16 "supported" but converts it in software: not native
    "zen4_onednn_capped_avx512_core": (ZEN4, {"env": {"ONEDNN_MAX_CPU_ISA": "avx512_core"}}, "fp32",
                                       "ONEDNN_MAX_CPU_ISA"),
    "zen4_dnnl_capped": (ZEN4, {"env": {"DNNL_MAX_CPU_ISA": "AVX2"}}, "fp32", "DNNL_MAX_CPU_ISA"),
    "zen4_onednn_says_no": (ZEN4, {"onednn_bf16": False}, "fp32", "oneDNN"),
    "zen4_aten_capped_avx2": (ZEN4, {"aten": "AVX2"}, "fp32", "ATEN_CPU_CAPABILITY"),
    "zen4_onednn_capped_at_bf16": (ZEN4, {"env": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}}, "bf16", "avx512_bf16"),
    "arm_cpu": ({}, {"machine": "aarch64", "onednn_bf16": True}, "fp32", "aarch64"),
}


@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_auto_decision_for_each_cpu(case, monkeypatch):
    flags, extra, want, word = CPU_CASES[case]
    mock_cpu(monkeypatch, flags, **extra)
    for requested in ("auto", None):
        chosen = choose_precision(requested, "cpu")
        assert chosen.name == want and chosen.bf16 == (want == "bf16")
        assert word in chosen.reason and chosen.describe().startswith(f"precision {want} (auto: ")
    # an explicit choice is obeyed on every kind of hardware, and says what auto would have done
    for requested in ("bf16", "fp32"):
        chosen = choose_precision(requested, "cpu")
        assert chosen.name == requested and chosen.requested == requested
        assert "as asked" in chosen.describe() and word in chosen.reason


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp32")])
def test_auto_decision_on_cuda(native, want, monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    chosen = choose_precision("auto", "cuda")
    assert chosen.name == want and "Some GPU" in chosen.reason
    assert asked == [False]  # emulated bf16 (pre-Ampere) does not count as native
    assert choose_precision("fp32", "cuda").name == "fp32" and choose_precision("bf16", "cuda").name == "bf16"


def test_auto_is_fp32_on_mps_and_bad_names_are_refused():
    assert choose_precision("auto", "mps").name == "fp32"
    assert choose_precision("bf16", "mps").name == "bf16"
    with pytest.raises(UserError, match="'fp16' is not one of auto, bf16, fp32"):
        choose_precision("fp16", "cpu")


def _decide_in_subprocess(env: dict) -> dict:
    code = ("import json; from cascaded_diffusion.hardware import choose_precision as c; p = c('auto', 'cpu'); "
            "print(json.dumps({'name': p.name, 'reason': p.reason}))")
    full = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_avx2_emulation_really_makes_auto_pick_fp32():
    """Not mocked: the environment variables docs/performance.md uses to emulate an AVX2-only CPU reach torch and
    oneDNN, and auto follows them (on a CPU without native bf16 it is fp32 either way)."""
    got = _decide_in_subprocess({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert got["name"] == "fp32", got
    if hardware.cpu_bf16_support()[0]:  # this CPU has native bf16: only the oneDNN cap removes it
        assert _decide_in_subprocess({"ONEDNN_MAX_CPU_ISA": "AVX2"})["name"] == "fp32"
        assert _decide_in_subprocess({"ATEN_CPU_CAPABILITY": "avx2"})["name"] == "fp32"


# --- the config: train.precision, and the old train.bf16 ------------------------------------------------------


def _config(tmp_path, text, overrides=()):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path, list(overrides)).train.precision


def test_train_precision_defaults_to_auto_and_old_bf16_configs_load(tmp_path):
    assert StageConfig().train.precision == "auto"
    assert _config(tmp_path, "[train]\n") == "auto"
    assert _config(tmp_path, "[train]\nbf16 = true\n") == "bf16"  # an old run resumes as it was trained
    assert _config(tmp_path, "[train]\nbf16 = false\n") == "fp32"
    assert _config(tmp_path, '[train]\nprecision = "fp32"\n') == "fp32"
    # an override replaces the file's setting in either spelling
    assert _config(tmp_path, "[train]\nbf16 = true\n", ["train.precision=auto"]) == "auto"
    assert _config(tmp_path, '[train]\nprecision = "auto"\n', ["train.bf16=false"]) == "fp32"
    # the resolved config written into run directories says precision, and reads back
    written = StageConfig().to_toml()
    assert 'precision = "auto"' in written and "bf16" not in written


def test_bad_precision_configs_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.precision = 'fp16' is not one of 'auto', 'bf16', 'fp32'"):
        _config(tmp_path, '[train]\nprecision = "fp16"\n')
    with pytest.raises(ConfigError, match=r"train\.bf16 and train\.precision are both set"):
        _config(tmp_path, '[train]\nbf16 = true\nprecision = "fp32"\n')


def test_shipped_configs_and_bundles_load_with_their_precision():
    configs = sorted(p for p in (ROOT / "configs").glob("*/*.toml") if not p.name.startswith("distill_"))  # stage configs
    assert configs
    for path in configs:
        assert load_config(path).train.precision == "auto", path
    from cascaded_diffusion.cascade import Cascade

    # run directories and bundles written before train.precision existed store `bf16 = false/true`: unchanged bytes, still loading
    assert "bf16 = false" in (TINY_RUN[0] / "config.toml").read_text()
    for stage in Cascade.load(TINY_RUN).stages:
        assert stage.config.train.precision == "fp32"
    bundle = next((ROOT / "cascaded_diffusion/pretrained/fashion-mnist").glob("*/stage.json"))
    assert '"bf16": true' in bundle.read_text()
    for stage in Cascade.load(pretrained="fashion-mnist").stages:
        assert stage.config.train.precision == "bf16"


# --- the commands: auto by default, an explicit choice obeyed, the choice printed ---------------------------


@pytest.fixture
def autocast_calls(monkeypatch):
    """Whether each network call of sampling ran under bf16 autocast."""
    from cascaded_diffusion import stage as stage_module

    calls: list[bool] = []
    real = stage_module.bf16_autocast

    def spy(device, enabled=True):
        calls.append(bool(enabled.bf16 if isinstance(enabled, hardware.Precision) else enabled))
        return real(device, enabled)

    monkeypatch.setattr(stage_module, "bf16_autocast", spy)
    return calls


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("option, want", [(None, None), ("auto", None), ("bf16", True), ("fp32", False)])
def test_cdm_sample_precision(option, want, native, monkeypatch, tmp_path, capsys, autocast_calls):
    from cascaded_diffusion.cli import main

    mock_cpu(monkeypatch, ZEN4 if native else ZEN3)
    want = native if want is None else want
    args = ["sample", str(TINY_RUN[0]), "--num", "2", "--steps", "1", "--out", str(tmp_path / "s.npz"),
            "--device", "cpu", "--quiet"]
    assert main(args + (["--precision", option] if option else [])) == 0
    assert autocast_calls and set(autocast_calls) == {want}
    err = capsys.readouterr().out
    assert f"cdm sample: precision {'bf16' if want else 'fp32'} (" in err
    assert ("(auto: " in err) == (option in (None, "auto"))


@pytest.mark.parametrize("option", [None, "bf16", "fp32"])
def test_cdm_cas_and_classifier_follow_the_same_rule(option, monkeypatch, tmp_path, capsys):
    """Their classifier trains in the precision chosen (mocked training: the wiring is what is tested here)."""
    import numpy as np

    from cascaded_diffusion.cli import evaluate as evaluate_cli
    from cascaded_diffusion.cli import main

    mock_cpu(monkeypatch, ZEN3)  # no native bf16: auto is fp32
    want = {None: False, "bf16": True, "fp32": False}[option]
    seen = []

    def fake_cas(images, labels, test_images, test_labels, num_classes, recipe, **kwargs):
        seen.append(recipe.bf16)
        return {"top1": 0.5, "top5": 0.9, "n_train": len(images), "n_test": len(test_images)}

    monkeypatch.setattr(evaluate_cli, "classification_accuracy_score", fake_cas)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), arr_1=np.arange(20) % 10)
    extra = ["--precision", option] if option else []
    out = tmp_path / "cas.json"
    assert main(["cas", str(data), "--test", f"npz:{data}", "--device", "cpu", "--out", str(out), *extra]) == 0
    assert seen == [want] and json.loads(out.read_text())["precision"] == ("bf16" if want else "fp32")
    assert f"cdm cas: precision {'bf16' if want else 'fp32'}" in capsys.readouterr().out

    trained = []

    def fake_train(images, labels, num_classes, recipe, **kwargs):
        trained.append(recipe.bf16)
        raise RuntimeError("stop after the precision was passed")

    monkeypatch.setattr(evaluate_cli, "train_classifier", fake_train)
    with pytest.raises(RuntimeError, match="stop after"):
        main(["classifier", "train", "--data", f"npz:{data}", "--out", str(tmp_path / "c.safetensors"),
              "--resolution", "8", "--device", "cpu", *extra])
    assert trained == [want]
    assert f"cdm classifier train: precision {'bf16' if want else 'fp32'}" in capsys.readouterr().out


def test_classifier_recipe_defaults_to_auto(monkeypatch):
    """The Python API: train_classifier without bf16= records (and uses) the hardware's choice."""
    import numpy as np

    from cascaded_diffusion.evaluation.classifier import ClassifierConfig, ClassifierRecipe, train_classifier

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), np.arange(8) % 2
    config = ClassifierConfig(num_classes=2, in_channels=1, resolution=8)
    for flags, want in ((ZEN3, False), (ZEN4, True)):
        mock_cpu(monkeypatch, flags)
        _, history = train_classifier(images, labels, 2, ClassifierRecipe(steps=1, batch_size=4), progress=False,
                                      config=config)
        assert history.recipe["bf16"] is want


@pytest.mark.parametrize("option, want", [(None, "fp32"), ("bf16", "bf16")])
def test_cdm_train_precision(option, want, monkeypatch, tmp_path, capsys):
    """train.precision = "auto" in the shipped configs trains in fp32 without native bf16; --precision wins."""
    import numpy as np

    from cascaded_diffusion import stage
    from cascaded_diffusion.cli import main
    from cascaded_diffusion.hardware import Precision

    mock_cpu(monkeypatch, ZEN3)
    used = []
    real = stage.bf16_autocast

    def recording(device, enabled=True):  # the training step passes the trainer's Precision (the grid a bool)
        if isinstance(enabled, Precision):
            used.append(enabled.name)
        return real(device, enabled)

    monkeypatch.setattr(stage, "bf16_autocast", recording)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), arr_1=np.arange(16) % 10)
    tiny = ["model.channels=8", "model.norm_groups=2", "model.channel_mult=[1]", "model.attention_resolutions=[]",
            "train.batch_size=4", "train.progress=false", "train.sample_steps=1", "diffusion.timesteps=10",
            f"data.source=npz:{data}", "data.prefetch=0"]
    args = ["train", str(ROOT / "configs/fashion-mnist/base8.toml"), "--out", str(tmp_path / "run"), "--steps", "1",
            "--device", "cpu"]
    for s in tiny:
        args += ["--set", s]
    assert main(args + (["--precision", option] if option else [])) == 0
    assert used and set(used) == {want}
    out = capsys.readouterr().out
    assert f"train.precision = '{option or 'auto'}': precision {want}" in out
    # the run directory keeps what was asked ("auto" stays auto: a resume on another machine decides again)
    assert f'precision = "{option or "auto"}"' in (tmp_path / "run/config.toml").read_text()
