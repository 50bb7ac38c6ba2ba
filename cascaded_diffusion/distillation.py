"""Progressive distillation of a cascade stage (Salimans & Ho, ICLR 2022): ``cdm distill``.

Each round trains a student to do in one deterministic DDIM step what its teacher does in two, so K rounds turn a
``start_steps``-step teacher into a ``start_steps / 2**K``-step student; each round's teacher is the previous
round's student (its EMA weights), and round 1's student starts from the teacher's own weights.

**The grid.** The library's indices run 0 … T−1 (x_t at index t, level −1 is clean data). A K-step student is
evaluated at t_i = round(i·T/K) − 1, i = K … 1, and its last step goes from t_1 to clean data ("trailing" spacing,
:func:`~cascaded_diffusion.samplers.timestep_sequence`). The 2K-step teacher's grid is the same rule with 2K, so the
student's grid is exactly every other point of it and the teacher's extra point t'_i = round((2i−1)·T/(2K)) − 1 lies
between t_i and t_{i−1}. The student's stage.json records ``sample.spacing = "trailing"``, so the sampler evaluates it
on exactly these indices.

**The target.** From z_t (x_t drawn from real data at a student grid point t, next point s), two teacher DDIM steps
t → t' → s, each exactly as the teacher samples (its x̂ clipped when its ``sample.clip_denoised``), give z_s; the
student's target is x̃ = (z_s − (σ_s/σ_t) z_t) / (α_s − (σ_s/σ_t) α_t), the x̂ that makes one DDIM step t → s land on
z_s (onto clean data, x̃ = z_s). The student predicts v (x̂ = α_t z_t − σ_t v̂) whatever the teacher predicted: at
the few steps' first point, α_t ≈ 0 and an ε-prediction's x̂ = (z_t − σ_t ε̂)/α_t would amplify any error
1/α_t-fold. Loss: max(SNR_t, 1)·‖x̂ − x̃‖² (truncated SNR; ``snr_plus_one`` is SNR + 1, the plain loss on v).

**Learned variances** are dropped: the student is sampled by deterministic DDIM, which never uses them, so its
output layer keeps only the teacher's first C channels. **SR stages** see their low-resolution input exactly as the
trainer builds it (downsampled data, the stage's own augmentation and level s, the same crops), the same tensors for
teacher and student. **Guidance**: the teacher is run at ``distill.guidance`` (default its own ``sample.guidance``, 1
for every shipped stage: no guidance); a guided teacher's combination is what the student learns (it then samples
without guidance and is trained without label dropout).

Everything else is the trainer's (training.py): checkpoints, bit-exact resume, log.jsonl, run lock, precision, NaN
handling. A distillation directory holds ``distill.json`` (settings, teacher reference with sha256) and one trainer
run directory per round, ``round_K/``, each exportable like any stage (``cdm export OUT/round_K``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .augment import NoiseAugmentation, downsample
from .checkpoint import latest_valid_checkpoint, list_checkpoints, load_state, load_tensors, load_weights_into
from .config import ConfigError, StageConfig
from .diffusion import GaussianDiffusion, mean_flat, x0_eps_from_prediction
from .distill_config import (DISTILL_FILE, FORMAT_VERSION, OUT, DistillSettings, TeacherRef, check_teacher,
                             read_distill_file, resolve_settings, resolve_teacher, student_config, verify_teacher)
from .errors import UserError, check_output_dir, naming
from .fileio import atomic_write_text
from .pretrained import file_sha256
from .rundir import LOCK_FILE, RunLock
from .data.readers import ImageArray
from .samplers import timestep_sequence
from .stage import Stage, build_network, network_call
from .training import Trainer

METHOD = "progressive distillation (Salimans & Ho 2022)"


# --- the grid and the target ----------------------------------------------------------------------------


def distillation_grid(num_timesteps: int, steps: int) -> list[int]:
    """The indices a ``steps``-step student is evaluated at (its last step goes on to clean data)."""
    return timestep_sequence(num_timesteps - 1, -1, steps, spacing="trailing")


class StepGrid:
    """Round tensors: for student step i, its index t, the teacher's middle index t' and the next index s (−1 =
    clean), and ᾱ extended by ᾱ_{−1} = 1 (``abar[idx + 1]``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, student_steps: int, device: torch.device | str = "cpu"):
        T = len(alphas_cumprod)
        student, teacher = distillation_grid(T, student_steps), distillation_grid(T, 2 * student_steps)
        if teacher[::2] != student:  # timestep_sequence's trailing rule nests by construction
            raise AssertionError(f"the {student_steps}-step grid is not every other point of the "
                                 f"{2 * student_steps}-step one")
        self.student, self.teacher = student, teacher
        self.t = torch.tensor(student, device=device)
        self.mid = torch.tensor(teacher[1::2], device=device)
        self.next = torch.tensor(student[1:] + [-1], device=device)
        self.abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.double()]).to(device)

    def alpha_sigma(self, idx: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.abar[idx + 1].reshape(-1, *([1] * (like.ndim - 1)))
        return a.sqrt().to(like.dtype), (1.0 - a).sqrt().to(like.dtype)


def teacher_x0_eps(teacher: GaussianDiffusion, out: torch.Tensor, z: torch.Tensor, abar: torch.Tensor,
                   clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pred, _ = teacher.split_output(out.float(), z.shape[1])
    return x0_eps_from_prediction(teacher.prediction, pred, z, abar, clip)


@torch.no_grad()
def distillation_target(teacher_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        teacher: GaussianDiffusion, grid: StepGrid, z_t: torch.Tensor, t: torch.Tensor,
                        mid: torch.Tensor, s: torch.Tensor, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, z_s): the student's x̂ target at (z_t, t) and the teacher's two-DDIM-step result z_s, per example
    (t, mid, s: index tensors of shape (N,); ``teacher_fn(z, t_scaled)`` is the teacher's raw network output)."""
    z = z_t
    for here, there in ((t, mid), (mid, s)):
        a_here, s_here = grid.alpha_sigma(here, z)
        a_there, s_there = grid.alpha_sigma(there, z)
        x0, eps = teacher_x0_eps(teacher, teacher_fn(z, teacher.scale_timesteps(here)), z, a_here**2, clip)
        z = a_there * x0 + s_there * eps  # DDIM, η = 0 (samplers._ddim_step)
    alpha_t, sigma_t = grid.alpha_sigma(t, z_t)
    alpha_s, sigma_s = grid.alpha_sigma(s, z_t)
    ratio = sigma_s / sigma_t
    return (z - ratio * z_t) / (alpha_s - ratio * alpha_t), z


def loss_weight(alpha: torch.Tensor, sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    snr = alpha**2 / sigma**2
    return snr.clamp(min=1.0) if weighting == "truncated_snr" else snr + 1.0


def student_init(net: torch.nn.Module, teacher_tensors: dict[str, torch.Tensor],
                 channels: int) -> dict[str, torch.Tensor]:
    """The teacher's weights for the student's network: a learned-variance teacher's output layer loses its variance
    channels (its first ``channels`` outputs are the prediction)."""
    expected = net.state_dict()
    out = {}
    for key, value in teacher_tensors.items():
        if key in expected and key.startswith("out_conv.") and value.shape[0] == 2 * channels \
                and expected[key].shape[0] == channels:
            value = value[:channels]
        out[key] = value.float()
    return out


# --- one round: the trainer with the distillation loss ---------------------------------------------------


@dataclass
class RoundTeacher:
    config: StageConfig
    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]  # source, path, sha256, step: written into every checkpoint


class DistillTrainer(Trainer):
    """One round: :class:`~cascaded_diffusion.training.Trainer` (checkpoints, resume, log, lock, precision) with the
    student initialised from the teacher and the distillation loss."""

    def __init__(self, config: StageConfig, run_dir: str | Path, *, teacher: RoundTeacher, settings: DistillSettings,
                 round_index: int, guidance: float, record: dict[str, Any], device: str | None = None,
                 data: ImageArray | None = None, stop_after: int | None = None):
        super().__init__(config, run_dir, device=device, data=data, stop_after=stop_after)
        self.round_teacher = teacher
        self.settings = settings
        self.round_index = round_index
        self.guidance = guidance
        self.record = record
        self.resumed_step = 0
        self._cost_before = (0.0, 0.0)

    def _build(self) -> None:
        super()._build()
        self._clock = (time.process_time(), time.time())
        tcfg = self.round_teacher.config
        net = build_network(tcfg, "cpu")
        load_weights_into(net, self.round_teacher.tensors, source=self.record["teacher"]["path"])
        net.to(self.device).eval().requires_grad_(False)
        self.teacher = Stage(tcfg, net, self.device, source=self.record["teacher"]["path"])
        self.teacher.network_batch = None  # training batches go to the network as they are
        self.teacher.check_guidance(self.guidance)
        self.teacher_clip = tcfg.sample.clip_denoised
        init = student_init(self.net, self.round_teacher.tensors, self.config.stage.channels)
        load_weights_into(self.net, init, source=self.record["teacher"]["path"])
        load_weights_into(self.ema.model, init, source=self.record["teacher"]["path"])
        self.grid = StepGrid(self.diffusion.alphas_cumprod, self.config.sample.steps, self.device)

    def _check_run_dir(self, ckpt: Path | None) -> Path | None:
        ckpt = super()._check_run_dir(ckpt)
        if ckpt is not None:
            stored = load_state(ckpt).get("distillation", {}).get("teacher", {}).get("sha256")
            if stored != self.record["teacher"]["sha256"]:
                raise naming(ConfigError, "{run_dir} was distilled from another teacher (sha256 {old}…, now {new}…); "
                             "distill into a new {option}", OUT, run_dir=self.run_dir, old=str(stored)[:12],
                             new=self.record["teacher"]["sha256"][:12])
        return ckpt

    def resume(self, ckpt: Path) -> None:
        super().resume(ckpt)
        self.resumed_step = self.step
        cost = load_state(ckpt).get("distillation", {})
        self._cost_before = (cost.get("cpu_seconds", 0.0), cost.get("wall_seconds", 0.0))

    def checkpoint_state(self) -> dict[str, Any]:
        cpu, wall = self._cost_before
        return {"distillation": {**self.record, "cpu_seconds": cpu + time.process_time() - self._clock[0],
                                 "wall_seconds": wall + time.time() - self._clock[1]}}

    def _lr_at(self, step: int) -> float:
        lr = super()._lr_at(step)
        if self.settings.lr_decay:
            lr *= (self.config.train.steps - step) / self.config.train.steps
        return lr

    def _loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n, gen = x0.shape[0], self.generator
        y = self._dropped_labels(y)
        low_res = level = aug_level = None
        if cfg.is_sr:  # as the trainer builds it, one tensor for teacher and student
            low_res = downsample(x0, cfg.stage.low_res)
            if self.settings.conditioning == "train":
                low_res, level = self.augmentation(low_res, gen)
            elif isinstance(self.augmentation, NoiseAugmentation):
                level = torch.full((n,), cfg.conditioning.sample_s, dtype=torch.long, device=self.device)
                low_res = self.augmentation.apply(low_res, level, generator=gen)
            if level is not None:
                aug_level = self.augmentation.scaled_level(level)
            if cfg.train.crop:
                x0, low_res = self._crop(x0, low_res)
        i = torch.randint(0, len(self.grid.student), (n,), generator=gen, device=self.device)
        t, mid, s = self.grid.t[i], self.grid.mid[i], self.grid.next[i]
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        alpha, sigma = self.grid.alpha_sigma(t, x0)
        z_t = alpha * x0 + sigma * noise
        teacher_fn = self.teacher.model_fn(y, low_res, level, guidance=self.guidance, autocast=self.precision.bf16)
        target, _ = distillation_target(teacher_fn, self.teacher.diffusion, self.grid, z_t, t, mid, s,
                                        self.teacher_clip)
        call = network_call(self.train_net, self.device, autocast=self.precision, channels_last=cfg.train.channels_last)
        v = call(z_t, self.diffusion.scale_timesteps(t), y, aug_level, low_res)
        x_hat = alpha * z_t - sigma * v
        losses = mean_flat((x_hat - target) ** 2) * loss_weight(alpha, sigma, self.settings.weighting).flatten()
        self.loss_by_t.add(t, losses)
        return losses.mean()


# --- the whole distillation ------------------------------------------------------------------------------


def round_dir(out: str | Path, k: int) -> Path:
    return Path(out) / f"round_{k}"


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """A round's last checkpoint when the round is complete, else None."""
    ckpt, _ = latest_valid_checkpoint(run_dir)
    return ckpt if ckpt is not None and load_state(ckpt)["step"] >= steps else None


def read_record(out: Path) -> dict | None:
    """``OUT/distill.json``, None for a new directory; a non-empty directory that is not a distillation is refused."""
    path = out / DISTILL_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise naming(UserError, "{path} is not readable ({reason}); distill into a new {option}", OUT, path=path,
                         reason=e) from None
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise naming(UserError, "{option} {out} is not empty and holds no {file}: give a new or empty directory", OUT,
                     out=out, file=DISTILL_FILE)
    return None


@dataclass
class DistillSummary:
    out: Path
    rounds_done: int
    rounds: int
    final_checkpoint: Path | None
    student_steps: int | None

    @property
    def finished(self) -> bool:
        return self.rounds_done == self.rounds


def distill(teacher: str, out: str | Path, *, rounds: int | None = None, start_steps: int | None = None,
            config: str | Path | None = None, overrides: list[str] | None = None, device: str | None = None,
            stop_after: int | None = None, log: Callable[[str], None] = print) -> DistillSummary:
    """Distill ``teacher`` (a run, checkpoint or exported stage directory, or ``pretrained:CASCADE/STAGE``) into
    ``out``: every round not yet finished, resuming the one under way. ``stop_after``: return after this many
    optimizer steps in this call (to simulate an interruption)."""
    out = Path(out)
    stored = read_record(out)
    if stored and not any(list_checkpoints(p) for p in out.glob("round_*")):
        stored = None  # nothing trained yet (a start that failed early): the settings may still change
    check_output_dir(out, "out")
    with RunLock(out):
        source = f"{out / DISTILL_FILE}" if stored else "distill"
        settings, student = resolve_settings(stored, read_distill_file(config), list(overrides or []),
                                             {"rounds": rounds, "start_steps": start_steps}, source)
        if stored:  # the recorded weights (not what a teacher run directory holds newest now), wherever they are
            ref = TeacherRef(**stored["teacher"])
            if str(teacher) != ref.source or not (Path(ref.path) / f"{ref.stem}.safetensors").is_file():
                ref = check_teacher(stored["teacher"], resolve_teacher(str(teacher), ref.stem)[0])
            tconfig = StageConfig.from_dict(stored["teacher_config"], source=str(out / DISTILL_FILE))
        else:
            ref, tconfig = resolve_teacher(str(teacher), settings.teacher_weights)
        verify_teacher(ref)
        settings.validate(tconfig.diffusion.timesteps)
        guidance = tconfig.sample.guidance if settings.guidance < 0 else settings.guidance
        configs = [student_config(tconfig, settings, student, k, guidance) for k in range(1, settings.rounds + 1)]
        atomic_write_text(out / DISTILL_FILE, json.dumps({  # (a moved teacher's new path included)
            "format_version": FORMAT_VERSION, "method": METHOD, "teacher": ref.to_dict(),
            "teacher_config": tconfig.to_dict(), "distill": settings.to_dict(), "student": student,
            "guidance": guidance, "grid": "trailing: t_i = round(i*T/N) - 1, i = N..1, then clean data",
        }, indent=1))
        return _run_rounds(out, ref, tconfig, settings, configs, guidance, device, stop_after, log)


def _run_rounds(out: Path, ref: TeacherRef, tconfig: StageConfig, settings: DistillSettings,
                configs: list[StageConfig], guidance: float, device: str | None, stop_after: int | None,
                log: Callable[[str], None]) -> DistillSummary:
    original = {**ref.to_dict(), "prediction": tconfig.diffusion.prediction,
                "learn_sigma": tconfig.diffusion.learn_sigma, "clip_denoised": tconfig.sample.clip_denoised}
    teacher = RoundTeacher(tconfig, load_tensors(ref.path, ref.stem), original)
    data: ImageArray | None = None
    final: Path | None = None
    for k, config in enumerate(configs, start=1):
        run_dir, steps = round_dir(out, k), settings.steps_of_round(k)
        final = finished_checkpoint(run_dir, steps) if run_dir.is_dir() else None
        if final is None:
            if stop_after is not None and stop_after <= 0:
                return DistillSummary(out, k - 1, settings.rounds, None, None)
            n = config.sample.steps
            log(f"round {k} of {settings.rounds}: {2 * n} teacher steps -> {n} student steps, {steps} optimizer steps "
                f"in {run_dir}")
            record = {"method": METHOD, "round": k, "rounds": settings.rounds, "teacher_steps": 2 * n,
                      "student_steps": n, "grid": distillation_grid(config.diffusion.timesteps, n),
                      "weighting": settings.weighting, "conditioning": settings.conditioning, "guidance": guidance,
                      "teacher": teacher.record, "original_teacher": original}
            trainer = DistillTrainer(config, run_dir, teacher=teacher, settings=settings, round_index=k,
                                     guidance=guidance, record=record, device=device, data=data,
                                     stop_after=stop_after)
            trainer.train()
            data = trainer.data
            if stop_after is not None:
                stop_after -= trainer.step - trainer.resumed_step
            final = finished_checkpoint(run_dir, steps)
            if final is None:
                return DistillSummary(out, k - 1, settings.rounds, None, None)
        # the next round's teacher: this round's student, its EMA weights as written (also when resumed later)
        weights = final / "ema.safetensors"
        teacher = RoundTeacher(config, load_tensors(final, "ema"), {
            "source": str(run_dir), "path": str(final.resolve()), "kind": "checkpoint", "stem": "ema",
            "sha256": file_sha256(weights), "step": load_state(final)["step"], "prediction": "v",
            "learn_sigma": False, "clip_denoised": False})
    return DistillSummary(out, len(configs), settings.rounds, final, configs[-1].sample.steps)


def round_checkpoints(out: str | Path) -> Iterator[tuple[int, Path, dict[str, Any]]]:
    """Each round of the ``cdm distill`` output ``out`` that has a valid checkpoint: (round, its newest checkpoint,
    that checkpoint's state), in round order."""
    k = 1
    while round_dir(out, k).is_dir():
        ckpt, _ = latest_valid_checkpoint(round_dir(out, k))
        if ckpt is not None:
            yield k, ckpt, load_state(ckpt)
        k += 1


def finished_students(out: str | Path) -> dict[int, Path]:
    """Student sampling steps -> the final checkpoint of each finished round of ``out``."""
    return {state["config"]["sample"]["steps"]: ckpt for _, ckpt, state in round_checkpoints(out)
            if state["step"] >= state["config"]["train"]["steps"]}


def distill_report(out: str | Path) -> list[dict[str, Any]]:
    """Per round of ``out``: steps, optimizer steps done, loss at the end, CPU and wall seconds (from the newest
    checkpoint's record: the work kept, not work lost to interruptions)."""
    rows = []
    for k, ckpt, state in round_checkpoints(out):
        rec = state.get("distillation", {})
        rows.append({"round": k, "teacher_steps": rec.get("teacher_steps"),
                     "student_steps": rec.get("student_steps"), "step": state["step"],
                     "of": state["config"]["train"]["steps"], "cpu_hours": rec.get("cpu_seconds", 0.0) / 3600,
                     "wall_hours": rec.get("wall_seconds", 0.0) / 3600, "checkpoint": str(ckpt)})
    return rows


