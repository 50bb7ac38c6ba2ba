#!/usr/bin/env python
"""Memory traffic of one ``torch.compile``-d training step, ours against diffusers, counted by inductor itself.

After compiling forward + backward of both models at a matched configuration (``unet_throughput.py``'s), this
sums what inductor's scheduler says each scheduled node reads and writes (``GraphLowering.count_bytes``, the
numbers behind ``torch._inductor.metrics.num_bytes_accessed``): the generated (fused element-wise and
reduction) kernels separately from the extern kernels (convolutions, matmuls, attention). On a GPU the generated
kernels are memory-bound, so their bytes say how much of the compiled step the two graphs can differ by beyond
convolution FLOPs, without a GPU: the counts are a static property of the compiled graph, not a timing.

The compile runs on this machine's CPU backend. ``--gpu-paths`` (the default) makes ours take the branches it
takes on non-CPU devices (plain SDPA instead of the CPU's fp32 short-sequence attention, ``addcmul`` for
scale-shift; the sub-pixel interleave follows the memory format alone, as everywhere), so that the graph is the one a GPU
compiles; inductor's CPU fusion decisions are close to, not identical with, its Triton ones. Compiling both
cpu-32 models takes several minutes on 2 cores. The last line of output is one JSON object.

Example::

    OMP_NUM_THREADS=2 python benchmarks/inductor_traffic.py --config cpu-32 --batch-size 4 --channels-last
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:  # run from a checkout without installing the package
    import cascaded_diffusion  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cascaded_diffusion.unet as unet
from cascaded_diffusion.hardware import device_name
from unet_throughput import CONFIGS, build_diffusers, build_ours, call_diffusers, call_ours, make_inputs

def gpu_code_paths():
    """Ours as it runs on a non-CPU device: the CPU-only branches of ``unet.py`` replaced by their GPU twins (a
    context manager that restores them on exit)."""
    return mock.patch.multiple(unet, **{
        "_attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "_scale_shift": lambda h, scale, shift: torch.addcmul(shift, h, 1.0 + scale),
    })  # the sub-pixel interleave depends on the memory format only, the same on every device


def traffic_of_compiled_step(build, call, bc, batch: int, channels_last: bool) -> dict:
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as metrics

    torch._logging.set_logs(inductor_metrics=True)  # makes inductor count bytes per scheduled node
    torch._dynamo.reset()
    metrics.reset()
    torch.manual_seed(0)
    model = build(bc, "cpu")
    x, t, y, target = make_inputs(bc, batch, torch.device("cpu"), channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # a cache hit would skip the code generation that does the counting (and disabling caches warns that
    # profile-guided recompilation is off, which does not matter for one static shape)
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")
    with inductor_config.patch(fx_graph_cache=False, force_disable_caches=True):
        compiled = torch.compile(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(compiled, x, t, y)
        F.mse_loss(out.float(), target).backward()
    generated = 0
    extern: collections.Counter = collections.Counter()
    for node, words in metrics.nodes_num_elem:  # count_bytes stores bytes // 4 per node
        if node.is_extern():
            extern[str(getattr(node.node, "python_kernel_name", None) or type(node.node).__name__)] += 4 * words
        else:
            generated += 4 * words
    return {"bytes_total": int(metrics.num_bytes_accessed), "bytes_generated_kernels": generated,
            "bytes_extern_kernels": sum(extern.values()), "extern_by_kernel": dict(extern.most_common()),
            "scheduled_nodes": len(metrics.nodes_num_elem)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="cpu-32")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--channels-last", action="store_true", help="both models and inputs (the GPU suite's setting)")
    p.add_argument("--cpu-paths", action="store_true", help="keep ours on its CPU branches instead of the GPU ones")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bc = CONFIGS[args.config]
    paths = contextlib.nullcontext() if args.cpu_paths else gpu_code_paths()
    with paths:
        ours = traffic_of_compiled_step(build_ours, call_ours, bc, args.batch_size, args.channels_last)
    diffusers = traffic_of_compiled_step(build_diffusers, call_diffusers, bc, args.batch_size, args.channels_last)
    for name, r in (("ours", ours), ("diffusers", diffusers)):
        print(f"{name:10s} generated kernels {r['bytes_generated_kernels'] / 1e6:8.1f} MB   extern kernels "
              f"{r['bytes_extern_kernels'] / 1e6:8.1f} MB   total {r['bytes_total'] / 1e6:8.1f} MB   "
              f"({r['scheduled_nodes']} scheduled nodes)", flush=True)
    result = {"config": args.config, "batch_size": args.batch_size, "channels_last": args.channels_last,
              "code_paths": "cpu" if args.cpu_paths else "gpu", "ours": ours, "diffusers": diffusers,
              "generated_bytes_ratio_ours_over_diffusers":
                  ours["bytes_generated_kernels"] / diffusers["bytes_generated_kernels"],
              "compiled_on": device_name("cpu"), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
