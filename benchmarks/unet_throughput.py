#!/usr/bin/env python
"""Throughput of our ADM U-Net against diffusers' ``UNet2DModel`` at a matched configuration.

Both networks are built in one process at the same widths, channel multipliers, residual blocks per level,
attention resolutions and head width, class conditioning (same embedding-table size), scale-shift norm,
BigGAN-style resampling residual blocks (diffusers: ``downsample_type="resnet"``/``upsample_type="resnet"`` and
the ``Resnet{Down,Up}sampleBlock2D`` blocks at levels without attention) and learned-sigma output channels.
Dropout is 0 in both. The script prints both parameter counts and the forward FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs; the counts are equal when ours
computes its upsampling convolutions the direct way, and ours does ~5 % fewer with its default sub-pixel
upsampling), then measures, after warm-up and INTERLEAVED (ours, theirs, theirs, ours, ... so that a change of
machine load hits both models alike):

* training img/s: forward + MSE loss against a random target + backward + fused AdamW step;
* forward img/s: ``torch.no_grad()`` forward;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` above what was allocated when the step started
  (activations, gradients, workspaces) plus the model's resident bytes (parameters + AdamW state); on CPU the
  peak-RSS growth (``VmHWM``) of one training step of each model, measured in a fresh subprocess per model
  (``--no-cpu-memory`` skips it; the probe runs eager even with ``--compile``).

``--with-direct-upsample`` adds a third model, ours with direct upsampling, timed in the same interleaved
order (``*_subpixel_speedup`` = ours / that model). Throughputs are medians over ``--iters`` timed iterations.
``bf16`` is ``torch.autocast`` with parameters in fp32. The last line of output is one JSON object (``train_speedup``/``forward_speedup`` = ours / diffusers).

Examples::

    python benchmarks/unet_throughput.py --config cpu-32 --device cpu --dtype bf16 --warmup 2 --iters 5
    python benchmarks/unet_throughput.py --config adm-64 --device cuda --dtype bf16 --compile
    python benchmarks/unet_throughput.py --config adm-64 --device cpu --batch-size 2 --iters 1 --warmup 0

Needs diffusers (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:  # run from a checkout without installing the package
    import cascaded_diffusion  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascaded_diffusion.hardware import device_name
from cascaded_diffusion.unet import UNet, UNetConfig, count_parameters, set_upsample_algorithm

# ------------------------------------------------------------------------------------------------------------------
# Matched configurations
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    name: str
    resolution: int
    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    head_channels: int
    num_classes: int
    batch_size: int
    learn_sigma: bool = True


CONFIGS = {
    # A CIFAR-sized class-conditional model: the size of the Fashion-MNIST 32x32 stages.
    "cpu-32": BenchConfig("cpu-32", 32, 3, 64, (1, 2, 2), 2, (16,), 32, 10, 64),
    # ADM's ImageNet 64x64 class-conditional model (Dhariwal & Nichol 2021, Table 11).
    "adm-64": BenchConfig("adm-64", 64, 3, 192, (1, 2, 3, 4), 3, (32, 16, 8), 64, 1000, 64),
}


def ours_config(bc: BenchConfig) -> UNetConfig:
    return UNetConfig(
        resolution=bc.resolution,
        in_channels=bc.in_channels,
        out_channels=bc.in_channels,
        model_channels=bc.model_channels,
        channel_mult=bc.channel_mult,
        num_res_blocks=bc.num_res_blocks,
        attention_resolutions=bc.attention_resolutions,
        num_head_channels=bc.head_channels,
        dropout=0.0,
        num_classes=bc.num_classes,
        learn_sigma=bc.learn_sigma,
        resblock_updown=True,
        use_scale_shift_norm=True,
        norm_groups=32,
    )


def diffusers_kwargs(bc: BenchConfig) -> dict[str, Any]:
    levels = [bc.resolution // 2**i for i in range(len(bc.channel_mult))]
    down = tuple("AttnDownBlock2D" if r in bc.attention_resolutions else "ResnetDownsampleBlock2D" for r in levels)
    up = tuple(
        "AttnUpBlock2D" if r in bc.attention_resolutions else "ResnetUpsampleBlock2D" for r in reversed(levels)
    )
    return dict(
        sample_size=bc.resolution,
        in_channels=bc.in_channels,
        out_channels=2 * bc.in_channels if bc.learn_sigma else bc.in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(bc.model_channels * m for m in bc.channel_mult),
        layers_per_block=bc.num_res_blocks,
        attention_head_dim=bc.head_channels,
        norm_num_groups=32,
        # With scale-shift norm diffusers builds the middle block's attention WITHOUT a group norm unless
        # this is given; ADM (and ours) normalises the input of every attention block.
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        dropout=0.0,
        # Our table has num_classes + 1 rows (the last is the null class for guidance); give diffusers the
        # same table so that the parameter counts compare like for like.
        num_class_embeds=bc.num_classes + 1,
    )


def build_ours(bc: BenchConfig, device: torch.device | str) -> nn.Module:
    return UNet(ours_config(bc), device=device)


def build_ours_direct_upsample(bc: BenchConfig, device: torch.device | str) -> nn.Module:
    """Ours with the upsampling convolutions run on the upsampled map, as ADM and diffusers do (A/B baseline)."""
    return set_upsample_algorithm(build_ours(bc, device), "direct")


def build_diffusers(bc: BenchConfig, device: torch.device | str) -> nn.Module:
    from diffusers import UNet2DModel

    with torch.device(device):
        return UNet2DModel(**diffusers_kwargs(bc))


# The two call conventions, unified as fn(model, x, t, y) -> Tensor.
def call_ours(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, t, y=y)


def call_diffusers(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, t, class_labels=y, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------------------------


def forward_flops(build: Callable, call: Callable, bc: BenchConfig, batch: int = 1) -> int:
    """Forward FLOPs at ``batch`` images, counted on the meta device (shapes only, nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(bc, "meta")
    x = torch.empty(batch, bc.in_channels, bc.resolution, bc.resolution, device="meta")
    t = torch.empty(batch, device="meta")
    y = torch.empty(batch, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call(model, x, t, y)
    return int(counter.get_total_flops())


def make_inputs(bc: BenchConfig, batch: int, device: torch.device, channels_last: bool, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, bc.in_channels, bc.resolution, bc.resolution, generator=g)
    out_ch = 2 * bc.in_channels if bc.learn_sigma else bc.in_channels
    target = torch.randn(batch, out_ch, bc.resolution, bc.resolution, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    y = torch.randint(0, bc.num_classes, (batch,), generator=g)
    x, target, t, y = (v.to(device) for v in (x, target, t, y))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        target = target.contiguous(memory_format=torch.channels_last)
    return x, t, y, target


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Runner:
    """One model with its optimizer, a training step and a forward step."""

    def __init__(self, name: str, model: nn.Module, call: Callable, args: argparse.Namespace, device: torch.device):
        self.name = name
        self.device = device
        self.model = model
        self.call = call
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
        )
        fused = device.type in ("cuda", "cpu")  # the same fused AdamW for both models
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.train_fn = self._train_step
        self.forward_fn = self._forward
        if args.compile:
            # Ours must trace as one graph: a graph break would silently run parts of it eagerly (and once cost a
            # whole GPU measurement), so it fails loudly instead. diffusers is compiled as users compile it.
            self.compiled = torch.compile(model, mode=args.compile_mode, backend=args.compile_backend,
                                          fullgraph=name.startswith("ours"))
        else:
            self.compiled = model

    def _train_step(self, x, t, y, target) -> None:
        self.model.train()
        with self.autocast:
            out = self.call(self.compiled, x, t, y)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _forward(self, x, t, y, target) -> None:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            self.call(self.compiled, x, t, y)

    def resident_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        total += sum(b.numel() * b.element_size() for b in self.model.buffers())
        for state in self.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        return total


def timed(fn: Callable, inputs, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved(
    runners: list[Runner], kind: str, inputs, warmup: int, iters: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-iteration seconds of each runner in ABBA order (ours, theirs, theirs, ours, ...), and on CUDA the
    largest per-step peak of allocated memory above what was allocated when the step started."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    peaks: dict[str, int] = {r.name: 0 for r in runners}
    for i in range(warmup + iters):
        order = runners if i % 2 == 0 else runners[::-1]
        for r in order:
            fn = r.train_fn if kind == "train" else r.forward_fn
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(fn, inputs, device)
            if device.type == "cuda":
                peaks[r.name] = max(peaks[r.name], torch.cuda.max_memory_allocated(device) - base)
            if i >= warmup:
                times[r.name].append(seconds)
            print(f"  {kind:7s} {'warmup' if i < warmup else 'iter':6s} {i:3d} {r.name:9s} {seconds * 1e3:9.1f} ms",
                  flush=True)
    return times, peaks


# Kernel/op name fragments -> category, first match wins (lower-case). CUDA kernel names come from cuDNN,
# cuBLAS/CUTLASS, flash attention, inductor's Triton kernels and ATen; CPU op names from ATen/oneDNN.
PROFILE_CATEGORIES = (
    # First: inductor names its Triton kernels after the ops they fuse ("triton_poi_fused_convolution_...").
    ("fused element-wise (triton)", ("triton",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "mkldnn")),
    ("matmul", ("gemm", "matmul", "addmm", "bmm", "mm", "linear", "cutlass", "nvjet")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("normalization", ("group_norm", "groupnorm", "layer_norm", "batch_norm")),
    ("copies and layout", ("copy", "contiguous", "cat", "clone", "to_copy", "transpose", "permute")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, fragments in PROFILE_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def profile_step(runner: "Runner", kind: str, inputs, device: torch.device, rows: int) -> dict[str, float]:
    """Profile one warm step; print the top ``rows`` ops/kernels by self time and return milliseconds per
    category (device kernels on CUDA, CPU ops otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn = runner.train_fn if kind == "train" else runner.forward_fn
    fn(*inputs)  # warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(f"--- profile: {kind} step of {runner.name} (self {'device' if device.type == 'cuda' else 'CPU'} time)")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70))
    totals: dict[str, float] = {}
    uncategorized: dict[str, float] = {}
    for event in events:
        us = getattr(event, key)
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if us > 0:
            cat = categorize(event.key)
            totals[cat] = totals.get(cat, 0.0) + us / 1e3
            if cat == "other":
                uncategorized[event.key] = us / 1e3
    totals = {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    print(f"    by category (ms): {totals}")
    top_other = sorted(uncategorized.items(), key=lambda kv: -kv[1])[:6]
    print("    largest in 'other' (ms): " + ", ".join(f"{name[:60]} {ms:.1f}" for name, ms in top_other))
    return totals


def cpu_memory_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Peak-RSS growth of training steps of each model, each in a fresh subprocess."""
    result = {}
    for which in ("ours", "diffusers"):
        cmd = [sys.executable, __file__, "--config", args.config, "--device", "cpu", "--dtype", args.dtype,
               "--batch-size", str(args.batch_size), "--threads", str(torch.get_num_threads()),
               "--memory-probe", which]
        if args.channels_last:
            cmd.append("--channels-last")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            result[which] = None
            continue
        result[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_memory_probe(args: argparse.Namespace, bc: BenchConfig) -> None:
    device = torch.device("cpu")
    build, call = (build_ours, call_ours) if args.memory_probe == "ours" else (build_diffusers, call_diffusers)
    torch.manual_seed(0)
    model = build(bc, device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = Runner(args.memory_probe, model, call, args, device)
    inputs = make_inputs(bc, args.batch_size, device, args.channels_last)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    for _ in range(2):
        runner.train_fn(*inputs)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"rss_before_kib": before, "peak_growth_bytes": (peak - before) * 1024}))


# ------------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (same mode)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for both models")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for both models ('aot_eager' smoke-tests the wiring cheaply)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's batch size")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per model and measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per model before timing")
    p.add_argument("--channels-last", action="store_true", help="both models and inputs in channels_last")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--skip-forward", action="store_true", help="measure training only")
    p.add_argument("--skip-train", action="store_true", help="measure forward only")
    p.add_argument("--no-cpu-memory", action="store_true", help="skip the CPU peak-RSS subprocesses")
    p.add_argument("--with-direct-upsample", action="store_true",
                   help="also time ours with its upsampling convolutions run the direct way (upsample, then "
                        "3x3 conv), interleaved with the other two: an A/B of the sub-pixel upsampling")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step of each model: top ROWS ops/kernels and time per category")
    p.add_argument("--memory-probe", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = CONFIGS[args.config].batch_size
    if args.iters < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--iters and --batch-size must be >= 1 and --warmup >= 0")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 so that compilation is not timed")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bc = CONFIGS[args.config]
    if args.memory_probe:
        run_memory_probe(args, bc)
        return {}

    import diffusers

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    models = [("ours", build_ours, call_ours), ("diffusers", build_diffusers, call_diffusers)]
    if args.with_direct_upsample:
        models.append(("ours_direct_upsample", build_ours_direct_upsample, call_ours))
    # Sizes and FLOPs (meta device: nothing is allocated or computed).
    params = {name: count_parameters(build(bc, "meta")) for name, build, _ in models}
    flops = {name: forward_flops(build, call, bc) for name, build, call in models}
    print(f"config {bc.name}: {bc}")
    print(f"device {device} dtype {args.dtype} batch {args.batch_size} compile {args.compile} "
          f"channels_last {args.channels_last} threads {torch.get_num_threads()} torch {torch.__version__} "
          f"diffusers {diffusers.__version__}")
    for name, _, _ in models:
        print(f"{name:9s} parameters {params[name]:>13,d}   forward FLOPs/image {flops[name] / 1e9:9.3f} G")

    torch.manual_seed(0)
    runners = []
    for name, build, call in models:
        model = build(bc, device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        runners.append(Runner(name, model, call, args, device))
    inputs = make_inputs(bc, args.batch_size, device, args.channels_last)
    results: dict[str, Any] = {}

    def summarize(kind: str, times: dict[str, list[float]], peaks: dict[str, int]) -> None:
        for r in runners:
            ts = times[r.name]
            results[f"{kind}_img_s_{r.name}"] = args.batch_size / statistics.median(ts)
            results[f"{kind}_ms_{r.name}"] = [round(s * 1e3, 2) for s in ts]
            if device.type == "cuda":
                results[f"{kind}_peak_mem_bytes_{r.name}"] = peaks[r.name] + (
                    r.resident_bytes() if kind == "train" else 0)

        def speedup(key: str, baseline: str) -> None:
            """ours / baseline: ratio of median img/s, and (robust to load drift on a shared machine) the median
            of the per-iteration-pair ratios."""
            ours, base = times["ours"], times[baseline]
            results[f"{kind}_{key}"] = statistics.median(base) / statistics.median(ours)
            results[f"{kind}_{key}_paired_median"] = statistics.median([b / o for o, b in zip(ours, base)])

        speedup("speedup", "diffusers")
        print(f"{kind}: ours {results[f'{kind}_img_s_ours']:.2f} img/s, diffusers "
              f"{results[f'{kind}_img_s_diffusers']:.2f} img/s, speedup {results[f'{kind}_speedup']:.3f}x "
              f"(paired median {results[f'{kind}_speedup_paired_median']:.3f}x)", flush=True)
        if "ours_direct_upsample" in times:
            speedup("subpixel_speedup", "ours_direct_upsample")
            print(f"{kind}: ours with direct upsampling {results[f'{kind}_img_s_ours_direct_upsample']:.2f} img/s; "
                  f"sub-pixel upsampling speedup {results[f'{kind}_subpixel_speedup']:.3f}x (paired median "
                  f"{results[f'{kind}_subpixel_speedup_paired_median']:.3f}x)", flush=True)

    if not args.skip_train:
        summarize("train", *interleaved(runners, "train", inputs, args.warmup, args.iters, device))
    if not args.skip_forward:
        summarize("forward", *interleaved(runners, "forward", inputs, args.warmup, args.iters, device))

    if args.profile:
        for kind in [k for k, skip in (("train", args.skip_train), ("forward", args.skip_forward)) if not skip]:
            for r in runners:
                results[f"profile_{kind}_ms_by_category_{r.name}"] = profile_step(r, kind, inputs, device,
                                                                                   args.profile)

    if device.type == "cpu" and not args.no_cpu_memory and not args.skip_train:
        probe = cpu_memory_probe(args)
        for name in ("ours", "diffusers"):
            results[f"train_peak_mem_bytes_{name}"] = probe[name]["peak_growth_bytes"] if probe[name] else None
        print("train peak RSS growth (2 steps, fresh process): " + ", ".join(
            f"{n} {results[f'train_peak_mem_bytes_{n}'] / 2**20:.0f} MiB"
            if results[f"train_peak_mem_bytes_{n}"] is not None else f"{n} n/a" for n in ("ours", "diffusers")))
    elif device.type == "cpu":
        results["train_peak_mem_bytes_ours"] = results["train_peak_mem_bytes_diffusers"] = "n/a"

    summary = {
        "train_speedup": results.get("train_speedup"),
        "forward_speedup": results.get("forward_speedup"),
        "config": bc.name,
        "bench_config": {k: list(v) if isinstance(v, tuple) else v for k, v in bc.__dict__.items()},
        "device": str(device),
        "device_name": device_name(device),
        "dtype": args.dtype,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "compile_backend": args.compile_backend if args.compile else None,
        "channels_last": args.channels_last,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "params_ours": params["ours"],
        "params_diffusers": params["diffusers"],
        "forward_flops_per_image_ours": flops["ours"],
        "forward_flops_per_image_diffusers": flops["diffusers"],
        **({"forward_flops_per_image_ours_direct_upsample": flops["ours_direct_upsample"]}
           if args.with_direct_upsample else {}),
        **{k: v for k, v in results.items() if k not in ("train_speedup", "forward_speedup")},
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
