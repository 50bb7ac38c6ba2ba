"""Tests for the ADM-family U-Net (cascaded_diffusion.unet). Tiny configs only: the whole file runs in seconds."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cascaded_diffusion.unet import (
    AttentionBlock,
    UNet,
    UNetConfig,
    ResBlock,
    _scale_shift,
    _upsample_conv3x3,
    count_parameters,
    set_upsample_algorithm,
    timestep_embedding,
)


def tiny_config(**overrides) -> UNetConfig:
    fields = dict(
        resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
        num_res_blocks=1, attention_resolutions=(8,), num_heads=2, norm_groups=4,
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def sr_config(**overrides) -> UNetConfig:
    return tiny_config(num_classes=5, learn_sigma=True, use_aug_level=True, low_res_channels=3, **overrides)


def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that the zero-initialised output layers no longer hide the inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def sr_inputs(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(n, 3, 16, 16, generator=g),
        t=torch.rand(n, generator=g) * 1000,
        y=torch.randint(0, 5, (n,), generator=g),
        aug_level=torch.rand(n, generator=g) * 1000,
        low_res=torch.randn(n, 3, 8, 8, generator=g),
    )


# ----------------------------------------------------------------------------------------------------------------
# Shapes and structure
# ----------------------------------------------------------------------------------------------------------------


def test_base_model_output_shape_doubles_channels_with_learned_sigma():
    model = UNet(tiny_config(num_classes=10, learn_sigma=True))
    out = model(torch.randn(3, 3, 16, 16), torch.rand(3) * 1000, y=torch.tensor([0, 4, 10]))
    assert out.shape == (3, 6, 16, 16)

    plain = UNet(tiny_config(in_channels=1, out_channels=1))
    assert plain(torch.randn(2, 1, 16, 16), torch.rand(2) * 1000).shape == (2, 1, 16, 16)


def test_sr_model_output_shape():
    model = UNet(sr_config())
    assert model(**sr_inputs(n=2)).shape == (2, 6, 16, 16)


def test_output_is_exactly_zero_at_init():
    # The last conv is zero-initialised, so a fresh network predicts 0 (ε-prediction starts at the mean).
    model = UNet(sr_config())
    assert torch.count_nonzero(model(**sr_inputs())) == 0


def test_attention_runs_at_configured_resolutions():
    cfg = tiny_config(resolution=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,))
    model = UNet(cfg)
    seen: list[int] = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-1]))
    model(torch.randn(1, 3, 32, 32), torch.tensor([10.0]))
    # encoder: num_res_blocks per attention level; decoder: num_res_blocks + 1; middle block: one at 8×8.
    assert sorted(seen) == [8] + [16] * (2 + 3)


def test_low_res_is_upsampled_with_the_configured_mode():
    for mode in ("bilinear", "bicubic", "nearest"):
        model = perturb_(UNet(sr_config(low_res_upsample=mode)))
        inputs = sr_inputs()
        out_low = model(**inputs)
        align = None if mode == "nearest" else False
        inputs["low_res"] = F.interpolate(inputs["low_res"], size=(16, 16), mode=mode, align_corners=align)
        torch.testing.assert_close(model(**inputs), out_low)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------


def test_null_class_output_depends_only_on_the_null_embedding():
    cfg = tiny_config(num_classes=5)
    model = perturb_(UNet(cfg)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100.0, 700.0])
    null = torch.full((2,), cfg.num_classes)
    reference = model(x, t, y=null)

    with torch.no_grad():
        model.label_embed.weight[: cfg.num_classes].normal_()  # every real class row
    torch.testing.assert_close(model(x, t, y=null), reference, rtol=0, atol=0)

    with torch.no_grad():
        model.label_embed.weight[cfg.num_classes].normal_()  # the null row
    assert not torch.allclose(model(x, t, y=null), reference)


def test_different_classes_give_different_outputs():
    model = perturb_(UNet(tiny_config(num_classes=5))).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300.0])
    outputs = [model(x, t, y=torch.tensor([label])) for label in range(6)]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-4, (i, j)


def test_aug_level_timestep_and_low_res_all_change_the_output():
    model = perturb_(UNet(sr_config())).eval()
    inputs = sr_inputs()
    reference = model(**inputs)
    for key in ("t", "aug_level", "low_res"):
        changed = dict(inputs)
        changed[key] = inputs[key] + (250.0 if key != "low_res" else 0.5)
        assert (model(**changed) - reference).abs().max() > 1e-4, key


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))
    odd = timestep_embedding(torch.tensor([3.0]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0


# ----------------------------------------------------------------------------------------------------------------
# Input and config validation
# ----------------------------------------------------------------------------------------------------------------


def _bad_sr_inputs():
    good = sr_inputs()
    cases = {
        "x must have shape": dict(x=torch.randn(2, 4, 16, 16)),
        "x must have shape ": dict(x=torch.randn(2, 3, 32, 32)),
        "x must have shape  ": dict(x=torch.randn(3, 16, 16)),
        "t must have shape": dict(t=torch.rand(3)),
        "y .* is required": dict(y=None),
        "y must have shape": dict(y=torch.tensor([1, 2, 3])),
        "y must be an integer": dict(y=torch.tensor([1.0, 2.0])),
        "aug_level .* is required": dict(aug_level=None),
        "aug_level must have shape": dict(aug_level=torch.rand(2, 1)),
        "low_res .* is required": dict(low_res=None),
        "low_res must have shape": dict(low_res=torch.randn(2, 1, 8, 8)),
        "exceeds the model resolution": dict(low_res=torch.randn(2, 3, 32, 32)),
    }
    return [pytest.param({**good, **change}, message.strip(), id=message.strip()) for message, change in cases.items()]


@pytest.mark.parametrize("inputs, message", _bad_sr_inputs())
def test_bad_inputs_raise_value_error(inputs, message):
    model = UNet(sr_config())
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_conditioning_given_to_a_model_without_it_raises():
    model = UNet(tiny_config())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1.0])
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, y=torch.tensor([0]))
    with pytest.raises(ValueError, match="use_aug_level is False"):
        model(x, t, aug_level=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="base model"):
        model(x, t, low_res=torch.randn(1, 3, 8, 8))


def test_zero_dim_timestep_is_broadcast():
    model = perturb_(UNet(tiny_config())).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x, torch.tensor(40.0)), model(x, torch.tensor([40.0, 40.0])))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_channels=24, norm_groups=16), "norm_groups=16 must divide"),
        (dict(channel_mult=(1, 3), model_channels=16, norm_groups=32), "norm_groups=32 must divide"),
        (dict(attention_resolutions=(4,)), r"attention_resolutions \[4\]"),
        (dict(resolution=18, channel_mult=(1, 2, 2)), "divisible by"),
        (dict(num_heads=3), "num_heads=3 must divide"),
        (dict(num_head_channels=12), "num_head_channels=12 must divide"),
        (dict(low_res_upsample="area"), "low_res_upsample"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(low_res_channels=-1), "low_res_channels"),
    ],
)
def test_invalid_config_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_dict_round_trip_through_json():
    cfg = sr_config(channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=8, dropout=0.1)
    restored = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert isinstance(restored.channel_mult, tuple)
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "num_resblocks": 3})


# ----------------------------------------------------------------------------------------------------------------
# Devices, dtypes, memory formats, checkpointing
# ----------------------------------------------------------------------------------------------------------------


def test_meta_device_construction_matches_cpu_parameter_count():
    cfg = sr_config()
    on_meta = UNet(cfg, device="meta")
    assert all(p.is_meta for p in on_meta.parameters())
    assert count_parameters(on_meta) == count_parameters(UNet(cfg)) > 0
    with torch.device("meta"):
        assert count_parameters(UNet(cfg)) == count_parameters(on_meta)


def test_paper_scale_config_builds_on_meta():
    # The CDM ImageNet base-32 model (Appendix B): built without allocating memory.
    cfg = UNetConfig(resolution=32, model_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=6,
                     attention_resolutions=(16, 8), num_heads=4, num_classes=1000, learn_sigma=True, dropout=0.1)
    model = UNet(cfg, device="meta")
    assert model.out_conv.weight.is_meta
    assert count_parameters(model) > 500_000_000
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def _loss_and_grads(model: UNet, inputs: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for both runs
    loss = model(**inputs).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_gradient_checkpointing_gives_identical_gradients():
    plain = perturb_(UNet(sr_config(dropout=0.2))).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    assert checkpointed.config.gradient_checkpointing and not plain.config.gradient_checkpointing
    inputs = sr_inputs()
    loss_a, grads_a = _loss_and_grads(plain, inputs, seed=7)
    loss_b, grads_b = _loss_and_grads(checkpointed, inputs, seed=7)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_forward_and_backward():
    model = perturb_(UNet(sr_config()))
    inputs = sr_inputs()
    reference = model(**inputs).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    relative_error = (out.float() - reference).norm() / reference.norm()
    assert relative_error < 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_matches_contiguous():
    model = perturb_(UNet(sr_config(resblock_updown=True))).eval()
    inputs = sr_inputs()
    reference = model(**inputs)
    as_cl = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in inputs.items()}
    torch.testing.assert_close(model(**as_cl), reference, rtol=1e-4, atol=1e-5)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(**as_cl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_conv_resampling_variant_without_scale_shift():
    # resblock_updown=False uses strided-conv / upsample+conv; use_scale_shift_norm=False adds the embedding.
    cfg = tiny_config(num_classes=3, resblock_updown=False, use_scale_shift_norm=False, num_head_channels=8)
    model = perturb_(UNet(cfg)).eval()
    x = torch.randn(2, 3, 16, 16)
    out_a = model(x, torch.tensor([5.0, 5.0]), y=torch.tensor([0, 1]))
    out_b = model(x, torch.tensor([900.0, 900.0]), y=torch.tensor([0, 1]))
    assert out_a.shape == (2, 3, 16, 16)
    assert (out_a - out_b).abs().max() > 1e-4


@pytest.mark.parametrize("interleave", ["auto", "shuffle", "copies"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (1, 3, 1, 1), (3, 8, 7, 5)])
def test_subpixel_upsample_conv_is_conv_of_the_upsampled_map(shape, channels_last, interleave):
    """Values and all three gradients equal the direct form in float64, on odd and one-pixel maps too, for both
    ways of interleaving the phases (CPUs use pixel_shuffle; GPUs slice copies for channels_last)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], 6, 3, padding=1).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    h = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    direct = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    subpixel = _upsample_conv3x3(h, conv, interleave=interleave)
    assert subpixel.shape == direct.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(subpixel, direct, rtol=1e-12, atol=1e-12)
    assert subpixel.is_contiguous(memory_format=torch.channels_last) == (channels_last and shape[2] * shape[3] > 1)
    grad = torch.randn_like(direct)
    for a, b in zip(torch.autograd.grad(subpixel, (x, conv.weight, conv.bias), grad),
                    torch.autograd.grad(direct, (x, conv.weight, conv.bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("resblock_updown", [True, False])
def test_upsample_algorithms_give_the_same_network(resblock_updown):
    model = perturb_(UNet(sr_config(resblock_updown=resblock_updown))).double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in sr_inputs().items()}
    subpixel = model(**inputs)
    (grad_subpixel,) = torch.autograd.grad(subpixel.square().sum(), model.input_conv.weight)
    set_upsample_algorithm(model, "direct")
    direct = model(**inputs)
    (grad_direct,) = torch.autograd.grad(direct.square().sum(), model.input_conv.weight)
    torch.testing.assert_close(subpixel, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_subpixel, grad_direct, rtol=1e-10, atol=1e-12)
    # the switch is not part of the architecture: same parameters, same config, same state-dict keys
    assert model.config == UNet(sr_config(resblock_updown=resblock_updown)).config
    with pytest.raises(ValueError, match="upsample algorithm"):
        set_upsample_algorithm(model, "bilinear")


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_compiles_as_one_graph(channels_last):
    """A graph break splits torch.compile's graph per stage, and the per-stage recompiles then hit dynamo's
    limit and run the rest eagerly (it once cost 40 % of compiled GPU training speed); fullgraph=True fails on
    any break. The 'eager' backend traces without generating code, so this is quick."""
    torch._dynamo.reset()
    for updown in (True, False):
        model = perturb_(UNet(sr_config(resblock_updown=updown)))
        inputs = sr_inputs()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v
                      for k, v in inputs.items()}
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        out = compiled(**inputs)
        out.square().mean().backward()
        torch.testing.assert_close(out, model(**inputs))
    # the GPU's way of interleaving the sub-pixel phases (CPUs take pixel_shuffle) must trace as one graph too
    conv = torch.nn.Conv2d(8, 4, 3, padding=1)
    h = torch.randn(2, 8, 5, 5)
    h = h.contiguous(memory_format=torch.channels_last) if channels_last else h
    for interleave in ("copies", "shuffle"):
        traced = torch.compile(lambda x: _upsample_conv3x3(x, conv, interleave), backend="eager", fullgraph=True)
        torch.testing.assert_close(traced(h), _upsample_conv3x3(h, conv, interleave))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_shift_is_the_addcmul_it_replaces(dtype):
    """On CPU scale-shift is a multiply and an in-place add instead of one (unvectorised) addcmul: equal up to
    rounding, the same memory format, and the same gradients."""
    torch.manual_seed(0)
    h = torch.randn(3, 8, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    scale = torch.randn(3, 8, 1, 1, dtype=dtype, requires_grad=True)
    shift = torch.randn(3, 8, 1, 1, dtype=dtype, requires_grad=True)
    out, ref = _scale_shift(h, scale, shift), torch.addcmul(shift, h, 1.0 + scale)
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert out.stride() == ref.stride()
    grad = torch.randn_like(ref)
    inputs = (h, scale, shift)
    for a, b in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_subpixel_interleaves_give_the_same_values():
    """pixel_shuffle (NCHW) and slice copies (channels_last) put the same values in place, with or without
    autograd."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    h = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        sampled = _upsample_conv3x3(h, conv)
        copies = _upsample_conv3x3(h, conv, interleave="copies")
    trained = _upsample_conv3x3(h, conv)
    assert trained.requires_grad
    assert torch.equal(sampled, trained) and torch.equal(sampled, copies)
    torch.testing.assert_close(sampled, conv(F.interpolate(h, scale_factor=2.0, mode="nearest")), rtol=1e-5, atol=1e-5)


def test_subpixel_upsampling_counts_fewer_flops():
    from torch.utils.flop_counter import FlopCounterMode

    def flops(algorithm: str) -> int:
        model = set_upsample_algorithm(UNet(sr_config()), algorithm)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**sr_inputs())
        return counter.get_total_flops()

    # One upsampling conv, 32 -> 32 channels, 8 -> 16 px, batch 2, 2 FLOPs per multiply-add. Direct: a 3x3 kernel
    # at 16x16 outputs; sub-pixel: 2x2 kernels with 4 x 32 outputs over the (8 + 1) x (8 + 1) windows.
    saved = 2 * 2 * (16 * 16 * 32 * 32 * 9 - 9 * 9 * 4 * 32 * 32 * 4)
    assert flops("direct") - flops("subpixel") == saved


def test_dropout_is_pytorchs_on_every_device():
    """Residual blocks drop with F.dropout (the same distribution on CPU and GPU): for the same seed a block's output
    equals the one computed with F.dropout by hand."""
    torch.manual_seed(0)
    block = ResBlock(8, 8, 16, dropout=0.25, norm_groups=4).train()
    torch.nn.init.normal_(block.out_conv.weight)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    torch.manual_seed(5)
    out = block(x, emb)
    scale, shift = block.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    h = F.silu(F.group_norm(x, 4, block.in_norm.weight, block.in_norm.bias, block.in_norm.eps))
    h = F.silu(_scale_shift(F.group_norm(block.in_conv(h), 4, block.out_norm.weight, block.out_norm.bias,
                                         block.out_norm.eps), scale, shift))
    torch.manual_seed(5)
    expected = block.out_conv(F.dropout(h, p=0.25, training=True)) + x
    torch.testing.assert_close(out, expected)

    model = perturb_(UNet(sr_config(dropout=0.3)))
    inputs = sr_inputs()
    model.train()
    assert not torch.allclose(model(**inputs), model(**inputs))
    model.eval()
    torch.testing.assert_close(model(**inputs), model(**inputs), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_unet_overfits_a_handful_of_images():
    torch.manual_seed(0)
    num_steps, resolution, timesteps = 150, 8, 1000
    # Cosine schedule (Nichol & Dhariwal): ᾱ_t = f(t+1)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2).
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = (f[1:] / f[0]).clamp(min=1e-5).float()

    # Four smooth images (real images are mostly low-frequency).
    images = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=(resolution, resolution), mode="bilinear",
                           align_corners=True)
    cfg = UNetConfig(resolution=resolution, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(4,), num_heads=2, norm_groups=8)
    model = UNet(cfg)

    def draw(n: int, generator: torch.Generator | None = None):
        return (torch.randint(0, len(images), (n,), generator=generator),
                torch.randint(0, timesteps, (n,), generator=generator),
                torch.randn(n, 3, resolution, resolution, generator=generator))

    def epsilon_mse(index: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * images[index] + (1 - a).sqrt() * noise
        return (model(x_t, t.float() * 1000 / timesteps) - noise).square().mean()

    held_out = draw(256, torch.Generator().manual_seed(1))  # fixed (image, t, ε) triples to measure on
    with torch.no_grad():
        initial = epsilon_mse(*held_out).item()

    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    for _ in range(num_steps):
        loss = epsilon_mse(*draw(32))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    with torch.no_grad():
        final = epsilon_mse(*held_out).item()
    assert initial > 0.9  # zero-initialised output: the loss starts at E[ε²] ≈ 1
    assert final < initial / 10, (initial, final)


def test_middle_attention_can_be_dropped_and_is_stored_only_when_dropped():
    """An SR stage trained on crops and sampled whole can drop ADM's middle attention; a config that keeps it
    (every config before the option) serialises exactly as before, so old run dirs and bundles keep their bytes."""
    from cascaded_diffusion.config import load_config
    from cascaded_diffusion.stage import build_network
    from cascaded_diffusion.unet import AttentionBlock

    config = load_config(Path(__file__).resolve().parents[1] / "configs/emoji256/sr64to256.toml")
    assert config.model.middle_attention is False and "middle_attention = false" in config.to_toml()
    net = build_network(config, "cpu")
    assert not any(isinstance(m, AttentionBlock) for m in net.modules())
    config.model.middle_attention = True
    assert "middle_attention" not in config.to_toml()
    assert sum(isinstance(m, AttentionBlock) for m in build_network(config, "cpu").modules()) == 1
    # fully convolutional: a crop-sized and a whole-image input both run
    net.eval()
    with torch.no_grad():
        for size in (64, 128):
            x = torch.zeros(1, 3, size, size)
            out = net(x, torch.zeros(1), y=torch.zeros(1, dtype=torch.long), low_res=x[..., ::4, ::4])
            assert out.shape[-1] == size
