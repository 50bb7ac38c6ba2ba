"""Cascades of tiny stages: validation before compute, truncated / non-truncated sampling, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cascaded_diffusion.cascade import Cascade, CascadeError
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.stage import Stage, build_network

from conftest import make_stage, stage_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base8():
    return make_stage(stage_config("base", 8))


@pytest.fixture(scope="module")
def sr8to16():
    return make_stage(stage_config("sr", 16, 8, sample_s=10))


def test_two_stage_cascade_samples_end_to_end(base8, sr8to16):
    cascade = Cascade([base8, sr8to16])
    labels = balanced_labels(6, 3)
    gen = torch.Generator().manual_seed(0)
    out = cascade.sample(labels, generator=gen, aug_levels=[10])
    assert [x.shape for x in out.stages] == [(6, 1, 8, 8), (6, 1, 16, 16)]
    assert out.images.abs().max() <= 1 and torch.isfinite(out.images).all()


def test_truncated_and_nontruncated_paths_differ_and_run(base8, sr8to16):
    cascade = Cascade([base8, sr8to16])
    labels = balanced_labels(4, 3)
    full = cascade.sample(labels, generator=torch.Generator().manual_seed(1), aug_levels=[20])
    trunc = cascade.sample(labels, generator=torch.Generator().manual_seed(1), aug_levels=[20], truncated=True)
    assert full.images.shape == trunc.images.shape == (4, 1, 16, 16)
    # truncated sampling hands on the base's noisy x_s: noisier than its clean output
    assert not torch.allclose(trunc.stages[0], full.stages[0])
    # s = 0 is clean conditioning in both modes: identical results for the same seed
    a = cascade.sample(labels, generator=torch.Generator().manual_seed(2), aug_levels=[0])
    b = cascade.sample(labels, generator=torch.Generator().manual_seed(2), aug_levels=[0], truncated=True)
    assert torch.allclose(a.images, b.images)


def test_truncated_stop_level_matches_forward_process(base8, sr8to16, monkeypatch):
    """The SR stage receives z_s at exactly the requested level: check the level it is told."""
    seen = {}
    real = sr8to16.sample

    def spy(labels, **kw):
        seen["aug_level"] = kw["aug_level"].clone()
        seen["low_res"] = kw["low_res"].clone()
        return real(labels, **kw)

    monkeypatch.setattr(sr8to16, "sample", spy)
    Cascade([base8, sr8to16]).sample(balanced_labels(3, 3), aug_levels=[15], truncated=True)
    assert seen["aug_level"].tolist() == [15, 15, 15]


def test_ground_truth_low_res_input(base8, sr8to16):
    cascade = Cascade([base8, sr8to16])
    low = torch.rand(3, 1, 8, 8) * 2 - 1
    out = cascade.sample(balanced_labels(3, 3), low_res=low, start_stage=1, aug_levels=[0])
    assert len(out.stages) == 1 and out.images.shape == (3, 1, 16, 16)


def test_miss_chained_cascades_are_refused():
    base8 = make_stage(stage_config("base", 8))
    sr8 = make_stage(stage_config("sr", 16, 8))
    with pytest.raises(CascadeError, match="super-resolution stage.*starts with a base"):
        Cascade([sr8, base8])
    with pytest.raises(CascadeError, match="base model.*only super-resolution stages may follow"):
        Cascade([base8, base8])
    with pytest.raises(CascadeError, match="trained to upsample 8px inputs.*produces 16px"):
        Cascade([make_stage(stage_config("base", 16)), sr8])
    with pytest.raises(CascadeError, match="3 classes.*5"):
        Cascade([make_stage(stage_config("base", 8, classes=5)), sr8])
    with pytest.raises(CascadeError, match="takes 1-channel images.*produces 3"):
        Cascade([make_stage(stage_config("base", 8, channels=3)), sr8])


def test_truncation_needs_matching_schedules():
    base = make_stage(stage_config("base", 8, timesteps=40))
    sr = make_stage(stage_config("sr", 16, 8, timesteps=40, noise_timesteps=60, s_max=60))
    with pytest.raises(CascadeError, match="truncated sampling at s=5"):
        Cascade([base, sr]).sample(balanced_labels(2, 3), aug_levels=[5], truncated=True)


def test_aug_level_on_a_stage_without_noise_augmentation_is_refused():
    base = make_stage(stage_config("base", 8))
    sr = make_stage(stage_config("sr", 16, 8, augmentation="blur"))
    with pytest.raises(CascadeError, match="takes no augmentation level"):
        Cascade([base, sr]).sample(balanced_labels(2, 3), aug_levels=[5])


def test_balanced_labels():
    assert balanced_labels(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert balanced_labels(4, 10, [7, 2]).tolist() == [2, 2, 7, 7]
    with pytest.raises(ValueError, match="outside"):
        balanced_labels(4, 3, [5])


def test_truncated_at_the_last_level_hands_on_pure_noise(base8, sr8to16):
    """s = T: the base runs no step at all; its 'output' is the initial noise x_T."""
    out = Cascade([base8, sr8to16]).sample(balanced_labels(2, 3), aug_levels=[40], truncated=True,
                                           generator=torch.Generator().manual_seed(0))
    expected = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.stages[0], expected)
    assert out.images.shape == (2, 1, 16, 16)


# One compile of the tiny fixture run, shared by the assertions below. Tracing costs ~30 s on a busy 2-core CPU
# even for this 4-channel network (dynamo + AOT autograd, independent of the graph's size), so the suite pays it
# once; the bundled cascade took the same again per test, and another batch size a recompile.
COMPILE_LABELS = torch.arange(6) % 10
COMPILE_KWARGS = dict(sampler="dpmpp", steps=[3, 2])
TINY_RUN = [ROOT / "tests/fixtures/tiny_run/base8", ROOT / "tests/fixtures/tiny_run/sr8to16"]


@pytest.fixture(scope="module")
def compiled_tiny():
    """'aot_eager' traces and runs the same graph (forward, functionalised) that inductor would compile, without
    its C++ code generation."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cascade = Cascade.load(TINY_RUN).compile(backend="aot_eager")
    first = cascade.sample(COMPILE_LABELS, generator=torch.Generator().manual_seed(3), **COMPILE_KWARGS)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return cascade, first, frames


def test_compiled_sampling_matches_eager(compiled_tiny):
    """Cascade.compile changes how the networks run, not what the cascade samples."""
    compiled, out, _ = compiled_tiny
    ref = Cascade.load(TINY_RUN).sample(COMPILE_LABELS, generator=torch.Generator().manual_seed(3), **COMPILE_KWARGS)
    for a, b in zip(ref.stages, out.stages):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # bit-identical here; another seed differs by ~1.5
    assert all(s._sampling_net is not s.net for s in compiled.stages)


def test_compiled_sampling_reuses_its_graphs(compiled_tiny):
    """A second batch of the same shape runs the graphs already compiled: no recompilation, and the same samples
    from the same seed."""
    compiled, first, frames = compiled_tiny
    assert frames >= len(compiled.stages)  # every stage's network was captured
    again = compiled.sample(COMPILE_LABELS, generator=torch.Generator().manual_seed(3), **COMPILE_KWARGS)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    for a, b in zip(first.stages, again.stages):
        assert torch.equal(a, b)


def test_reduce_overhead_means_cuda_graphs_on_gpus_only():
    """mode="reduce-overhead" adds CUDA graphs on a GPU only; on the CPU a stage then samples through the same
    network call as the compiled cascade above (no graph steps, no copies), so nothing more is traced here."""
    compiled = Cascade.load(TINY_RUN).compile(mode="reduce-overhead", backend="eager")
    assert all(s._sampling_net is not s.net for s in compiled.stages)
    assert not any(s._cuda_graphs for s in compiled.stages)


def test_channels_last_sampling_converts_the_weights_too():
    """train.channels_last samples in channels_last on GPUs. A one-channel x_t is contiguous in both memory formats,
    so the weights must be converted as well, or every convolution would stay NCHW. (The conversion itself is
    device-independent; the CPU keeps NCHW, where channels_last group norms are slower.)"""
    config = stage_config("base", 8)
    config.train.channels_last = True
    conv_weights = lambda stage: [m.weight for m in stage.net.modules() if isinstance(m, torch.nn.Conv2d)]
    cpu_stage = Stage(config, build_network(config), "cpu")
    assert not cpu_stage._channels_last
    assert all(w.is_contiguous() for w in conv_weights(cpu_stage))
    gpu_stage = Stage(config, build_network(config), torch.device("cuda"))  # never run here: only the setup
    assert gpu_stage._channels_last
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(gpu_stage)
               if w.shape[1] * w.shape[2] * w.shape[3] > 1)
