"""Files the library writes and reads outside checkpoints: atomic writes, the one file lock, the cache root,
sample ``.npz`` files (streamed when they are large).

* Every file is written atomically (a temporary file in the same directory, fsynced, renamed): a full disk, a kill
  or any other failure leaves the previous file at that path untouched.
* One cache root for every cache (decoded image folders, reference statistics, Inception weights):
  ``$CDM_CACHE`` if set, else ``~/.cache/cascaded_diffusion`` (:func:`cache_dir`).
* Sample files are the guided-diffusion evaluator format: ``arr_0`` uint8 N x H x W x C, ``arr_1`` int64 labels
  (:mod:`cascaded_diffusion.images` converts them to and from the library's [-1, 1] tensors).
* One lock (:class:`FileLock`) for every directory a process must have to itself.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

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


class LockBusy(Exception):
    """Another process holds a :class:`FileLock`; ``holder`` says who (pid, host, since when) where it recorded
    itself, else None."""

    def __init__(self, path: Path, holder: str | None):
        super().__init__(f"{path} is locked" + (f" by {holder}" if holder else ""))
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive ``flock`` on the file ``path``: every lock of the library (a run directory's, a preparation's,
    a sampling job's shards). The kernel drops it when the process exits, however it exits (``kill -9``
    included), so a stale lock never blocks anyone; the descriptor is not inherited by exec'ed children. The
    file is never followed through a link and must be a regular file (:func:`open_lock_file`).

    ``record``: the holder writes its pid, host, start time and command line into the file (written over the
    old record, then cut to length: a full disk never leaves it empty), which :meth:`holder` reads for the
    message of the process refused. A lock file that its holder removes (with its directory) while another
    process locks it is noticed (its inode is no longer at the path) and the new file is locked instead. No
    locking where there is no ``fcntl`` (not POSIX)."""

    def __init__(self, path: str | Path, *, record: bool = True):
        self.path, self.record, self._fd = Path(path), record, None

    def acquire(self, wait: bool = False, on_wait: Callable[[], None] | None = None) -> "FileLock":
        """Take the lock; held by another process: :class:`LockBusy`, or with ``wait`` block until it is free
        (``on_wait()`` is called first)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: no locking
            return self
        for _ in range(10):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = open_lock_file(self.path)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    if not wait:
                        raise LockBusy(self.path, self.holder()) from None
                    if on_wait is not None:
                        on_wait()
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    if self.record:
                        self._write_record(fd)
                    self._fd, fd = fd, None
                    return self
            finally:
                if fd is not None:
                    os.close(fd)  # refused, failed, or the holder removed the file as we locked it: try the new one
        from .errors import UserError

        raise UserError(f"{self.path}: could not be locked (it kept being removed); retry")

    def _write_record(self, fd: int) -> None:
        import json
        import socket
        import sys
        import time

        info = (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                            "argv": sys.argv}) + "\n").encode()
        try:
            if os.pwrite(fd, info, 0) != len(info):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.ftruncate(fd, len(info))
        except OSError as e:
            raise OSError(e.errno, f"could not record this process in the lock file ({e.strerror or e})",
                          str(self.path)) from None

    def holder(self) -> str | None:
        """``pid P on host H, since TIME`` from the holder's record, or None where there is none (yet)."""
        import json
        import time

        try:
            info = json.loads(self.path.read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            return f"pid {info['pid']} on host {info['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """:func:`atomic_replace`, with an OSError re-raised naming ``path`` (not the temporary file)."""
    try:
        atomic_replace(path, write)
    except OSError as e:
        raise OSError(e.errno, f"could not write it ({e.strerror or e}); any previous version is untouched",
                      str(path)) from e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a single file atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: write_bytes_durably(tmp, data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# --------------------------------------------------------------------------------------------------------
# Sample files (.npz)
# --------------------------------------------------------------------------------------------------------


def save_samples_npz(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``arr_0`` (uint8 N x H x W x C) and ``arr_1`` (int64 labels) atomically, creating the directory."""
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=np.asarray(labels).astype(np.int64))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same arrays always give the same bytes


class NpyMember:
    """One ``.npy`` member of a zip being written, filled block by block."""

    def __init__(self, archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype):
        info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        self._handle = archive.open(info, "w", force_zip64=True)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_1_0(self._handle, header)
        self._rows = 0

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not fit an array of shape {self.shape}")
        self._handle.write(block.tobytes())
        self._rows += block.shape[0]

    def close(self) -> None:
        if self._rows != self.shape[0]:
            raise ValueError(f"wrote {self._rows} rows of an array of {self.shape[0]}")
        self._handle.close()


def write_npz_streaming(path: str | os.PathLike,
                        arrays: dict[str, tuple[tuple[int, ...], Any, Callable[[NpyMember], None]]]) -> None:
    """Write an uncompressed ``.npz`` (what ``np.savez`` writes, with fixed member timestamps, so equal arrays
    give equal bytes) atomically (:func:`atomic_write`) without holding its arrays in memory.

    ``arrays``: name → (shape, dtype, fill) where ``fill(member)`` calls ``member.write(block)`` with
    consecutive blocks of rows. Members are written in the order given."""

    def write(tmp: Path) -> None:
        with open_no_follow(tmp) as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, (shape, dtype, fill) in arrays.items():
                    member = NpyMember(archive, f"{name}.npy", shape, dtype)
                    fill(member)
                    member.close()
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


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
