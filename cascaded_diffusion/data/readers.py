"""Dataset readers: a labelled uint8 image array (:class:`ImageArray`), Fashion-MNIST's idx files, guided-diffusion
``.npz`` files, and the pixel operations every reader shares (channel conversion, ADM/BigGAN center crop and resize).

On disk and in :class:`ImageArray` images are uint8 N x H x W x C; inside the library they are float tensors in
[-1, 1], N x C x H x W (:func:`cascaded_diffusion.images.images_to_tensor` / ``tensor_to_images``).
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import read_samples_npz

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension

# Largest class index an npz label may hold: one class name is built per class, so an absurd label (10**10)
# must be refused before anything is allocated. ImageNet-21k has 21,841 classes.
MAX_NPZ_LABEL = 99_999


@dataclass
class ImageArray:
    """A labelled image dataset held as a uint8 array.

    Attributes:
        images: uint8 array N x H x W x C (may be a read-only ``np.memmap``).
        labels: int64 array of length N, values in ``[0, num_classes)``.
        num_classes: number of classes (labels ``num_classes`` is reserved as the null class by the models).
        class_names: one name per class.
        source: canonical spec the data came from, e.g. ``"fashion-mnist:train"``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: list[str]
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"ImageArray.images must be a uint8 N x H x W x C array, got dtype {self.images.dtype} "
                f"and shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != np.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"ImageArray.labels must be int64 of shape ({self.images.shape[0]},), got dtype "
                f"{self.labels.dtype} and shape {tuple(self.labels.shape)}"
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"ImageArray has num_classes={self.num_classes} but {len(self.class_names)} class names"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        """Side length of the (square) images."""
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        """Number of channels (1 for grayscale, 3 for RGB)."""
        return int(self.images.shape[3])


# --------------------------------------------------------------------------------------------------------
# Shared pixel helpers
# --------------------------------------------------------------------------------------------------------


def rgb_to_luma(images: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with PIL's fixed-point rounding, so npz and image-folder paths agree exactly."""
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def convert_channels(images: np.ndarray, channels: int | None, source: str) -> np.ndarray:
    """Convert an N x H x W x C uint8 array between grayscale and RGB."""
    have = images.shape[-1]
    if have not in (1, 3):
        raise ValueError(
            f"{source}: images have {have} channels; only 1 (grayscale) or 3 (RGB) are supported"
        )
    if channels is None or channels == have:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    return rgb_to_luma(images)


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM/BigGAN preprocessing: BOX-halve while the short side is >= 2*res, BICUBIC so the short side is
    res, then center crop res x res. Halving first keeps the final bicubic step from aliasing."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    new_size = tuple(max(resolution, round(side * scale)) for side in image.size)
    if new_size != image.size:
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def resize_stack(images: np.ndarray, resolution: int, resize_one) -> np.ndarray:
    """Apply ``resize_one(PIL image) -> HxW[xC] array`` to every image of an N x H x W x C uint8 stack."""
    n, _, _, c = images.shape
    out = np.empty((n, resolution, resolution, c), dtype=np.uint8)
    for i in range(n):
        pil = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = np.asarray(resize_one(pil)).reshape(resolution, resolution, c)
    return out


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------------------


def _fashion_mnist_dir(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(os.path.expanduser(os.fspath(root)))
    env = os.environ.get("CDM_FASHION_MNIST")
    return Path(os.path.expanduser(env)) if env else Path(FASHION_MNIST_DEFAULT_DIR)


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read a gzip-compressed idx file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(
            f"{path}: cannot decompress ({exc}); the file is truncated or corrupt, re-download it"
        ) from exc
    header_bytes = 4 * (1 + ndim)
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: only {len(raw)} bytes, too short for an idx header; the file is corrupt")
    header = np.frombuffer(raw[:header_bytes], dtype=">u4")
    if int(header[0]) != magic:
        raise ValueError(
            f"{path}: bad idx magic number {int(header[0]):#010x}, expected {magic:#010x}; "
            "is this the right Fashion-MNIST file?"
        )
    shape = tuple(int(d) for d in header[1:])
    expected = math.prod(shape)
    if len(raw) - header_bytes != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header_bytes}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def load_fashion_mnist(
    split: str, resolution: int, *, channels: int | None, root: str | os.PathLike | None
) -> ImageArray:
    directory = _fashion_mnist_dir(root)
    image_name, label_name = FASHION_MNIST_FILES[split]
    missing = [name for name in (image_name, label_name) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {directory} (missing: {', '.join(missing)}). "
            "Install them with `apt-get install dataset-fashion-mnist` (files go to "
            f"{FASHION_MNIST_DEFAULT_DIR}), or download the four .gz files (train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
            "https://github.com/zalandoresearch/fashion-mnist and set CDM_FASHION_MNIST=/path/to/that/dir "
            "(or pass root=)."
        )
    images = _read_idx(directory / image_name, _IDX_IMAGES_MAGIC, ndim=3)
    labels = _read_idx(directory / label_name, _IDX_LABELS_MAGIC, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{directory / image_name}: images are {images.shape[1:]}, expected 28 x 28")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels in {directory}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{directory / label_name}: label {labels.max()} out of range 0..9")

    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 -> 32, zero (black) border
    if resolution != 32:
        # BOX is an exact area average when shrinking; it would be blocky when enlarging, so use BICUBIC.
        resample = Image.Resampling.BOX if resolution < 32 else Image.Resampling.BICUBIC
        padded = resize_stack(padded, resolution, lambda im: im.resize((resolution, resolution), resample))
    return ImageArray(
        images=convert_channels(padded, channels, "fashion-mnist"),
        labels=labels.astype(np.int64),
        num_classes=len(FASHION_MNIST_CLASSES),
        class_names=list(FASHION_MNIST_CLASSES),
        source=f"fashion-mnist:{split}",
    )


# --------------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------------


class ResolutionMismatch(ValueError):
    """An ``npz:`` data set is not at the resolution a command needs, and resizing it was not asked for."""


RESIZE_POLICIES = ("any", "down", "exact")


def load_npz(path: Path, resolution: int, *, channels: int | None, resize: str = "any") -> ImageArray:
    """``resize``: ``"any"`` resizes to ``resolution``; ``"down"`` refuses images smaller than it (upsampled
    training targets or references would pass for real ones); ``"exact"`` refuses any other size."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    images, labels = read_samples_npz(path)
    size = images.shape[1:3]
    if size != (resolution, resolution) and (resize == "exact" or (resize == "down" and min(size) < resolution)):
        raise ResolutionMismatch(
            f"npz:{path} holds {size[0]}x{size[1]} images, not the {resolution}x{resolution} needed here; "
            f"{'it would be upsampled' if min(size) < resolution else 'it would be resized'}"
        )
    images = convert_channels(images, channels, str(path))

    if labels is None:
        labels = np.zeros(images.shape[0], dtype=np.int64)
    else:
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: arr_1 must be integer labels of shape ({images.shape[0]},), got dtype "
                f"{labels.dtype} and shape {labels.shape}"
            )
        if labels.min() < 0:
            raise ValueError(f"{path}: arr_1 has negative label {labels.min()}")
        if int(labels.max()) > MAX_NPZ_LABEL:  # checked before one class name per possible label is built
            raise ValueError(
                f"{path}: arr_1 has label {int(labels.max())}; labels must be class indices 0..{MAX_NPZ_LABEL}"
            )
        labels = labels.astype(np.int64)

    if images.shape[1:3] != (resolution, resolution):
        images = resize_stack(images, resolution, lambda im: center_crop_resize(im, resolution))
    num_classes = int(labels.max()) + 1
    return ImageArray(
        images=np.ascontiguousarray(images),
        labels=labels,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        source=f"npz:{path.resolve()}",
    )
