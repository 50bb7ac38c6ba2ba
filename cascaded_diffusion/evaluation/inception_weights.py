"""The TF-FID Inception weights file (``pt_inception-2015-12-05-6726825d.pth``): where it is found (argument,
``$CDM_INCEPTION_WEIGHTS``, the cache), its download, the checks of its bytes against the SHA-256 prefix its name
carries, and reading it as a plain state dict (``.pth`` without unpickling objects, or ``.safetensors``).

The network it fills is in :mod:`~cascaded_diffusion.evaluation.inception`.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from pathlib import Path

import torch

from ..errors import UserError
from ..fileio import atomic_replace, cache_dir, cache_setting, check_cache_dir, open_no_follow

INCEPTION_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS_FILENAME
)
INCEPTION_WEIGHTS_ENV = "CDM_INCEPTION_WEIGHTS"


def file_sha256(path: str | os.PathLike, length: int = 12) -> str:
    """Hex prefix of a file's SHA-256, used to fingerprint feature networks in statistics files."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def expected_sha256_prefix(filename: str) -> str | None:
    """The hash prefix a weights file name carries, torch.hub style (``NAME-<sha256 prefix>.ext``), or None."""
    match = re.search(r"-([0-9a-f]{8,64})\.[^.]+$", filename)
    return match.group(1) if match else None


def default_inception_cache_path() -> Path:
    """Where :func:`~.inception.load_inception` looks for (and downloads) the weights when no path is given."""
    return cache_dir() / INCEPTION_WEIGHTS_FILENAME


def _missing_weights_message(path: Path, reason: str) -> str:
    return (
        f"TF-FID Inception weights not found: {reason}.\n"
        f"Download {INCEPTION_WEIGHTS_URL}\n"
        f"and either put it at {path}, or set the environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/"
        f"{INCEPTION_WEIGHTS_FILENAME}, or pass weights_path=... (a .pth state dict or its .safetensors "
        "conversion). Without these weights, use the Fashion-MNIST classifier features ('classifier:PATH')."
    )


class WeightsHashError(ValueError):
    """Downloaded weights whose SHA-256 does not start with the prefix their file name carries."""


def _download(url: str, destination: Path, timeout_s: float) -> None:
    """Fetch ``url`` to ``destination`` atomically (a partial download never lands at the final path) and,
    when the destination's name carries a SHA-256 prefix (``...-6726825d.pth``), check the bytes against it:
    a corrupt or substituted download is deleted and refused."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    expected = expected_sha256_prefix(destination.name)

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open_no_follow(tmp) as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if expected is not None and not digest.hexdigest().startswith(expected):
            raise WeightsHashError(
                f"the file downloaded from {url} has SHA-256 {digest.hexdigest()[:16]}..., but its name says it "
                f"starts with {expected}: the download is corrupt or not the expected file, so it was discarded. "
                f"Retry, or download it yourself and check it (sha256sum), then pass its path"
            )

    atomic_replace(destination, fetch)  # a partial or refused download never lands at the final path


class WeightsFileError(UserError):
    """A weights file that cannot be read (truncated, corrupt, not a state dict) or fails its name's hash."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth`` file without unpickling arbitrary objects.

    A file that cannot be read raises :class:`WeightsFileError` (one line): torch's own message for a damaged
    file is a page of advice to pass ``weights_only=False``, which would be wrong advice for a corrupt file
    and dangerous for a foreign one."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # not the file's content: a path error is already one line, memory is reported as such
    except Exception as e:  # noqa: BLE001 - anything the deserialisers raise means "not readable weights"
        raise WeightsFileError(
            f"{path} is not a readable weights file ({type(e).__name__}): it is truncated, corrupt or not a "
            f"state dict. Download it again ({INCEPTION_WEIGHTS_URL}) or redo the conversion"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(f"{path} does not contain a plain state dict of tensors")
    return state


def check_cached_weights(path: Path) -> None:
    """A weights file in the cache whose name carries a SHA-256 prefix (``...-6726825d.pth``) must still match
    it: a cache damaged later (a disk error, a half copy, another file put there) is refused, naming the file,
    instead of giving wrong features or a traceback. Hashing ~100 MB takes well under a second, little next to
    feature extraction."""
    expected = expected_sha256_prefix(path.name)
    if expected is None:
        return
    actual = file_sha256(path, length=64)
    if not actual.startswith(expected):
        raise WeightsFileError(
            f"the cached weights {path} have SHA-256 {actual[:16]}..., but their name says it starts with "
            f"{expected}: the file is corrupt or not the expected one. Delete it (it is downloaded again on the "
            "next run) or pass the path of a good copy"
        )


def resolve_inception_weights(
    weights_path: str | os.PathLike | None = None, download: bool = True, timeout_s: float = 15.0
) -> Path:
    """Find the weights file: argument, else ``$CDM_INCEPTION_WEIGHTS``, else the cache (downloading there).

    An explicitly given path (argument or environment variable) must exist; only the default cache
    location is filled by downloading. Raises FileNotFoundError with instructions otherwise.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path, f"weights_path {path} does not exist"))
        return path
    from_env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                _missing_weights_message(path, f"{INCEPTION_WEIGHTS_ENV}={from_env} does not exist")
            )
        return path
    path = default_inception_cache_path()
    if path.is_file():
        check_cached_weights(path)
        return path
    if not download:
        raise FileNotFoundError(_missing_weights_message(path, f"{path} does not exist and download=False"))
    check_cache_dir(path.parent, cache_setting())  # CDM_CACHE a file: say so, not "downloading failed (File exists)"
    try:
        _download(INCEPTION_WEIGHTS_URL, path, timeout_s)
    except OSError as error:  # URLError, timeouts and HTTP errors are all OSErrors
        raise FileNotFoundError(
            _missing_weights_message(path, f"{path} does not exist and downloading it failed ({error})")
        ) from error
    return path
