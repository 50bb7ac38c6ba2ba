"""Stage configuration: one human-readable TOML file per cascade stage.

Every key is declared in a dataclass below; loading validates names, types and allowed values and raises
:class:`ConfigError` naming the offending key. The resolved config (defaults filled in) is stored in every
checkpoint, so a run directory describes itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .augment import AUGMENTATIONS
from .diffusion import LOSS_WEIGHTINGS, LOSSES, PREDICTIONS
from .samplers import SAMPLE_VARIANCES, SAMPLERS, SPACINGS
from .unet_config import LOW_RES_UPSAMPLE_MODES, ModelOptions, UNetConfig, UNetConfigError
from .errors import naming
from .tomlsections import ConfigError, build_section, parse_override, toml_value, tomllib



def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class StageSection:
    name: str = "stage"
    kind: str = field(default="base", metadata=_choices("base", "sr"))
    resolution: int = 32
    low_res: int = 0  # SR stages only: resolution of the conditioning image
    channels: int = 3
    num_classes: int = 10


@dataclass
class DataSection:
    source: str = "fashion-mnist"
    root: str = ""  # dataset directory override (e.g. Fashion-MNIST idx files)
    cache_dir: str = ""
    flip: bool = True
    on_corrupt: str = field(default="skip", metadata=_choices("skip", "error"))
    prefetch: int = 2  # batches read ahead by a background thread (0: read on the training thread)


@dataclass
class DiffusionSection:
    timesteps: int = 1000
    schedule: str = "cosine"  # cosine | linear | linear:START,END
    prediction: str = field(default="eps", metadata=_choices(*PREDICTIONS))
    learn_sigma: bool = False
    loss: str = field(default="simple", metadata=_choices(*LOSSES))
    vlb_weight: float = 0.001
    # weighting of the simple (MSE) term over t; the hybrid loss's VLB term is never reweighted.
    # "min_snr": min(SNR, gamma) expressed in the x0 error (Hang et al. 2023), i.e. min(SNR, gamma)/SNR for eps,
    # min(SNR, gamma)/(SNR + 1) for v, min(SNR, gamma) for x0 prediction
    loss_weighting: str = field(default="uniform", metadata=_choices(*LOSS_WEIGHTINGS))
    min_snr_gamma: float = 5.0


@dataclass
class ConditioningSection:
    """How an SR stage sees its low-resolution input (ignored by base stages)."""

    upsample: str = field(default="bilinear", metadata=_choices(*LOW_RES_UPSAMPLE_MODES))
    augmentation: str = field(default="none", metadata=_choices(*AUGMENTATIONS))
    # noise augmentation: the forward process of the *previous* stage, levels s in [s_min, s_max]
    noise_schedule: str = "cosine"
    noise_timesteps: int = 1000
    s_min: int = 0
    s_max: int = 1000
    fixed_s: int = -1  # >= 0: train at this single level instead of amortizing over [s_min, s_max]
    sample_s: int = 0  # default level s at sampling time (pick it with `cdm sweep`)
    # blur augmentation
    blur_kernel: int = 3
    blur_sigma_min: float = 0.4
    blur_sigma_max: float = 0.6
    blur_prob: float = 0.5


@dataclass
class TrainSection:
    steps: int = 10000
    batch_size: int = 64  # per process
    grad_accum: int = 1
    optimizer: str = field(default="adam", metadata=_choices("adam", "adamw"))
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # <= 0 disables clipping
    ema_rate: float = 0.9999
    ema_warmup: bool = True  # rate min(ema_rate, (1+n)/(10+n)) so early EMA weights are usable
    # network precision: "auto" = bf16 autocast where the hardware does bf16 natively and it measured faster (CUDA
    # with bf16, CPUs with avx512_bf16 or AMX), fp32 elsewhere (hardware.choose_precision); "bf16" | "fp32" are
    # obeyed as given. Older configs said `bf16 = true/false`, read as "bf16"/"fp32" (_legacy_bf16).
    precision: str = field(default="auto", metadata=_choices("auto", "bf16", "fp32"))
    channels_last: bool = False
    compile: bool = False
    # cuDNN autotunes each convolution's algorithm for the (fixed) training shapes, as the throughput benchmark
    # does; false picks algorithms by heuristic, which is slower but the same choice on every run
    cudnn_benchmark: bool = True
    seed: int = 0
    # SR stages: train on aligned random crops (crop x crop of the high-res image and the matching region of its
    # upsampled conditioning image) and sample at full size; 0 = whole images
    crop: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 3
    # checkpoints written at these steps as well and never pruned (e.g. doubling budgets for a compute study)
    keep_steps: list[int] = field(default_factory=list)
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 50
    tensorboard: bool = False
    progress: bool = True
    # periodic small-sample KID of the EMA weights against the stage's training data (watch.py); 0 = off. Written
    # to a stored config only when on, so run directories and bundles made before these keys keep their bytes
    eval_every: int = 0
    eval_num: int = 64
    eval_features: str = ""  # "classifier[:PATH|NAME]" or "inception[:WEIGHTS]"; required when eval_every > 0


@dataclass
class SampleSection:
    sampler: str = field(default="ddim", metadata=_choices(*SAMPLERS))
    steps: int = 50  # 0: every training step
    eta: float = 0.0
    variance: str = field(default="auto", metadata=_choices(*SAMPLE_VARIANCES))
    guidance: float = 1.0  # 1.0 = plain conditional sampling
    clip_denoised: bool = True
    # where the steps' network evaluations lie (samplers.timestep_sequence): "trailing" is the grid a progressively
    # distilled stage was trained on (`cdm distill`). Written to a stored config only when not "linspace", so run
    # directories and bundles made before this key keep their bytes
    spacing: str = field(default="linspace", metadata=_choices(*SPACINGS))


@dataclass
class StageConfig:
    stage: StageSection = field(default_factory=StageSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    model: ModelOptions = field(default_factory=ModelOptions)
    conditioning: ConditioningSection = field(default_factory=ConditioningSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)

    # --- conversion -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        # written only when false: run directories and bundles made before the option keep their bytes
        if values["model"].get("middle_attention", True):
            values["model"].pop("middle_attention", None)
        if values["sample"].get("spacing") == "linspace":
            values["sample"].pop("spacing", None)
        if not values["train"].get("eval_every"):
            for key in ("eval_every", "eval_num", "eval_features"):
                values["train"].pop(key, None)
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> StageConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a table of sections, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in raw.items():
            if name not in sections:
                raise ConfigError(
                    f"{source}: unknown section [{name}] (valid sections: {', '.join(sections)})"
                )
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, got {type(value).__name__}")
            section_type = _section_type(sections[name])
            if name == "train":
                value = _legacy_bf16(value, source)
            kwargs[name] = build_section(section_type, value, f"{name}", source)
        config = cls(**kwargs)
        config.validate(source)
        return config

    # --- semantic checks --------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: {key}: {msg}")

        s, m, d, c = self.stage, self.model, self.diffusion, self.conditioning
        if s.resolution < 4 or s.resolution & (s.resolution - 1):
            fail("stage.resolution", f"must be a power of two >= 4, got {s.resolution}")
        if s.channels not in (1, 3):
            fail("stage.channels", f"must be 1 or 3, got {s.channels}")
        if s.num_classes < 1:
            fail("stage.num_classes", f"must be >= 1, got {s.num_classes}")
        if s.kind == "sr":
            if not 1 <= s.low_res < s.resolution:
                fail("stage.low_res", f"an SR stage needs 1 <= low_res < resolution ({s.resolution}), got {s.low_res}")
        elif s.low_res not in (0, s.resolution):
            fail("stage.low_res", "only SR stages (stage.kind = \"sr\") take a low_res")
        if d.timesteps < 2:
            fail("diffusion.timesteps", f"must be >= 2, got {d.timesteps}")
        if d.loss == "hybrid" and not d.learn_sigma:
            fail("diffusion.loss", "\"hybrid\" trains learned variances: set diffusion.learn_sigma = true")
        _validate_network(self, fail)
        if m.norm_groups >= 1 and m.channels // m.norm_groups < 2:
            warnings.warn(
                f"{source}: model.norm_groups = {m.norm_groups} puts one channel in each group at the first level "
                f"(model.channels = {m.channels}): group norm becomes instance norm, which strips every feature map's "
                "mean and scale. Use norm_groups <= channels / 4 "
                "(ADM: 128 channels in 32 groups), e.g. 8 for 32 channels.",
                stacklevel=3,
            )
        if not 0.0 <= m.label_dropout < 1.0:
            fail("model.label_dropout", f"must be in [0, 1), got {m.label_dropout}")
        _validate_conditioning(c, fail)
        if self.data.prefetch < 0:
            fail("data.prefetch", f"must be >= 0, got {self.data.prefetch}")
        if d.min_snr_gamma <= 0:
            fail("diffusion.min_snr_gamma", f"must be > 0, got {d.min_snr_gamma}")
        _validate_train(self, fail)
        _validate_counts(self, fail)

    @property
    def is_sr(self) -> bool:
        return self.stage.kind == "sr"

    @property
    def uses_aug_level(self) -> bool:
        """The network takes the augmentation level s (an SR stage with noise augmentation)."""
        return self.is_sr and self.conditioning.augmentation == "noise"

    def unet_config(self) -> UNetConfig:
        """The stage's network: its ``[model]`` options plus what the stage fixes (image size and channels,
        classes, learned variances, and for an SR stage the low-res input and its augmentation level)."""
        s = self.stage
        return UNetConfig.from_options(
            self.model, resolution=s.resolution, channels=s.channels, num_classes=s.num_classes,
            learn_sigma=self.diffusion.learn_sigma, use_aug_level=self.uses_aug_level,
            low_res_channels=s.channels if self.is_sr else 0, low_res_upsample=self.conditioning.upsample,
        )

    def architecture(self) -> dict[str, Any]:
        """The keys that fix the network's shape: changing them makes old weights unusable."""
        return {
            "stage": {k: v for k, v in dataclasses.asdict(self.stage).items() if k != "name"},
            "model": self.model.architecture(),
            "diffusion": {"learn_sigma": self.diffusion.learn_sigma},
            "conditioning": {"use_aug_level": self.uses_aug_level},
        }

    def parameterization(self) -> dict[str, Any]:
        """The keys that fix what the weights mean (eps vs v, the schedule, an SR input's upsampling and level s)."""
        d, c = self.diffusion, self.conditioning
        meaning: dict[str, Any] = {"diffusion": {k: getattr(d, k) for k in ("prediction", "schedule", "timesteps",
                                                                          "learn_sigma")}}
        if self.is_sr:  # the level s the network is told is a step of the augmentation schedule
            noise = ("noise_schedule", "noise_timesteps") if c.augmentation == "noise" else ()
            meaning["conditioning"] = {k: getattr(c, k) for k in ("upsample", "augmentation", *noise)}
        return meaning


def _validate_conditioning(c: ConditioningSection, fail) -> None:
    """The levels of noise augmentation and the blur's kernel, sigmas and probability."""
    if c.augmentation == "noise":
        if not 0 <= c.s_min <= c.s_max <= c.noise_timesteps:
            fail("conditioning.s_max", f"need 0 <= s_min <= s_max <= noise_timesteps ({c.noise_timesteps})")
        if c.fixed_s > c.noise_timesteps:
            fail("conditioning.fixed_s", f"must be <= noise_timesteps ({c.noise_timesteps})")
        if not 0 <= c.sample_s <= c.noise_timesteps:
            fail("conditioning.sample_s", f"must be in [0, noise_timesteps ({c.noise_timesteps})]")
    if c.augmentation == "blur":
        if c.blur_kernel < 1 or c.blur_kernel % 2 == 0:
            fail("conditioning.blur_kernel", f"must be a positive odd integer, got {c.blur_kernel}")
        if not 0 < c.blur_sigma_min <= c.blur_sigma_max:
            fail("conditioning.blur_sigma_max", "need 0 < blur_sigma_min <= blur_sigma_max")
        if not 0.0 <= c.blur_prob <= 1.0:
            fail("conditioning.blur_prob", f"must be in [0, 1], got {c.blur_prob}")


def _validate_train(config: StageConfig, fail) -> None:
    """The optimizer's numbers, and crops that fit the network and the low-resolution pixels."""
    s, m, t = config.stage, config.model, config.train
    if t.batch_size < 1 or t.grad_accum < 1:
        fail("train.batch_size", "batch_size and grad_accum must be >= 1")
    if t.lr <= 0:
        fail("train.lr", f"must be > 0, got {t.lr}")
    if not 0.0 <= t.ema_rate < 1.0:
        fail("train.ema_rate", f"must be in [0, 1), got {t.ema_rate}")
    if len(t.betas) != 2:
        fail("train.betas", f"must be two numbers, got {t.betas}")
    if t.crop:
        factor = 2 ** (len(m.channel_mult) - 1)
        if s.kind != "sr":
            fail("train.crop", "crop training is for SR stages (a base stage must see whole images)")
        if not 0 < t.crop <= s.resolution or t.crop % factor:
            fail("train.crop", f"must be in (0, {s.resolution}] and a multiple of {factor} (the network "
                 f"downsamples {len(m.channel_mult) - 1} times), got {t.crop}")
        ratio = s.resolution // s.low_res if s.low_res else 1
        if t.crop % ratio:
            fail("train.crop", f"must be a multiple of resolution / low_res = {ratio} so the crop is aligned "
                 f"with whole low-resolution pixels, got {t.crop}")
    if any(k < 1 for k in t.keep_steps):
        fail("train.keep_steps", f"steps must be >= 1, got {t.keep_steps}")
    for key in ("log_every", "ckpt_every", "keep_last"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")


# The config key of each UNetConfig field that is not ``model.<field>``
_NETWORK_KEYS = {"model_channels": "model.channels", "resolution": "stage.resolution", "in_channels": "stage.channels",
                 "out_channels": "stage.channels", "low_res_channels": "stage.channels",
                 "num_classes": "stage.num_classes", "low_res_upsample": "conditioning.upsample"}


def _validate_network(config: StageConfig, fail) -> None:
    """The ``[model]`` section with what the stage fixes, checked once, by the network's own validation
    (:meth:`UNetConfig.validate`), its errors named by their config key."""
    try:
        config.unet_config()
    except UNetConfigError as e:
        fail(_NETWORK_KEYS.get(e.field, f"model.{e.field}"), e.detail)
    except TypeError as e:  # a list where a number belongs, and the like
        fail("model", str(e))


def _validate_counts(config: StageConfig, fail) -> None:
    """Sizes, counts and numbers that would otherwise fail late (after training) or silently do nothing."""
    t, smp = config.train, config.sample
    if t.steps < 1:
        fail("train.steps", f"must be >= 1, got {t.steps}")
    for key in ("sample_every", "sample_steps", "warmup_steps"):
        if getattr(t, key) < 0:
            fail(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.eval_every < 0:
        fail("train.eval_every", f"must be >= 0 (0 = off), got {t.eval_every}")
    if t.eval_every and t.eval_num < 2:
        fail("train.eval_num", f"must be >= 2 (KID compares sets of at least 2 images), got {t.eval_num}")
    if t.eval_every and t.eval_features.partition(":")[0] not in ("classifier", "inception"):
        fail("train.eval_features", "train.eval_every > 0 needs a feature network: \"classifier\" (the shipped "
             "Fashion-MNIST one), \"classifier:NAME_OR_PATH\" or \"inception[:WEIGHTS]\"; got "
             f"{t.eval_features!r}")
    for key in ("lr", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(t, key)):
            fail(f"train.{key}", f"must be a finite number, got {getattr(t, key)}")
    if smp.steps < 0:
        fail("sample.steps", f"must be >= 0 (0 = every training step), got {smp.steps}")
    if not (math.isfinite(smp.eta) and smp.eta >= 0):
        fail("sample.eta", f"must be a finite number >= 0, got {smp.eta}")
    if not (math.isfinite(smp.guidance) and smp.guidance >= 0):
        fail("sample.guidance", f"must be a finite number >= 0 (1 = no guidance), got {smp.guidance}")


def _legacy_bf16(train: dict[str, Any], source: str) -> dict[str, Any]:
    """``train.bf16 = true/false`` (configs, run directories and bundles written before train.precision existed) as
    ``train.precision = "bf16"/"fp32"``: an old run resumes, and an old bundle loads, in the precision it was
    made with. Both keys at once is refused, since they could disagree."""
    if "bf16" not in train:
        return train
    train = dict(train)
    old = train.pop("bf16")
    if not isinstance(old, bool):
        raise ConfigError(f"{source}: train.bf16 must be true or false, got {type(old).__name__} {old!r} "
                          "(it is the old spelling of train.precision = \"auto\" | \"bf16\" | \"fp32\")")
    if "precision" in train:
        raise ConfigError(f"{source}: train.bf16 and train.precision are both set; train.bf16 is the old spelling "
                          "of train.precision: keep only train.precision (\"auto\", \"bf16\" or \"fp32\")")
    train["precision"] = "bf16" if old else "fp32"
    return train


def _section_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(StageConfig)
    return hints[f.name]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise naming(ConfigError, "{option} {text!r}: [{section}] is not a table", {"option": "overrides"},
                         text=text, section=section)
        if section == "train" and key in ("bf16", "precision"):
            # an override replaces the file's setting in either spelling (old train.bf16, new train.precision)
            merged[section].pop("precision" if key == "bf16" else "bf16", None)
        merged[section][key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> StageConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # a bare codec error would not say which file
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return StageConfig.from_dict(apply_overrides(raw, overrides or []), source=str(path))
