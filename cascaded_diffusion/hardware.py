"""What a measurement ran on, in words: recorded with every benchmark and sampler-curve result."""

from __future__ import annotations

import os
import platform

import torch


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
