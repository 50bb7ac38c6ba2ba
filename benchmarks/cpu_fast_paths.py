#!/usr/bin/env python
"""The CPU fast path of ``cascaded_diffusion.unet`` against the PyTorch op it replaces.

On CPU, ``scale_shift`` (``h * (1 + scale) + shift``) runs as a multiply and an in-place add instead of one
``addcmul`` (training and sampling). The exact-valued CPU paths this benchmark also timed before the module
redesign (pooling as a depthwise convolution, nearest upsampling and the sub-pixel interleave as strided copies, a 16-bit dropout)
were removed; docs/performance.md keeps their numbers.

Part 1 times each against the op it replaces at the shapes of the bundled Fashion-MNIST cascade and the cpu-32
benchmark model, in bf16 and fp32, interleaved (ABBA), and reports the largest difference between the two
results (0 means bit-identical). ``scale_shift`` is also timed forward + backward, as training runs it.
Part 2 runs one forward of each bundled stage network (no autograd: what sampling does; in each of
``--model-dtypes``, bf16 meaning bf16 autocast) with the fast paths on and patched out, interleaved; ``--cascade``
also times whole cascade samples both ways (bf16), and ``--train`` training steps of the cpu-32 benchmark model in
each of ``--model-dtypes`` (where only ``scale_shift`` applies).
The last line of output is one JSON object.

Examples::

    OMP_NUM_THREADS=2 python benchmarks/cpu_fast_paths.py --threads 2
    OMP_NUM_THREADS=2 python benchmarks/cpu_fast_paths.py --threads 2 --skip-ops --cascade --reps 6
    OMP_NUM_THREADS=2 python benchmarks/cpu_fast_paths.py --threads 2 --skip-ops --skip-networks --train --reps 8
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

try:  # run from a checkout without installing the package
    import cascaded_diffusion  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cascaded_diffusion.unet as unet
from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.labels import balanced_labels
from cascaded_diffusion.hardware import device_name

# name -> (module attribute, the PyTorch op it stands for)
PLAIN_OPS: dict[str, tuple[str, Callable]] = {
    "scale_shift": ("_scale_shift", lambda h, scale, shift: torch.addcmul(shift, h, 1.0 + scale)),
}


def plain_pytorch_ops():
    """Run the U-Net with the PyTorch ops the CPU fast paths replace (the code before they existed); a context
    manager that puts the fast paths back on exit, error or not."""
    return mock.patch.multiple(unet, **dict(PLAIN_OPS.values()))


def with_plain_ops(fn: Callable):
    """``fn`` run under :func:`plain_pytorch_ops`: the "plain" side of an A/B."""
    def plain():
        with plain_pytorch_ops():
            return fn()
    return plain


def medians(times: dict[str, list[float]]) -> tuple[float, float]:
    """Median seconds of the "fast" and the "plain" side."""
    return statistics.median(times["fast"]), statistics.median(times["plain"])


def interleaved(fns: dict[str, Callable], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(reps):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def op_cases(batch: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, mode, input shape): the shapes of the bundled cascade's SR network and of the cpu-32 model."""
    cases = []
    for shape in ((batch, 32, 32, 32), (batch, 64, 16, 16), (batch, 128, 16, 16)):
        cases += [("scale_shift", "forward", shape), ("scale_shift", "train", shape)]
    return cases


def run_op_case(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    n, c = shape[:2]
    fast_fn = getattr(unet, PLAIN_OPS[op][0])
    plain_fn = PLAIN_OPS[op][1]
    autocast = contextlib.nullcontext()
    if op == "scale_shift":
        scale, shift = (torch.randn(n, c, 1, 1, generator=g).to(dtype) for _ in range(2))
        args: tuple = (x, scale, shift)
    else:
        args = (x,)

    grad = torch.randn(shape, generator=g).to(dtype)

    def call(fn: Callable) -> Callable[[], torch.Tensor]:
        if mode == "train":
            leaves = tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) else a for a in args)

            def step():
                return torch.autograd.grad(fn(*leaves), leaves, grad)[0]  # the gradient of h
            return step

        def forward():
            with torch.no_grad(), autocast:
                return fn(*args)
        return forward

    fast, plain = call(fast_fn), call(plain_fn)
    diff = (fast().float() - plain().float()).abs().max().item()
    fast_ms, plain_ms = (1e3 * m for m in medians(interleaved({"fast": fast, "plain": plain}, reps)))
    return {"op": op, "mode": mode, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
            "fast_ms": fast_ms, "plain_ms": plain_ms, "speedup": plain_ms / fast_ms, "max_abs_diff": diff}


def run_networks(cascade: Cascade, batch: int, reps: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    results = []
    g = torch.Generator().manual_seed(0)
    for stage in cascade.stages:
        net, cfg = stage.net.eval(), stage.net.config
        x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
        t = torch.rand(batch, generator=g) * 1000
        y = torch.randint(0, stage.num_classes, (batch,), generator=g)
        low = None
        if cfg.low_res_channels:
            low = torch.randn(batch, cfg.low_res_channels, stage.low_res, stage.low_res, generator=g)

        def forward() -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return net(x, t, y=y, low_res=low)

        plain_forward = with_plain_ops(forward)
        diff = (forward().float() - plain_forward().float()).abs().max().item()
        fast_ms, plain_ms = (1e3 * m for m in medians(interleaved({"fast": forward, "plain": plain_forward}, reps)))
        results.append({"stage": stage.config.stage.name, "resolution": cfg.resolution, "batch": batch,
                        "dtype": str(dtype).removeprefix("torch."), "fast_ms": fast_ms, "plain_ms": plain_ms, "speedup": plain_ms / fast_ms,
                        "max_abs_diff": diff})
    return results


def run_training(dtype: torch.dtype, batch: int, reps: int) -> dict:
    """Training steps (forward, MSE backward, fused AdamW) of the cpu-32 benchmark model, fast paths on and off.

    Training reaches only ``scale_shift`` (the other paths need autograd off), so this measures that one."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unet_throughput import CONFIGS, build_ours, make_inputs

    bc = CONFIGS["cpu-32"]
    torch.manual_seed(0)
    model = build_ours(bc, "cpu")
    with torch.no_grad():  # away from the zero-initialised output layers, so every branch does work
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, t, y, target = make_inputs(bc, batch, torch.device("cpu"), channels_last=False)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step() -> None:
        with autocast:
            out = model(x, t, y=y)
        F.mse_loss(out.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved({"fast": step, "plain": with_plain_ops(step)}, reps, warmup=1)
    fast_s, plain_s = medians(times)
    paired = statistics.median(p / f for f, p in zip(times["fast"], times["plain"]))
    return {"config": "cpu-32", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
            "fast_img_per_s": batch / fast_s, "plain_img_per_s": batch / plain_s, "speedup": plain_s / fast_s,
            "paired_speedup": paired}


def run_cascade(cascade: Cascade, batch: int, reps: int) -> dict:
    labels = balanced_labels(batch, cascade.num_classes)

    def sample() -> None:
        cascade.sample(labels, generator=torch.Generator().manual_seed(0))

    fast_s, plain_s = medians(interleaved({"fast": sample, "plain": with_plain_ops(sample)}, reps, warmup=1))
    return {"batch": batch, "fast_s": fast_s, "plain_s": plain_s, "speedup": plain_s / fast_s,
            "fast_samples_per_s": batch / fast_s, "plain_samples_per_s": batch / plain_s}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", default="bf16,fp32", help="dtypes of the op cases")
    p.add_argument("--model-dtypes", default=None,
                   help="dtypes of the network forwards and training steps (default: --dtypes)")
    p.add_argument("--pretrained", default="fashion-mnist")
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--skip-networks", action="store_true")
    p.add_argument("--cascade", action="store_true", help="also time whole cascade samples (slow)")
    p.add_argument("--train", action="store_true", help="also time cpu-32 training steps in each dtype (slow)")
    args = p.parse_args(argv)
    names = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for flag in ("dtypes", "model_dtypes"):
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            setattr(args, flag, [names[d.strip()] for d in value.split(",") if d.strip()])
        except KeyError as err:
            p.error(f"--{flag.replace('_', '-')}: unknown {err}; choose from bf16, fp32")
    if args.model_dtypes is None:
        args.model_dtypes = args.dtypes
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"device_name": device_name("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if not args.skip_ops:
        result["ops"] = []
        for dtype in args.dtypes:
            for op, mode, shape in op_cases(args.batch_size):
                r = run_op_case(op, mode, shape, dtype, args.reps)
                result["ops"].append(r)
                print(f"{op:12s} {mode:8s} {r['dtype']:9s} {str(tuple(shape)):20s} fast {r['fast_ms']:7.2f} ms  "
                      f"plain {r['plain_ms']:7.2f} ms  {r['speedup']:5.2f}x  max diff {r['max_abs_diff']:.3g}",
                      flush=True)
    if not args.skip_networks or args.cascade:
        cascade = Cascade.load(pretrained=args.pretrained)
        if not args.skip_networks:
            result["networks"] = [r for dtype in args.model_dtypes
                                  for r in run_networks(cascade, args.batch_size, args.reps, dtype)]
            for r in result["networks"]:
                print(f"{r['stage']:16s} forward, {r['dtype']}, batch {r['batch']}: fast {r['fast_ms']:.1f} ms  "
                      f"plain {r['plain_ms']:.1f} ms  {r['speedup']:.3f}x  max diff {r['max_abs_diff']:.3g}",
                      flush=True)
        if args.cascade:
            r = result["cascade"] = run_cascade(cascade, args.batch_size, args.reps)
            print(f"cascade, batch {r['batch']}: fast {r['fast_s']:.2f} s ({r['fast_samples_per_s']:.2f} samples/s)"
                  f"  plain {r['plain_s']:.2f} s  {r['speedup']:.3f}x", flush=True)
    if args.train:
        result["train"] = []
        for dtype in args.model_dtypes:
            r = run_training(dtype, args.batch_size, args.reps)
            result["train"].append(r)
            print(f"train cpu-32 {r['dtype']}, batch {r['batch']}: fast {r['fast_img_per_s']:.2f} img/s  "
                  f"plain {r['plain_img_per_s']:.2f} img/s  {r['speedup']:.3f}x (paired {r['paired_speedup']:.3f}x)",
                  flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
