"""Dataset specs -> uint8 image arrays: the one entry point, :func:`load_images`.

Dataset specs:

* ``fashion-mnist`` / ``fashion-mnist:train`` / ``fashion-mnist:test`` -- the four standard idx ``.gz``
  files; 28x28 images are zero-padded to 32x32 (2 px each side), then resized to ``resolution``.
* ``imagefolder:PATH`` -- ImageNet layout, one subfolder per class (sorted folder names give labels 0..K-1);
  ADM/BigGAN preprocessing; decoded once into the cache directory by the machinery of ``cdm prepare``
  (:mod:`cascaded_diffusion.data.prepare`) and memory-mapped.
* ``npz:PATH`` -- the guided-diffusion evaluator format: ``arr_0`` uint8 NHWC, optional ``arr_1`` labels.
* ``prepared:DIR`` -- a directory written by ``cdm prepare``, memory-mapped at the requested resolution.

The readers live in :mod:`.readers` (Fashion-MNIST, npz), :mod:`.imagefolder` and :mod:`.prepare`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from .imagefolder import load_imagefolder
from .prepare import load_imagefolder_cached, load_prepared
from .readers import FASHION_MNIST_FILES, ImageArray, load_fashion_mnist, load_npz

__all__ = ["ImageArray", "load_images"]

_VALID_SPECS = (
    "'fashion-mnist', 'fashion-mnist:train', 'fashion-mnist:test', 'imagefolder:PATH', 'npz:PATH', 'prepared:DIR'"
)


def load_images(
    spec: str,
    resolution: int,
    *,
    channels: int | None = None,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: Literal["skip", "error"] = "skip",
    progress: bool = False,
    use_cache: bool = True,
    num_workers: int | None = None,
    resize: str = "any",
) -> ImageArray:
    """Load a dataset spec as square uint8 images of side ``resolution``.

    Args:
        spec: ``fashion-mnist[:train|:test]``, ``imagefolder:PATH``, ``npz:PATH`` or ``prepared:DIR``.
        resolution: output side length in pixels.
        channels: 1 (grayscale) or 3 (RGB); ``None`` keeps the source's own (Fashion-MNIST 1, image folders
            3, npz whatever it holds). Grayscale is replicated to RGB; RGB is converted to luma as PIL's
            ``convert("L")`` does.
        root: for Fashion-MNIST, the directory holding the four idx files (default: env
            ``CDM_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``); for ``imagefolder``/``npz``,
            a base directory that a relative PATH is resolved against.
        cache_dir: where ``imagefolder`` caches its decoded array (default: ``fileio.cache_dir("data")``).
        on_corrupt: ``"skip"`` drops unreadable image files with a warning; ``"error"`` raises naming the file.
        progress: show a tqdm progress bar while decoding an image folder.
        use_cache: ``False`` decodes an image folder in memory without reading or writing the cache.
        num_workers: decoding threads for image folders (default: ``min(32, cpu_count)``).
        resize: for ``npz:`` data, whose resolution is the data's own choice: ``"any"`` resizes it, ``"down"``
            only downsamples it, ``"exact"`` refuses another size (``readers.ResolutionMismatch``). Fashion-MNIST
            (28 px) and image folders (any size) are always resized; a prepared directory must hold the size.

    Returns:
        An :class:`ImageArray` with images N x resolution x resolution x C.

    Raises:
        ValueError: unknown spec, invalid arguments, missing/corrupt files.
    """
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    resolution = int(resolution)
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 (grayscale) or 3 (RGB), got {channels!r}")
    if on_corrupt not in ("skip", "error"):
        raise ValueError(f"on_corrupt must be 'skip' or 'error', got {on_corrupt!r}")
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset spec must be a non-empty string, one of {_VALID_SPECS}; got {spec!r}")

    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "fashion-mnist":
        split = arg.strip().lower() or "train"
        if split not in FASHION_MNIST_FILES:
            raise ValueError(f"unknown Fashion-MNIST split {arg!r} in spec {spec!r}; expected 'train' or 'test'")
        return load_fashion_mnist(split, resolution, channels=channels, root=root)
    if kind in ("imagefolder", "npz", "prepared"):
        if not arg:
            raise ValueError(f"spec {spec!r} is missing its PATH; expected '{kind}:PATH'")
        path = Path(os.path.expanduser(arg))
        if root is not None and not path.is_absolute():
            path = Path(os.path.expanduser(os.fspath(root))) / path
        if kind == "npz":
            return load_npz(path, resolution, channels=channels, resize=resize)
        if kind == "prepared":  # a `cdm prepare` directory, memory-mapped (cascaded_diffusion.data.prepare)
            return load_prepared(path, resolution, channels=channels, on_corrupt=on_corrupt)
        folder, channels = path.resolve(), 3 if channels is None else channels
        if use_cache:  # the cache is a `cdm prepare` of the folder at this one resolution
            return load_imagefolder_cached(folder, resolution, channels=channels, cache_dir=cache_dir,
                                           on_corrupt=on_corrupt, progress=progress, num_workers=num_workers)
        return load_imagefolder(folder, resolution, channels=channels, on_corrupt=on_corrupt, progress=progress,
                                num_workers=num_workers)
    raise ValueError(f"unknown dataset spec {spec!r}; valid forms are {_VALID_SPECS}")
