"""The demo's sampling side, independent of any web framework: what the page may ask for (checked into a
:class:`DemoRequest` or refused with a :class:`DemoParameterError` naming the parameter), one sample through the
cascade at a time (:class:`DemoBusy` for a second caller), progress fed by the samplers' per-step callback, and
the images as PNG data URLs.

One sample of seed S and class c is sample 0 of ``cdm sample --seed S --num 1 --class-label c`` with the same
steps and levels: the same per-sample generator, so a picture seen in the demo can be reproduced from the CLI.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..cascade import Cascade, CascadeError
from ..images import tensor_to_images
from ..hardware import choose_precision
from ..rng import PerSampleGenerator
from ..samplers import SamplerStep

MAX_SEED = 2**63 - 1
PARAMETERS = ("class", "seed", "aug_levels", "truncated", "steps")


class DemoParameterError(ValueError):
    """A parameter the page sent is missing, of the wrong type or out of range (HTTP 400)."""


class DemoBusy(RuntimeError):
    """Another sample is being drawn in this process (HTTP 409)."""


@dataclass(frozen=True)
class DemoRequest:
    class_label: int
    random_class: bool
    seed: int
    aug_levels: list[int]  # one per SR stage
    truncated: bool
    steps: list[int]  # one per stage


def _png_data_url(image: np.ndarray) -> str:
    """uint8 H x W x C -> ``data:image/png;base64,...`` (grey for one channel)."""
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    # JSON true/false are ints to Python; a slider or number box never sends them, so they are refused
    if isinstance(value, bool) or not isinstance(value, int):
        raise DemoParameterError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise DemoParameterError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


class DemoEngine:
    """Samples one image through ``cascade`` per call of :meth:`sample`, one call at a time."""

    def __init__(self, cascade: Cascade, *, name: str = "", class_names: list[str] | None = None,
                 steps: list[int] | None = None, study_aug_level: int | None = None):
        self.cascade = cascade
        self.name = name
        n = cascade.num_classes
        self.class_names = list(class_names) if class_names and len(class_names) == n else [f"class {k}" for k in
                                                                                                range(n)]
        self.default_steps = [self._default_steps(i, steps) for i in range(len(cascade.stages))]
        self.study_aug_level = study_aug_level
        self.precision = choose_precision("auto", cascade.stages[0].device)
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {"busy": False, "stage": None, "step": 0, "total": 0, "fraction": 0.0}

    # --- what the page shows --------------------------------------------------------------------------
    def _default_steps(self, i: int, steps: list[int] | None) -> int:
        stage = self.cascade.stages[i]
        if steps:
            value = steps[i] if len(steps) > 1 else steps[0]
        else:
            value = stage.config.sample.steps
        limit = stage.diffusion.num_timesteps
        return limit if not value or value > limit else value  # 0 (every step) shown as the number it is

    def aug_range(self, i: int) -> tuple[int, int] | None:
        """The levels SR stage ``i`` (index into the cascade) may be given: those it was trained on (one level for a
        fixed-s stage); None without noise augmentation (blur and none take no level at sampling time)."""
        stage = self.cascade.stages[i]
        if not stage.uses_noise_augmentation:
            return None
        c = stage.config.conditioning
        return (c.fixed_s, c.fixed_s) if c.fixed_s >= 0 else (c.s_min, c.s_max)

    def truncation_possible(self) -> bool:
        """Truncated sampling needs every noise-augmented stage's augmentation schedule to be its predecessor's."""
        stages = [i for i in range(1, len(self.cascade.stages)) if self.aug_range(i)]
        try:
            for i in stages:
                self.cascade._check_truncation(i, 1)
        except CascadeError:
            return False
        return bool(stages)

    def info(self) -> dict[str, Any]:
        defaults = self.cascade.default_aug_levels()
        stages = []
        for i, stage in enumerate(self.cascade.stages):
            entry = {
                "index": i, "resolution": stage.resolution, "channels": stage.channels,
                "kind": "sr" if stage.is_sr else "base", "low_res": stage.low_res if stage.is_sr else None,
                "augmentation": stage.config.conditioning.augmentation if stage.is_sr else None,
                "sampler": stage.config.sample.sampler, "steps": self.default_steps[i],
                "max_steps": stage.diffusion.num_timesteps, "aug_range": None, "aug_default": None,
            }
            if i and self.aug_range(i):
                entry["aug_range"], entry["aug_default"] = list(self.aug_range(i)), defaults[i - 1]
            stages.append(entry)
        return {"name": self.name, "classes": self.class_names, "stages": stages,
                "truncated_default": self.cascade.default_truncated, "truncation_possible": self.truncation_possible(),
                "study_aug_level": self.study_aug_level, "device": str(self.cascade.stages[0].device),
                "precision": "bf16" if self.precision.bf16 else "fp32"}

    # --- the parameters -------------------------------------------------------------------------------
    def parse(self, body: Any) -> DemoRequest:
        """The page's JSON object as a :class:`DemoRequest`; omitted parameters take the defaults."""
        if not isinstance(body, dict):
            raise DemoParameterError(f"expected a JSON object with {', '.join(PARAMETERS)}, got {type(body).__name__}")
        unknown = sorted(set(body) - set(PARAMETERS))
        if unknown:
            raise DemoParameterError(f"unknown parameter {unknown[0]!r} (known: {', '.join(PARAMETERS)})")
        n, num_classes = len(self.cascade.stages), self.cascade.num_classes
        seed = _int(body.get("seed", 0), "seed", 0, MAX_SEED)
        label = body.get("class", "random")
        random_class = label == "random"
        if random_class:  # drawn from the seed, so one seed always shows the same picture
            label = int(np.random.default_rng(seed).integers(num_classes))
        else:
            label = _int(label, "class", 0, num_classes - 1)
        truncated = body.get("truncated", self.cascade.default_truncated)
        if not isinstance(truncated, bool):
            raise DemoParameterError(f"truncated must be true or false, got {truncated!r}")

        steps = body.get("steps", self.default_steps)
        if not isinstance(steps, list) or len(steps) != n:
            raise DemoParameterError(f"steps must be a list of {n} integers (one per stage), got {steps!r}")
        steps = [_int(v, f"steps[{i}] (stage {i + 1})", 1, self.cascade.stages[i].diffusion.num_timesteps)
                 for i, v in enumerate(steps)]

        levels = body.get("aug_levels", self.cascade.default_aug_levels())
        if not isinstance(levels, list) or len(levels) != n - 1:
            raise DemoParameterError(f"aug_levels must be a list of {n - 1} integers (one per SR stage), got "
                                     f"{levels!r}")
        checked = []
        for i, value in enumerate(levels, start=1):
            name = f"aug_levels[{i - 1}] (stage {i + 1})"
            span = self.aug_range(i)
            if span is None:
                aug = self.cascade.stages[i].config.conditioning.augmentation
                if value != 0 or isinstance(value, bool):
                    raise DemoParameterError(f"{name} must be 0: the stage's augmentation is {aug!r}, which takes no "
                                             f"level at sampling time; got {value!r}")
                checked.append(0)
            else:
                checked.append(_int(value, f"{name}, the levels it was trained on,", *span))
        if truncated:
            for i, s in enumerate(checked, start=1):
                if s:
                    try:
                        self.cascade._check_truncation(i, s)
                    except CascadeError as e:
                        raise DemoParameterError(str(e)) from None
        return DemoRequest(label, random_class, seed, checked, truncated, steps)

    # --- sampling -------------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        return dict(self._progress)

    def try_acquire(self) -> None:
        """Reserve the engine for one :meth:`sample` (which releases it), or raise :class:`DemoBusy` at once."""
        if not self._lock.acquire(blocking=False):
            p = self._progress
            where = f" (stage {p['stage'] + 1}, step {p['step']}/{p['total']})" if p["stage"] is not None else ""
            raise DemoBusy(f"busy: another sample is being drawn{where}; this demo draws one at a time, try again "
                           "when it is done")
        self._progress = {"busy": True, "stage": None, "step": 0, "total": 0, "fraction": 0.0}

    def release(self) -> None:
        """Give back a reservation of :meth:`try_acquire` that no :meth:`sample` used."""
        self._progress = {**self._progress, "busy": False}
        self._lock.release()

    def sample(self, request: DemoRequest, *, acquired: bool = False,
               on_step: Callable[[SamplerStep], None] | None = None) -> dict[str, Any]:
        """Draw the sample (holding the engine; ``acquired``: :meth:`try_acquire` was already called) and return
        the per-stage images and what they are."""
        if not acquired:
            self.try_acquire()
        try:
            return self._sample(request, on_step)
        finally:
            self.release()

    def _sample(self, request: DemoRequest, on_step) -> dict[str, Any]:
        cascade, n = self.cascade, len(self.cascade.stages)

        def step(info: SamplerStep) -> None:  # runs on the sampling thread; the page polls what it writes
            fraction = (info.stage + info.step / info.total) / n
            self._progress = {"busy": True, "stage": info.stage, "step": info.step, "total": info.total,
                              "fraction": fraction}
            if on_step is not None:
                on_step(info)

        device = cascade.stages[0].device
        started = time.perf_counter()
        with torch.no_grad():
            out = cascade.sample(torch.tensor([request.class_label]), steps=request.steps,
                                 aug_levels=request.aug_levels, truncated=request.truncated,
                                 generator=PerSampleGenerator(request.seed, [0], device),
                                 autocast=self.precision.bf16, callback=step)
        seconds = time.perf_counter() - started
        noisy = cascade.noisy_outputs(request.aug_levels, request.truncated)
        stages = []
        for i, (stage, x, cond) in enumerate(zip(cascade.stages, out.stages, out.conditioning)):
            entry: dict[str, Any] = {
                "index": i, "resolution": stage.resolution,
                "output": _png_data_url(tensor_to_images(x.clamp(-1, 1))[0]),
                "output_note": (f"noisy z_s at s={request.aug_levels[i]}, handed on as it is (truncated)" if noisy[i]
                                else "sample"),
                "conditioning": None, "conditioning_note": None,
            }
            if cond is not None:
                # as the network sees it: upsampled by the network's own rule (noise shown clipped to [-1, 1])
                seen = stage.net.upsample_low_res(cond.float(), (stage.resolution, stage.resolution))
                entry["conditioning"] = _png_data_url(tensor_to_images(seen.clamp(-1, 1))[0])
                entry["conditioning_note"] = self._conditioning_note(i, request)
            stages.append(entry)
        return {"class": request.class_label, "class_name": self.class_names[request.class_label],
                "random_class": request.random_class, "seed": request.seed, "aug_levels": request.aug_levels,
                "truncated": request.truncated, "steps": request.steps, "seconds": round(seconds, 3),
                "stages": stages}

    def _conditioning_note(self, i: int, request: DemoRequest) -> str:
        stage = self.cascade.stages[i]
        s = request.aug_levels[i - 1]
        up = f"stage {i} output ({stage.low_res}px) upsampled {stage.config.conditioning.upsample} to " \
             f"{stage.resolution}px"
        aug = stage.config.conditioning.augmentation
        if aug == "noise" and s and request.truncated:
            return f"{up}; stage {i} stopped at level s={s} (truncated), its z_s handed on"
        if aug == "noise" and s:
            return f"{up}; clean output re-noised to level s={s}"
        if aug == "noise":
            return f"{up}; s=0, clean"
        if aug == "blur":
            return f"{up}; clean (blur augmentation is applied in training only)"
        return f"{up}; clean (trained without augmentation)"
