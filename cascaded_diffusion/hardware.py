"""Devices: which one a command runs on, its global math settings, the bf16 autocast every network call uses, and
what a measurement ran on, in words (recorded with every benchmark and sampler-curve result)."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from .errors import UserError


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` as a torch.device; a device that is unknown or not
    present is a :class:`UserError` (before any work starts). ``local_rank`` picks the GPU of a torchrun process."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {requested} was requested but no CUDA device is available (torch {torch.__version__}"
                f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu"
            )
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"--device {requested} was requested but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "mps"):
        raise UserError(f"--device {requested!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def configure_cuda_backends(cudnn_benchmark: bool = True) -> None:
    """The global CUDA math settings of a training process: TF32 for fp32 matmuls and convolutions (the parts
    that autocast leaves in fp32), and cuDNN autotuning unless ``cudnn_benchmark`` is off (``train.cudnn_benchmark``)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark


def bf16_autocast(device: str | torch.device, enabled: bool = True):
    """The context every network call runs in: bf16 autocast on ``device`` when ``enabled``, else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def device_name(device: str | torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"`` for a CUDA device, ``"AMD EPYC (2 CPUs)"`` for the CPU (its model name and the
    number of CPUs this process may use), the device type otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"{_cpu_model()} ({cpus} CPUs)"
    return device.type


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
