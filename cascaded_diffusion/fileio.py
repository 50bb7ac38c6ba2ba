"""Files the library writes and reads outside checkpoints: atomic writes, the cache root, sample ``.npz`` files,
the uint8 <-> tensor image conventions, and image grids.

* Every file is written atomically (a temporary file in the same directory, fsynced, renamed): a full disk, a kill
  or any other failure leaves the previous file at that path untouched.
* One cache root for every cache (decoded image folders, reference statistics, Inception weights):
  ``$CDM_CACHE`` if set, else ``~/.cache/cascaded_diffusion`` (:func:`cache_dir`).
* Sample files are the guided-diffusion evaluator format: ``arr_0`` uint8 N x H x W x C, ``arr_1`` int64 labels.
  Inside the library images are float N x C x H x W tensors in [-1, 1] (:func:`images_to_tensor`,
  :func:`tensor_to_images`).
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

# What a truncated, garbage or half-written .npz raises while it is opened or read.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, KeyError)


# --------------------------------------------------------------------------------------------------------
# Atomic writes and the cache root
# --------------------------------------------------------------------------------------------------------


def cache_dir(kind: str = "") -> Path:
    """``$CDM_CACHE/KIND`` if CDM_CACHE is set (it names the library's cache root), else
    ``~/.cache/cascaded_diffusion/KIND``: ``data`` (decoded image folders), ``stats`` (reference statistics), or
    the root itself (the Inception weights)."""
    root = os.environ.get("CDM_CACHE")
    base = Path(os.path.expanduser(root)) if root else Path.home() / ".cache" / "cascaded_diffusion"
    return base / kind


def check_cache_dir(directory: str | os.PathLike, setting: str) -> None:
    """Refuse a cache location under a regular file before anything tries to create it there, naming the
    ``setting`` that chose it (``CDM_CACHE=...``, ``data.cache_dir``): the directory's own creation error would
    otherwise be reported against whatever option the cache happens to be used for (``--out``)."""
    from .errors import UserError  # (errors is a leaf module; imported here to keep fileio's imports minimal)

    for path in (Path(directory), *Path(directory).parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise UserError(f"{setting}: the cache directory {directory} cannot be created, {path} is a file "
                                "(or a broken link), not a directory; point it at a directory")
            return


def cache_setting() -> str:
    """How the user chose the cache root, for messages: ``CDM_CACHE=...`` or the default's path."""
    root = os.environ.get("CDM_CACHE")
    return f"CDM_CACHE={root}" if root else f"the default cache {cache_dir()}"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file (0o666 less the umask), read without changing the umask
    where /proc says it (changing it, even briefly, races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - no /proc
    os.umask(mask)
    return 0o666 & ~mask


# Temporary files are created by mkstemp (O_CREAT | O_EXCL, so never through a planted symlink or into an existing
# file, with an unpredictable name) and then opened by name only with O_NOFOLLOW. The pattern names them for the
# leftover cleaners (checkpoint.clean_run_dir, the shard directory): ``.NAME.tmp-XXXXXXXX``; the digits-only
# suffix is the ``.NAME.tmp-PID`` of earlier versions, still cleaned up.
TMP_INFIX = ".tmp-"
TMP_FILE_PATTERN = r"\..+\.tmp-(?:\d+|[a-z0-9_]{8})"


def make_temp_file(path: Path) -> Path:
    """Create an empty, exclusive temporary file beside ``path`` (same directory, so a rename is atomic) with the
    permissions a plain ``open(path, "w")`` would give it, and return its name."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}")
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp's 0600 would make shared outputs unreadable to a group
    finally:
        os.close(fd)
    return Path(name)


def open_no_follow(path: str | Path, flags: int = os.O_WRONLY | os.O_TRUNC):
    """A binary file object for ``path`` opened without following a symbolic link at its last component (a link
    planted in a shared directory must not redirect the write)."""
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), _default_file_mode())
    return os.fdopen(fd, "rb+" if flags & os.O_RDWR else "wb")


def write_bytes_durably(path: Path, data: bytes) -> None:
    with open_no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def unlink_quietly(path: str | Path) -> None:
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def atomic_replace(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` to write a temporary file next to ``path``, then rename it to ``path`` and fsync the
    directory. If anything fails (``write`` may raise to refuse what it wrote) the temporary file is removed and any
    previous file at ``path`` is untouched. ``tmp`` exists (empty, created exclusively by :func:`make_temp_file`)
    when ``write`` is called; ``write`` should open it with :func:`open_no_follow`."""
    path = Path(path)
    tmp = make_temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        unlink_quietly(tmp)
        raise


def open_lock_file(path: str | Path) -> int:
    """A read-write descriptor of the lock file ``path`` (created if missing), for ``flock``. A symbolic link is
    never followed (a planted ``.lock`` link would have the lock holder's record written over its target) and
    anything but a regular file is refused, naming the path."""
    from .errors import UserError

    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o644)  # O_NONBLOCK: a planted FIFO never hangs us
    except OSError as e:
        if e.errno == errno.ELOOP or Path(path).is_symlink():
            raise UserError(f"{path} is a symbolic link; a lock file must be a regular file (remove the link)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file; a lock file must be one (remove it)")
    return fd


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (:func:`atomic_replace`); an OSError is re-raised naming ``path`` (not the
    temporary file)."""
    try:
        atomic_replace(path, lambda tmp: write_bytes_durably(tmp, data))
    except OSError as e:
        raise OSError(e.errno, f"could not write it ({e.strerror or e}); any previous version is untouched",
                      str(path)) from e


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------------------------------------
# Sample files (.npz) and the image conventions
# --------------------------------------------------------------------------------------------------------


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``arr_0`` (uint8 N x H x W x C) and ``arr_1`` (int64 labels) atomically, creating the directory."""
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=np.asarray(labels).astype(np.int64))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def npz_array_shape(path: str | os.PathLike, key: str = "arr_0") -> tuple[int, ...]:
    """The shape of one array of an ``.npz`` from its header alone (a 50k-image file is not read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return tuple(read_header(f)[0])
    except KeyError:
        raise ValueError(f"{path}: no {key!r} array") from None
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ValueError(f"{path}: cannot read as an .npz archive ({type(exc).__name__}: {exc})") from exc


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate a guided-diffusion style ``.npz``: ``arr_0`` uint8 N×H×W×C images and the
    optional ``arr_1`` labels (returned unvalidated, or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except NPZ_READ_ERRORS as exc:
        raise ValueError(
            f"{path}: cannot read as an .npz archive ({type(exc).__name__}: {exc}); "
            "the file is truncated, corrupt or not an .npz"
        ) from exc
    if not hasattr(archive, "files"):
        raise ValueError(f"{path}: is a single .npy array, expected an .npz archive with arr_0 (and arr_1)")
    with archive:
        if "arr_0" not in archive.files:
            raise ValueError(
                f"{path}: no 'arr_0' array (found {archive.files}); expected arr_0 = uint8 N x H x W x C "
                "images and optional arr_1 = labels"
            )
        try:
            images = archive["arr_0"]
            labels = archive["arr_1"] if "arr_1" in archive.files else None
        except NPZ_READ_ERRORS as exc:
            raise ValueError(
                f"{path}: cannot read its arrays ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
            ) from exc

    if images.dtype != np.uint8:
        hint = ""
        if np.issubdtype(images.dtype, np.floating) and images.size:
            lo, hi = float(images.min()), float(images.max())
            hint = (
                f" (values in [{lo:.3g}, {hi:.3g}]; from [-1, 1] convert with "
                "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8))"
            )
        raise ValueError(f"{path}: arr_0 has dtype {images.dtype}, expected uint8 images in 0..255{hint}")
    if images.ndim != 4:
        raise ValueError(
            f"{path}: arr_0 has shape {images.shape} (rank {images.ndim}), expected rank 4 N x H x W x C "
            "(add a trailing channel axis for grayscale)"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return images, labels


def images_to_tensor(
    images: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    flip_mask: torch.Tensor | np.ndarray | None = None,
) -> torch.Tensor:
    """uint8 N x H x W x C images -> float32 N x C x H x W tensor in [-1, 1] on ``device``.

    The uint8 data is moved before the float conversion (4x less transfer). ``flip_mask`` (bool, length N)
    mirrors the selected images left-right.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(f"images_to_tensor expects uint8 images, got numpy dtype {images.dtype}")
        if not images.flags.writeable or not images.flags.c_contiguous:
            images = np.array(images)  # memmaps are read-only; torch wants writable memory
        tensor = torch.from_numpy(images)
    elif isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise ValueError(f"images_to_tensor expects uint8 images, got tensor dtype {images.dtype}")
        tensor = images
    else:
        raise ValueError(f"images_to_tensor expects a numpy array or torch tensor, got {type(images).__name__}")
    if tensor.ndim != 4:
        raise ValueError(f"images_to_tensor expects N x H x W x C images, got shape {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    x = tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if flip_mask is not None:
        mask = torch.as_tensor(flip_mask, device=x.device)
        if mask.dtype != torch.bool or mask.shape != (x.shape[0],):
            raise ValueError(
                f"flip_mask must be a bool tensor of shape ({x.shape[0]},), got {mask.dtype} {tuple(mask.shape)}"
            )
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """Float N x C x H x W tensor in [-1, 1] -> uint8 N x H x W x C numpy array (rounded, clamped)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            "tensor_to_images expects a float N x C x H x W tensor, got "
            + (f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        )
    x = x.detach()
    if torch.isnan(x).any():
        raise ValueError("tensor_to_images: the images contain NaN (did sampling or training diverge?)")
    pixels = ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------------


def make_grid(
    images: np.ndarray | torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile images into one uint8 H x W x C array with ``nrow`` images per row.

    Args:
        images: uint8 N x H x W x C (numpy or tensor), or a float N x C x H x W tensor in [-1, 1].
        nrow: images per row (callers put one class per row by passing the samples-per-class count).
        padding: pixels between images and around the border.
        pad_value: gray level of the padding (white by default, visible against black backgrounds).
    """
    if isinstance(images, torch.Tensor):
        images = tensor_to_images(images) if images.is_floating_point() else images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"make_grid expects a non-empty uint8 N x H x W x C array, got {images.dtype} {images.shape}"
        )
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(
            "make_grid needs nrow >= 1, padding >= 0, 0 <= pad_value <= 255; "
            f"got nrow={nrow}, padding={padding}, pad_value={pad_value}"
        )
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_grid(
    images: np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    nrow: int,
    padding: int = 2,
    pad_value: int = 255,
) -> Path:
    """Write :func:`make_grid` of ``images`` to ``path`` (format from the extension, e.g. .png); returns it."""
    from PIL import Image

    grid = make_grid(images, nrow, padding=padding, pad_value=pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    try:
        image.save(buffer, format=Image.registered_extensions().get(path.suffix.lower()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot write an image with extension {path.suffix!r} ({e}); use .png") from None
    atomic_write_bytes(path, buffer.getvalue())  # a full disk or a kill never leaves a half-written grid
    return path


def grid_by_class(
    stage_images: Sequence[np.ndarray],
    labels: np.ndarray,
    per_class: int = 8,
    max_classes: int = 10,
    min_tile: int = 32,
) -> np.ndarray:
    """One row per class; each sample shows every stage side by side (nearest-upsampled to the final
    resolution, and to at least ``min_tile`` pixels so tiny stages stay visible), low resolution to high.
    ``stage_images``: uint8 NHWC arrays, one per stage."""
    final = stage_images[-1].shape[1]
    final *= -(-min_tile // final) if final < min_tile else 1
    shown = [np.repeat(np.repeat(imgs, final // imgs.shape[1], 1), final // imgs.shape[2], 2) for imgs in stage_images]
    classes = [c for c in np.unique(labels)][:max_classes]
    per_class = min(per_class, min(int((labels == c).sum()) for c in classes))
    tiles = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in idx:
            tiles.extend(s[j] for s in shown)
    return make_grid(np.stack(tiles), nrow=per_class * len(shown))
