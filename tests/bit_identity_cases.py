"""The sampling calls whose exact outputs tests/fixtures/bit_identity.npz records (see
tests/fixtures/make_bit_identity.py): a run directory made by the code before the module redesign (commit e6299d3) and the shipped
bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# Float results are bit-reproducible on one kind of machine only: oneDNN and the ATen kernels pick their code
# path (AMX, AVX-512 bf16, AVX2 ...) from the CPU, and the summation order and bf16 rounding follow it. The
# fixture therefore holds one recording per machine signature ("CASE@SIGNATURE"); the unsuffixed keys are the
# first recording, made on a machine whose signature was not written down.
_ISA_FLAGS = ("amx_tile", "amx_bf16", "avx512_fp16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma")


def machine_signature() -> str:
    """torch version, ATen's CPU capability and the ISA flags oneDNN dispatches on (Linux /proc/cpuinfo)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = "+".join(f for f in _ISA_FLAGS if f in flags) or "unknown"
    return f"torch{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability()}-{isa}"
TINY = [FIXTURES / "tiny_run" / "base8", FIXTURES / "tiny_run" / "sr8to16"]

# name -> (cascade, sampling keyword arguments); labels and seed fixed per case
CASES = {
    "tiny_ddpm_fp32": ("tiny", dict(steps=5, sampler="ddpm", autocast=False)),
    "tiny_ddim_truncated_fp32": ("tiny", dict(steps=[4, 3], sampler="ddim", truncated=True, aug_levels=[10],
                                              autocast=False)),
    "tiny_dpmpp_bf16_guided": ("tiny", dict(steps=4, sampler="dpmpp", guidance=[2.0, 1.5], autocast=True)),
    "tiny_default_levels": ("tiny", dict(steps=3, autocast=False)),
    "pretrained_ddpm_fp32": ("pretrained", dict(steps=3, sampler="ddpm", autocast=False)),
    "pretrained_ddim_bf16": ("pretrained", dict(steps=3, sampler="ddim", autocast=True)),
}


def load_cascade(kind: str):
    from cascaded_diffusion.cascade import Cascade

    if kind == "tiny":
        return Cascade.load(TINY)
    return Cascade.load(pretrained="fashion-mnist")


def sample_case(name: str) -> np.ndarray:
    """Every stage's output, float32, concatenated flat (stage 1 first)."""
    kind, kwargs = CASES[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cascade = load_cascade(kind)
        labels = torch.tensor([0, 3, 7, 9] if kind == "tiny" else [1, 8])
        out = cascade.sample(labels, generator=torch.Generator().manual_seed(1234), **kwargs)
    finally:
        torch.set_num_threads(threads)
    return np.concatenate([x.float().numpy().ravel() for x in out.stages])


# --precision bf16 explicitly: the recording was made when bf16 was the default; since then the default is
# "auto", which would pick fp32 on a machine without native bf16 and compare the wrong thing there
CLI_ARGS = ["--num", "6", "--steps", "3", "--seed", "5", "--sampler", "ddim", "--quiet", "--precision", "bf16"]


def cli_sample(out_dir: Path) -> np.ndarray:
    """The uint8 images `cdm sample` writes for the tiny run (bf16 autocast, the default when it was recorded)."""
    from cascaded_diffusion.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sample", *map(str, TINY), "--out", str(out_dir / "s.npz"), *CLI_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    with np.load(out_dir / "s.npz") as f:
        return f["arr_0"]
