"""The measurement scripts behind docs/performance.md: the U-Net benchmark compares like with like, and the
sampler curve scores what it sampled, resumes, and accepts per-stage step counts."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cascaded_diffusion.hardware import device_name

from conftest import load_module

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# scripts/sampler_curve.py
# ----------------------------------------------------------------------------------------------------------------


def test_parse_points_forms_and_errors():
    curve = load_module("scripts/sampler_curve.py", "sampler_curve_under_test")
    assert curve.parse_points("ddpm:1000, dpmpp:20/10,ddim:5") == [("ddpm", 1000), ("dpmpp", (20, 10)), ("ddim", 5)]
    for bad in ("euler:10", "ddpm:0", "ddpm:", "dpmpp:20/x", "ddim:-3"):
        with pytest.raises(SystemExit):
            curve.parse_points(bad)


@pytest.mark.filterwarnings("ignore:.*rank-deficient")
def test_sampler_curve_scores_resumes_and_plots(tmp_path, monkeypatch):
    curve = load_module("scripts/sampler_curve.py", "sampler_curve_under_test")
    from cascaded_diffusion.evaluation.evaluate import reference_stats
    from cascaded_diffusion.evaluation.features import get_feature_extractor

    # A reference of random 32x32 grey images: the point is the wiring, not the score's value.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(200, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "ref_images.npz", images, np.zeros(200, dtype=np.int64))
    extractor = get_feature_extractor("classifier")
    ref = reference_stats(f"npz:{tmp_path / 'ref_images.npz'}", extractor, resolution=32, channels=1,
                          cache_dir=tmp_path / "cache")
    ref.save(tmp_path / "ref_stats.npz")

    out = tmp_path / "curve.json"
    argv = ["sampler_curve.py", "--pretrained", "fashion-mnist", "--ref", str(tmp_path / "ref_stats.npz"),
            "--num", "20", "--batch-size", "20", "--out", str(out), "--plot", str(tmp_path / "curve.png"),
            "--device", "auto"]  # as scripts/fashion_mnist_study.sh passes it
    monkeypatch.setattr(sys, "argv", argv + ["--points", "ddpm:4,dpmpp:3/2"])
    curve.main()
    result = json.loads(out.read_text())
    assert [(p["sampler"], p["steps"]) for p in result["points"]] == [("ddpm", 4), ("dpmpp", [3, 2])]
    assert result["points"][0]["stage_steps"] == [4, 4] and result["points"][1]["stage_steps"] == [3, 2]
    assert all(np.isfinite(p["fid"]) and p["fid"] > 0 and p["samples_per_s"] > 0 for p in result["points"])
    assert result["num_samples"] == 20 and result["feature_network"] == extractor.name
    assert (tmp_path / "curve.png").stat().st_size > 0

    # A rerun measures only the new point and keeps the old rows unchanged.
    before = result["points"]
    monkeypatch.setattr(sys, "argv", argv + ["--points", "ddpm:4,dpmpp:3/2,ddim:2"])
    curve.main()
    after = json.loads(out.read_text())["points"]
    assert after[:2] == before and [(p["sampler"], p["steps"]) for p in after[2:]] == [("ddim", 2)]
    assert {p["device_name"] for p in after} == {device_name("cpu")}  # every point says where it ran

    # Step counts per stage must match the cascade.
    monkeypatch.setattr(sys, "argv", argv + ["--points", "dpmpp:3/2/1"])
    with pytest.raises(SystemExit, match="3 step counts for 2 stages"):
        curve.main()


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/cascade_sampling.py
# ----------------------------------------------------------------------------------------------------------------


def test_cascade_sampling_benchmark_compares_modes_on_the_same_samples(capsys):
    bench = load_module("benchmarks/cascade_sampling.py", "cascade_sampling_under_test")
    torch._dynamo.reset()
    # the tiny fixture cascade and dynamo's capture alone ("eager" backend): the benchmark's plumbing of modes is
    # what is tested; AOT tracing took ~30 s of the suite, tests/test_cascade.py does it once
    tiny = [str(ROOT / "tests/fixtures/tiny_run" / name) for name in ("base8", "sr8to16")]
    summary = bench.main(["--stages", *tiny, "--device", "cpu", "--batch-size", "4", "--batches", "2",
                          "--steps", "3/2", "--modes", "eager,default", "--compile-backend", "eager"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary))
    assert set(last["samples_per_s"]) == {"eager", "default"} and all(v > 0 for v in last["samples_per_s"].values())
    assert last["speedup_vs_eager"]["eager"] == 1.0
    assert [len(v) for v in last["batch_seconds"].values()] == [2, 2]
    assert last["steps"] == [3, 2] and last["resolutions"] == [8, 16]
    # the same seed through the compiled network gives the same images (up to kernel rounding)
    assert last["max_abs_diff_vs_eager"]["eager"] == 0.0 and last["max_abs_diff_vs_eager"]["default"] < 1e-2
    with pytest.raises(SystemExit):
        bench.main(["--modes", "eager,turbo"])


def test_cascade_sampling_benchmark_times_sampling_and_a_training_step_in_both_precisions(capsys):
    bench = load_module("benchmarks/cascade_sampling.py", "cascade_sampling_precisions")
    summary = bench.main(["--pretrained", "fashion-mnist", "--device", "cpu", "--batch-size", "2", "--batches", "1",
                          "--steps", "1/1", "--precisions", "bf16,fp32", "--train-steps", "1", "--train-batch", "2"])
    assert set(summary["samples_per_s"]) == {"eager/bf16", "eager/fp32"}
    assert {p: v["name"] for p, v in summary["precision"].items()} == {"bf16": "bf16", "fp32": "fp32"}
    steps = summary["train_step_seconds"]
    assert list(steps) == ["stage1_8px", "stage2_32px"]
    assert all(set(v) == {"bf16", "fp32"} and min(v.values()) > 0 for v in steps.values())
    # the two precisions really ran differently: bf16 rounding moves the samples, not by much
    assert 0 < summary["max_abs_diff_vs_eager"]["eager/fp32"]
    with pytest.raises(SystemExit):
        bench.main(["--precisions", "fp16"])


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/unet_throughput.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def bench(monkeypatch):
    pytest.importorskip("diffusers")
    module = load_module("benchmarks/unet_throughput.py", "unet_throughput_under_test")
    tiny = module.BenchConfig("tiny", 16, 3, 32, (1, 2), 1, (8,), 16, 10, 2)
    monkeypatch.setitem(module.CONFIGS, "tiny", tiny)
    return module, tiny


@pytest.mark.parametrize("name", ["cpu-32", "adm-64", "tiny"])
def test_benchmark_models_match(bench, name):
    """Same parameters and, computed the direct way, the same forward FLOPs: the comparison is like for like.
    Our sub-pixel upsampling computes the same function with fewer FLOPs (a 3x3 conv of an upsampled map as
    2x2 convs of the low-res map), and only in the upsampling blocks."""
    module, _ = bench
    bc = module.CONFIGS[name]
    ours = module.count_parameters(module.build_ours(bc, "meta"))
    theirs = module.count_parameters(module.build_diffusers(bc, "meta"))
    assert ours == theirs == module.count_parameters(module.build_ours_direct_upsample(bc, "meta"))
    flops_theirs = module.forward_flops(module.build_diffusers, module.call_diffusers, bc)
    assert module.forward_flops(module.build_ours_direct_upsample, module.call_ours, bc) == flops_theirs
    flops_ours = module.forward_flops(module.build_ours, module.call_ours, bc)
    assert 0.85 * flops_theirs < flops_ours < 0.97 * flops_theirs
    if name == "adm-64":  # the reference model: ~295M parameters, ~219 GFLOP per image
        assert 290e6 < ours < 300e6


def test_benchmark_end_to_end_json(bench, capsys):
    module, _ = bench
    summary = module.main(["--config", "tiny", "--device", "cpu", "--dtype", "bf16", "--warmup", "1",
                           "--iters", "2", "--no-cpu-memory", "--profile", "3", "--with-direct-upsample"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(summary))
    for key in ("train_speedup", "forward_speedup"):
        assert last[key] > 0
    assert last["train_speedup"] == pytest.approx(last["train_img_s_ours"] / last["train_img_s_diffusers"])
    assert len(last["train_ms_ours"]) == len(last["train_ms_diffusers"]) == 2
    assert last["params_ours"] == last["params_diffusers"]
    for kind in ("train", "forward"):  # the sub-pixel A/B: a third model, timed interleaved with the two others
        assert len(last[f"{kind}_ms_ours_direct_upsample"]) == 2
        assert last[f"{kind}_subpixel_speedup"] == pytest.approx(
            last[f"{kind}_img_s_ours"] / last[f"{kind}_img_s_ours_direct_upsample"])
    assert last["forward_flops_per_image_ours"] < last["forward_flops_per_image_ours_direct_upsample"]
    for kind in ("train", "forward"):
        for name in ("ours", "diffusers"):
            by_category = last[f"profile_{kind}_ms_by_category_{name}"]
            # the categories must find the convolutions and the attention matmuls; which one takes longest on a tiny
            # model is a timing, and flips when other jobs share the CPU, so it is not asserted
            assert by_category["convolution"] > 0 and by_category["matmul"] > 0
    assert torch.get_num_threads() >= 1


def test_profile_categories(bench):
    module, _ = bench
    cases = {
        "triton_poi_fused__to_copy_convolution_native_group_norm_silu_141": "fused element-wise (triton)",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize": "convolution",
        "aten::mkldnn_convolution": "convolution",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention",
        "aten::native_group_norm_backward": "normalization",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>": "copies and layout",
        "aten::_fused_adamw_": "optimizer",
        "aten::silu_backward": "other",
    }
    assert {name: module.categorize(name) for name in cases} == cases


def test_benchmark_compiles_ours_as_one_graph(bench, capsys):
    """--compile traces ours with fullgraph=True, so a graph break fails the run instead of silently timing a
    partly eager model; the 'eager' backend checks the tracing without generating code."""
    module, _ = bench
    torch._dynamo.reset()
    summary = module.main(["--config", "tiny", "--device", "cpu", "--dtype", "bf16", "--warmup", "1", "--iters", "1",
                           "--no-cpu-memory", "--compile", "--compile-backend", "eager", "--with-direct-upsample"])
    assert summary["compile"] and summary["train_speedup"] > 0 and summary["forward_speedup"] > 0


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/cpu_fast_paths.py
# ----------------------------------------------------------------------------------------------------------------


def test_cpu_fast_paths_benchmark_compares_each_path_with_its_pytorch_op(capsys):
    fast_paths = load_module("benchmarks/cpu_fast_paths.py", "cpu_fast_paths_under_test")
    import cascaded_diffusion.unet as unet

    originals = {attr: getattr(unet, attr) for attr, _ in fast_paths.PLAIN_OPS.values()}
    # bf16 where this CPU has it natively (auto's rule): emulated bf16 networks cost half a minute and the wiring
    # under test is the same in both dtypes; the ops are compared in both everywhere (they are small)
    from cascaded_diffusion.hardware import cpu_bf16_support

    dtypes = ["float32", "bfloat16"] if cpu_bf16_support()[0] else ["float32"]
    result = fast_paths.main(["--batch-size", "2", "--reps", "1", "--dtypes", "fp32,bf16", "--train",
                              "--model-dtypes", ",".join({"float32": "fp32", "bfloat16": "bf16"}[d] for d in dtypes)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert {attr: getattr(unet, attr) for attr in originals} == originals  # the plain ops were patched back out
    ops = result["ops"]
    assert {(r["op"], r["mode"]) for r in ops} == {("scale_shift", "forward"), ("scale_shift", "train")}
    assert len(ops) == 2 * len(fast_paths.op_cases(2))
    for r in ops:
        assert r["fast_ms"] > 0 and r["plain_ms"] > 0
        if r["op"] != "scale_shift" or r["mode"] == "train":  # exact replacements (and the same input gradient)
            assert r["max_abs_diff"] == 0.0, r
        else:  # addcmul rounds once, multiply + add twice
            assert 0.0 < r["max_abs_diff"] < (0.1 if r["dtype"] == "bfloat16" else 1e-5), r
    # the network A/B really swaps the ops: the forwards differ by rounding, not more
    assert [(r["stage"], r["dtype"]) for r in result["networks"]] == [
        (stage, d) for d in dtypes for stage in ("fmnist-base8", "fmnist-sr8to32-noaug")]
    for r in result["networks"]:
        assert 0.0 < r["max_abs_diff"] < (0.2 if r["dtype"] == "bfloat16" else 1e-3), r
    assert [(r["dtype"], r["batch"]) for r in result["train"]] == [(d, 2) for d in dtypes]
    assert all(r["fast_img_per_s"] > 0 and r["plain_img_per_s"] > 0 for r in result["train"])


def test_plain_pytorch_ops_restores_the_fast_paths_after_an_error():
    fast_paths = load_module("benchmarks/cpu_fast_paths.py", "cpu_fast_paths_under_test")
    import cascaded_diffusion.unet as unet

    before = unet._scale_shift
    with pytest.raises(RuntimeError, match="boom"), fast_paths.plain_pytorch_ops():
        assert unet._scale_shift is not before
        raise RuntimeError("boom")
    assert unet._scale_shift is before


def test_device_name_says_what_the_measurement_ran_on():
    import os

    name = device_name("cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert name.endswith(f" ({cpus} CPUs)") and len(name) > len(f" ({cpus} CPUs)")
    assert device_name(torch.device("meta")) == "meta"


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/inductor_traffic.py
# ----------------------------------------------------------------------------------------------------------------


def test_inductor_traffic_gpu_code_paths_are_the_gpu_branches():
    traffic = load_module("benchmarks/inductor_traffic.py", "inductor_traffic_under_test")
    import cascaded_diffusion.unet as unet

    before = {name: getattr(unet, name) for name in ("_attention", "_scale_shift")}
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 5, 5)
    q, k, v = torch.randn(3, 2, 2, 16, 8, dtype=torch.bfloat16).unbind(0)
    scale, shift = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    with traffic.gpu_code_paths():
        # bf16 attention on CPU stays bf16 (the CPU branch would upcast short sequences to fp32)
        torch.testing.assert_close(unet._attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                   rtol=0, atol=0)
        assert torch.equal(unet._scale_shift(h, scale, shift), torch.addcmul(shift, h, 1.0 + scale))
        for x in (h, h.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(unet._upsample_conv3x3(x, conv),
                                       conv(torch.nn.functional.interpolate(x, scale_factor=2.0)), rtol=1e-5, atol=1e-5)
    assert {name: getattr(unet, name) for name in before} == before


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_traffic_counts_the_bytes_of_a_compiled_step():
    """A two-conv model compiles in seconds: the counts must add up and see both kinds of kernel."""
    traffic = load_module("benchmarks/inductor_traffic.py", "inductor_traffic_under_test")
    bench = load_module("benchmarks/unet_throughput.py", "unet_throughput_for_traffic")
    bc = bench.BenchConfig("tiny", 8, 3, 8, (1,), 1, (), 8, 2, 2, learn_sigma=False)

    def build(bc, device):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                                   torch.nn.Conv2d(8, 3, 3, padding=1)).to(device)

    r = traffic.traffic_of_compiled_step(build, lambda model, x, t, y: model(x), bc, batch=2, channels_last=False)
    assert r["bytes_generated_kernels"] > 0 and r["bytes_extern_kernels"] > 0
    # per node inductor keeps bytes // 4, so the sum may round down by under 4 bytes a node
    assert 0 <= r["bytes_total"] - (r["bytes_generated_kernels"] + r["bytes_extern_kernels"]) < 4 * r["scheduled_nodes"]
    assert any("convolution" in name for name in r["extern_by_kernel"])


def test_data_pipeline_benchmark_prepares_the_generated_folder_and_reads_it(tmp_path, monkeypatch):
    bench = load_module("benchmarks/data_pipeline.py", "data_pipeline_bench")
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", ["data_pipeline.py", "--images", "12", "--out", str(out), "--resolutions",
                                      "32,64", "--workers", "1", "--batches", "3", "--json", str(tmp_path / "r.json")])
    bench.main()
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["images"] for r in results["prepare"]] == [12]
    assert results["prepare"][0]["imagenet_hours"] > 0
    assert [(r["resolution"], r["prefetch_depth"]) for r in results["loader"]] == [(64, 0), (64, 2)]
    assert sorted(p.name for p in (out / "jpegs").iterdir()) == [f"class_{i:02d}" for i in range(10)]
