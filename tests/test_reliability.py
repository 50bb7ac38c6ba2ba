"""Concurrent use, full disks, interrupted runs and bad input end in a one-line error or a recovery,
never in a traceback, a silent wrong number or lost data. One test (or more) per case of docs/reliability.md."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascaded_diffusion import checkpoint as checkpoint_module
from cascaded_diffusion import fileio
from cascaded_diffusion.fileio import atomic_write_bytes
from cascaded_diffusion.checkpoint import (
    clean_run_dir,
    latest_valid_checkpoint,
    list_checkpoints,
    load_state,
    load_tensors,
    save_checkpoint,
)
from cascaded_diffusion.cli import main
from cascaded_diffusion.data import load_images
from cascaded_diffusion.errors import RunLockedError
from cascaded_diffusion.evaluation.stats import FeatureStats
from cascaded_diffusion.rundir import CONFIG_HEADER, RunLock, read_log
from cascaded_diffusion.training import Trainer

from conftest import train_args, write_data

ROOT = Path(__file__).resolve().parents[1]
BASE8 = str(ROOT / "configs/fashion-mnist/base8.toml")


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def under_a_file(tmp_path: Path, name: str) -> Path:
    """A path whose parent is a regular file: unwritable even for root (tests run as root, where chmod is moot)."""
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("x")
    return blocker / name


# --- 1. a run directory has one trainer at a time --------------------------------------------------------


def test_second_trainer_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(tiny, tmp_path, capsys):
    cfg, _ = tiny
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-m", "cascaded_diffusion.cli",
         *train_args(cfg, run, "train.steps=100000", "train.ckpt_every=100000", "train.log_every=100000")],
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads((run / ".lock").read_text())["pid"] == holder.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first trainer never took the lock")
        # the second trainer (another seed) is refused before it touches anything
        assert main(train_args(cfg, run, "train.seed=1", "train.steps=2")) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err and "in use by another trainer" in err
        assert "Traceback" not in err
        if (run / "config.toml").exists():
            assert "seed = 1" not in (run / "config.toml").read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    # the kernel dropped the dead holder's lock: a resume is not blocked by its leftover .lock file
    assert main(train_args(cfg, run, "train.steps=2")) == 0
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert [r["step"] for r in read_log(run)] == [2]


def test_run_lock_in_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path):
        pass


# --- 2. absurd npz labels are refused before anything is allocated -----------------------------------------


@pytest.fixture
def huge_label_npz(tmp_path) -> Path:
    path = tmp_path / "h.npz"
    np.savez(path, arr_0=np.zeros((20, 8, 8, 1), np.uint8), arr_1=np.array([10**10] + [0] * 19))
    return path


def test_npz_label_of_ten_billion_is_refused_everywhere(huge_label_npz, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="arr_1 has label 10000000000; labels must be class indices 0..99999"):
        load_images(f"npz:{huge_label_npz}", 8)
    samples = write_data(tmp_path / "s.npz", resolution=8)
    for args in (
        ["train", BASE8, "--out", str(tmp_path / "run"), "--device", "cpu", "--set", f"data.source=npz:{huge_label_npz}"],
        ["stats", f"npz:{huge_label_npz}", "--out", str(tmp_path / "st.npz"), "--features", "classifier",
         "--device", "cpu"],
        ["cas", str(samples), "--test", f"npz:{huge_label_npz}", "--device", "cpu"],
        ["sample", "--pretrained", "fashion-mnist", "--low-res-samples", str(huge_label_npz), "--num", "4",
         "--out", str(tmp_path / "x.npz"), "--device", "cpu", "--quiet"],
    ):
        assert main(args) == 2, args[0]
        err = capsys.readouterr().err
        assert "label 10000000000" in err and "Traceback" not in err, (args[0], err)


# --- 3. statistics files are written atomically; a corrupt one is a clear error ----------------------------


@pytest.fixture
def stats_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    return write_data(tmp_path / "ref32.npz", n=24, resolution=32)


def test_stats_write_is_atomic_and_a_corrupt_stats_file_is_a_one_line_error(stats_env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ref_stats.npz"
    stats_cmd = ["stats", f"npz:{stats_env}", "--out", str(out), "--features", "classifier", "--device", "cpu"]
    assert main(stats_cmd) == 0
    before = out.read_bytes()

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "write_bytes_durably", full_disk)
    assert main(stats_cmd) == 2
    err = capsys.readouterr().err
    assert f"{out}: could not write it (No space left on device)" in err and "Traceback" not in err
    monkeypatch.undo()
    assert out.read_bytes() == before, "the previous statistics file was damaged"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # a statistics file cut short (by a kill under the old code, or a copy) is named, not a BadZipFile traceback
    out.write_bytes(before[: len(before) // 2])
    samples = write_data(tmp_path / "s32.npz", n=12, resolution=32)
    assert main(["eval", str(samples), "--ref", str(out), "--out", str(tmp_path / "m.json"),
                 "--features", "classifier", "--metrics", "fid", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not a readable statistics file" in err and "cdm stats" in err and "Traceback" not in err


# --- 4. eval refuses samples of another resolution or channel count than the reference ---------------------


def test_eval_refuses_mismatched_resolution_and_channels(stats_env, tmp_path, capsys):
    ref = tmp_path / "ref_stats.npz"
    assert main(["stats", f"npz:{stats_env}", "--out", str(ref), "--features", "classifier", "--device", "cpu"]) == 0
    stats = FeatureStats.load(ref)
    assert (stats.resolution, stats.channels) == (32, 1)

    def run_eval(samples):
        return main(["eval", str(samples), "--ref", str(ref), "--out", str(tmp_path / "m.json"),
                     "--features", "classifier", "--metrics", "fid", "--device", "cpu"])

    assert run_eval(write_data(tmp_path / "s8.npz", n=12, resolution=8)) == 2
    err = capsys.readouterr().err
    assert "are 8x8 but the reference statistics" in err and "32x32" in err and "--resolution 8" in err
    assert run_eval(write_data(tmp_path / "rgb.npz", n=12, resolution=32, channels=3)) == 2
    assert "have 3 channel(s)" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    assert run_eval(write_data(tmp_path / "ok.npz", n=12, resolution=32, seed=1)) == 0
    # statistics files from before this change carry the resolution only in their source text
    legacy = FeatureStats(mu=np.zeros(2), sigma=np.eye(2), num=5, network="x", source="npz:/r.npz @ 32px, n=5")
    legacy.save(tmp_path / "legacy.npz")
    assert FeatureStats.load(tmp_path / "legacy.npz").resolution == 32


# --- 5. on_corrupt = "error" holds once a cache exists ------------------------------------------------------


def test_on_corrupt_error_is_honoured_by_a_cache_built_under_skip(tmp_path):
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (12, 12), (10, 20, 30)).save(folder / name / "ok.png")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    spec, cache = f"imagefolder:{folder}", tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        assert len(load_images(spec, 8, cache_dir=cache)) == 2
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png.*on_corrupt = 'error'"):
        load_images(spec, 8, cache_dir=cache, on_corrupt="error")
    with pytest.warns(UserWarning, match="skipped 1 of 3"):  # the cache itself is intact and still used
        assert len(load_images(spec, 8, cache_dir=cache)) == 2


# --- 6. files in the run directory that are not ours are never overwritten ---------------------------------


def test_users_config_and_log_in_the_run_dir_are_kept(tiny, tmp_path):
    _, config = tiny
    run = tmp_path / "run"
    run.mkdir()
    user_config = "# my experiment: lr sweep, run 3\n" + config.to_toml().replace("[train]", "[train]  # tuned")
    (run / "config.toml").write_text(user_config)
    (run / "log.jsonl").write_text('{"note": "my own notes"}\n')
    assert main(train_args(run / "config.toml", run, "train.steps=2")) == 0
    assert (run / "config.toml").read_text() == user_config
    resolved = (run / "config.resolved.toml").read_text()
    assert resolved.startswith(CONFIG_HEADER) and "steps = 2" in resolved
    assert (run / "log.jsonl").read_text().startswith('{"note": "my own notes"}\n')
    assert [r["step"] for r in read_log(run) if "step" in r] == [2]


def test_refused_resume_leaves_config_and_log_untouched(tiny, tmp_path, capsys):
    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=3")) == 0
    config_before, log_before = (run / "config.toml").read_bytes(), (run / "log.jsonl").read_bytes()
    assert config_before.decode().startswith(CONFIG_HEADER)
    other = write_data(tmp_path / "other.npz", n=48)  # the saved data position does not fit other data
    assert main(train_args(cfg, run, "train.steps=6", f"data.source=npz:{other}")) == 2
    assert "num_items=40" in capsys.readouterr().err
    assert (run / "config.toml").read_bytes() == config_before
    assert (run / "log.jsonl").read_bytes() == log_before


def test_log_is_appended_and_read_log_voids_lost_steps(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"event": "start", "step": 0}, {"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.9},
             {"step": 6, "loss": 0.8}, {"event": "resume", "step": 3}, {"step": 4, "loss": 0.7}]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')  # a line cut by a kill
    assert read_log(log) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.7}]
    from cascaded_diffusion.rundir import append_log_event

    append_log_event(log, "resume", 4)  # starts on a new line, so the cut line cannot swallow it
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "resume"


# --- 7. every output path is checked before any compute; write failures name the path ----------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Make any start of real work fail the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("compute started before the output paths were checked")

    import cascaded_diffusion.evaluation.evaluate as evaluate_module
    import cascaded_diffusion.evaluation.features as features_module
    from cascaded_diffusion.cascade import Cascade

    monkeypatch.setattr(Cascade, "sample", forbidden)
    monkeypatch.setattr(features_module, "get_feature_extractor", forbidden)
    monkeypatch.setattr(evaluate_module, "reference_stats", forbidden)
    monkeypatch.setattr(Trainer, "_build", forbidden)
    monkeypatch.setattr(checkpoint_module, "export_stage", forbidden)


def _output_cases(bad: Path, tmp_path: Path) -> list[tuple[list[str], str]]:
    samples = tmp_path / "s.npz"
    sample = ["sample", "--pretrained", "fashion-mnist", "--num", "2", "--device", "cpu", "--quiet"]
    return [
        (sample + ["--out", str(bad)], "--out"),
        (sample + ["--out", str(tmp_path / "ok.npz"), "--grid", str(bad.with_suffix(".png"))], "--grid"),
        (sample + ["--out", str(tmp_path / "ok.npz"), "--save-stages", str(bad.with_suffix(""))], "--save-stages"),
        (["stats", "fashion-mnist", "--out", str(bad)], "--out"),
        (["eval", str(samples), "--ref", "fashion-mnist", "--out", str(bad.with_suffix(".json"))], "--out"),
        (["export", str(tmp_path / "run"), "--out", str(bad.with_suffix(""))], "--out"),
        (["export", "--pretrained", "fashion-mnist", "--out", str(bad.with_suffix(""))], "--out"),
        (["upscale", str(tmp_path / "in.png"), "--pretrained", "fashion-mnist", "--label", "0",
          "--out", str(bad.with_suffix(""))], "--out"),
        (["train", BASE8, "--out", str(bad.with_suffix(""))], "--out"),
        (["cas", str(samples), "--out", str(bad.with_suffix(".json"))], "--out"),
        (["sweep", "--pretrained", "fashion-mnist", "--aug-levels", "0", "--ref", "fashion-mnist",
          "--out", str(bad.with_suffix(".json"))], "--out"),
        (["classifier", "train", "--out", str(bad.with_suffix(".safetensors"))], "--out"),
    ]


def test_unwritable_outputs_are_refused_before_any_compute(tmp_path, capsys, no_compute):
    write_data(tmp_path / "s.npz", n=4)
    bad = under_a_file(tmp_path, "x.npz")
    for args, option in _output_cases(bad, tmp_path):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"error: {option} {tmp_path / 'a-regular-file'}" in err, (args, err)
        assert "regular file" in err
    # a directory where a file is expected
    (tmp_path / "adir").mkdir()
    assert main(["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "adir"), "--device", "cpu"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_read_only_location_is_refused_before_any_compute(tmp_path, capsys, no_compute, monkeypatch):
    import cascaded_diffusion.errors as errors_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(errors_module.tempfile, "mkstemp", read_only)
    assert main(["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "ro" / "s.npz"),
                 "--device", "cpu"]) == 2
    assert f"--out {tmp_path / 'ro' / 's.npz'}: cannot write in {tmp_path / 'ro'}: Read-only file system" in (
        capsys.readouterr().err)
    assert main(["train", BASE8, "--out", str(tmp_path / "ro-run")]) == 2
    assert "Read-only file system" in capsys.readouterr().err


def test_atomic_write_failure_names_the_target_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def full_disk(path, data):
        Path(path).write_bytes(data[:1])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "write_bytes_durably", full_disk)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new contents")
    assert info.value.filename == str(target) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_samples_are_kept_when_the_disk_fills_during_sampling(tmp_path, capsys, monkeypatch):
    """The finished samples stay in OUT.shards/ when the final npz cannot be written; the rerun only merges."""
    import cascaded_diffusion.shards as shards_module
    from cascaded_diffusion.cascade import Cascade

    out = tmp_path / "out" / "s.npz"
    real_write = shards_module.write_npz_streaming

    def full_disk(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(shards_module, "write_npz_streaming", full_disk)
    args = ["sample", "--pretrained", "fashion-mnist", "--num", "2", "--steps", "2", "--out", str(out),
            "--device", "cpu", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out}: No space left on device; the 2 samples are kept in {out}.shards" in err
    assert err.strip().count("\n") == 0 and not out.exists()

    def forbidden(*a, **k):
        raise AssertionError("the kept samples were sampled again")

    monkeypatch.setattr(shards_module, "write_npz_streaming", real_write)
    monkeypatch.setattr(Cascade, "sample", forbidden)
    assert main(args) == 0
    with np.load(out) as f:
        assert f["arr_0"].shape == (2, 32, 32, 1)
    assert not (tmp_path / "out" / "s.npz.shards").exists()


# --- 8. sizes, counts, numbers, devices, packages and input files are checked before any compute -----------


@pytest.mark.parametrize("flags, option", [
    (["--num", "0"], "--num"), (["--num", "-5"], "--num"), (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"), (["--eta", "nan"], "--eta"), (["--guidance", "nan"], "--guidance"),
    (["--grid-per-class", "0"], "--grid-per-class"), (["--steps", "-4"], "--steps"),
    (["--sampler", "euler"], "--sampler"), (["--aug-level", "-1"], "--aug-level"),
])
def test_bad_sampling_options_are_refused_while_parsing(flags, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "x.npz"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err


@pytest.mark.parametrize("setting, message", [
    ("train.steps=-5", "train.steps: must be >= 1, got -5"),
    ("train.sample_every=-1", "train.sample_every: must be >= 0, got -1"),
    ("train.sample_steps=-4", "train.sample_steps: must be >= 0, got -4"),
    ("sample.eta=nan", "sample.eta: must be a finite number >= 0"),
    ("sample.guidance=nan", "sample.guidance: must be a finite number >= 0"),
])
def test_bad_train_settings_are_refused_before_training(setting, message, tmp_path, capsys, no_compute):
    assert main(["train", BASE8, "--out", str(tmp_path / "run"), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_or_unknown_devices_are_one_line_errors(tmp_path, capsys, no_compute):
    for device, message in (("cuda", "no CUDA device is available"), ("tpu", "'tpu' is not a device")):
        for args in (["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "x.npz")],
                     ["train", BASE8, "--out", str(tmp_path / "run")],
                     ["stats", "fashion-mnist", "--out", str(tmp_path / "s.npz")]):
            assert main([*args, "--device", device]) == 2, (device, args[0])
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err


def test_tensorboard_without_the_package_is_refused_before_training(tmp_path, capsys, no_compute, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["train", BASE8, "--out", str(tmp_path / "run"), "--set", "train.tensorboard=true"]) == 2
    assert "train.tensorboard = true needs the tensorboard package" in capsys.readouterr().err


def test_truncated_garbage_and_npy_inputs_are_one_line_errors(tmp_path, capsys):
    good = write_data(tmp_path / "good.npz", n=40)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(os.urandom(300))
    np.save(tmp_path / "array.npy", np.zeros((4, 8, 8, 1), np.uint8))
    cases = {"truncated.npz": "truncated", "garbage.npz": "cannot read", "array.npy": "single .npy array"}
    for name, message in cases.items():
        path = tmp_path / name
        assert main(["train", BASE8, "--out", str(tmp_path / "run"), "--device", "cpu",
                     "--set", f"data.source=npz:{path}"]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err and "Traceback" not in err, err
        assert main(["eval", str(path), "--ref", "fashion-mnist", "--out", str(tmp_path / "m.json")]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and message in err and "Traceback" not in err, err


# --- 9. leftovers are cleaned on the next start; a corrupt newest checkpoint falls back ---------------------


def _fake_checkpoint(run: Path, step: int) -> Path:
    tensors = {stem: {"w": torch.full((64,), float(step))} for stem in checkpoint_module.TRAINING_STEMS}
    return save_checkpoint(run, step, tensors, {"config": {}}, keep_last=10)


@pytest.mark.parametrize("damage", ["truncated safetensors", "broken state.json", "missing file"])
def test_latest_valid_checkpoint_skips_corrupt_ones(tmp_path, damage):
    _fake_checkpoint(tmp_path, 1)
    newest = _fake_checkpoint(tmp_path, 2)
    if damage == "truncated safetensors":
        data = (newest / "ema.safetensors").read_bytes()
        (newest / "ema.safetensors").write_bytes(data[:-10])
    elif damage == "broken state.json":
        (newest / "state.json").write_text('{"step": 2, "conf')
    else:
        (newest / "optimizer.safetensors").unlink()
    ckpt, corrupt = latest_valid_checkpoint(tmp_path)
    assert ckpt.name == "step_00000001" and [p.name for p, _ in corrupt] == ["step_00000002"]
    assert "step_00000002" in corrupt[0][1]


def test_pruning_removes_state_json_first(tmp_path, monkeypatch):
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)
    import shutil

    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a kill right after state.json went
    save_checkpoint(tmp_path, 3, {"model": {"w": torch.zeros(2)}}, {"config": {}}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003"]
    monkeypatch.undo()
    assert {p.name for p in clean_run_dir(tmp_path)} == {"step_00000001", "step_00000002"}


def test_interrupted_run_leftovers_are_removed_and_a_corrupt_newest_checkpoint_falls_back(tiny, tmp_path, capsys):
    cfg, config = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run)) == 0  # checkpoints at steps 3 and 6
    straight = tmp_path / "straight"
    assert main(train_args(cfg, straight, "train.steps=9")) == 0
    ckpts = run / "checkpoints"
    # what kill -9 / SIGTERM leave: a checkpoint being written, one being pruned, a file being replaced
    (ckpts / ".tmp-step_00000009-4242-1").mkdir()
    (ckpts / ".tmp-step_00000009-4242-1" / "model.safetensors").write_bytes(b"\0" * 1000)
    (ckpts / "step_00000001").mkdir()
    (ckpts / "step_00000001" / "ema.safetensors").write_bytes(b"\0" * 10)
    (run / ".config.toml.tmp-4242").write_text("half")
    # and the newest checkpoint is damaged (truncated model weights)
    model = ckpts / "step_00000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    capsys.readouterr()
    assert main(train_args(cfg, run, "train.steps=9")) == 0
    err = capsys.readouterr().err
    assert "removed 3 leftover(s)" in err and "step_00000006/model.safetensors is truncated or corrupt" in err
    assert "resuming from the newest valid checkpoint, step_00000003" in err
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["corrupt-step_00000006", "step_00000003", "step_00000006", "step_00000009"]
    assert not (run / ".config.toml.tmp-4242").exists()
    # resumed from step 3, the run ends where an uninterrupted one does, bit for bit
    for stem in ("model", "ema", "optimizer"):
        a, b = load_tensors(ckpts / "step_00000009", stem), load_tensors(straight / "checkpoints/step_00000009", stem)
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    assert load_state(ckpts / "step_00000009")["step"] == 9
    assert [r["step"] for r in read_log(run)] == [2, 4, 6, 8, 9]


def test_sampling_a_run_with_a_corrupt_newest_checkpoint_uses_the_newest_valid_one(tiny, tmp_path):
    from cascaded_diffusion.stage import Stage

    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run)) == 0
    (run / "checkpoints/step_00000006/state.json").write_text("{")
    with pytest.warns(UserWarning, match="skipping the unreadable checkpoint .*step_00000006"):
        stage = Stage.load(run)
    assert stage.step == 3


# --- 10. 16-bit PNGs keep their brightness -------------------------------------------------------------------


def test_16_bit_grayscale_pngs_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "images" / "only"
    folder.mkdir(parents=True)
    levels = [0, 257 * 64, 257 * 128, 65535]
    for i, level in enumerate(levels):
        Image.fromarray(np.full((8, 8), level, np.uint16)).save(folder / f"{i}.png")
        assert Image.open(folder / f"{i}.png").mode.startswith("I")
    data = load_images(f"imagefolder:{tmp_path / 'images'}", 8, channels=1, use_cache=False)
    assert data.images[:, 0, 0, 0].tolist() == [0, 64, 128, 255]
    rgb = load_images(f"imagefolder:{tmp_path / 'images'}", 8, channels=3, use_cache=False)
    assert rgb.images[:, 0, 0].tolist() == [[v] * 3 for v in (0, 64, 128, 255)]


# --- 11. running out of memory says what to lower -------------------------------------------------------------


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 53687091200 bytes."),
    MemoryError(),
])
def test_out_of_memory_names_what_to_lower(error, tmp_path, capsys, monkeypatch, tiny):
    from cascaded_diffusion.cascade import Cascade

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(Cascade, "sample", oom)
    assert main(["sample", "--pretrained", "fashion-mnist", "--batch-size", "100000", "--out",
                 str(tmp_path / "x.npz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "lower --batch-size (it is 100000)" in err and "Traceback" not in err
    monkeypatch.setattr(Trainer, "train_step", oom)
    cfg, _ = tiny
    assert main(train_args(cfg, tmp_path / "run")) == 2
    assert "lower train.batch_size" in capsys.readouterr().err


def test_a_genuine_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from cascaded_diffusion.cascade import Cascade

    def bug(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(Cascade, "sample", bug)
    with pytest.raises(RuntimeError, match="internal invariant"):
        main(["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "x.npz"), "--device", "cpu"])


# --- 12. downloaded Inception weights are checked against the hash in their name ------------------------------


def test_inception_download_is_checked_against_the_hash_in_its_name(tmp_path, monkeypatch):
    import hashlib

    from cascaded_diffusion.evaluation import inception_weights as inception

    payload = b"definitely not the inception weights"
    monkeypatch.setattr(inception.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(inception.WeightsHashError, match="its name says it starts with 6726825d"):
        inception.resolve_inception_weights(download=True)
    cache = tmp_path / ".cache" / "cascaded_diffusion"
    assert list(cache.iterdir()) == [], "a download that fails its hash check must leave nothing behind"
    # a file whose bytes match the prefix in its name is accepted
    good = cache / f"weights-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    inception._download("http://example/w.pth", good, 1.0)
    assert good.read_bytes() == payload
    assert inception.expected_sha256_prefix(inception.INCEPTION_WEIGHTS_FILENAME) == "6726825d"
