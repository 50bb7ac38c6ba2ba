"""Devices: which one a command runs on, its global math settings, the precision its networks run in (bf16
autocast or fp32, :func:`choose_precision`), what a measurement ran on, in words (recorded with every
benchmark and sampler-curve result), and how much memory it has left (:func:`check_sampling_memory`)."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from .errors import UserError, naming


def resolve_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` as a torch.device; a device that is unknown or not
    present is a :class:`UserError` (before any work starts). ``local_rank`` picks the GPU of a torchrun process."""
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    names = {"option": "device"}
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise naming(UserError, "{option} {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps", names,
                     requested=requested) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise naming(UserError, "{option} {requested} was requested but no CUDA device is available (torch "
                         "{torch}{build}); use {option} cpu", names, requested=requested, torch=torch.__version__,
                         build="" if torch.version.cuda else ", a CPU-only build")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise naming(UserError, "{option} {requested}: there are only {count} CUDA device(s)", names,
                         requested=requested, count=torch.cuda.device_count())
        return torch.device("cuda", index)
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise naming(UserError, "{option} {requested} was requested but MPS is not available; use {option} cpu", names,
                     requested=requested)
    if device.type not in ("cpu", "mps"):
        raise naming(UserError, "{option} {requested!r} is not supported; use auto, cpu, cuda, cuda:N or mps", names,
                     requested=requested)
    return device


def configure_cuda_backends(cudnn_benchmark: bool = True) -> None:
    """The global CUDA math settings of a training process: TF32 for fp32 matmuls and convolutions (the parts
    that autocast leaves in fp32), and cuDNN autotuning unless ``cudnn_benchmark`` is off (``train.cudnn_benchmark``)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark


def bf16_autocast(device: str | torch.device, enabled: bool | Precision = True):
    """The context every network call runs in: bf16 autocast on ``device`` when ``enabled`` (a bool or a
    :class:`Precision`), else nothing."""
    if isinstance(enabled, Precision):
        enabled = enabled.bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


PRECISIONS = ("auto", "bf16", "fp32")

# oneDNN's ISA levels below AVX512_CORE_BF16, the names ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA take: capped at one of
# these, oneDNN has no bf16 instructions and converts every bf16 operand in software (docs/performance.md).
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class Precision:
    """The precision a command's networks run in and the reason, in words (every command prints both)."""

    name: str  # "bf16" (bf16 autocast, fp32 weights) | "fp32"
    reason: str
    requested: str = "auto"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def describe(self) -> str:
        """``"precision fp32 (auto: this CPU has no native bf16 ...)"``: the line a command prints."""
        return f"precision {self.name} ({'auto: ' if self.requested == 'auto' else ''}{self.reason})"


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether bf16 runs natively on this CPU *as torch will use it now*, and why, asking torch and oneDNN.

    Native means: the CPU has bf16 instructions (avx512_bf16, or AMX tiles), oneDNN will use them (its effective
    ISA, which ``ONEDNN_MAX_CPU_ISA`` caps, is at least AVX-512 core: ``torch.ops.mkldnn._is_mkldnn_bf16_supported``),
    and ATen's own kernels run at AVX-512 (``ATEN_CPU_CAPABILITY`` caps them). Without any one of these, bf16
    convolutions and element-wise ops convert every operand in software and are several times slower than fp32
    (16x for sampling on an AVX2-only Zen 3)."""
    flags = _cpu_flags()
    has_instructions = bool(flags.get("avx512_bf16") or flags.get("amx_bf16") or flags.get("amx_tile"))
    if not has_instructions:
        return False, "this CPU has no native bf16 (no avx512_bf16, no AMX)"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = os.environ.get(var, "").strip().upper()
        if cap in _ONEDNN_ISAS_WITHOUT_BF16:
            return False, f"{var}={cap} keeps oneDNN below its bf16 instructions"
    if not _onednn_bf16():
        return False, "oneDNN runs no bf16 on this CPU at its current ISA"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False, f"ATen runs at {capability} (ATEN_CPU_CAPABILITY), without bf16 instructions"
    native = "AMX" if flags.get("amx_bf16") or flags.get("amx_tile") else "avx512_bf16"
    return True, f"this CPU has native bf16 ({native})"


def _onednn_bf16() -> bool:
    """oneDNN's own answer: bf16 at its effective ISA (False when ``ONEDNN_MAX_CPU_ISA`` caps it below AVX-512)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpu_flags() -> dict:
    """torch's cpuinfo view of this CPU's instructions (``torch.cpu.get_capabilities``; older torch: its
    ``_is_*_supported`` helpers)."""
    if hasattr(torch.cpu, "get_capabilities"):
        return dict(torch.cpu.get_capabilities())
    return {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_tile": torch.cpu._is_amx_tile_supported()}


def choose_precision(requested: str | None, device: str | torch.device) -> Precision:
    """The one place that decides a network's precision. ``bf16`` and ``fp32`` are always obeyed; ``auto`` (and
    None) is bf16 where the hardware does it natively *and* it measured faster, fp32 otherwise:

    - CUDA: bf16 when the GPU has native bf16 (Ampere or newer), fp32 before.
    - CPU: bf16 with avx512_bf16 or AMX in use (:func:`cpu_bf16_support`): 1.7x faster training and as fast or
      faster sampling on the 2-core Zen 4 (docs/performance.md); fp32 without (16x faster sampling on AVX2).
    - anything else (MPS, ARM CPUs): fp32, where bf16 has not been measured faster.
    """
    requested = "auto" if requested is None else requested
    if requested not in PRECISIONS:
        raise UserError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    auto = _auto_precision(torch.device(device))
    if requested == "auto":
        return auto
    if auto.name == requested:
        return Precision(requested, f"as asked; also the automatic choice: {auto.reason}", requested)
    return Precision(requested, f"as asked, although auto would pick {auto.name}: {auto.reason}", requested)


def _auto_precision(device: torch.device) -> Precision:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bf16", f"{torch.cuda.get_device_name(device)} has native bf16")
        return Precision("fp32", f"{torch.cuda.get_device_name(device)} has no native bf16")
    if device.type == "cpu":
        if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
            return Precision("fp32", f"bf16 is not measured faster on {platform.machine()} CPUs")
        native, why = cpu_bf16_support()
        return Precision("bf16" if native else "fp32", why)
    return Precision("fp32", f"bf16 is not measured faster on {device.type}")


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


def available_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device``: a CUDA device's free memory, or for the host the
    kernel's ``MemAvailable`` capped by a cgroup (v2) limit, as in a container or a batch job. None where it
    cannot be told (another OS): then nothing is refused on an estimate."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


class SamplingMemoryError(UserError):
    """Sampling would need more memory than is available; ``option`` is the argument to lower (``batch_size``
    or ``num``), so a command line can name its own flag."""

    def __init__(self, detail: str, option: str, value: int):
        super().__init__(f"{detail}; lower {option} (it is {value})")
        self.detail, self.option, self.value = detail, option, value


# Bytes per sample that sampling keeps for the whole run whatever the batch: the int64 labels, their sorted copy,
# the numpy copy, the indices left to sample and the merge's row map.
_BYTES_PER_LABEL = 40


def check_sampling_memory(cascade, num: int, batch_size: int, *, start_stage: int = 0,
                          world_size: int = 1, labels_allocated: bool = False) -> None:
    """Refuse, before anything is allocated, for a :class:`~cascaded_diffusion.cascade.Cascade`, a ``num``/``batch_size`` whose memory certainly does not fit.

    The estimate is a lower bound, so nothing feasible is refused: per sample of a batch, the sampler's float32
    state (the current x, the network's output and the next x; an SR stage also holds its upsampled
    conditioning) for the largest stage, plus two uint8 copies of every stage's output until the chunk is
    written; per sample of ``num``, the label bookkeeping. Without a check ``--batch-size 10**8`` grows until
    the kernel kills the process. ``labels_allocated``: the labels exist already (their memory is no longer
    available), so only the batch is checked. Raises :class:`SamplingMemoryError` naming the argument to lower."""
    stages = cascade.stages[start_stage:]
    batch = min(batch_size, -(-num // max(1, world_size)))
    state = max(4 * s.channels * s.resolution ** 2 * (4 if s.is_sr else 3) for s in stages)
    outputs = 2 * sum(s.channels * s.resolution ** 2 for s in stages)
    device = cascade.stages[0].device
    on_device = device.type == "cuda"
    host = available_memory("cpu")
    largest = max(s.resolution for s in stages)
    if on_device:  # the sampler's state is on the GPU, the outputs and the labels on the host
        free = available_memory(device)
        if free is not None and batch * state > free:
            raise SamplingMemoryError(
                f"a batch of {batch} samples needs at least {_gib(batch * state)} of {device} memory for the "
                f"sampler's state at {largest}px, but {_gib(free)} are free", "batch_size", batch_size)
        batch_host = batch * outputs
    else:
        batch_host = batch * (state + outputs)
    if host is None:
        return
    if batch_host > host:
        raise SamplingMemoryError(
            f"a batch of {batch} samples needs at least {_gib(batch_host)} of memory (the sampler's state and the "
            f"images at up to {largest}px), but {_gib(host)} are available", "batch_size", batch_size)
    if not labels_allocated and batch_host + num * _BYTES_PER_LABEL > host:
        raise SamplingMemoryError(
            f"{num} samples need at least {_gib(num * _BYTES_PER_LABEL)} of memory for their labels and indices "
            f"besides {_gib(batch_host)} for a batch, but {_gib(host)} are available", "num", num)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
