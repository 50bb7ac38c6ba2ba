"""``cdm distill``'s settings: the ``[distill]`` section, the teacher it names and each round's student config.

A distillation config is a small TOML file (``configs/fashion-mnist/distill_*.toml``)::

    [distill]
    rounds = 3            # halvings: a 32-step teacher gives 16-, 8- and 4-step students
    start_steps = 32      # the teacher's DDIM steps in round 1 (a multiple of 2**rounds)
    round_steps = [4000]  # optimizer steps per round: one value for every round or one per round

    [train]               # the student's training: over the teacher's own [train] section and TRAIN_DEFAULTS
    lr = 1e-4

``[train]``, ``[data]`` and ``[model]`` (only keys that leave the network's shape alone, e.g. ``dropout``) set the
student; the student's ``[diffusion]`` (v-prediction, no learned variance) and ``[sample]`` (DDIM on the
distillation grid) are fixed by the method. The resolved settings and the teacher's reference (its directory and
the sha256 of its weights) are stored in ``OUT/distill.json``; a rerun resumes and must agree with them (only
``rounds`` may change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import STAGE_FILE, CheckpointError, latest_valid_checkpoint, is_exported_stage, load_state, \
    verify_checkpoint
from .config import ConfigError, StageConfig, apply_overrides
from .tomlsections import build_section
from .errors import UserError, naming
from .pretrained import file_sha256, find_cascade

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DISTILL_FILE = "distill.json"
# the setting that names a distillation's directory, as errors name it (the CLI shows it as --out)
OUT = {"option": "out"}
FORMAT_VERSION = 1
WEIGHTINGS = ("truncated_snr", "snr_plus_one")
CONDITIONINGS = ("train", "sample")
STUDENT_SECTIONS = ("train", "data", "model")
PRETRAINED_PREFIX = "pretrained:"

# The student's training, over the teacher's [train] section (a config's [train] table goes over these): Salimans &
# Ho anneal the learning rate to 0 in every round (distill.lr_decay); checkpoints often, on a shared CPU
TRAIN_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4, "warmup_steps": 100, "ema_rate": 0.999, "ema_warmup": True, "log_every": 50, "ckpt_every": 250,
    "keep_last": 2, "keep_steps": [], "sample_every": 0, "eval_every": 0, "progress": True, "precision": "auto",
}


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class DistillSettings:
    """The ``[distill]`` section."""

    rounds: int = 1
    start_steps: int = 64
    round_steps: list[int] = field(default_factory=lambda: [2000])
    # the student's loss on x: max(SNR, 1) ("truncated SNR") or SNR + 1 (the same as an unweighted loss on v)
    weighting: str = field(default="truncated_snr", metadata=_choices(*WEIGHTINGS))
    # SR stages: the low-res input as in training ("train": the stage's augmentation, random level s / blur) or as at
    # sampling ("sample": only conditioning.sample_s, no blur)
    conditioning: str = field(default="train", metadata=_choices(*CONDITIONINGS))
    guidance: float = -1.0  # the teacher's classifier-free guidance scale; < 0: its sample.guidance
    teacher_weights: str = field(default="ema", metadata=_choices("ema", "model"))
    lr_decay: bool = True  # the learning rate falls linearly to 0 over each round

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def student_steps(self, k: int) -> int:
        """Sampling steps of round k's student (k = 1 … rounds)."""
        return self.start_steps >> k

    def steps_of_round(self, k: int) -> int:
        return self.round_steps[0] if len(self.round_steps) == 1 else self.round_steps[k - 1]

    def validate(self, num_timesteps: int, source: str = "distill") -> None:
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: distill.{key}: {msg}")

        if self.rounds < 1:
            fail("rounds", f"must be >= 1 (each round halves the steps), got {self.rounds}")
        if self.start_steps < 2:
            fail("start_steps", f"must be >= 2, got {self.start_steps}")
        if self.start_steps % (1 << self.rounds):
            example = (1 << self.rounds) * max(1, self.start_steps >> self.rounds)
            fail("start_steps", f"{self.start_steps} steps cannot be halved {self.rounds} times: use a multiple of "
                 f"2**rounds = {1 << self.rounds} (e.g. {example})")
        if self.start_steps > num_timesteps:
            fail("start_steps", f"must be <= the teacher's diffusion.timesteps ({num_timesteps}), got "
                 f"{self.start_steps}")
        if not self.round_steps or any(s < 1 for s in self.round_steps):
            fail("round_steps", f"must be one or more step counts >= 1, got {self.round_steps}")
        if len(self.round_steps) not in (1, self.rounds):
            fail("round_steps", f"give one value for every round or one per round ({self.rounds}), got "
                 f"{len(self.round_steps)}")


# --- the settings' layers: stored < config file < --set < options -----------------------------------------


def read_distill_file(path: str | Path | None) -> dict[str, Any]:
    """A distillation config's tables (``{}`` for no file); unknown sections are refused."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a valid UTF-8 TOML file: {e}") from None
    allowed = ("distill", *STUDENT_SECTIONS)
    for name, value in raw.items():
        if name not in allowed or not isinstance(value, dict):
            raise ConfigError(f"{path}: [{name}] is not a table a distillation config takes (valid: "
                              f"{', '.join(f'[{a}]' for a in allowed)}; the student's [diffusion] and [sample] are "
                              "fixed by the method)")
    return raw


def resolve_settings(stored: dict | None, file_raw: dict, overrides: list[str], options: dict[str, Any],
                     source: str = "distill") -> tuple[DistillSettings, dict[str, dict]]:
    """The settings and the student's tables, layered: defaults < ``stored`` (a run being resumed) < the config file
    < ``--set`` < command-line ``options`` (``rounds``, ``start_steps``). A resumed run must agree with what it
    stored, except for ``rounds``."""
    base: dict[str, Any] = {"distill": dict((stored or {}).get("distill", {}))}
    for name in STUDENT_SECTIONS:
        base[name] = dict((stored or {}).get("student", {}).get(name, {}))
    for name, table in file_raw.items():
        base[name].update(table)
    for text in overrides:
        section = text.split("=", 1)[0].strip().split(".")[0]
        if section not in base:
            raise naming(ConfigError, "{option} {text!r}: a distillation takes distill.*, train.*, data.* or model.* "
                         "keys", {"option": "overrides"}, text=text)
    merged = apply_overrides(base, overrides)
    merged["distill"].update({k: v for k, v in options.items() if v is not None})
    settings = build_section(DistillSettings, merged["distill"], "distill", source)
    student = {name: merged[name] for name in STUDENT_SECTIONS if merged[name]}
    if stored:
        old = dict(stored.get("distill", {}))
        new = settings.to_dict()
        changed = [f"distill.{k}: stored {old.get(k)!r}, now {new[k]!r}" for k in new
                   if k != "rounds" and k in old and old[k] != new[k]]
        if student != stored.get("student", {}):
            changed.append(f"the student's tables: stored {stored.get('student', {})}, now {student}")
        if changed:
            raise naming(ConfigError, "{source} was started with other settings ({changed}): rerun with the original "
                         "ones (only distill.rounds may change), or distill into a new {option}", OUT, source=source,
                         changed="; ".join(changed))
    return settings, student


# --- the teacher ------------------------------------------------------------------------------------------


@dataclass
class TeacherRef:
    """Which weights a distillation starts from: ``path`` is the concrete directory read (an exported stage or one
    checkpoint), ``stem`` its weights file, ``sha256`` that file's hash."""

    source: str
    path: str
    kind: str  # "exported" | "checkpoint"
    stem: str
    sha256: str
    step: int | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NOT_A_STAGE = ("expected a training run directory (checkpoints/step_*), one checkpoint directory (with state.json), "
               f"an exported stage ({STAGE_FILE} + model.safetensors) or {PRETRAINED_PREFIX}CASCADE/STAGE (e.g. "
               f"{PRETRAINED_PREFIX}fashion-mnist/base8)")


def pretrained_stage_dir(spec: str) -> Path:
    """The folder of ``pretrained:CASCADE/STAGE``: a bundled cascade's, or a downloaded or exported one's, stage."""
    name, sep, stage = spec[len(PRETRAINED_PREFIX):].rstrip("/").rpartition("/")
    if not sep or not name or not stage:
        raise UserError(f"{spec}: give {PRETRAINED_PREFIX}CASCADE/STAGE, e.g. "
                        f"{PRETRAINED_PREFIX}fashion-mnist/base8")
    folder = find_cascade(name)
    if stage not in folder.manifest["stages"]:
        raise UserError(f"{spec}: the cascade {name} has no stage {stage!r} (its stages: "
                        f"{', '.join(folder.manifest['stages'])})")
    return folder.root / stage


def resolve_teacher(spec: str, weights: str = "ema") -> tuple[TeacherRef, StageConfig]:
    """The concrete weights a teacher argument names, and its config. A run directory resolves to its newest valid
    checkpoint *now*: that checkpoint is recorded, so a run that trains on does not change a distillation's
    teacher."""
    path = pretrained_stage_dir(spec) if spec.startswith(PRETRAINED_PREFIX) else Path(os.path.expanduser(spec))
    if not path.is_dir():
        raise UserError(f"teacher {spec}: no such directory; {NOT_A_STAGE}")
    if (path / DISTILL_FILE).is_file():
        raise UserError(f"teacher {spec} is a `cdm distill` output: give one of its rounds (e.g. {path / 'round_1'}) "
                        "to distill a student further")
    if is_exported_stage(path):
        try:
            meta = json.loads((path / STAGE_FILE).read_text())
            config = StageConfig.from_dict(meta["config"], source=str(path / STAGE_FILE))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"teacher {spec}: {path / STAGE_FILE} is not a readable stage ({e})") from None
        kind, stem, step, ckpt = "exported", "model", meta.get("step"), path
    else:
        try:
            if (path / "state.json").is_file():
                ckpt = path
                verify_checkpoint(ckpt, (weights,))
            else:
                ckpt, corrupt = latest_valid_checkpoint(path, (weights,))
                if ckpt is None:
                    why = f" (unreadable: {corrupt[0][1]})" if corrupt else ""
                    raise UserError(f"teacher {spec} is not a stage{why}: {NOT_A_STAGE}")
            state = load_state(ckpt)
            config = StageConfig.from_dict(state["config"], source=str(ckpt / "state.json"))
        except CheckpointError as e:
            raise UserError(f"teacher {spec}: {e}") from None
        kind, stem, step = "checkpoint", weights, state["step"]
    weights_file = ckpt / f"{stem}.safetensors"
    if not weights_file.is_file():
        raise UserError(f"teacher {spec}: {weights_file} is missing")
    ref = TeacherRef(source=spec, path=str(ckpt.resolve()), kind=kind, stem=stem, sha256=file_sha256(weights_file),
                     step=step)
    return ref, config


def check_teacher(stored: dict, ref: TeacherRef) -> TeacherRef:
    """On resume with another teacher argument, or when the recorded weights file is gone (a moved checkout): the
    weights given now must be the recorded ones (the same sha256). Returns the recorded reference while its file is
    there (its concrete checkpoint, not a run's newest one), else the one given now."""
    old = TeacherRef(**stored)
    if ref.sha256 != old.sha256:
        raise naming(UserError, "teacher {source}: its weights ({path}, sha256 {sha}…) are not the ones this "
                     "distillation started from ({old_path}, sha256 {old_sha}…); give the original teacher, or distill "
                     "into a new {option}", OUT, source=ref.source, path=ref.path, sha=ref.sha256[:12],
                     old_path=old.path, old_sha=old.sha256[:12])
    return old if (Path(old.path) / f"{old.stem}.safetensors").is_file() else ref


def verify_teacher(ref: TeacherRef) -> None:
    weights_file = Path(ref.path) / f"{ref.stem}.safetensors"
    if not weights_file.is_file():
        raise UserError(f"the teacher's weights {weights_file} are gone (a pruned checkpoint?); this distillation "
                        "cannot go on without them")
    if file_sha256(weights_file) != ref.sha256:
        raise naming(UserError, "the teacher's weights {file} changed since this distillation started (sha256 {sha}… "
                     "recorded); distill into a new {option}", OUT, file=weights_file, sha=ref.sha256[:12])


# --- the student ------------------------------------------------------------------------------------------


def student_config(teacher: StageConfig, settings: DistillSettings, student: dict[str, dict], k: int,
                   guidance: float) -> StageConfig:
    """Round k's student: the teacher's network and data, v-prediction without learned variance, trained with
    :data:`TRAIN_DEFAULTS` and ``student``'s tables, sampled by deterministic DDIM on the distillation grid."""
    steps = settings.student_steps(k)
    raw = teacher.to_dict()
    raw["stage"]["name"] = f"{teacher.stage.name}-distilled{steps}"
    raw["diffusion"].update(prediction="v", learn_sigma=False, loss="simple", loss_weighting="uniform")
    raw["train"].update(TRAIN_DEFAULTS)
    for name, table in student.items():
        raw[name].update(table)
    raw["train"].update(steps=settings.steps_of_round(k), sample_steps=steps, seed=raw["train"].get("seed", 0) + k - 1)
    if guidance != 1.0:  # the guided prediction is what is learnt: the student samples without guidance
        raw["model"]["label_dropout"] = 0.0
    raw["sample"] = {"sampler": "ddim", "steps": steps, "eta": 0.0, "variance": "auto", "guidance": 1.0,
                     "clip_denoised": False, "spacing": "trailing"}
    config = StageConfig.from_dict(raw, source=f"round {k}'s student")
    expected = dict(teacher.architecture(), diffusion={"learn_sigma": False})
    if config.architecture() != expected:
        raise ConfigError("a distillation's [model] may not change the network's shape (the student starts from the "
                          f"teacher's weights): {student.get('model')}")
    return config
