"""Cascaded Diffusion Models: a class-conditional base diffusion model followed by
super-resolution diffusion models trained with conditioning augmentation.

The public API, three lines from a cascade to images::

    from cascaded_diffusion import Cascade
    cascade = Cascade.load(pretrained="fashion-mnist")        # or Cascade.load(["runs/base8", "runs/sr8to32"])
    images, labels = cascade.generate(num=64, seed=0)          # uint8 N x H x W x C, int64: what `cdm sample` writes

Everything else is importable from its module (docs/architecture.md lists them); the names here are the ones a
user needs and are kept stable. They are imported on first use, so ``import cascaded_diffusion`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# name -> the module that defines it
_EXPORTS = {
    "Cascade": "cascade",          # load a cascade (run dirs, a bundled or exported folder, the Hub); generate, sample
    "Stage": "stage",              # one trained stage: load, sample
    "StageConfig": "config",       # a stage's validated TOML config
    "load_config": "config",       # TOML file + "section.key=value" overrides -> StageConfig
    "train_stage": "training",     # train (or resume) one stage into a run directory
    "distill": "distillation",     # progressive distillation of one stage into a few-step student (resumable)
    "sample_sharded": "sharded_sampling",  # many samples over torchrun's processes, resumable, into one .npz
    "export_cascade": "sharing",   # a shareable cascade folder (weights, hashed manifest, model card)
    "load_images": "data",  # a data spec (fashion-mnist, npz:, imagefolder:, prepared:) -> ImageArray
    "images_to_tensor": "images",  # uint8 N x H x W x C -> float N x C x H x W in [-1, 1]
    "tensor_to_images": "images",  # float N x C x H x W in [-1, 1] -> uint8 N x H x W x C (rounded, clamped)
    "UserError": "errors",         # what a caller can act on; the message says how
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .cascade import Cascade
    from .config import StageConfig, load_config
    from .data import load_images
    from .distillation import distill
    from .errors import UserError
    from .images import images_to_tensor, tensor_to_images
    from .sharded_sampling import sample_sharded
    from .sharing import export_cascade
    from .stage import Stage
    from .training import train_stage


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
