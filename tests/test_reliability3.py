"""The third reliability round: no file clobbered through a symlink, no foreign data deleted, no output
over an input, no silent change of meaning, and one-line errors. One test (or more) per item; the rows are in
docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion import fileio, images
from cascaded_diffusion.checkpoint import clean_run_dir
from cascaded_diffusion.rundir import RunLock
from cascaded_diffusion.cli import main
from cascaded_diffusion.config import StageConfig
from cascaded_diffusion.errors import UserError
from cascaded_diffusion.fileio import write_npz_streaming

from conftest import train_args  # the tiny stage of round two is conftest's `tiny` fixture


# --- 1. temporary files are exclusive and unpredictable ---------------------------------------------------


def _plant_links(directory: Path, name: str, victim: Path) -> None:
    """What an attacker plants in a shared directory: the old predictable temporary names, for a range of pids
    around ours, as links to a file the victim can write."""
    for pid in range(max(1, os.getpid() - 20), os.getpid() + 20):
        (directory / f".{name}.tmp-{pid}").symlink_to(victim)


@pytest.mark.parametrize("writer", ["atomic_write_bytes", "write_npz_streaming", "save_grid"])
def test_atomic_writes_never_follow_a_planted_temporary_link(tmp_path, writer):
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = shared / "s.npz"
    _plant_links(shared, target.name, victim)
    if writer == "atomic_write_bytes":
        fileio.atomic_write_bytes(target, b"new bytes")
    elif writer == "write_npz_streaming":
        write_npz_streaming(target, {"arr_0": ((2,), np.int64, lambda m: m.write(np.arange(2)))})
    else:
        target = shared / "g.png"
        _plant_links(shared, target.name, victim)
        images.save_grid(np.zeros((1, 4, 4, 1), np.uint8), target, nrow=1)
    assert victim.read_text() == "precious"
    assert target.is_file() and not target.is_symlink()
    # the temporary file was unpredictable and is gone; the planted links are left alone
    left = sorted(p.name for p in shared.iterdir() if p.name != target.name)
    assert all((shared / n).is_symlink() for n in left)


def test_temporary_files_keep_the_usual_permissions_and_the_cleaner_knows_their_names(tmp_path):
    old = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644  # not mkstemp's 0600
    tmp = fileio.make_temp_file(tmp_path / "config.toml")
    assert tmp.name.startswith(".config.toml.tmp-") and len(tmp.name) == len(".config.toml.tmp-") + 8
    (tmp_path / ".log.jsonl.tmp-4242").write_text("old style")
    (tmp_path / "notes.tmp-1").write_text("not ours")
    assert sorted(p.name for p in clean_run_dir(tmp_path)) == sorted([".log.jsonl.tmp-4242", tmp.name])
    assert (tmp_path / "notes.tmp-1").exists()


# --- 2. the lock file is never followed through a link ---------------------------------------------------


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path, tiny, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        RunLock(run).acquire()
    cfg, _ = tiny
    assert main(train_args(cfg, run, "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert f"{run / '.lock'} is a symbolic link" in err and err.count("\n") == 1
    assert victim.read_text() == "precious"
    (run / ".lock").unlink()
    os.mkfifo(run / ".lock")
    with pytest.raises(UserError, match="not a regular file"):
        RunLock(run).acquire()


def test_a_full_disk_while_taking_the_lock_names_the_lock_and_keeps_its_record(tmp_path, monkeypatch):
    lock = RunLock(tmp_path).acquire()
    lock.release()
    before = (tmp_path / ".lock").read_text()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as info:
        RunLock(tmp_path).acquire()
    assert info.value.filename == str(tmp_path / ".lock") and "No space left" in str(info.value)
    assert (tmp_path / ".lock").read_text() == before


# --- 3. cdm train never deletes things in a directory that is not its run ---------------------------------


def test_train_refuses_a_foreign_directory_and_deletes_nothing_in_it(tmp_path, tiny, capsys):
    cfg, _ = tiny
    foreign = tmp_path / "other-tool"
    (foreign / "checkpoints" / "step_1000").mkdir(parents=True)
    (foreign / "checkpoints" / "step_1000" / "weights.bin").write_bytes(b"their weights")
    (foreign / ".cache.tmp-5").write_text("theirs")
    before = sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*"))
    assert main(train_args(cfg, foreign, "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert f"--out {foreign} is not empty and is not a run directory of `cdm train`" in err and err.count("\n") == 1
    assert sorted(str(p.relative_to(foreign)) for p in foreign.rglob("*")) == before  # not even a .lock
    # our own run keeps being cleaned: its leftovers are recognised once the directory is ours
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=2")) == 0
    (run / "checkpoints" / "step_00000009").mkdir()
    assert main(train_args(cfg, run, "train.steps=3")) == 0
    assert not (run / "checkpoints" / "step_00000009").exists()
    capsys.readouterr()


def test_a_non_utf8_config_names_its_file(tmp_path, capsys):
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes("# café\n[stage]\n".encode("latin-1"))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: not UTF-8 text" in err and err.count("\n") == 1


# --- 4. no output over an input or over another output ----------------------------------------------------


def _samples(path: Path, n: int = 4, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8), arr_1=np.arange(n) % 3)
    return path


def test_outputs_over_inputs_or_each_other_are_refused_before_compute(tmp_path, capsys, monkeypatch):
    import cascaded_diffusion.cli.evaluate as evaluate_cli
    import cascaded_diffusion.cli.sample as sample_cli

    def no_compute(*a, **k):
        raise AssertionError("compute started")

    for name in ("get_feature_extractor", "load_samples", "load_images"):
        monkeypatch.setattr(evaluate_cli, name, no_compute)
    monkeypatch.setattr(sample_cli.Cascade, "load", no_compute)
    s = _samples(tmp_path / "s.npz")
    link = tmp_path / "link.npz"
    link.symlink_to(s)
    original = s.read_bytes()
    cases = [
        (["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "same.png"), "--grid",
          str(tmp_path / "same.png")], "--grid"),
        (["sample", "--pretrained", "fashion-mnist", "--out", str(s), "--low-res-samples", str(s)], "--out"),
        (["stats", f"npz:{s}", "--out", str(s)], "--out"),
        (["eval", str(s), "--ref", "fashion-mnist", "--out", str(link)], "--out"),
        (["cas", str(s), "--test", f"npz:{tmp_path / 't.npz'}", "--out", str(s)], "--out"),
        # the JSON half of the classifier pair would replace the training data
        (["classifier", "train", "--data", f"npz:{tmp_path / 'c.json'}", "--out", str(tmp_path / "c.safetensors")],
         "--out (its JSON)"),
    ]
    (tmp_path / "t.npz").write_bytes(original)
    (tmp_path / "c.json").write_bytes(original)
    for args, option in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert f"error: {option} " in err and "is the same file as" in err and err.count("\n") == 1, (args, err)
    assert s.read_bytes() == original and not (tmp_path / "same.png").exists()


def test_save_stages_files_over_the_out_file_are_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import cascaded_diffusion.cli.sample as sample_cli

    monkeypatch.setattr(sample_cli, "sample_sharded", lambda *a, **k: pytest.fail("sampling started"))
    out = tmp_path / "st" / "stage2_32px.npz"  # the fashion-mnist cascade's final stage file
    args = ["sample", "--pretrained", "fashion-mnist", "--num", "2", "--device", "cpu", "--out", str(out),
            "--save-stages", str(tmp_path / "st")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--save-stages (stage2_32px.npz) {out} is the same file as --out {out}" in err


# --- 6. a resume that changes what the weights mean is refused ------------------------------------------------


@pytest.mark.parametrize("setting, key", [("diffusion.prediction=v", "diffusion.prediction"),
                                          ("diffusion.schedule=linear", "diffusion.schedule"),
                                          ("diffusion.timesteps=30", "diffusion.timesteps")])
def test_resume_that_changes_the_parameterization_is_refused(tmp_path, tiny, capsys, setting, key):
    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=3")) == 0
    state = (run / "checkpoints" / "step_00000003" / "state.json").read_bytes()
    capsys.readouterr()
    assert main(train_args(cfg, run, "train.steps=6", setting)) == 2
    err = capsys.readouterr().err
    assert "another parameterization" in err and f"{key}: run has" in err and err.count("\n") == 1
    assert (run / "checkpoints" / "step_00000003" / "state.json").read_bytes() == state  # not relabelled
    # what does not change the weights' meaning still resumes
    assert main(train_args(cfg, run, "train.steps=6", "train.lr=5e-5")) == 0


# --- 7. data at the wrong resolution is refused, not silently resized -----------------------------------------


def test_wrong_resolution_data_is_refused_unless_resize_is_asked_for(tmp_path, tiny, capsys, monkeypatch):
    import cascaded_diffusion.cli.evaluate as evaluate_cli

    s32 = _samples(tmp_path / "s32.npz", n=6, size=32)
    ref8 = _samples(tmp_path / "ref8.npz", n=6, size=8)
    for args, option in [
        (["eval", str(s32), "--ref", f"npz:{ref8}", "--out", str(tmp_path / "m.json"), "--features", "classifier"],
         "--ref"),
        (["eval", str(s32), "--ref", str(ref8), "--out", str(tmp_path / "m.json"), "--features", "classifier"],
         "--ref"),
        (["cas", str(s32), "--test", f"npz:{ref8}", "--device", "cpu"], "--test"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"error: {option} " in err and "holds 8x8 images, not the 32x32 needed here; it would be upsampled" in err
        assert "--resize" in err and err.count("\n") == 1
    # asked for, the resize happens (what every run did before, silently)
    seen = {}

    def scored(images, reference, *a, **k):
        seen["ref"] = reference
        return {"num_samples": len(images), "reference": {}, "fid": 0.0}

    monkeypatch.setattr(evaluate_cli, "evaluate_images", scored)
    assert main(["eval", str(s32), "--ref", f"npz:{ref8}", "--out", str(tmp_path / "m.json"), "--features",
                 "classifier", "--metrics", "fid", "--resize", "--device", "cpu"]) == 0
    assert seen["ref"].num == 6
    capsys.readouterr()
    # an SR stage's high-resolution targets are never upsampled: an 8 px npz for a 32 px stage is refused
    cfg, config = tiny
    raw = config.to_dict()
    raw["stage"].update(resolution=16)
    big = StageConfig.from_dict(raw)
    (tmp_path / "big.toml").write_text(big.to_toml())
    assert main(train_args(tmp_path / "big.toml", tmp_path / "run", "train.steps=1")) == 2
    err = capsys.readouterr().err
    assert "data.source: npz:" in err and "holds 8x8 images, not the 16x16 needed here" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cas_refuses_labels_outside_the_test_sets_classes(tmp_path, capsys):
    s = _samples(tmp_path / "s.npz", n=6, size=8)  # labels 0..2
    test = tmp_path / "t.npz"
    np.savez(test, arr_0=np.zeros((4, 8, 8, 1), np.uint8), arr_1=np.array([0, 1, 2, 7]))
    assert main(["cas", str(s), "--test", f"npz:{test}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--test npz:{test} has label 7, but the samples' labels go up to 2" in err


# --- 8. no export into a run directory; 9. readers survive the trainer's pruning ---------------------------------


@pytest.fixture
def trained(tmp_path, tiny, capsys) -> Path:
    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=3")) == 0
    capsys.readouterr()
    return run


def test_export_into_a_run_directory_is_refused(trained, tmp_path, capsys):
    for out in (trained, trained / "checkpoints" / ".."):
        assert main(["export", str(trained), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "is a training run directory; export into a directory of its own" in err and err.count("\n") == 1
    assert not (trained / "stage.json").exists()
    assert main(["export", str(trained), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "stage.json").is_file()


def test_a_run_dir_holding_an_old_export_samples_its_newest_checkpoint(trained, tmp_path):
    from cascaded_diffusion.checkpoint import export_stage
    from cascaded_diffusion.stage import Stage

    export_stage(trained / "checkpoints" / "step_00000003", trained)  # what an older version let through
    (trained / "stage.json").write_text((trained / "stage.json").read_text().replace('"step": 3', '"step": 1'))
    with pytest.warns(UserWarning, match="using the newest checkpoint"):
        stage = Stage.load(trained)
    assert stage.step == 3


def _pruning_reader(monkeypatch, run: Path):
    """Make the first read of a checkpoint find it pruned, as a trainer with keep_last=1 does when it writes the
    next one while the reader is between choosing the checkpoint and reading it."""
    import shutil

    from cascaded_diffusion import checkpoint as ck
    from cascaded_diffusion import stage as stage_module

    real = ck.load_tensors
    raced = []

    def racing(ckpt, stem, device="cpu"):
        if not raced:
            raced.append(Path(ckpt).name)
            newer = Path(ckpt).with_name(f"step_{int(Path(ckpt).name[5:]) + 6:08d}")
            shutil.copytree(ckpt, newer)  # the trainer's next checkpoint (its state.json names its own step) ...
            state = json.loads((newer / "state.json").read_text())
            (newer / "state.json").write_text(json.dumps({**state, "step": int(newer.name[5:])}))
            (Path(ckpt) / "state.json").unlink()  # ... and its pruning of this one, state.json first
            shutil.rmtree(ckpt)
        return real(ckpt, stem, device)

    monkeypatch.setattr(stage_module, "load_tensors", racing)
    monkeypatch.setattr(ck, "load_tensors", racing)
    return raced


def test_sampling_and_export_retry_when_the_chosen_checkpoint_is_pruned(trained, tmp_path, monkeypatch, recwarn):
    from cascaded_diffusion.stage import Stage

    raced = _pruning_reader(monkeypatch, trained)
    stage = Stage.load(trained)
    assert raced == ["step_00000003"] and stage.step == 9  # read from the newer one, step_00000009
    assert not [w for w in recwarn if "unreadable" in str(w.message)]
    raced.clear()
    assert main(["export", str(trained), "--out", str(tmp_path / "exported")]) == 0
    assert raced == ["step_00000009"]
    assert json.loads((tmp_path / "exported" / "stage.json").read_text())["source"].endswith("step_00000015")


# --- 10. two `cdm sample` on one --out: the second is refused at once, naming the first ---------------------


def test_a_second_sampler_on_the_same_out_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    import socket

    from cascaded_diffusion.cascade import Cascade
    from cascaded_diffusion.shards import ShardDirectory, shard_dir_for

    out = tmp_path / "s.npz"
    first = ShardDirectory(out).lock()  # as the first `cdm sample` holds it
    (shard_dir_for(out) / ".chunk-x.npz.tmp-abcdefgh").write_bytes(b"the first one's chunk being written")
    monkeypatch.setattr(Cascade, "sample", lambda *a, **k: pytest.fail("sampled"))
    args = ["sample", "--pretrained", "fashion-mnist", "--num", "2", "--steps", "2", "--out", str(out),
            "--device", "cpu", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} is being sampled by another `cdm sample` (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert (shard_dir_for(out) / ".chunk-x.npz.tmp-abcdefgh").exists()  # its temporary files are not cleaned away
    first.release()
    monkeypatch.undo()
    assert main(args) == 0 and out.is_file() and not shard_dir_for(out).exists()


# --- 5. the shipped cascade's bytes do not depend on the batch size ------------------------------------------


def test_the_shipped_cascade_is_byte_identical_for_any_batch_size():
    """With one thread (as a torchrun rank often has) oneDNN picked other kernels for other batch shapes (a 1x1
    convolution's GEMM over N*H*W rows summed in another order); the networks now always see 8 samples."""
    import torch

    from cascaded_diffusion.cascade import Cascade, sample_in_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cascade = Cascade.load(pretrained="fashion-mnist", device="cpu")
        labels = torch.arange(20) % 10
        runs = [sample_in_batches(cascade, labels, batch_size=b, seed=2, steps=[3, 3], autocast=False)[0]
                for b in (20, 16, 3)]
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert np.array_equal(a, b), int((a != b).sum())


# --- 11, 15. one-line errors and a strictly JSON log -----------------------------------------------------------


def test_low_res_sample_labels_beyond_the_classes_are_refused_before_sampling(tmp_path, capsys, monkeypatch):
    from cascaded_diffusion.cascade import Cascade

    monkeypatch.setattr(Cascade, "sample", lambda *a, **k: pytest.fail("sampled"))
    low = tmp_path / "low.npz"
    np.savez(low, arr_0=np.zeros((2, 8, 8, 1), np.uint8), arr_1=np.array([3, 12]))
    assert main(["sample", "--pretrained", "fashion-mnist", "--num", "2", "--low-res-samples", str(low),
                 "--out", str(tmp_path / "s.npz"), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "arr_1 has label 12, but the cascade has classes 0..9" in err and err.count("\n") == 1


def test_a_diverged_loss_is_logged_as_strict_json(tmp_path, tiny, capsys):
    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=2", "train.lr=1e30", "train.grad_clip=0")) == 2
    assert "non-finite" in capsys.readouterr().err
    for line in (run / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the log"))


# --- 12. corrupt Inception weights, given or cached: one line, and the cache is re-checked against its name ------


def _stats_args(tmp_path: Path, features: str) -> list[str]:
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    return ["stats", f"npz:{samples}", "--features", features, "--out", str(tmp_path / "st.npz"), "--device", "cpu"]


def test_corrupt_inception_weights_given_or_cached_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import torch

    from cascaded_diffusion.evaluation import inception

    for name, payload in (("garbage.pth", os.urandom(4000)), ("cut.pth", b"PK\x03\x04cut short"),
                          ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")):
        path = tmp_path / name
        path.write_bytes(payload)
        assert main(_stats_args(tmp_path, f"inception:{path}")) == 2
        err = capsys.readouterr().err
        assert f"{path} is not a readable weights file" in err and err.count("\n") == 1, err
        assert "weights_only" not in err
    # the cache: a readable file under the download's name whose bytes are not the download's
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    cached = inception.default_inception_cache_path()
    cached.parent.mkdir()
    torch.save({"fc.weight": torch.zeros(1)}, cached)
    with pytest.raises(inception.WeightsFileError, match="name says it starts with 6726825d"):
        inception.resolve_inception_weights(download=False)
    assert main(_stats_args(tmp_path, "inception")) == 2
    err = capsys.readouterr().err
    assert f"the cached weights {cached} have SHA-256" in err and "Delete it" in err and err.count("\n") == 1
    assert cached.exists(), "a file the user may have put there is never deleted"


# --- 15. the smaller ones -------------------------------------------------------------------------------------


def test_empty_aug_levels_are_refused_while_parsing(capsys):
    for argv in (["sweep", "--aug-levels", "", "--ref", "x.npz", "--out", "m.json"],
                 ["sample", "--pretrained", "fashion-mnist", "--aug-level", " , ", "--out", "s.npz"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "expected one or more comma-separated integers >= 0" in err and "min()" not in err


def test_a_negative_or_mismatched_step_in_state_json_is_refused(tmp_path, tiny, capsys):
    from cascaded_diffusion.checkpoint import latest_valid_checkpoint

    cfg, _ = tiny
    run = tmp_path / "run"
    assert main(train_args(cfg, run, "train.steps=2", "train.ckpt_every=1")) == 0
    first, second = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    state = json.loads((second / "state.json").read_text())
    (second / "state.json").write_text(json.dumps({**state, "step": 1}))  # e.g. copied from the older one
    ckpt, corrupt = latest_valid_checkpoint(run)
    assert ckpt == first and "its step 1 is not that of step_00000002" in corrupt[0][1]
    state = json.loads((first / "state.json").read_text())
    (first / "state.json").write_text(json.dumps({**state, "step": -5}))
    capsys.readouterr()
    assert main(train_args(cfg, run, "train.steps=4")) == 2
    err = capsys.readouterr().err
    assert "holds no valid checkpoint" in err and "its step -5 is not a step number >= 0" in err
    assert err.count("\n") == 1


def test_a_cdm_cache_that_is_a_file_is_named_not_blamed_on_out(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from cascaded_diffusion.evaluation import inception

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    (tmp_path / "cachefile").write_text("not a directory")
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cachefile"))
    assert main(["stats", f"imagefolder:{tmp_path / 'imgs'}", "--resolution", "8", "--features", "classifier",
                 "--out", str(tmp_path / "st.npz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"CDM_CACHE={tmp_path / 'cachefile'}" in err and "is a file" in err and "--out" not in err, err
    monkeypatch.delenv(inception.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match="CDM_CACHE=.*is a file"):  # before any download is tried
        inception.resolve_inception_weights(download=True)
    assert not (tmp_path / "st.npz").exists()


def test_float_tiffs_in_0_1_are_scaled_and_out_of_range_ones_refused(tmp_path):
    from PIL import Image

    from cascaded_diffusion.data import load_images
    from cascaded_diffusion.data.prepare import load_prepared, prepare_dataset

    folder = tmp_path / "images" / "only"
    folder.mkdir(parents=True)
    for i, level in enumerate([0.0, 0.25, 0.5, 1.0]):
        Image.fromarray(np.full((8, 8), level, np.float32)).save(folder / f"{i}.tif")
        assert Image.open(folder / f"{i}.tif").mode == "F"
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(folder / "4_levels.tif")  # 8-bit levels as floats
    Image.fromarray(np.full((8, 8), -3.0, np.float32)).save(folder / "5_negative.tif")
    expected = [0, 64, 128, 255, 200]
    with pytest.warns(UserWarning, match="skipped 1 of 6"):
        data = load_images(f"imagefolder:{tmp_path / 'images'}", 8, channels=1, use_cache=False, num_workers=1)
    assert data.images[:, 0, 0, 0].tolist() == expected
    result = prepare_dataset(tmp_path / "images", [8], tmp_path / "prepared", channels=3, workers=1)
    assert "5_negative.tif" in result.skipped[0] and "values in [-3, -3]" in result.skipped[0]
    assert load_prepared(tmp_path / "prepared", 8).images[:, 0, 0].tolist() == [[v] * 3 for v in expected]


# --- 13. a disk filled up before `cdm prepare` resumes: refused before the memory map is written ---------------


def test_a_resumed_prepare_checks_free_space_before_writing_its_arrays(tmp_path, monkeypatch, capsys):
    import shutil

    from PIL import Image

    from cascaded_diffusion.data import partial, prepare

    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    out = tmp_path / "prepared"
    real = partial._decode_chunk

    def interrupted(job):
        if job[0] == 1:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(partial, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(tmp_path / "images", [32], out, workers=1, chunk_size=2)
    # the disk filled up meanwhile: 1 KiB left, while 6 files x 32*32*3 bytes are still unwritten
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(partial.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    monkeypatch.setattr(partial, "_decode_chunk", lambda job: pytest.fail("wrote into the arrays"))
    assert main(["prepare", str(tmp_path / "images"), "--resolutions", "32", "--out", str(out), "--workers", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "finishing the interrupted preparation (6 files to decode) needs" in err and "KiB more" in err
    assert "only 1.0 KiB are free" in err and "0.00 GiB" not in err and err.count("\n") == 1
    monkeypatch.undo()
    result = prepare.prepare_dataset(tmp_path / "images", [32], out, workers=1)
    assert result.decoded == 6 and result.manifest["num_images"] == 8


# --- 14. a batch or a --num that cannot fit in memory is refused before anything is allocated ------------------


def test_a_batch_or_num_that_cannot_fit_is_refused_naming_the_flag(tmp_path, capsys, monkeypatch):
    import cascaded_diffusion.cascade as cascade_module
    from cascaded_diffusion import hardware
    from cascaded_diffusion.sharded_sampling import sample_sharded

    monkeypatch.setattr(cascade_module.Cascade, "sample", lambda *a, **k: pytest.fail("sampled"))
    monkeypatch.setattr(cascade_module, "balanced_labels", lambda *a, **k: pytest.fail("labels were allocated"))
    base = ["sample", "--pretrained", "fashion-mnist", "--out", str(tmp_path / "s.npz"), "--device", "cpu", "--quiet"]
    # 10**8 samples of 32x32 in one batch: over a terabyte of sampler state, on any machine
    assert main(base + ["--num", str(10**8), "--batch-size", str(10**8)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "a batch of 100000000 samples needs at least" in err and err.endswith("lower --batch-size (it is 100000000)")
    # the labels of --num alone, on a machine with 1 GiB available; a small batch is not blamed
    monkeypatch.setattr(hardware, "available_memory", lambda device="cpu": 2**30)
    assert main(base + ["--num", str(10**8), "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"{10**8} samples need at least" in err and err.endswith(f"lower --num (it is {10**8})")
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.npz.shards").exists()
    # the library names its own argument (still on the machine with 1 GiB available)
    cascade = cascade_module.Cascade.load(pretrained="fashion-mnist", device="cpu")
    with pytest.raises(hardware.SamplingMemoryError, match=r"lower batch_size \(it is 100000\)") as info:
        sample_sharded(cascade, np.zeros(10**5, np.int64), tmp_path / "s.npz", seed=0, batch_size=10**5)
    assert info.value.option == "batch_size"
    hardware.check_sampling_memory(cascade, 10**5, 64)  # what fits is not refused


# --- 15. SIGTERM (a scheduler's grace period) and SIGINT save a checkpoint and say how to resume ----------------


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signalled_trainer_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny, sig, capsys):
    import signal
    import subprocess
    import sys
    import time

    cfg, _ = tiny
    run = tmp_path / "run"
    # ckpt_every far away: any checkpoint found is the one the signal caused
    args = train_args(cfg, run, "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1",
                      "train.sample_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cascaded_diffusion.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "log.jsonl").exists() or '"loss"' not in (run / "log.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), err
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert step >= 1 and saved[0].name == f"step_{step:08d}"
    assert f"stopped by {sig} at step {step} of 100000; saved the checkpoint {saved[0]}" in err
    assert "Rerun the same `cdm train` command to resume" in err and "Traceback" not in err
    # and it resumes from there
    assert main(train_args(cfg, run, f"train.steps={step + 1}", "train.sample_every=0")) == 0
    assert f"resumed from {saved[0]} at step {step}" in capsys.readouterr().out
