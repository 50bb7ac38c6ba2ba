"""Datasets as uint8 image arrays, a resumable batch stream, and image grids.

Dataset specs accepted by :func:`load_images`:

* ``fashion-mnist`` / ``fashion-mnist:train`` / ``fashion-mnist:test`` -- the four standard idx ``.gz``
  files; 28x28 images are zero-padded to 32x32 (2 px each side), then resized to ``resolution``.
* ``imagefolder:PATH`` -- ImageNet layout, one subfolder per class (sorted folder names give labels 0..K-1);
  ADM/BigGAN preprocessing; decoded once into the cache directory by the machinery of ``cdm prepare``
  (:mod:`cascaded_diffusion.prepare`) and memory-mapped.
* ``npz:PATH`` -- the guided-diffusion evaluator format: ``arr_0`` uint8 NHWC, optional ``arr_1`` labels.
* ``prepared:DIR`` -- a directory written by ``cdm prepare``, memory-mapped at the requested resolution.

On disk and in :class:`ImageArray` images are uint8 NHWC; inside the library they are float tensors in
[-1, 1], NCHW (:func:`images_to_tensor` / :func:`tensor_to_images` convert between the two).
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image

from .fileio import read_samples_npz

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ImageArray",
    "load_images",
    "BatchStream",
]

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
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte data, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte data, 1 dimension

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_VALID_SPECS = (
    "'fashion-mnist', 'fashion-mnist:train', 'fashion-mnist:test', 'imagefolder:PATH', 'npz:PATH', 'prepared:DIR'"
)
_DECODE_BLOCK = 2048  # paths submitted to the thread pool at a time (bounds the number of live futures)
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
# load_images: spec dispatch
# --------------------------------------------------------------------------------------------------------


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
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"unknown Fashion-MNIST split {arg!r} in spec {spec!r}; expected 'train' or 'test'")
        return _load_fashion_mnist(split, resolution, channels=channels, root=root)
    if kind in ("imagefolder", "npz", "prepared"):
        if not arg:
            raise ValueError(f"spec {spec!r} is missing its PATH; expected '{kind}:PATH'")
        path = Path(os.path.expanduser(arg))
        if root is not None and not path.is_absolute():
            path = Path(os.path.expanduser(os.fspath(root))) / path
        if kind == "npz":
            return _load_npz(path, resolution, channels=channels)
        if kind == "prepared":  # a `cdm prepare` directory, memory-mapped (cascaded_diffusion.prepare)
            from .prepare import load_prepared

            return load_prepared(path, resolution, channels=channels, on_corrupt=on_corrupt)
        return _load_imagefolder(
            path,
            resolution,
            channels=3 if channels is None else channels,
            cache_dir=cache_dir,
            on_corrupt=on_corrupt,
            progress=progress,
            use_cache=use_cache,
            num_workers=num_workers,
        )
    raise ValueError(f"unknown dataset spec {spec!r}; valid forms are {_VALID_SPECS}")


# --------------------------------------------------------------------------------------------------------
# Shared pixel helpers
# --------------------------------------------------------------------------------------------------------


def _rgb_to_luma(images: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with PIL's fixed-point rounding, so npz and image-folder paths agree exactly."""
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _convert_channels(images: np.ndarray, channels: int | None, source: str) -> np.ndarray:
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
    return _rgb_to_luma(images)


def _center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
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


def _resize_stack(images: np.ndarray, resolution: int, resize_one) -> np.ndarray:
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


def _load_fashion_mnist(
    split: str, resolution: int, *, channels: int | None, root: str | os.PathLike | None
) -> ImageArray:
    directory = _fashion_mnist_dir(root)
    image_name, label_name = _FASHION_MNIST_FILES[split]
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
        padded = _resize_stack(padded, resolution, lambda im: im.resize((resolution, resolution), resample))
    return ImageArray(
        images=_convert_channels(padded, channels, "fashion-mnist"),
        labels=labels.astype(np.int64),
        num_classes=len(FASHION_MNIST_CLASSES),
        class_names=list(FASHION_MNIST_CLASSES),
        source=f"fashion-mnist:{split}",
    )


# --------------------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------------------


def _load_npz(path: Path, resolution: int, *, channels: int | None) -> ImageArray:
    images, labels = read_samples_npz(path)
    images = _convert_channels(images, channels, str(path))

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
        images = _resize_stack(images, resolution, lambda im: _center_crop_resize(im, resolution))
    num_classes = int(labels.max()) + 1
    return ImageArray(
        images=np.ascontiguousarray(images),
        labels=labels,
        num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)],
        source=f"npz:{path.resolve()}",
    )


# --------------------------------------------------------------------------------------------------------
# imagefolder: listing, fingerprint, decoding, cache
# --------------------------------------------------------------------------------------------------------


def _list_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
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


def _fingerprint(folder: Path, entries: list[tuple[str, int]]) -> dict[str, Any]:
    """File count, total size and a hash of (path, size, mtime) so any added/removed/edited file shows."""
    digest = hashlib.sha256()
    total_bytes = 0
    for relpath, label in entries:
        st = os.stat(folder / relpath)
        total_bytes += st.st_size
        digest.update(f"{relpath}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"file_count": len(entries), "total_bytes": total_bytes, "mtimes_hash": digest.hexdigest()}


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL modes ``I;16*``, and ``I`` as 16-bit PNGs open) scaled to 8-bit ``L``:
    v -> round(v * 255 / 65535). PIL's own conversion would clip every value above 255 to white."""
    array = np.asarray(image).astype(np.int64)
    if image.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"32-bit integer image with values in [{array.min()}, {array.max()}]; expected 8 or 16 bits")
    return Image.fromarray(((array * 255 + 32767) // 65535).astype(np.uint8))


def _decode_image(path: str, resolution: int, mode: str) -> np.ndarray:
    """Decode one image file and preprocess it to resolution x resolution x C uint8 (C from ``mode``)."""
    with Image.open(path) as image:
        image.load()  # raises on truncated data instead of decoding a partly grey image
        if image.mode.startswith("I;16") or image.mode == "I":
            image = _to_8bit(image)
        with warnings.catch_warnings():
            # Palette images with transparency warn on RGB conversion; the alpha is meant to be dropped.
            warnings.simplefilter("ignore", UserWarning)
            image = image.convert(mode)
    array = _center_crop_resize(image, resolution)
    return array[..., None] if array.ndim == 2 else array


def _decode_into(
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
            return index, _decode_image(path, resolution, mode), None
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


def _warn_skipped(folder: Path, skipped: list[str], total: int) -> None:
    shown = "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
    warnings.warn(
        f"{folder}: skipped {len(skipped)} of {total} image files that could not be decoded: {shown}",
        stacklevel=4,
    )


def _load_imagefolder(
    folder: Path,
    resolution: int,
    *,
    channels: int,
    cache_dir: str | os.PathLike | None,
    on_corrupt: str,
    progress: bool,
    use_cache: bool,
    num_workers: int | None,
) -> ImageArray:
    folder = folder.resolve()
    if use_cache:  # the cache is a `cdm prepare` of the folder at this one resolution (cascaded_diffusion.prepare)
        from .prepare import load_imagefolder_cached

        return load_imagefolder_cached(folder, resolution, channels=channels, cache_dir=cache_dir,
                                       on_corrupt=on_corrupt, progress=progress, num_workers=num_workers)
    class_names, entries = _list_image_folder(folder)
    relpaths = [relpath for relpath, _ in entries]
    all_labels = np.array([label for _, label in entries], dtype=np.int64)
    workers = num_workers if num_workers is not None else min(32, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    images = np.empty((len(entries), resolution, resolution, channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    failures = _decode_into(folder, relpaths, images, resolution, mode, on_corrupt, progress, workers)
    if len(failures) == len(relpaths):
        first = failures[min(failures)]
        raise ValueError(f"{folder}: none of the {len(relpaths)} image files could be decoded; first: {first}")
    keep = np.array([i for i in range(len(relpaths)) if i not in failures], dtype=np.int64)
    skipped = [failures[i] for i in sorted(failures)]
    if skipped:
        _warn_skipped(folder, skipped, len(entries))
        images = images[keep]
    return ImageArray(images, all_labels[keep], len(class_names), class_names, f"imagefolder:{folder}")


# --------------------------------------------------------------------------------------------------------
# BatchStream
# --------------------------------------------------------------------------------------------------------


class BatchStream:
    """Deterministic, resumable stream of batch indices over ``num_items`` items.

    The stream is the concatenation of per-epoch orders: epoch ``e`` is a permutation of ``range(num_items)``
    drawn from ``(seed, e)`` (or the identity order when ``shuffle=False``). Each step consumes one *global*
    batch of ``batch_size * world_size`` consecutive entries; rank ``r`` gets the ``r``-th slice of
    ``batch_size`` entries, so ranks are disjoint within a step and together cover the global batch.
    ``batch_size`` is therefore **per rank**. A global batch that runs past the end of an epoch continues
    into the next epoch's order rather than dropping the remainder, so every item is seen once per epoch
    and tiny datasets (``num_items < batch_size``) still work; the price is that a batch straddling an
    epoch boundary may repeat an item.

    The state (epoch, position within the epoch) is global and identical on every rank, so it can be saved
    from rank 0 and restored on all ranks, even with a different ``world_size`` or ``batch_size``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        for name, value, minimum in (("num_items", num_items, 1), ("batch_size", batch_size, 1),
                                     ("seed", seed, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"BatchStream {name} must be an integer >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"BatchStream rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def global_batch_size(self) -> int:
        """Items consumed per step across all ranks."""
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the data (fractional when the global batch does not divide num_items)."""
        return self.num_items / self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of ``epoch`` (int64, a permutation of ``range(num_items)``)."""
        if epoch not in self._orders:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            else:
                order = np.arange(self.num_items)
            # Only the current and the next epoch are ever needed.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order.astype(np.int64)
        return self._orders[epoch]

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next batch (int64, length ``batch_size``); advances the stream."""
        global_batch = np.empty(self.global_batch_size, dtype=np.int64)
        filled = 0
        while filled < self.global_batch_size:
            order = self.epoch_order(self.epoch)
            take = min(self.global_batch_size - filled, self.num_items - self.position)
            global_batch[filled : filled + take] = order[self.position : self.position + take]
            filled += take
            self.position += take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
        return global_batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position of the stream (plus num_items/seed/shuffle to catch mismatches)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; later batches equal those of an uninterrupted stream."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"BatchStream state is missing {key!r}; got keys {sorted(state)}")
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"BatchStream state was saved with {key}={state[key]!r} but this stream has "
                    f"{key}={getattr(self, key)!r}; the saved position would not be meaningful"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(
                f"BatchStream state has epoch={epoch}, position={position}; expected epoch >= 0 and "
                f"0 <= position < num_items={self.num_items}"
            )
        self.epoch, self.position = epoch, position


# --------------------------------------------------------------------------------------------------------
# uint8 <-> [-1, 1] tensors, flips
# --------------------------------------------------------------------------------------------------------
