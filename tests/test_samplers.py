"""Tests for cascaded_diffusion.samplers.

The samplers are driven by the exact optimal predictor for Gaussian data x0 ~ N(μ, σ²) (per channel):
  ε*(x_t) = sqrt(1−ᾱ)(x_t − sqrt(ᾱ)μ)/(ᾱσ² + 1 − ᾱ),   x0*(x_t) = μ + σ² sqrt(ᾱ)(x_t − sqrt(ᾱ)μ)/(ᾱσ² + 1 − ᾱ),
and, for learned variances, the exact one-step reverse variance Var(x_{t−1} | x_t) = Pβ/((1−β)P + β) with
P = ᾱ_{t−1}σ² + 1 − ᾱ_{t−1} (which lies in [β̃_t, β_t] for σ² ≤ 1). Samples must then have the data moments.

Tolerances: a sample mean of n draws has standard error σ/√n and a sample variance relative standard error
√(2/(n−1)); we allow 4.5 standard errors (a false failure has probability ~1e-5 per check; seeds are fixed
anyway) plus the sampler's own deterministic bias for that setting, stated at each test. Those biases were
computed offline by propagating the exact first two moments through each sampler's linear-Gaussian steps in
float64 for this data and the cosine schedule with T = 1000.
"""

from __future__ import annotations

import math

import pytest
import torch

from cascaded_diffusion.diffusion import GaussianDiffusion, make_beta_schedule, prediction_target
from cascaded_diffusion.samplers import SamplerStep, make_cfg_model_fn, sample, timestep_sequence

MU = torch.tensor([0.3, -0.5, 0.0])
VAR = torch.tensor([0.25, 0.64, 1.0])
T = 1000


def per_channel(values: torch.Tensor) -> torch.Tensor:
    return values.view(1, -1, 1, 1)


class OptimalGaussianModel:
    """The Bayes-optimal network for Gaussian data, as a ``model_fn(x_t, t_scaled)`` closure.

    It reads the level from the network time exactly as a trained network would have to (``base`` is the
    training diffusion).
    """

    def __init__(self, base: GaussianDiffusion, prediction: str = "eps", learn_sigma: bool = False):
        self.base, self.prediction, self.learn_sigma = base, prediction, learn_sigma
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t_scaled: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        base = self.base
        idx = torch.round(t_scaled.double() * base.num_timesteps / 1000).long()
        a = per_channel(torch.ones(1, dtype=torch.float64)) * base.alphas_cumprod[idx].view(-1, 1, 1, 1)
        mu, var = per_channel(MU).double(), per_channel(VAR).double()
        denom = a * var + 1 - a
        # x0* and ε* are affine in x_t: build their coefficients in float64, apply them in x_t's float32
        x0_gain, eps_gain = (var * a.sqrt() / denom).float(), ((1 - a).sqrt() / denom).float()
        centred = x_t - (a.sqrt() * mu).float()
        x0, eps = mu.float() + x0_gain * centred, eps_gain * centred
        out = prediction_target(self.prediction, x0, eps, a.float())
        if not self.learn_sigma:
            return out
        a_prev = torch.where(idx > 0, base.alphas_cumprod[(idx - 1).clamp(min=0)], 1.0).view(-1, 1, 1, 1)
        beta = 1 - a / a_prev
        p = a_prev * var + 1 - a_prev
        true_var = p * beta / ((1 - beta) * p + beta)
        log_beta = base.log_betas[idx].view(-1, 1, 1, 1)
        log_post = base.posterior_log_variance_clipped[idx].view(-1, 1, 1, 1)
        v = (2 * (true_var.log() - log_post) / (log_beta - log_post) - 1).clamp(-1, 1)
        return torch.cat([out, v.float().expand_as(out)], dim=1)


def cosine(T_: int = T, **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(make_beta_schedule("cosine", T_), **kwargs)


def check_moments(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, var_bias: float, label: str = "") -> None:
    """Per-channel sample mean and variance of x (N, C, H, W) against ``mean``/``var`` (C,), allowing 4.5
    standard errors plus a deterministic relative variance bias ``var_bias``. The means get no bias allowance:
    every step of every sampler is affine in x_t and the optimal x̂0 is unbiased, so they are exact."""
    n = x.numel() // x.shape[1]
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    m_hat, v_hat = flat.mean(1), flat.var(1)
    mean_tol = 4.5 * (var * (1 + var_bias) / n).sqrt()
    var_tol = 4.5 * math.sqrt(2 / (n - 1)) + var_bias
    assert torch.all((m_hat - mean).abs() <= mean_tol), f"{label} mean {m_hat} vs {mean} (tol {mean_tol})"
    assert torch.all((v_hat / var - 1).abs() <= var_tol), f"{label} var {v_hat} vs {var} (rel tol {var_tol:.4f})"


def marginal(d: GaussianDiffusion, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of x_k for the Gaussian data (k = −1: the data itself)."""
    a = 1.0 if k < 0 else d.alphas_cumprod[k].item()
    return math.sqrt(a) * MU.double(), a * VAR.double() + 1 - a


def draw_marginal(d: GaussianDiffusion, k: int, shape, generator) -> torch.Tensor:
    mean, var = marginal(d, k)
    return per_channel(mean).float() + per_channel(var.sqrt()).float() * torch.randn(shape, generator=generator)


def exact_ode_map(d: GaussianDiffusion, x: torch.Tensor, from_t: int, to_t: int) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data keeps the standardised value (x − mean_t)/std_t fixed."""
    m_from, v_from = marginal(d, from_t)
    m_to, v_to = marginal(d, to_t)
    z = (x.double() - per_channel(m_from)) / per_channel(v_from.sqrt())
    return per_channel(m_to) + per_channel(v_to.sqrt()) * z


SHAPE = (4096, 3, 2, 2)  # 16384 draws per channel


# --- DDPM ancestral sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variance, prediction, var_bias",
    [
        # exact-moment biases for this data at T = 1000: fixed_large ≤ 0.2%, fixed_small ≤ 0.8%, learned 0
        ("fixed_large", "eps", 0.005),
        ("fixed_small", "x0", 0.01),
        ("learned", "v", 0.002),
    ],
)
def test_ddpm_full_schedule_samples_the_data(variance, prediction, var_bias):
    learn = variance == "learned"
    d = cosine(prediction=prediction, learn_sigma=learn)
    model = OptimalGaussianModel(d, prediction, learn)
    gen = torch.Generator().manual_seed(1)
    x = sample(d, model, SHAPE, sampler="ddpm", variance=variance, clip_denoised=False, generator=gen)
    assert model.calls == T
    check_moments(x, MU.double(), VAR.double(), var_bias, f"ddpm/{variance}")


def test_respaced_ancestral_sampling_with_learned_variances():
    # 50 strided steps with the step's β and β̃ (Improved DDPM respacing): exact-moment bias ≤ 0.3%
    d = cosine(learn_sigma=True)
    model = OptimalGaussianModel(d, learn_sigma=True)
    x = sample(d, model, SHAPE, steps=50, clip_denoised=False, generator=torch.Generator().manual_seed(2))
    assert model.calls == 50
    check_moments(x, MU.double(), VAR.double(), 0.005, "ddpm/learned/50")


def test_respaced_ancestral_sampling_with_fixed_large_variance():
    # 100 strided steps with σ² = the step's β: exact-moment bias +1.9% (σ² = 0.25), +0.6% (0.64), 0 (1.0)
    d = cosine()
    x = sample(d, OptimalGaussianModel(d), SHAPE, steps=100, variance="fixed_large", clip_denoised=False,
               generator=torch.Generator().manual_seed(4))
    check_moments(x, MU.double(), VAR.double(), 0.02, "ddpm/fixed_large/100")


def test_stop_t_returns_the_noisy_marginal():
    d = cosine(learn_sigma=True)
    k = 200
    model = OptimalGaussianModel(d, learn_sigma=True)
    x = sample(d, model, SHAPE, stop_t=k, clip_denoised=False, generator=torch.Generator().manual_seed(5))
    assert model.calls == T - 1 - k
    mean, var = marginal(d, k)
    check_moments(x, mean, var, 0.002, "ddpm stop_t")  # learned exact variances: bias 0
    # and strided: 40 steps down to x_k (bias ≤ 0.2%)
    x = sample(d, model, SHAPE, steps=40, stop_t=k, clip_denoised=False, generator=torch.Generator().manual_seed(6))
    check_moments(x, mean, var, 0.005, "ddpm/40 stop_t")


def test_start_from_a_given_x_t():
    d = cosine(learn_sigma=True)
    k = 300
    gen = torch.Generator().manual_seed(7)
    x_k = draw_marginal(d, k, SHAPE, gen)
    model = OptimalGaussianModel(d, learn_sigma=True)
    x = sample(d, model, SHAPE, x_start=x_k, start_t=k, clip_denoised=False, generator=gen)
    assert model.calls == k + 1
    check_moments(x, MU.double(), VAR.double(), 0.002, "ddpm from x_k")


# --- DDIM and DPM-Solver++ -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, prediction", [("ddim", "eps"), ("dpmpp", "eps"), ("dpmpp", "v"), ("ddim", "x0")])
def test_deterministic_samplers_follow_the_probability_flow_ode(sampler, prediction):
    """Against the exact ODE map of Gaussian data. DDIM is first order (error halves when the steps double),
    DPM-Solver++(2M) second order (error / 4). On time-uniform steps of the cosine schedule the first jump
    from ᾱ ≈ 2e-9 is large, so 50 steps leave a few percent (measured: DDIM 3.1%, DPM++ 1.7% of x − μ)."""
    d = cosine(prediction=prediction)
    model = OptimalGaussianModel(d, prediction)
    x_T = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(8))
    exact = exact_ode_map(d, x_T, T - 1, -1)

    def error(steps: int) -> float:
        x = sample(d, model, x_T.shape, sampler=sampler, steps=steps, x_start=x_T, clip_denoised=False)
        return (x.double() - exact).abs().max().item()

    e50, e100, e200 = error(50), error(100), error(200)
    order_ratio = {"ddim": 0.5, "dpmpp": 0.25}[sampler]
    assert e50 < {"ddim": 0.12, "dpmpp": 0.06}[sampler]
    for coarse, fine in ((e50, e100), (e100, e200)):
        assert fine / coarse == pytest.approx(order_ratio, abs=0.08), (e50, e100, e200)


@pytest.mark.parametrize("sampler, var_bias", [("ddim", 0.07), ("dpmpp", 0.04)])
def test_deterministic_samplers_sample_the_data_in_50_steps(sampler, var_bias):
    # variance bias of the 50-step discretisation (see the ODE test): DDIM −6.1%, DPM++ +3.4% at σ² = 0.25
    d = cosine()
    x = sample(d, OptimalGaussianModel(d), (16384, 3, 2, 2), sampler=sampler, steps=50, clip_denoised=False,
               generator=torch.Generator().manual_seed(9))
    check_moments(x, MU.double(), VAR.double(), var_bias, sampler)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_deterministic_samplers_start_and_stop_anywhere(sampler):
    d = cosine()
    model = OptimalGaussianModel(d)
    start, stop = 600, 100
    x_start = draw_marginal(d, start, (64, 3, 2, 2), torch.Generator().manual_seed(10))
    x = sample(d, model, x_start.shape, sampler=sampler, steps=100, x_start=x_start, start_t=start, stop_t=stop,
               clip_denoised=False)
    # away from the ᾱ ≈ 0 end the steps are gentle (measured: DDIM 9e-3, DPM++ 2e-4)
    bound = {"ddim": 2e-2, "dpmpp": 1e-3}[sampler]
    assert (x.double() - exact_ode_map(d, x_start, start, stop)).abs().max().item() < bound


def test_ddim_with_eta_one_is_ancestral_sampling_with_posterior_variance():
    d = cosine()
    model = OptimalGaussianModel(d)
    shape = (128, 3, 2, 2)
    a = sample(d, model, shape, sampler="ddim", eta=1.0, steps=20, generator=torch.Generator().manual_seed(11))
    b = sample(d, model, shape, sampler="ddpm", variance="fixed_small", steps=20,
               generator=torch.Generator().manual_seed(11))
    assert torch.allclose(a, b, atol=1e-4)
    c = sample(d, model, shape, sampler="ddim", eta=0.5, steps=20, generator=torch.Generator().manual_seed(11))
    assert not torch.allclose(a, c, atol=1e-2)



@pytest.mark.parametrize("v, fixed", [(1.0, "fixed_large"), (-1.0, "fixed_small")])
def test_learned_variance_endpoints_on_strided_steps(v, fixed):
    """With 10 strided steps β and β̃ of a step differ a lot: v = +1 must be the step's β, v = −1 its β̃."""
    d = cosine(learn_sigma=True)
    eps_model = OptimalGaussianModel(d)
    learned = lambda x, t: torch.cat([eps_model(x, t), torch.full_like(x, v)], 1)  # noqa: E731
    shape = (64, 3, 2, 2)
    kwargs = dict(steps=10, stop_t=50, clip_denoised=False)
    a = sample(d, learned, shape, variance="learned", generator=torch.Generator().manual_seed(12), **kwargs)
    b = sample(d, learned, shape, variance=fixed, generator=torch.Generator().manual_seed(12), **kwargs)
    other = {"fixed_large": "fixed_small", "fixed_small": "fixed_large"}[fixed]
    c = sample(d, learned, shape, variance=other, generator=torch.Generator().manual_seed(12), **kwargs)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-2)

# --- sequences, seeding, outputs -------------------------------------------------------------------------


def test_timestep_sequence():
    assert timestep_sequence(9, -1, None) == list(range(9, -1, -1))
    assert timestep_sequence(9, 4, 100) == [9, 8, 7, 6, 5]
    seq = timestep_sequence(999, -1, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0 and all(a > b for a, b in zip(seq, seq[1:]))
    seq = timestep_sequence(700, 199, 7)
    assert len(seq) == 7 and seq[0] == 700 and seq[-1] == 200
    assert timestep_sequence(5, -1, 1) == [5]
    with pytest.raises(ValueError, match="stop_t < start_t"):
        timestep_sequence(5, 5, None)
    with pytest.raises(ValueError, match="steps must be"):
        timestep_sequence(500, -1, 0)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_seeded_and_returns_pred_x0(sampler):
    d = cosine(100)
    model = OptimalGaussianModel(d)
    kwargs = dict(sampler=sampler, eta=1.0, steps=10)
    a, a_x0 = sample(d, model, (8, 3, 4, 4), generator=torch.Generator().manual_seed(0), return_pred_x0=True, **kwargs)
    b = sample(d, model, (8, 3, 4, 4), generator=torch.Generator().manual_seed(0), **kwargs)
    c = sample(d, model, (8, 3, 4, 4), generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.allclose(a, a_x0, atol=1e-5)  # the last step onto clean data is x̂0 for every sampler
    assert a.dtype == torch.float32 and a.shape == (8, 3, 4, 4)


def test_clip_denoised_keeps_samples_in_range():
    d = cosine(100, prediction="x0")
    x = sample(d, lambda x, t: torch.full_like(x, 5.0), (4, 1, 2, 2), steps=10,
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, torch.ones_like(x))


def test_model_sees_scaled_original_timesteps():
    d = cosine(4000)
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sample(d, spy, (3, 1, 2, 2), sampler="ddim", steps=4, start_t=3999)
    assert [s.tolist() for s in seen] == [[v * 0.25] * 3 for v in timestep_sequence(3999, -1, 4)]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_sampling_loop_makes_no_host_reads(sampler):
    """Meta tensors have no data, so any .item()/bool()/.tolist() on them raises: the loop has none
    (on CUDA these would be host-device synchronisations)."""
    d = cosine(20, learn_sigma=True)
    out = sample(d, lambda x, t: torch.cat([x * t.view(-1, 1, 1, 1), x.tanh()], 1), (2, 3, 4, 4),
                 sampler=sampler, eta=0.5, device="meta", stop_t=3)
    assert out.device.type == "meta" and out.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_callback_sees_every_step_and_does_not_change_the_result(sampler):
    d = cosine(100)
    model = OptimalGaussianModel(d)
    kwargs = dict(sampler=sampler, eta=1.0, steps=7, stop_t=9, shape=(4, 3, 2, 2))
    plain = sample(d, model, generator=torch.Generator().manual_seed(0), **kwargs)
    steps: list[SamplerStep] = []
    out = sample(d, model, generator=torch.Generator().manual_seed(0), callback=steps.append, **kwargs)
    assert torch.equal(out, plain)  # the callback observes; it draws no numbers and changes nothing
    assert [s.step for s in steps] == list(range(1, 8)) and {s.total for s in steps} == {7}
    assert [s.t for s in steps] == timestep_sequence(99, 9, 7)
    assert torch.equal(steps[-1].x, out) and steps[0].stage is None
    assert all(s.pred_x0.shape == (4, 3, 2, 2) for s in steps)


def test_progress_bar_runs(capsys):
    d = cosine(10)
    x = sample(d, lambda x, t: torch.zeros_like(x), (2, 1, 2, 2), progress=True)
    assert x.shape == (2, 1, 2, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sampler="euler"), "unknown sampler"),
        (dict(variance="learned"), "learn_sigma=True"),
        (dict(variance="wide"), "unknown variance"),
        (dict(start_t=10), r"start_t must be in \[0, 10\)"),
        (dict(start_t=4, stop_t=5), "stop_t must be in"),
        (dict(stop_t=-2), "stop_t must be in"),
        (dict(x_start=torch.zeros(2, 1, 2, 2)), "x_start has shape"),
        (dict(eta=-1.0, sampler="ddim"), "eta must be"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    d = cosine(10)
    with pytest.raises(ValueError, match=message):
        sample(d, lambda x, t: torch.zeros_like(x), (3, 1, 2, 2), **kwargs)


def test_wrong_model_output_channels_raise():
    d = cosine(10, learn_sigma=True)
    with pytest.raises(ValueError, match="expected 2 output channels"):
        sample(d, lambda x, t: torch.zeros_like(x), (3, 1, 2, 2))


# --- classifier-free guidance ----------------------------------------------------------------------------


class RecordingNet:
    """net_call(x, t, labels): prediction = x·(label+1), variance channels = label; records its batches."""

    def __init__(self, learn_sigma: bool):
        self.learn_sigma, self.batches = learn_sigma, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.batches.append((x.shape[0], t.shape[0], labels.tolist()))
        lab = labels.float().view(-1, 1, 1, 1)
        pred = x * (lab + 1)
        return torch.cat([pred, lab.expand_as(x)], 1) if self.learn_sigma else pred


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_batches_cond_and_uncond_in_one_forward(learn_sigma):
    net = RecordingNet(learn_sigma)
    y, null, w = torch.tensor([0, 2]), 5, 3.0
    fn = make_cfg_model_fn(net, y, null, w, learn_sigma)
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([10.0, 10.0])
    out = fn(x, t)
    assert net.batches == [(4, 4, [0, 2, 5, 5])]
    cond, uncond = x * (y.float().view(-1, 1, 1, 1) + 1), x * (null + 1)
    assert torch.allclose(out[:, :3], uncond + w * (cond - uncond))
    if learn_sigma:  # variance channels from the conditional pass
        assert torch.equal(out[:, 3:], y.float().view(-1, 1, 1, 1).expand_as(x))
    else:
        assert out.shape[1] == 3


@pytest.mark.parametrize("scale", [1.0, None])
def test_cfg_scale_one_is_plain_conditional(scale):
    net = RecordingNet(False)
    y = torch.tensor([1, 3])
    x = torch.randn(2, 1, 2, 2)
    out = make_cfg_model_fn(net, y, 9, scale, False)(x, torch.zeros(2))
    assert net.batches == [(2, 2, [1, 3])]
    assert torch.allclose(out, x * (y.float().view(-1, 1, 1, 1) + 1))


def test_cfg_scale_zero_is_unconditional():
    net = RecordingNet(False)
    x = torch.randn(2, 1, 2, 2)
    out = make_cfg_model_fn(net, torch.tensor([1, 3]), 9, 0.0, False)(x, torch.zeros(2))
    assert torch.allclose(out, x * 10)



def test_guidance_checks_output_channels():
    net = RecordingNet(False)
    fn = make_cfg_model_fn(net, torch.tensor([0]), 1, 2.0, learn_sigma=True)
    with pytest.raises(ValueError, match="guidance expected 4 output channels"):
        fn(torch.randn(1, 2, 2, 2), torch.zeros(1))
