"""The cascade pipeline: a base stage followed by super-resolution stages.

Conditioning augmentation at sampling time (PAPER.md):

* **non-truncated** — each stage samples all the way to clean data; before an SR stage with noise
  augmentation, its input is re-noised with the forward process to level s and (z_s, s) is handed on;
* **truncated** — the previous stage's reverse process stops at level s and its noisy z_s is handed on
  directly (this needs the previous stage's schedule to be the SR stage's augmentation schedule).

Blur-augmented and unaugmented SR stages always receive the clean previous output.
Every check that can fail is done in ``validate()`` before any sampling compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .images import images_to_tensor, tensor_to_images
from .errors import UserError
from .labels import balanced_labels  # noqa: F401 (also imported from here, as the model cards show)
from .pretrained import find_cascade
from .rng import Generator, PerSampleGenerator
from .samplers import StepCallback
from .stage import Stage


class CascadeError(ValueError):
    """The stages given do not form a valid cascade (checked before any compute)."""


@dataclass
class CascadeOutput:
    images: torch.Tensor  # final stage output in [-1, 1]
    stages: list[torch.Tensor] = field(default_factory=list)  # every stage's output, low to high resolution
    labels: torch.Tensor | None = None
    # per stage run: the low-resolution input it was conditioned on, at the previous stage's resolution, as the
    # network received it (noised at level s, or the truncated z_s, or clean); None for the base stage
    conditioning: list[torch.Tensor | None] = field(default_factory=list)


def _per_stage(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (int, float, str)):
        return [value] * n
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise CascadeError(f"{name}: got {len(value)} values for {n} stages")
    return value


class Cascade:
    def __init__(self, stages: Sequence[Stage], *, truncated: bool = False):
        self.stages = list(stages)
        # the mode :meth:`sample` uses when not told: a bundle records the one its study measured best
        self.default_truncated = bool(truncated)
        self.validate()

    # --- construction ----------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        run_dirs: Sequence[str | Path] = (),
        *,
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        weights: str = "ema",
    ) -> "Cascade":
        """The stages in ``run_dirs`` (run or exported stage directories, base first), or the cascade folder
        ``pretrained`` (EMA weights): a bundled one by name (``"fashion-mnist"``), ``"hf://OWNER/REPO[@REVISION]"``
        from the Hugging Face Hub or its cache, or the path of an exported one; one or the other. Exported and
        downloaded folders are checked against their manifest's hashes before any file is loaded."""
        if pretrained and run_dirs:
            raise UserError("give either run directories or a pretrained cascade, not both")
        truncated = False
        if pretrained:
            folder = find_cascade(str(pretrained))
            run_dirs, weights, truncated = folder.stage_dirs, "ema", folder.truncated
        if not run_dirs:
            raise UserError("give one or more run directories (base first), or a pretrained cascade")
        return cls([Stage.load(p, device=device, weights=weights) for p in run_dirs], truncated=truncated)

    def compile(self, mode: str | None = None, backend: str = "inductor") -> "Cascade":
        """Sample every stage through ``torch.compile`` (see :meth:`Stage.compile`)."""
        for stage in self.stages:
            stage.compile(mode=mode, backend=backend)
        return self

    def validate(self) -> None:
        if not self.stages:
            raise CascadeError("a cascade needs at least one stage")

        def name(i: int) -> str:
            return f"stage {i + 1} ({self.stages[i].source or self.stages[i].config.stage.name})"

        if self.stages[0].is_sr:
            raise CascadeError(
                f"{name(0)} is a super-resolution stage ({self.stages[0].low_res}px -> "
                f"{self.stages[0].resolution}px); a cascade starts with a base stage. Put the base model first."
            )
        for i in range(1, len(self.stages)):
            prev, cur = self.stages[i - 1], self.stages[i]
            if not cur.is_sr:
                raise CascadeError(
                    f"{name(i)} is a base model ({cur.resolution}px); only super-resolution stages may follow "
                    f"{name(i - 1)}. Is the order of the run directories right?"
                )
            if cur.low_res != prev.resolution:
                raise CascadeError(
                    f"{name(i)} was trained to upsample {cur.low_res}px inputs, but {name(i - 1)} produces "
                    f"{prev.resolution}px images"
                )
            if cur.channels != prev.channels:
                raise CascadeError(
                    f"{name(i)} takes {cur.channels}-channel images, {name(i - 1)} produces {prev.channels}"
                )
            if cur.num_classes != prev.num_classes:
                raise CascadeError(
                    f"{name(i)} has {cur.num_classes} classes, {name(i - 1)} has {prev.num_classes}"
                )

    @property
    def resolutions(self) -> list[int]:
        return [s.resolution for s in self.stages]

    @property
    def num_classes(self) -> int:
        return self.stages[0].num_classes

    def default_aug_levels(self) -> list[int]:
        """Per SR stage: the level it was trained at if that was one fixed level (``conditioning.fixed_s``), else
        the level stored in its config (``conditioning.sample_s``); 0 without noise aug."""
        levels = []
        for stage in self.stages[1:]:
            c = stage.config.conditioning
            levels.append(0 if not stage.uses_noise_augmentation else c.fixed_s if c.fixed_s >= 0 else c.sample_s)
        return levels

    def aug_levels(self, aug_levels: Sequence[int] | None = None) -> list[int]:
        """One level s per SR stage: ``aug_levels`` (one value is used for every SR stage) or the defaults."""
        n = len(self.stages)
        levels = list(aug_levels) if aug_levels is not None else self.default_aug_levels()
        if len(levels) == 1 and n > 2:
            levels = levels * (n - 1)
        if len(levels) != n - 1:
            raise CascadeError(f"aug_levels: got {len(levels)} values for {n - 1} SR stages")
        return levels

    def noisy_outputs(self, aug_levels: Sequence[int] | None = None, truncated: bool | None = None) -> list[bool]:
        """Per stage: whether :meth:`sample` returns a noisy z_s for it rather than an image (truncated sampling
        stops a stage at the next stage's level s and hands z_s on)."""
        truncated = self.default_truncated if truncated is None else truncated
        levels = self.aug_levels(aug_levels)
        return [truncated and i < len(levels) and levels[i] > 0 for i in range(len(self.stages))]

    def _check_truncation(self, i: int, level: int) -> None:
        """Truncated sampling hands the previous stage's own x_s on: the schedules must agree."""
        prev, cur = self.stages[i - 1], self.stages[i]
        a_prev = prev.diffusion.alphas_cumprod
        a_aug = cur.augmentation.alpha_bar(torch.arange(1, cur.augmentation.num_timesteps_prev + 1))
        if len(a_prev) != len(a_aug) or not torch.allclose(
            torch.as_tensor(a_prev, dtype=torch.float64), torch.as_tensor(a_aug, dtype=torch.float64)
        ):
            raise CascadeError(
                f"truncated sampling at s={level} needs stage {i} ({prev.config.diffusion.schedule}, "
                f"T={prev.diffusion.num_timesteps}) to use the augmentation schedule of stage {i + 1} "
                f"({cur.config.conditioning.noise_schedule}, T={cur.config.conditioning.noise_timesteps}); "
                "use non-truncated sampling instead"
            )

    def _check_sampling(self, levels: list[int], guidance: list, truncated: bool, start_stage: int,
                        low_res: torch.Tensor | None) -> None:
        """Everything :meth:`sample` can refuse, before any compute: levels a stage cannot take, truncation across
        schedules that differ, guidance without label dropout, a start stage without its input."""
        n = len(self.stages)
        for i, s in enumerate(levels, start=1):
            stage = self.stages[i]
            if s and not stage.uses_noise_augmentation:
                raise CascadeError(
                    f"stage {i + 1} was trained with conditioning.augmentation = "
                    f"{stage.config.conditioning.augmentation!r}; it takes no augmentation level (got s={s})"
                )
            if s and not 0 <= s <= stage.config.conditioning.noise_timesteps:
                raise CascadeError(f"aug level {s} for stage {i + 1} is outside [0, {stage.config.conditioning.noise_timesteps}]")
            if truncated and s and i > start_stage:
                self._check_truncation(i, s)
        for i in range(start_stage, n):
            g = guidance[i]
            self.stages[i].check_guidance(self.stages[i].config.sample.guidance if g is None else g)
        if not 0 <= start_stage < n:
            raise CascadeError(f"start_stage must be in [0, {n}), got {start_stage}")
        if start_stage > 0 and low_res is None:
            raise CascadeError("start_stage > 0 needs the clean low_res input of that stage")

    # --- sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        *,
        steps=None,
        sampler=None,
        aug_levels: Sequence[int] | None = None,
        truncated: bool | None = None,
        guidance=None,
        eta=None,
        generator: Generator = None,
        low_res: torch.Tensor | None = None,
        start_stage: int = 0,
        autocast: bool | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
    ) -> CascadeOutput:
        """Sample ``len(labels)`` images through the cascade.

        ``steps``/``sampler``/``guidance``/``eta``: one value for all stages or one per stage.
        ``aug_levels``: one level s per SR stage (default: each stage's ``conditioning.sample_s``).
        ``truncated``: None takes :attr:`default_truncated` (a bundle's recorded mode; False for run dirs).
        ``generator``: a :class:`~cascaded_diffusion.rng.PerSampleGenerator` makes every sample depend on
        (seed, its index) only; a plain ``torch.Generator`` draws the whole batch from one stream.
        ``low_res`` with ``start_stage=k``: skip stages before k and feed these clean images (the output of
        stage k-1, or ground-truth low-resolution images) to stage k — used by the augmentation sweep.
        ``autocast``: True = bf16 autocast, False = fp32, None (default) = bf16 only where the hardware does it
        natively (:func:`~.hardware.choose_precision`).
        ``callback``: called after every sampler step of every stage with a
        :class:`~cascaded_diffusion.samplers.SamplerStep` whose ``stage`` is the stage's index.
        """
        n = len(self.stages)
        truncated = self.default_truncated if truncated is None else truncated
        steps_l = _per_stage(steps, n, "steps")
        sampler_l = _per_stage(sampler, n, "sampler")
        guidance_l = _per_stage(guidance, n, "guidance")
        eta_l = _per_stage(eta, n, "eta")
        levels = self.aug_levels(aug_levels)
        self._check_sampling(levels, guidance_l, truncated, start_stage, low_res)
        device = self.stages[0].device
        labels = labels.to(device)
        outputs: list[torch.Tensor] = []
        conditioning: list[torch.Tensor | None] = []
        handed_on: torch.Tensor | None = low_res.to(device) if low_res is not None else None
        handed_level: torch.Tensor | None = None
        for i in range(start_stage, n):
            stage = self.stages[i]
            # what this stage hands to the next one: its level s (0 = clean)
            next_level = levels[i] if i + 1 < n else 0
            stop_t = next_level - 1 if (truncated and next_level > 0) else -1
            cond, cond_level = self._conditioning(i, handed_on, handed_level, levels, labels.shape[0], generator)
            conditioning.append(cond)
            stage_callback = None
            if callback is not None:
                stage_callback = lambda step, i=i: callback(replace(step, stage=i))  # noqa: E731
            x = stage.sample(
                labels,
                low_res=cond,
                aug_level=cond_level if stage.uses_noise_augmentation else None,
                sampler=sampler_l[i],
                steps=steps_l[i],
                eta=eta_l[i],
                guidance=guidance_l[i],
                generator=generator,
                stop_t=stop_t,
                autocast=autocast,
                progress=progress,
                callback=stage_callback,
            )
            outputs.append(x.clamp(-1, 1) if stop_t < 0 else x)
            if stop_t >= 0:
                handed_on = x
                handed_level = torch.full((labels.shape[0],), next_level, dtype=torch.long, device=device)
            else:
                handed_on = x.clamp(-1, 1)
                handed_level = None
        return CascadeOutput(images=outputs[-1], stages=outputs, labels=labels, conditioning=conditioning)

    def _conditioning(self, i: int, handed_on: torch.Tensor | None, handed_level: torch.Tensor | None,
                      levels: list[int], num: int, generator: Generator
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stage ``i``'s low-resolution input and its noise level from what the stage before handed on."""
        if i == 0:
            return None, None
        cond, cond_level = handed_on, handed_level
        if cond_level is None:  # clean input: apply non-truncated augmentation here
            s = levels[i - 1]
            cond_level = torch.full((num,), s, dtype=torch.long, device=self.stages[0].device)
            if s > 0:
                cond = self.stages[i].augmentation.apply(cond, cond_level, generator=generator)
        return cond, cond_level

    def labels_for(self, num: int | None = None, labels=None,
                   class_labels: Sequence[int] | None = None) -> torch.Tensor:
        """The class of every sample of a run: ``labels`` as given (one class per sample), or ``num`` labels with
        ``class_labels`` cycled (default: every class equally often), sorted by class (:func:`balanced_labels`, what
        ``cdm sample --num N`` samples)."""
        if labels is None:
            if num is None:
                raise ValueError("give the number of samples (num) or their labels")
            return balanced_labels(num, self.num_classes, class_labels)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if num is not None and num != len(labels):
            raise ValueError(f"num is {num}, but {len(labels)} labels were given")
        if class_labels is not None:
            raise ValueError("give either labels or class_labels, not both")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must be classes 0..{self.num_classes - 1}, got {sorted(set(labels.tolist()))}")
        return labels

    def generate(
        self,
        num: int | None = None,
        labels=None,
        seed: int = 0,
        batch_size: int = 64,
        *,
        class_labels: Sequence[int] | None = None,
        steps=None,
        sampler=None,
        guidance=None,
        eta=None,
        aug_levels: Sequence[int] | None = None,
        truncated: bool | None = None,
        autocast: bool | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``num`` images (or one per entry of ``labels``) as uint8 N x H x W x C, with their int64 labels: the very
        bytes ``cdm sample --num N --seed S`` writes with the same settings (on the same kind of device), whatever
        ``batch_size`` (sample k depends on ``seed`` and k only).

        ``class_labels``: sample these classes in turn instead of all of them (``cdm sample --class-label``).
        ``steps``, ``sampler``, ``guidance``, ``eta``: one value or one per stage (default: each stage's recorded
        ``[sample]`` settings); ``aug_levels``, ``truncated``, ``autocast``: as :meth:`sample`."""
        labels = self.labels_for(num, labels, class_labels)
        if not len(labels):
            raise ValueError("nothing to sample: num is 0")
        stages, labels_np = sample_in_batches(self, labels, batch_size=batch_size, seed=seed, progress=progress,
                                              **self.sampling_options(steps=steps, sampler=sampler, guidance=guidance,
                                                                      eta=eta, aug_levels=aug_levels,
                                                                      truncated=truncated, autocast=autocast))
        return stages[-1], labels_np.astype(np.int64)

    def sampling_options(self, *, steps=None, sampler=None, guidance=None, eta=None, aug_levels=None,
                         truncated: bool | None = None, autocast: bool | None = None) -> dict:
        """The keyword arguments of :meth:`sample` a sampling run records: ``truncated`` decided (None: the
        cascade's :attr:`default_truncated`), the others as given (None: each stage's default)."""
        return dict(steps=steps, sampler=sampler, guidance=guidance, eta=eta,
                    truncated=self.default_truncated if truncated is None else bool(truncated),
                    aug_levels=aug_levels, autocast=autocast)

    def upscale(self, images, labels, *, seed: int = 0, keys: Sequence[int] | None = None, batch_size: int = 64,
                progress: bool = False, **kwargs) -> list[np.ndarray]:
        """Run every SR stage on given low-resolution images: ``images`` is a uint8 N x H x W x C array or a
        sequence of PIL images / uint8 H x W [x C] arrays of any size, each brought to the first SR stage's input
        size by the training data's rule (:func:`~cascaded_diffusion.data.imagefolder.preprocess_image`: channels
        converted, ADM centre crop + resize; an image already at that size is used as it is). ``labels``: one
        class per image (an int: all of them). Image k's noise depends on ``seed`` and ``keys[k]`` only (default
        k), so it is the same whatever else is upscaled with it. Other keyword arguments go to :meth:`sample`
        (``aug_levels``, ``steps``, ...). Returns uint8 NHWC arrays: the input as fed, then each SR stage's output."""
        from .data.imagefolder import images_at

        if len(self.stages) < 2:
            raise CascadeError("upscaling needs a cascade with at least one super-resolution stage")
        low_res = images_at(images, self.stages[1].low_res, self.stages[1].channels, "upscale")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.numel() not in (1, len(low_res)):
            raise CascadeError(f"got {labels.numel()} labels for {len(low_res)} images")
        labels = labels.expand(len(low_res)).clone()
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise CascadeError(f"labels must be classes 0..{self.num_classes - 1}, got {labels.tolist()}")
        if not len(low_res):
            return [low_res]
        stages, _ = sample_in_batches(self, labels, batch_size=batch_size, seed=seed, low_res=low_res, start_stage=1,
                                      indices=keys, progress=progress, **kwargs)
        return [low_res, *stages]


def sample_in_batches(cascade: Cascade, labels: torch.Tensor, *, batch_size: int, seed: int,
                      low_res: np.ndarray | None = None, start_stage: int = 0, progress: bool = False,
                      indices: Sequence[int] | None = None, noise_device: str | torch.device | None = None,
                      **kwargs) -> tuple[list[np.ndarray], np.ndarray]:
    """Sample ``labels`` through ``cascade`` ``batch_size`` at a time; sample k's noise depends only on
    ``seed`` and its index ``indices[k]`` (default k), so the result does not depend on ``batch_size`` (see
    :mod:`cascaded_diffusion.rng`). ``low_res`` (uint8 NHWC, one per label) with ``start_stage`` feeds given
    images to that stage. ``noise_device``: where the per-sample generators draw (default: the cascade's
    device). Other keyword arguments go to :meth:`Cascade.sample`. Returns (one uint8 NHWC array per stage run,
    labels as numpy). Over many processes: :func:`~cascaded_diffusion.distributed.over_ranks` of it (each
    sample depends on its index alone), or :func:`~cascaded_diffusion.sharded_sampling.sample_sharded`."""
    device = cascade.stages[0].device
    noise_device = device if noise_device is None else torch.device(noise_device)
    indices = list(range(len(labels))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(labels):
        raise ValueError(f"got {len(indices)} sample indices for {len(labels)} labels")
    per_stage: list[list[np.ndarray]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(labels), desc="sampling", unit="img", dynamic_ncols=True)
    for lo in range(0, len(labels), batch_size):
        y = labels[lo : lo + batch_size]
        cond = None
        if low_res is not None:
            cond = images_to_tensor(low_res[lo : lo + batch_size], device=device)
        generator = PerSampleGenerator(seed, indices[lo : lo + batch_size], noise_device)
        out = cascade.sample(y, low_res=cond, start_stage=start_stage, generator=generator, **kwargs)
        arrays = [tensor_to_images(x.clamp(-1, 1)) for x in out.stages]
        if not per_stage:
            per_stage = [[] for _ in arrays]
        for acc, a in zip(per_stage, arrays):
            acc.append(a)
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    return [np.concatenate(a) for a in per_stage], labels.numpy()
