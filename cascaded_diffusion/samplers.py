"""Samplers over any decreasing sequence of timesteps of a trained diffusion, and classifier-free guidance.

All three samplers step between consecutive levels t > s of the diffusion's own (training) schedule using
only ᾱ_t and ᾱ_s, with ᾱ_{-1} = 1 for clean data. That one mechanism gives full-length and evenly respaced
sampling, starting from a given x_t at a given index, and stopping at an index s >= 0 with a noisy sample
distributed as x_s, which the cascade's truncated conditioning augmentation hands to the next stage.

Per-step coefficients are Python floats computed on the host from the float64 schedule and the per-step
network times are precomputed on the device, so the loop never synchronises host and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from .diffusion import VARIANCES, GaussianDiffusion, ModelFn, learned_log_variance, x0_eps_from_prediction
from .rng import Generator, randn

SAMPLERS = ("ddpm", "ddim", "dpmpp")
SAMPLE_VARIANCES = ("auto", *VARIANCES)  # "auto": learned when the model learns it, else fixed_large
# where the evaluation indices of a K-step sampler lie: "linspace" includes both ends (the last network evaluation
# is at index 0, next to clean data); "trailing" puts them at stop + round(i*(start - stop)/K), i = K..1, so the last
# step goes from about (start - stop)/K straight to clean data and the K-step grid is every other index of the
# 2K-step one: the grid a progressively distilled stage is trained on (distillation.py)
SPACINGS = ("linspace", "trailing")
NetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SamplerStep:
    """What a sampling ``callback`` is told after each network evaluation (progress bars, previews, logging).

    ``step`` counts the steps done (1 .. ``total``); ``t`` is the index the network was evaluated at; ``x`` is the
    sample after the step and ``pred_x0`` the step's x̂0, both on the sampling device (reading them synchronises
    with it, so a callback that only reports progress should not touch them). ``stage`` is the cascade stage
    (0-based) when :meth:`~cascaded_diffusion.cascade.Cascade.sample` runs the loop, else None."""

    step: int
    total: int
    t: int
    x: torch.Tensor
    pred_x0: torch.Tensor
    stage: int | None = None


StepCallback = Callable[[SamplerStep], None]


# --- classifier-free guidance ----------------------------------------------------------------------------


def _combine_guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int, learn_sigma: bool):
    pred = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([pred, cond[:, channels:]], dim=1) if learn_sigma else pred


def _check_outputs(out: torch.Tensor, x: torch.Tensor, learn_sigma: bool) -> int:
    channels = x.shape[1]
    expected = 2 * channels if learn_sigma else channels
    if out.shape[1] != expected:
        raise ValueError(
            f"guidance expected {expected} output channels for {channels}-channel data "
            f"(learn_sigma={learn_sigma}), the network gave {out.shape[1]}"
        )
    return channels


def make_cfg_model_fn(
    net_call: NetCall, y: torch.Tensor, null_label: int, scale: float | None, learn_sigma: bool
) -> ModelFn:
    """``model_fn(x_t, t_scaled)`` for class labels ``y`` with classifier-free guidance of scale w.

    ``net_call(x, t_scaled, labels)`` runs the network. Convention: **w = 1 (or None) is plain conditional
    sampling** (one forward, no unconditional pass); w = 0 is unconditional; w > 1 strengthens the class. The
    guided prediction is p_u + w·(p_c − p_u) on the prediction channels — for ε this is ε̂ = ε_u + w(ε_c − ε_u),
    and because x0 and v are affine in ε at fixed x_t the same formula guides those parameterizations
    identically. Learned-variance channels come from the conditional pass. The conditional and unconditional
    halves (labels ``y`` and ``null_label``) run as one batch of 2N.
    """
    if scale is None or scale == 1.0:
        return lambda x, t: net_call(x, t, y)
    labels = torch.cat([y, torch.full_like(y, null_label)])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = net_call(torch.cat([x, x]), torch.cat([t, t]), labels).chunk(2)
        return _combine_guided(cond, uncond, scale, _check_outputs(cond, x, learn_sigma), learn_sigma)

    return guided


# --- timestep sequences ----------------------------------------------------------------------------------


def timestep_sequence(start_t: int, stop_t: int, steps: int | None, spacing: str = "linspace") -> list[int]:
    """Decreasing indices start_t = t_K > … > t_1 at which the network is evaluated; the last step goes from
    t_1 to ``stop_t``. ``steps=None`` (or >= start_t − stop_t) takes every index; otherwise ``steps`` indices:
    ``spacing="linspace"`` evenly spaced from start_t down to stop_t + 1, ``"trailing"`` at
    stop_t + round(i·(start_t − stop_t)/steps) for i = steps … 1 (rounding halves up, in integers), so the
    ``steps``-index grid is exactly every other index of the ``2·steps`` one."""
    if not -1 <= stop_t < start_t:
        raise ValueError(f"need -1 <= stop_t < start_t, got start_t={start_t}, stop_t={stop_t}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r} (valid: {', '.join(SPACINGS)})")
    available = start_t - stop_t
    if steps is None or steps >= available:
        return list(range(start_t, stop_t, -1))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None or an int >= 1, got {steps!r}")
    if spacing == "trailing":  # spacing available/steps > 1, so no two indices merge
        return [stop_t + (2 * i * available + steps) // (2 * steps) for i in range(steps, 0, -1)]
    if steps == 1:
        return [start_t]
    # spacing (available-1)/(steps-1) > 1, so rounding never merges two indices
    return [int(i) for i in np.linspace(start_t, stop_t + 1, steps).round()]


# --- the sampling loop ----------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    spacing: str = "linspace",
    eta: float = 0.0,
    variance: str | None = None,
    x_start: torch.Tensor | None = None,
    start_t: int | None = None,
    stop_t: int = -1,
    clip_denoised: bool = True,
    generator: Generator = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    return_pred_x0: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse process of ``diffusion`` for a batch of ``shape`` (N, C, …) in float32.

    Args:
        model_fn: ``model_fn(x_t, t_scaled)`` → raw network output (see docs/architecture.md).
        sampler: ``"ddpm"`` (ancestral), ``"ddim"`` (with ``eta``: 0 deterministic, 1 the same walk as
            ancestral sampling with fixed_small variances) or ``"dpmpp"`` (DPM-Solver++(2M), deterministic).
        steps: number of network evaluations, evenly spaced over the schedule (None: every index).
        spacing: where those evaluations lie (:func:`timestep_sequence`): ``"linspace"`` (both ends) or
            ``"trailing"`` (the grid a progressively distilled stage was trained on).
        variance: DDPM only — ``"learned"``, ``"fixed_small"`` or ``"fixed_large"``; None or "auto" picks learned when
            the model learns it, else fixed_large. Strided steps use the step's own β = 1 − ᾱ_t/ᾱ_s and
            posterior variance, as an Improved-DDPM respaced model.
        x_start: a sample at index ``start_t`` (default: N(0, I) at index T−1).
        start_t: the index to start from (default T−1).
        stop_t: −1 returns clean data; k >= 0 returns a noisy sample distributed as x_k.
        clip_denoised: clamp x̂0 to [−1, 1] at every step.
        generator: seeds the initial noise and every stochastic step: a ``torch.Generator`` (numbers are
            drawn on its device) or a :class:`~cascaded_diffusion.rng.PerSampleGenerator` (row k of the
            batch from its own stream, so each sample is independent of the batch it is in).
        device: where to sample (default: x_start's device, else the CPU).
        return_pred_x0: also return the last step's x̂0.
        callback: called with a :class:`SamplerStep` after every step (it must not change the tensors).

    Returns:
        x (N, C, …), or (x, x̂0) with ``return_pred_x0``.
    """
    variance, start_t = _check_options(diffusion, shape, sampler, variance, eta, start_t, stop_t)
    x, device = _initial_sample(shape, x_start, generator, device)

    if stop_t == start_t:  # nothing to run: x_start already is the sample at that level (e.g. s = T)
        return (x, x) if return_pred_x0 else x
    seq = timestep_sequence(start_t, stop_t, steps, spacing)
    targets = seq[1:] + [stop_t]
    abar = diffusion.alphas_cumprod.tolist()
    n, channels = shape[0], shape[1]
    # every step's network times, computed once (one small host→device copy), one contiguous row per step
    t_scaled = diffusion.scale_timesteps(torch.tensor(seq, dtype=torch.long, device=device))
    t_rows = t_scaled.view(-1, 1).expand(-1, n).contiguous()

    iterator = _step_indices(len(seq), sampler, progress)
    dpm_state: tuple[torch.Tensor, float] | None = None
    x0 = x
    for i in iterator:
        t, s = seq[i], targets[i]
        a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
        out = model_fn(x, t_rows[i]).float()
        pred, v = diffusion.split_output(out, channels)
        x0, eps = x0_eps_from_prediction(diffusion.prediction, pred, x, a_t, clip_denoised)
        if sampler == "ddpm":
            x = _ddpm_step(x, x0, a_t, a_s, v, variance, generator)
        elif sampler == "ddim":
            x = _ddim_step(x0, eps, a_t, a_s, eta, generator)
        else:
            x, dpm_state = _dpmpp_2m_step(x, x0, a_t, a_s, dpm_state)
        if callback is not None:
            callback(SamplerStep(step=i + 1, total=len(seq), t=t, x=x, pred_x0=x0))
    return (x, x0) if return_pred_x0 else x


def _initial_sample(shape: tuple[int, ...], x_start: torch.Tensor | None, generator: Generator,
                    device: str | torch.device | None) -> tuple[torch.Tensor, torch.device]:
    """``x_start`` in float32 on ``device``, or N(0, I) noise drawn there (default device: x_start's, else CPU);
    and that device."""
    if device is None:
        device = x_start.device if x_start is not None else torch.device("cpu")
    device = torch.device(device)
    if x_start is None:
        return randn(tuple(shape), generator, device), device
    if tuple(x_start.shape) != tuple(shape):
        raise ValueError(f"x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
    return x_start.to(device=device, dtype=torch.float32), device


def _step_indices(num_steps: int, sampler: str, progress: bool) -> Iterable[int]:
    if not progress:
        return range(num_steps)
    from tqdm.auto import tqdm

    return tqdm(range(num_steps), desc=f"{sampler} sampling", leave=False, dynamic_ncols=True)


def _check_options(diffusion: GaussianDiffusion, shape: tuple[int, ...], sampler: str, variance: str | None,
                   eta: float, start_t: int | None, stop_t: int) -> tuple[str, int]:
    """:func:`sample`'s options checked before anything is drawn; returns the variance (``"auto"`` decided:
    learned when the model learns it, else fixed_large) and the start index (default T−1)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (valid: {', '.join(SAMPLERS)})")
    if variance in (None, "auto"):
        variance = "learned" if diffusion.learn_sigma else "fixed_large"
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r} (valid: {', '.join(VARIANCES)})")
    if sampler == "ddpm" and variance == "learned" and not diffusion.learn_sigma:
        raise ValueError(
            "variance='learned' needs a model trained with learn_sigma=True; use fixed_small or fixed_large"
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if len(shape) < 2:
        raise ValueError(f"shape must be (N, C, ...), got {tuple(shape)}")
    T = diffusion.num_timesteps
    start_t = T - 1 if start_t is None else int(start_t)
    if not 0 <= start_t < T:
        raise ValueError(f"start_t must be in [0, {T}), got {start_t}")
    if not -1 <= stop_t <= start_t:
        raise ValueError(f"stop_t must be in [-1, start_t={start_t}], got {stop_t}")
    return variance, start_t


def _noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def _ddpm_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    a_t: float,
    a_s: float,
    v: torch.Tensor | None,
    variance: str,
    generator: Generator,
) -> torch.Tensor:
    """Draw x_s ~ q(x_s | x_t, x̂0), the posterior of the (possibly strided) step t → s."""
    beta = 1.0 - a_t / a_s
    mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)) * x
    if a_s == 1.0:
        return mean  # onto clean data: the posterior variance is 0 and no noise is added
    posterior_var = beta * (1.0 - a_s) / (1.0 - a_t)
    if variance == "learned":
        std = torch.exp(0.5 * learned_log_variance(v, math.log(beta), math.log(posterior_var)))
    elif variance == "fixed_large":
        std = math.sqrt(beta)
    else:
        std = math.sqrt(posterior_var)
    return mean + std * _noise_like(x, generator)


def _ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, a_t: float, a_s: float, eta: float, generator: Generator
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(ᾱ_s)x̂0 + sqrt(1−ᾱ_s−σ²)ε̂ + σz,
    σ = η·sqrt((1−ᾱ_s)/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_s); onto clean data (ᾱ_s = 1) this is x̂0."""
    sigma = eta * math.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
    x = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma**2, 0.0)) * eps
    return x + sigma * _noise_like(x, generator) if sigma > 0 else x


def _dpmpp_2m_step(
    x: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float, state: tuple[torch.Tensor, float] | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, float] | None]:
    """One DPM-Solver++(2M) step t → s (Lu et al. 2022, Alg. 2) with data prediction x̂0, in λ = log(α/σ).

    x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^{−h})·D with h = λ_s − λ_t, where D = x̂0 on the first step and
    D = (1 + 1/(2r))·x̂0 − 1/(2r)·x̂0_prev, r = h_prev/h, after it. ``state`` carries (x̂0_prev, h_prev).
    Onto clean data λ_s = ∞: the step is first order and its limit (σ_s = 0, α_s = 1, e^{−h} = 0) is x̂0.
    """
    if a_s == 1.0:
        return x0, None
    alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1.0 - a_t)
    alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1.0 - a_s)
    h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)
    if state is None:
        d = x0
    else:
        prev_x0, prev_h = state
        half_inv_r = 0.5 * h / prev_h
        d = (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0
    x = (sigma_s / sigma_t) * x + (-alpha_s * math.expm1(-h)) * d
    return x, (x0, h)

