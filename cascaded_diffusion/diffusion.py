"""Discrete-time Gaussian diffusion (DDPM / Improved DDPM), the math every stage shares.

Index convention (docs/architecture.md): ``t`` in ``0 … T-1``, ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε`` with
``ᾱ_t = prod_{i<=t} (1-β_i)``; level -1 is clean data (ᾱ_{-1} = 1). Schedules are kept in float64 on the CPU;
coefficients are gathered on the index tensor's device (one cached copy per device) and cast to the data's
dtype, so nothing synchronises the host with the device.

Parameterizations: the network predicts ε, v (= sqrt(ᾱ)ε − sqrt(1−ᾱ)x_0) or x_0. With learned variances the
output has 2C channels, the last C interpolating the log variance between β_t (v=1) and the posterior
variance β̃_t (v=−1), Improved DDPM's "learned range". The hybrid loss is L_simple + λ·L_vlb with a
stop-gradient on the mean in the VLB term, so only the variance head learns from it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ᾱ as a Python float (samplers, one level for the whole batch) or a tensor broadcasting against x
AlphaBar = Union[torch.Tensor, float]

SCHEDULES = ("cosine", "linear", "linear:START,END")
PREDICTIONS = ("eps", "v", "x0")
LOSSES = ("simple", "hybrid")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
VARIANCES = ("learned", "fixed_small", "fixed_large")


# --- schedules -------------------------------------------------------------------------------------------


def make_beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """β_0 … β_{T-1} as a float64 tensor.

    ``"cosine"``: Improved DDPM, ᾱ(t) = f(t)/f(0) with f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, and β
    clipped at 0.999 (the last step would otherwise be 1). ``"linear"``: DDPM's 1e-4 … 0.02, scaled by 1000/T so
    any T traces the same ᾱ curve (Improved DDPM). ``"linear:START,END"``: explicit endpoints, e.g. SR3's
    ``linear:1e-6,1e-2``.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an int >= 1, got {num_timesteps!r}")
    T = num_timesteps
    if name == "cosine":
        s = 0.008
        t = np.arange(T + 1, dtype=np.float64)
        f = np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
        return torch.from_numpy(np.minimum(betas, 0.999))
    if name == "linear":
        scale = 1000.0 / T
        start, end = 1e-4 * scale, 0.02 * scale
        if end >= 1:
            raise ValueError(f"the scaled linear schedule needs T > 20 (its last β is 20/T), got T={T}")
        return torch.linspace(start, end, T, dtype=torch.float64)
    if name.startswith("linear:"):
        try:
            start, end = (float(v) for v in name.split(":", 1)[1].split(","))
        except ValueError:
            raise ValueError(f"bad beta schedule {name!r}: expected linear:START,END, e.g. linear:1e-6,1e-2") from None
        if not 0 < start <= end < 1:
            raise ValueError(f"bad beta schedule {name!r}: need 0 < START <= END < 1")
        return torch.linspace(start, end, T, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {name!r} (valid: {', '.join(SCHEDULES)})")


# --- Gaussian helpers ------------------------------------------------------------------------------------


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch dimension."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation (|error| < 3e-4), as Improved DDPM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data ``x`` (scaled to [-1, 1]) under N(means, e^{2·log_scales})
    discretized into 256 bins of width 2/255; the two edge bins take the tails, so the bins sum to one."""
    if x.shape != means.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but means has shape {tuple(means.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_bin = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


# --- parameterization conversions --------------------------------------------------------------------------
# All take ᾱ of the level x_t is at, as a float or a tensor broadcasting against x_t.


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar: AlphaBar) -> torch.Tensor:
    return (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, abar: AlphaBar) -> torch.Tensor:
    return (x_t - abar**0.5 * x0) / (1 - abar) ** 0.5


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, abar: AlphaBar) -> torch.Tensor:
    """v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0 (Salimans & Ho 2022)."""
    return abar**0.5 * eps - (1 - abar) ** 0.5 * x0


def x0_eps_from_v(x_t: torch.Tensor, v: torch.Tensor, abar: AlphaBar) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) from v: x0 = sqrt(ᾱ)x_t − sqrt(1−ᾱ)v, ε = sqrt(1−ᾱ)x_t + sqrt(ᾱ)v (a rotation, stable at any ᾱ)."""
    a, s = abar**0.5, (1 - abar) ** 0.5
    return a * x_t - s * v, s * x_t + a * v


def x0_eps_from_prediction(
    prediction: str, out: torch.Tensor, x_t: torch.Tensor, abar: AlphaBar, clip_denoised: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from a network prediction of kind ``prediction``.

    Each parameterization yields the pair its own stable way (ε-prediction keeps ε̂ as predicted). With
    ``clip_denoised`` x̂0 is clamped to [-1, 1] and ε̂ recomputed from it, so the two stay consistent with x_t.
    """
    if prediction == "eps":
        x0, eps = x0_from_eps(x_t, out, abar), out
    elif prediction == "v":
        x0, eps = x0_eps_from_v(x_t, out, abar)
    elif prediction == "x0":
        x0, eps = out, eps_from_x0(x_t, out, abar)
    else:
        raise ValueError(f"unknown prediction {prediction!r} (valid: {', '.join(PREDICTIONS)})")
    if clip_denoised:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x_t, x0, abar)
    return x0, eps


def prediction_target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar: AlphaBar) -> torch.Tensor:
    """What a network of kind ``prediction`` is trained to output for the pair (x0, ε)."""
    if prediction == "eps":
        return eps
    if prediction == "v":
        return v_from_x0_eps(x0, eps, abar)
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction {prediction!r} (valid: {', '.join(PREDICTIONS)})")


def learned_log_variance(
    v: torch.Tensor, log_beta: torch.Tensor | float, log_posterior_variance: torch.Tensor | float
) -> torch.Tensor:
    """Improved DDPM's learned range: log σ² = frac·log β + (1−frac)·log β̃ with frac = (v+1)/2, so v=1 gives β
    and v=−1 the posterior variance β̃. v is not clamped (as Improved DDPM; the network's output is free)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_posterior_variance


# --- the process -----------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion over T steps and how a network's output parameterizes its reverse.

    Args:
        betas: β_0 … β_{T-1}, each in (0, 1).
        prediction: what the network predicts, ``"eps"``, ``"v"`` or ``"x0"``.
        learn_sigma: the network also outputs C channels of learned-range variance.
        loss: ``"simple"`` (L_simple only) or ``"hybrid"`` (L_simple + vlb_weight·L_vlb, needs learn_sigma).
        vlb_weight: λ of the hybrid loss (Improved DDPM: 0.001).
        loss_weighting: ``"uniform"`` or ``"min_snr"``: the MSE term weighted so that, written as an error on
            x0, its weight is min(SNR_t, γ) (Hang et al. 2023, "Min-SNR-γ"). The VLB term is left alone.
        min_snr_gamma: γ of ``"min_snr"``.
    """

    def __init__(
        self,
        betas: torch.Tensor | Sequence[float],
        prediction: str = "eps",
        learn_sigma: bool = False,
        loss: str = "simple",
        vlb_weight: float = 0.001,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
    ):
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().flatten().cpu()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r} (valid: {', '.join(PREDICTIONS)})")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r} (valid: {', '.join(LOSSES)})")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("the hybrid loss trains learned variances: set learn_sigma=True")
        if vlb_weight < 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r} (valid: {', '.join(LOSS_WEIGHTINGS)})")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.prediction = prediction
        self.learn_sigma = learn_sigma
        self.loss_type = loss
        self.vlb_weight = float(vlb_weight)
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.betas = betas
        self.num_timesteps = T = betas.numel()

        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0 would give log 0: use β̃_1 there, as Improved DDPM (t=0 is the decoder, never noised)
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # fixed_large is β_t, but with β̃_1 at t=0 (Improved DDPM) so the decoder is not needlessly wide
        self.large_variance = torch.cat([first, betas[1:]])
        self.log_betas = torch.log(betas)
        self.mse_weights = self._mse_weights()
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _mse_weights(self) -> torch.Tensor:
        """Per-index weight of the MSE term. Every parameterization's MSE is a multiple of the x0 error:
        ε-error = SNR·(x0-error), v-error = (SNR + 1)·(x0-error), so Min-SNR's x0 weight min(SNR, γ) becomes
        min(SNR, γ)/SNR for ε and min(SNR, γ)/(SNR + 1) for v."""
        if self.loss_weighting == "uniform":
            return torch.ones_like(self.alphas_cumprod)
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1.0)
        return clipped

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, prediction={self.prediction!r}, "
            f"learn_sigma={self.learn_sigma}, loss={self.loss_type!r})"
        )

    # --- coefficient gathering -------------------------------------------------------------------------
    def _on_device(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        buf = self._device_cache.get(key)
        if buf is None:
            buf = getattr(self, name).to(device)
            self._device_cache[key] = buf
        return buf

    def extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Schedule array ``name`` at indices ``t`` (shape (N,)), shaped (N, 1, …) to broadcast against x, in
        x's dtype. Indexing happens on t's device, so a CUDA t never forces a synchronisation."""
        values = self._on_device(name, t.device)[t]
        return values.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input: ``t · 1000 / T`` as float32 (ADM's rescaling)."""
        return t.float() * (1000.0 / self.num_timesteps)

    # --- forward process -------------------------------------------------------------------------------
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x0)."""
        abar = self.extract("alphas_cumprod", t, x0)
        return abar.sqrt() * x0, 1.0 - abar, torch.log1p(-abar)

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) = N(sqrt(ᾱ_t) x0, (1−ᾱ_t) I)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x0's shape {tuple(x0.shape)}")
        abar = self.extract("alphas_cumprod", t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x0)."""
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.extract("posterior_variance", t, x_t), self.extract("posterior_log_variance_clipped", t, x_t)

    # --- the reverse process ---------------------------------------------------------------------------
    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance channels or None) from a raw network output for data of ``channels`` channels."""
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.ndim < 2 or model_output.shape[1] != expected:
            got = model_output.shape[1] if model_output.ndim >= 2 else "no"
            detail = "(prediction + learned variance)" if self.learn_sigma else "(prediction only, learn_sigma=False)"
            raise ValueError(f"expected {expected} output channels {detail}, the model gave {got}")
        if self.learn_sigma:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def predict_x0_eps(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) from the prediction channels at indices t."""
        abar = self.extract("alphas_cumprod", t, x_t)
        return x0_eps_from_prediction(self.prediction, pred, x_t, abar, clip_denoised)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        variance: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a raw network output: ``mean``, ``variance``, ``log_variance``, ``pred_x0``,
        ``pred_eps``.

        ``variance``: ``"learned"`` (learned range), ``"fixed_small"`` (β̃_t, log clipped at t=0) or
        ``"fixed_large"`` (β_t, β̃_1 at t=0); None picks learned when the model learns it, else fixed_large.
        """
        pred, v = self.split_output(model_output, x_t.shape[1])
        variance = variance or ("learned" if self.learn_sigma else "fixed_large")
        if variance == "learned":
            if v is None:
                raise ValueError("variance='learned' needs a model trained with learn_sigma=True")
            log_var = learned_log_variance(
                v, self.extract("log_betas", t, x_t), self.extract("posterior_log_variance_clipped", t, x_t)
            )
            var = log_var.exp()
        elif variance == "fixed_large":
            var = self.extract("large_variance", t, x_t).expand_as(x_t)
            log_var = var.log()
        elif variance == "fixed_small":
            var = self.extract("posterior_variance", t, x_t).expand_as(x_t)
            log_var = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"unknown variance {variance!r} (valid: {', '.join(VARIANCES)})")
        pred_x0, pred_eps = self.predict_x0_eps(pred, x_t, t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": pred_x0, "pred_eps": pred_eps}

    # --- losses ----------------------------------------------------------------------------------------
    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Per-example VLB term L_t in bits/dim: KL(q(x_{t-1}|x_t,x0) ‖ p(x_{t-1}|x_t)) for t > 0 and the
        discretized-Gaussian decoder NLL −log p(x0|x_1) for t = 0 (x0 must then be 8-bit data in [-1, 1])."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        log_likelihood = discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = -mean_flat(log_likelihood) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses at indices ``t`` (shape (N,)): ``loss``, ``mse`` and, for the hybrid loss, ``vb``.

        ``mse`` is L_simple, the mean squared error on the parameterization's target (ε, v or x0). The hybrid
        loss adds λ·L_vlb where L_vlb = T·L_t is the one-sample estimate of the full bound (in bits/dim), i.e.
        Improved DDPM's ``vb · T/1000`` at λ = 0.001, so λ means the same for any T. L_t sees the prediction
        through a stop-gradient: only the variance channels learn from it.
        """
        if t.shape != (x0.shape[0],):
            raise ValueError(f"t must have shape ({x0.shape[0]},), one index per example, got {tuple(t.shape)}")
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise=noise)
        model_output = model_fn(x_t, self.scale_timesteps(t)).float()
        pred, v = self.split_output(model_output, x0.shape[1])
        target = prediction_target(self.prediction, x0, noise, self.extract("alphas_cumprod", t, x0))
        mse = mean_flat((target - pred) ** 2)
        terms = {"mse": mse}
        weighted = mse if self.loss_weighting == "uniform" else mse * self.extract("mse_weights", t, mse)
        if self.loss_type == "hybrid":
            frozen_mean = torch.cat([pred.detach(), v], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen_mean, x0, x_t, t, clip_denoised=False)
            terms["loss"] = weighted + self.vlb_weight * self.num_timesteps * terms["vb"]
        else:
            terms["loss"] = weighted
        return terms
