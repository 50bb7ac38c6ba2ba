"""Progressive distillation (`cdm distill`): the target, the grid, bitwise resume, the sampler's defaults for a
distilled stage, cascades mixing distilled and undistilled stages, and the refusals. Tiny random networks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.checkpoint import export_stage, latest_checkpoint, list_checkpoints, load_state
from cascaded_diffusion.cli.main import main
from cascaded_diffusion.config import ConfigError, StageConfig
from cascaded_diffusion.diffusion import GaussianDiffusion
from cascaded_diffusion.distillation import StepGrid, distill, distillation_grid, distillation_target, round_dir
from cascaded_diffusion.errors import UserError
from cascaded_diffusion.samplers import sample, timestep_sequence
from cascaded_diffusion.stage import Stage, build_network

from conftest import all_tensors

T = 40


def write_data(tmp_path: Path, resolution: int = 8) -> Path:
    npz = tmp_path / f"data{resolution}.npz"
    if not npz.exists():
        rng = np.random.default_rng(0)
        np.savez(npz, arr_0=rng.integers(0, 256, size=(32, resolution, resolution, 1), dtype=np.uint8),
                 arr_1=rng.integers(0, 3, size=32).astype(np.int64))
    return npz


def tiny_teacher(tmp_path: Path, name: str = "base", kind: str = "base", prediction: str = "eps",
                 learn_sigma: bool = True, seed: int = 0, conditioning: dict | None = None, train: dict | None = None,
                 **model) -> Path:
    """An exported stage (model.safetensors + stage.json) with random weights: 8 px, or 8 -> 16 px for SR."""
    sr = kind == "sr"
    raw = {
        "stage": {"name": name, "kind": kind, "resolution": 16 if sr else 8, "low_res": 8 if sr else 0, "channels": 1,
                  "num_classes": 3},
        "data": {"source": f"npz:{write_data(tmp_path, 16 if sr else 8)}", "flip": False},
        "diffusion": {"timesteps": T, "prediction": prediction, "learn_sigma": learn_sigma,
                      "loss": "hybrid" if learn_sigma else "simple"},
        "model": {"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8 if sr else 4],
                  "norm_groups": 4, "dropout": 0.1, **model},
        "conditioning": conditioning or {},
        "train": {"precision": "fp32", "progress": False, **(train or {})},
        "sample": {"sampler": "dpmpp", "steps": 6},
    }
    config = StageConfig.from_dict(raw)
    torch.manual_seed(seed)
    net = build_network(config)
    with torch.no_grad():  # the output layer starts at zero: give the teacher something to say
        for p in net.out_conv.parameters():
            p.normal_(0, 0.05)
    out = tmp_path / name
    out.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    (out / "stage.json").write_text(json.dumps({"format_version": 1, "config": config.to_dict(), "step": 0}))
    return out


QUICK = ["train.batch_size=8", "train.ckpt_every=2", "train.log_every=2", "train.progress=false",
         "train.precision=fp32", "train.warmup_steps=1"]


def quiet(_: str) -> None:
    pass


# --- (a) the target --------------------------------------------------------------------------------------


def test_the_grids_nest_and_the_sampler_uses_them():
    for steps in (1, 2, 3, 4, 5, 8, 16, 125, 500):
        student, teacher = distillation_grid(1000, steps), distillation_grid(1000, 2 * steps)
        assert teacher[::2] == student and len(set(teacher)) == 2 * steps and teacher[0] == 999
    assert distillation_grid(1000, 4) == [999, 749, 499, 249]
    assert distillation_grid(1000, 8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert timestep_sequence(999, -1, 4) == [999, 666, 333, 0]  # the default spacing is unchanged


@pytest.mark.parametrize("prediction,learn_sigma,clip", [("eps", True, True), ("v", False, False)])
def test_one_student_step_on_the_target_lands_on_two_teacher_ddim_steps(tmp_path, prediction, learn_sigma, clip):
    """A student that outputs the target x̂ at each of its N grid points, sampled by the library's DDIM on its grid,
    reproduces the teacher sampled by the library's DDIM with 2N steps, step for step."""
    teacher = Stage.load(tiny_teacher(tmp_path, prediction=prediction, learn_sigma=learn_sigma))
    teacher.config.sample.clip_denoised = clip
    n, steps = 6, 4
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    fn = teacher.model_fn(y, autocast=False)
    x_start = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    seen_teacher: list[tuple[int, torch.Tensor]] = []
    want = sample(teacher.diffusion, fn, (n, 1, 8, 8), sampler="ddim", steps=2 * steps, spacing="trailing",
                  x_start=x_start, clip_denoised=clip, callback=lambda s: seen_teacher.append((s.t, s.x)))
    grid = StepGrid(teacher.diffusion.alphas_cumprod, steps)
    assert [t for t, _ in seen_teacher] == grid.teacher

    def oracle(x: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:  # v from the distillation target
        i = grid.student.index(round(float(t_scaled[0]) * T / 1000))
        idx = torch.full((x.shape[0],), i)
        target, _ = distillation_target(fn, teacher.diffusion, grid, x, grid.t[idx], grid.mid[idx], grid.next[idx], clip)
        alpha, sigma = grid.alpha_sigma(grid.t[idx], x)
        return (alpha * x - target) / sigma

    student = GaussianDiffusion(teacher.diffusion.betas, prediction="v")
    seen_student: list[tuple[int, torch.Tensor]] = []
    got = sample(student, oracle, (n, 1, 8, 8), sampler="ddim", steps=steps, spacing="trailing", x_start=x_start,
                 clip_denoised=False, callback=lambda s: seen_student.append((s.t, s.x)))
    assert [t for t, _ in seen_student] == grid.student
    for (_, a), (_, b) in zip(seen_student, seen_teacher[1::2]):  # after each student step: two teacher steps
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --- (b) resume ------------------------------------------------------------------------------------------


def drop_after(run: Path, step: int) -> None:
    """What a kill -9 after checkpoint ``step`` leaves: nothing newer."""
    for ckpt in list_checkpoints(run):
        if load_state(ckpt)["step"] > step:
            shutil.rmtree(ckpt)


def test_interrupted_distillation_resumes_bitwise_across_rounds(tmp_path):
    teacher = tiny_teacher(tmp_path)
    kw = dict(rounds=2, start_steps=8, overrides=[*QUICK, "distill.round_steps=[4]"], device="cpu", log=quiet)
    done = distill(str(teacher), tmp_path / "straight", **kw)
    assert done.finished and done.student_steps == 2
    resumed = tmp_path / "resumed"
    assert not distill(str(teacher), resumed, stop_after=3, **kw).finished  # killed after step 3 of round 1 ...
    drop_after(round_dir(resumed, 1), 2)  # ... before its checkpoint at 3 was written
    distill(str(teacher), resumed, stop_after=5, **kw)  # round 1 to its end, round 2 to step 3
    drop_after(round_dir(resumed, 2), 2)
    assert distill(str(teacher), resumed, **kw).finished
    for k in (1, 2):
        a, b = (all_tensors(latest_checkpoint(round_dir(d, k))) for d in (tmp_path / "straight", resumed))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (k, key)
    state = load_state(latest_checkpoint(round_dir(resumed, 2)))
    record = state["distillation"]
    assert (record["round"], record["teacher_steps"], record["student_steps"]) == (2, 4, 2)
    assert record["teacher"]["path"] == str(latest_checkpoint(round_dir(resumed, 1)).resolve())
    assert record["original_teacher"]["prediction"] == "eps" and record["cpu_seconds"] > 0
    assert state["config"]["diffusion"]["prediction"] == "v" and not state["config"]["diffusion"]["learn_sigma"]
    # distill.rounds may grow on a rerun: one more halving from the stored state
    assert distill(str(teacher), resumed, **{**kw, "rounds": 3}).student_steps == 1


# --- (c), (d) sampling -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """A 2-step distilled base and a 2-step distilled SR stage, exported, with their teachers."""
    tmp = tmp_path_factory.mktemp("students")
    teachers = {"base": tiny_teacher(tmp, "base"), "sr": tiny_teacher(tmp, "sr", kind="sr", prediction="v")}
    out = {}
    for name, teacher in teachers.items():
        summary = distill(str(teacher), tmp / f"d_{name}", rounds=1, start_steps=4,
                          overrides=[*QUICK, "distill.round_steps=[2]"], device="cpu", log=quiet)
        out[name] = export_stage(summary.final_checkpoint, tmp / f"{name}_2step")
    return teachers, out


def steps_taken(cascade: Cascade, **kwargs) -> list[list[int]]:
    seen: list[list[int]] = [[] for _ in cascade.stages]
    cascade.sample(torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0),
                   callback=lambda s: seen[s.stage].append(s.t), **kwargs)
    return seen


def test_a_distilled_stage_samples_with_its_recorded_steps_and_an_explicit_count_overrides(students):
    _, student = students
    meta = json.loads((student["base"] / "stage.json").read_text())
    assert meta["config"]["sample"] == {"sampler": "ddim", "steps": 2, "eta": 0.0, "variance": "auto",
                                        "guidance": 1.0, "clip_denoised": False, "spacing": "trailing"}
    assert meta["distillation"]["grid"] == [39, 19] and meta["distillation"]["teacher"]["kind"] == "exported"
    cascade = Cascade.load([student["base"]])
    assert steps_taken(cascade) == [[39, 19]]
    assert steps_taken(cascade, steps=[4]) == [[39, 29, 19, 9]]  # its grid, at the count asked for
    assert steps_taken(cascade, steps=[4], sampler=["dpmpp"]) == [[39, 29, 19, 9]]


def test_cascades_mix_distilled_and_undistilled_stages(students, tmp_path):
    teacher, student = students
    dpmpp6 = timestep_sequence(T - 1, -1, 6)  # the teachers' own sampler: DPM-Solver++, 6 steps, linspace
    for base, sr, want in ((student["base"], teacher["sr"], [[39, 19], dpmpp6]),
                           (teacher["base"], student["sr"], [dpmpp6, [39, 19]])):
        cascade = Cascade.load([base, sr])
        assert steps_taken(cascade) == want
    code = main(["sample", str(student["base"]), str(teacher["sr"]), "--num", "3", "--out", str(tmp_path / "s.npz"),
                 "--device", "cpu", "--precision", "fp32", "--quiet"])
    assert code == 0 and np.load(tmp_path / "s.npz")["arr_0"].shape == (3, 16, 16, 1)


def test_noise_augmented_sr_on_crops_and_a_guided_teacher(tmp_path):
    """The other paths through the loss: an SR teacher with noise augmentation trained on crops, distilled at its
    sampling level s; a teacher with label dropout distilled at guidance 2 (the student learns the guided
    prediction: it samples without guidance and trains without label dropout)."""
    sr = tiny_teacher(tmp_path, "sr_noise", kind="sr", prediction="v",
                      conditioning={"augmentation": "noise", "noise_timesteps": T, "s_max": 20, "sample_s": 5},
                      train={"crop": 8})
    summary = distill(str(sr), tmp_path / "d_sr", rounds=1, start_steps=4, device="cpu", log=quiet,
                      overrides=[*QUICK, "distill.round_steps=[2]", "distill.conditioning=sample"])
    config = StageConfig.from_dict(load_state(summary.final_checkpoint)["config"])
    assert config.train.crop == 8 and config.uses_aug_level and config.conditioning.sample_s == 5
    guided = tiny_teacher(tmp_path, "guided", label_dropout=0.2)
    summary = distill(str(guided), tmp_path / "d_guided", rounds=1, start_steps=4, device="cpu", log=quiet,
                      overrides=[*QUICK, "distill.round_steps=[2]", "distill.guidance=2"])
    state = load_state(summary.final_checkpoint)
    assert state["distillation"]["guidance"] == 2.0
    assert state["config"]["model"]["label_dropout"] == 0.0 and state["config"]["sample"]["guidance"] == 1.0


# --- (e) refusals ----------------------------------------------------------------------------------------


def test_clear_errors(tmp_path, capsys):
    teacher = tiny_teacher(tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a stage: expected a training run directory"):
        distill(str(tmp_path / "junk"), tmp_path / "o1", log=quiet)
    with pytest.raises(UserError, match="no such directory"):
        distill(str(tmp_path / "missing"), tmp_path / "o2", log=quiet)
    with pytest.raises(UserError, match="has no stage 'base16'"):
        distill("pretrained:fashion-mnist/base16", tmp_path / "o3", log=quiet)
    with pytest.raises(ConfigError, match="distill.start_steps: 12 steps cannot be halved 3 times"):
        distill(str(teacher), tmp_path / "o4", rounds=3, start_steps=12, log=quiet)
    with pytest.raises(ConfigError, match="distill.rounds: must be >= 1"):
        distill(str(teacher), tmp_path / "o5", overrides=["distill.rounds=0"], log=quiet)
    with pytest.raises(ConfigError, match="must be <= the teacher's diffusion.timesteps"):
        distill(str(teacher), tmp_path / "o6", rounds=1, start_steps=64, log=quiet)
    with pytest.raises(ConfigError, match="may not change the network's shape"):
        distill(str(teacher), tmp_path / "o7", rounds=1, start_steps=8, overrides=["model.channels=32"], log=quiet)
    with pytest.raises(UserError, match="is not empty and holds no distill.json"):
        distill(str(teacher), tmp_path / "junk", rounds=1, start_steps=8, log=quiet)
    with pytest.raises(UserError, match="needs a stage trained with label dropout"):
        distill(str(teacher), tmp_path / "o8", rounds=1, start_steps=8, overrides=[*QUICK, "distill.guidance=2"],
                log=quiet)
    # nothing was trained there yet: the same --out takes other settings
    assert distill(str(teacher), tmp_path / "o8", rounds=1, start_steps=8, device="cpu", log=quiet,
                   overrides=[*QUICK, "distill.round_steps=[1]"]).finished
    # a resumed run must keep its settings (only rounds may change) and its teacher
    run = tmp_path / "run"
    distill(str(teacher), run, rounds=1, start_steps=8, overrides=[*QUICK, "distill.round_steps=[1]"], device="cpu",
            log=quiet)
    with pytest.raises(ConfigError, match="distill.start_steps: stored 8, now 16"):
        distill(str(teacher), run, start_steps=16, log=quiet)
    with pytest.raises(ConfigError, match="the student's tables"):
        distill(str(teacher), run, overrides=["train.lr=1e-3"], log=quiet)
    other = tiny_teacher(tmp_path, "other", seed=1)
    with pytest.raises(UserError, match="are not the ones this distillation started from"):
        distill(str(other), run, log=quiet)
    moved = tmp_path / "moved"  # a teacher moved elsewhere (another checkout) is found by its hash
    shutil.copytree(teacher, moved)
    shutil.move(str(teacher), tmp_path / "gone")
    with pytest.raises(UserError, match="no such directory"):
        distill(str(teacher), run, log=quiet)
    assert distill(str(moved), run, device="cpu", log=quiet).finished
    assert json.loads((run / "distill.json").read_text())["teacher"]["path"] == str(moved.resolve())
    save_file({"x": torch.zeros(1)}, str(moved / "model.safetensors"))
    with pytest.raises(UserError, match="changed since this distillation started"):
        distill(str(moved), run, log=quiet)
    # the command line says it in one line
    assert main(["distill", str(tmp_path / "junk"), "--out", str(tmp_path / "o9")]) == 2
    assert "cdm distill: error: teacher" in capsys.readouterr().err


def test_library_errors_name_the_parameters_and_cdm_distill_names_its_options(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    with pytest.raises(UserError) as info:  # the directory is read before the teacher
        distill("unused", full, log=quiet)
    assert str(info.value).startswith(f"out {full} is not empty") and "--" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        distill("unused", tmp_path / "new", overrides=["foo.x=1"], log=quiet)
    assert str(info.value).startswith("overrides 'foo.x=1': a distillation takes")
    assert main(["distill", "unused", "--out", str(full)]) == 2
    assert f"cdm distill: error: --out {full} is not empty" in capsys.readouterr().err
    assert main(["distill", "unused", "--out", str(tmp_path / "new2"), "--set", "foo.x=1"]) == 2
    assert "cdm distill: error: --set 'foo.x=1': a distillation takes" in capsys.readouterr().err


@pytest.mark.parametrize("stage,rounds,first,last", [("base8", 5, 32, 2), ("sr8to32_noaug", 4, 8, 1)])
def test_the_fashion_mnist_distill_configs_resolve_against_the_bundle(stage, rounds, first, last):
    from cascaded_diffusion.distill_config import read_distill_file, resolve_settings, resolve_teacher, student_config

    root = Path(__file__).resolve().parents[1]
    settings, student = resolve_settings(None, read_distill_file(root / f"configs/fashion-mnist/distill_{stage}.toml"),
                                         [], {})
    _, teacher = resolve_teacher(f"pretrained:fashion-mnist/{stage}")
    settings.validate(teacher.diffusion.timesteps)
    configs = [student_config(teacher, settings, student, k, 1.0) for k in range(1, settings.rounds + 1)]
    assert (len(configs), configs[0].sample.steps, configs[-1].sample.steps) == (rounds, first, last)
    assert all(c.train.precision == "auto" and c.train.crop == teacher.train.crop for c in configs)
