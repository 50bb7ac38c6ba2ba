"""Image folders (ImageNet layout, one subfolder per class): listing, fingerprinting, decoding with ADM/BigGAN
preprocessing in a thread pool, and the uncached in-memory load. ``cdm prepare`` (:mod:`cascaded_diffusion.data.prepare`)
decodes with the same functions into memory-mapped arrays, and the ``imagefolder:`` source's cache is such a
preparation at one resolution."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .readers import ImageArray, center_crop_resize

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_DECODE_BLOCK = 2048  # paths submitted to the thread pool at a time (bounds the number of live futures)


def list_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Return (class names, [(path relative to folder, label)]) in a deterministic order.

    Class folders are searched recursively; hidden files and folders are ignored, as are files directly in
    ``folder`` (they belong to no class)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    class_names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise ValueError(
            f"{folder}: no class subfolders; expected the ImageNet layout {folder}/<class_name>/<image files>"
        )
    entries: list[tuple[str, int]] = []
    for label, name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if not filename.startswith(".") and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS:
                    entries.append((os.path.relpath(os.path.join(dirpath, filename), folder), label))
    if not entries:
        raise ValueError(
            f"{folder}: no image files found in its class subfolders (extensions: {sorted(IMAGE_EXTENSIONS)})"
        )
    return class_names, entries


def fingerprint(folder: Path, entries: list[tuple[str, int]]) -> dict[str, Any]:
    """File count, total size and a hash of (path, size, mtime) so any added/removed/edited file shows."""
    digest = hashlib.sha256()
    total_bytes = 0
    for relpath, label in entries:
        st = os.stat(folder / relpath)
        total_bytes += st.st_size
        digest.update(f"{relpath}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"file_count": len(entries), "total_bytes": total_bytes, "mtimes_hash": digest.hexdigest()}


def needs_8bit_scaling(image: Image.Image) -> bool:
    return image.mode.startswith("I;16") or image.mode in ("I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL modes ``I;16*``, and ``I`` as 16-bit PNGs open) scaled to 8-bit ``L``:
    v -> round(v * 255 / 65535). PIL's own conversion would clip every value above 255 to white.

    A float image (mode ``F``, e.g. a 32-bit float TIFF) in [0, 1] is scaled v -> round(v * 255): PIL would
    truncate it to 0 or 1, a black image. One whose values exceed 1 but stay in [0, 255] is taken as 8-bit
    levels; anything else (negative, above 255, NaN) is refused as unreadable rather than guessed."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise ValueError("float image with NaN or infinite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]; expected [0, 1] (or [0, 255])")
        scale = 255.0 if high <= 1 else 1.0
        return Image.fromarray(np.rint(values * scale).astype(np.uint8))
    array = np.asarray(image).astype(np.int64)
    if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"32-bit integer image with values in [{array.min()}, {array.max()}]; expected 8 or 16 bits")
    return Image.fromarray(((array * 255 + 32767) // 65535).astype(np.uint8))


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """A decoded image as the training data holds it before resizing: 16-bit and float images scaled to 8 bits,
    then converted to ``mode`` (``L`` or ``RGB``; alpha dropped)."""
    if needs_8bit_scaling(image):
        image = to_8bit(image)
    with warnings.catch_warnings():
        # Palette images with transparency warn on RGB conversion; the alpha is meant to be dropped.
        warnings.simplefilter("ignore", UserWarning)
        return image.convert(mode)


def open_image(path: str, mode: str) -> Image.Image:
    """Decode one image file, completely (truncated data raises instead of decoding a partly grey image), and
    :func:`convert_image` it: the one decoder of image folders and of ``cdm prepare``."""
    with Image.open(path) as image:
        image.load()
        return convert_image(image, mode)


def preprocess_image(image: Image.Image, resolution: int, mode: str) -> np.ndarray:
    """The training data's rule for one decoded image: :func:`convert_image`, then the ADM centre crop + resize
    to resolution x resolution x C uint8."""
    array = center_crop_resize(convert_image(image, mode), resolution)
    return array[..., None] if array.ndim == 2 else array


def decode_image(path: str, resolution: int, mode: str) -> np.ndarray:
    """Decode one image file and preprocess it to resolution x resolution x C uint8 (C from ``mode``)."""
    array = center_crop_resize(open_image(path, mode), resolution)
    return array[..., None] if array.ndim == 2 else array


def images_at(images, resolution: int, channels: int, what: str = "images") -> np.ndarray:
    """PIL images or uint8 H x W [x C] arrays of any size as one uint8 N x R x R x C array: each brought to
    ``resolution`` by the training data's rule (:func:`preprocess_image`); an array already at that size and channel
    count is used as it is. ``what`` names the caller in the error for anything else."""
    size, mode = resolution, ("RGB" if channels == 3 else "L")
    fed = []
    for image in images:
        if not isinstance(image, Image.Image):
            array = np.asarray(image)
            if array.dtype != np.uint8 or array.ndim not in (2, 3):
                raise ValueError(f"{what}: expected uint8 H x W [x C] images, got {array.dtype} {array.shape}")
            if array.shape[:2] == (size, size) and (array.shape[2:] or (1,))[0] == channels:
                fed.append(array.reshape(size, size, channels))
                continue
            image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
        fed.append(preprocess_image(image, size, mode))
    return np.stack(fed) if fed else np.zeros((0, size, size, channels), np.uint8)


def decode_into(
    folder: Path,
    relpaths: list[str],
    out: np.ndarray,
    resolution: int,
    mode: str,
    on_corrupt: str,
    progress: bool,
    num_workers: int,
) -> dict[int, str]:
    """Decode every file into ``out[i]``; return {index: 'path: reason'} for files that could not be decoded."""
    from tqdm.auto import tqdm

    failures: dict[int, str] = {}

    def decode(index: int) -> tuple[int, np.ndarray | None, str | None]:
        path = str(folder / relpaths[index])
        try:
            return index, decode_image(path, resolution, mode), None
        except Exception as exc:  # any decoder failure means "unreadable file"; never abort a long decode
            if on_corrupt == "error":
                raise ValueError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc
            return index, None, f"{path}: {type(exc).__name__}: {exc}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool, tqdm(
        total=len(relpaths), desc=f"decoding {folder.name}", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(relpaths), _DECODE_BLOCK):
            for index, array, failure in pool.map(decode, range(start, min(start + _DECODE_BLOCK, len(relpaths)))):
                if failure is not None:
                    failures[index] = failure
                else:
                    out[index] = array
                bar.update(1)
    return failures


def warn_skipped(folder: Path, skipped: list[str], total: int) -> None:
    shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    warnings.warn(
        f"{folder}: skipped {len(skipped)} of {total} image files that could not be decoded: {shown}",
        stacklevel=4,
    )


def load_imagefolder(
    folder: Path,
    resolution: int,
    *,
    channels: int,
    on_corrupt: str,
    progress: bool,
    num_workers: int | None,
) -> ImageArray:
    """Decode every image of ``folder`` (already resolved) in memory, without the cache."""
    class_names, entries = list_image_folder(folder)
    relpaths = [relpath for relpath, _ in entries]
    all_labels = np.array([label for _, label in entries], dtype=np.int64)
    workers = num_workers if num_workers is not None else min(32, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    images = np.empty((len(entries), resolution, resolution, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    failures = decode_into(folder, relpaths, images, resolution, mode, on_corrupt, progress, workers)
    if len(failures) == len(relpaths):
        first = failures[min(failures)]
        raise ValueError(f"{folder}: none of the {len(relpaths)} image files could be decoded; first: {first}")
    keep = np.array([i for i in range(len(relpaths)) if i not in failures], dtype=np.int64)
    skipped = [failures[i] for i in sorted(failures)]
    if skipped:
        warn_skipped(folder, skipped, len(entries))
        images = images[keep]
    return ImageArray(images, all_labels[keep], len(class_names), class_names, f"imagefolder:{folder}")
