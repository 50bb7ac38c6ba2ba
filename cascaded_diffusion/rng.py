"""Random numbers for sampling that depend on (seed, sample index) only.

A sampling run draws, for every sample, the initial noise of each stage, the noise of every stochastic
sampler step and the conditioning-augmentation noise. With one generator for the whole run those draws
depend on how the samples are batched and split over processes. :class:`PerSampleGenerator` holds one
``torch.Generator`` per row of a batch, seeded from ``(seed, index)`` by :func:`sample_seed`; each row's
numbers come from its own generator, in the same order whatever else shares the batch, so sample ``i`` is
the same for any batch size and any number of processes (on the same kind of device).

:func:`randn` is the single draw used by the samplers and the augmentation: it accepts a
``PerSampleGenerator``, a plain ``torch.Generator`` (training and the older APIs) or ``None``.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch

__all__ = ["PerSampleGenerator", "Generator", "sample_seed", "randn"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` in a run seeded with ``seed``: SplitMix64 of the seed, mixed
    with the index and mixed again (nearby seeds and indices give unrelated streams). 63 bits, so it is a
    valid ``torch.Generator.manual_seed`` argument."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(index)) >> 1


class PerSampleGenerator:
    """One generator per row of a batch; row ``k`` belongs to sample ``indices[k]``.

    ``device``: where the generators live and the numbers are drawn (they are then moved to the tensor's
    device). Numbers drawn on a CPU are the same on every machine; CUDA generators are faster for large
    images and reproducible on the same GPU model.
    """

    def __init__(self, seed: int, indices: Iterable[int], device: str | torch.device = "cpu"):
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(self.seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def _rows(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(
                f"a PerSampleGenerator for {len(self.generators)} samples cannot draw a batch of shape {shape}"
            )
        return shape[1:]

    def _draw(self, draw, shape, device: str | torch.device | None, dtype: torch.dtype) -> torch.Tensor:
        """``draw`` (``torch.randn`` or ``torch.rand``) of ``shape`` (N, ...): row k from generator k."""
        row = self._rows(shape)
        out = torch.empty((len(self.generators), *row), device=self.device, dtype=dtype)
        for k, g in enumerate(self.generators):
            draw(row, generator=g, out=out[k])
        return out.to(device if device is not None else self.device, non_blocking=True)

    def randn(self, shape, device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal numbers of ``shape`` (N, ...): row k from generator k."""
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, device: str | torch.device | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) numbers of ``shape`` (N, ...): row k from generator k."""
        return self._draw(torch.rand, shape, device, dtype)

    def __repr__(self) -> str:
        span = f"{self.indices[0]}..{self.indices[-1]}" if self.indices else "none"
        return f"PerSampleGenerator(seed={self.seed}, {len(self)} samples, indices {span}, device={self.device})"


Generator = Union[torch.Generator, PerSampleGenerator, None]


def randn(shape, generator: Generator, device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers of ``shape`` on ``device``, drawn on the generator's own device.

    ``generator``: a :class:`PerSampleGenerator` (each row its own stream), a ``torch.Generator`` or None
    (the global RNG of ``device``)."""
    device = torch.device(device)
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, device=device, dtype=dtype)
    source = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=source, dtype=dtype).to(device, non_blocking=True)


def rand(shape, generator: Generator, device: str | torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers, as :func:`randn`."""
    device = torch.device(device)
    if isinstance(generator, PerSampleGenerator):
        return generator.rand(shape, device=device, dtype=dtype)
    source = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=source, dtype=dtype).to(device, non_blocking=True)
