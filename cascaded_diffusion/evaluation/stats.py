"""Feature statistics: :class:`FeatureStats` (mean, covariance and optionally the raw features of a set of images,
with the feature network that made them, in a ``.npz`` file) and the checks every metric shares, so that
statistics from different networks, resolutions or channel counts are never compared by accident."""

from __future__ import annotations

import io
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import naming

STATS_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def as_feature_matrix(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Return ``features`` as a finite float64 (N, D) matrix, or raise ValueError explaining why not."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (num_samples, feature_dim), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); expected at least one sample and one feature")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf values")
    return array


def check_same_feature_dim(dim_a: int, dim_b: int, what_a: str = "features", what_b: str = "reference") -> None:
    """Raise ValueError if two feature dimensionalities differ (e.g. samples vs. reference statistics)."""
    if dim_a != dim_b:
        raise ValueError(
            f"feature dimensions differ: {what_a} has {dim_a}-d features but {what_b} has {dim_b}-d features; "
            "both must come from the same feature network"
        )


def warn_if_rank_deficient(num_samples: int, feature_dim: int, what: str = "features") -> bool:
    """Warn (and return True) when there are fewer samples than feature dimensions.

    With N <= D the sample covariance has rank at most N-1 < D, so the Fréchet distance is dominated
    by estimation noise; KID is unbiased and much better behaved for small N.
    """
    if num_samples <= feature_dim:
        warnings.warn(
            f"{what}: only {num_samples} samples for {feature_dim}-d features; the covariance is rank-deficient "
            f"(rank <= {max(num_samples - 1, 0)}) and FID is unreliable. Use more samples than feature "
            "dimensions (ideally >= 10k), or report KID, which is unbiased for small sample sizes.",
            stacklevel=2,
        )
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Feature statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Mean and covariance of a set of feature vectors, plus provenance.

    Attributes:
        mu: (D,) mean feature vector.
        sigma: (D, D) unbiased sample covariance (ddof=1), as TF-FID and pytorch-fid.
        num: number of feature vectors the statistics were computed from.
        network: identifier of the feature network (e.g. ``"inception"`` or ``"classifier:NAME@HASH"``).
        source: free-form description of the images (dataset spec, sample file, ...).
        features: the raw (num, D) features, kept for KID and precision/recall; ``None`` when dropped.
        resolution: side length of the images the features came from (``None``: unknown); samples of another
            resolution are refused by ``evaluate_images``.
        channels: their channel count (1 or 3; ``None``: unknown).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    network: str
    source: str = ""
    features: np.ndarray | None = None
    resolution: int | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1:
            raise ValueError(f"mu must be a 1-D vector, got shape {self.mu.shape}")
        dim = self.mu.shape[0]
        if self.sigma.shape != (dim, dim):
            raise ValueError(f"sigma must have shape ({dim}, {dim}) to match mu, got {self.sigma.shape}")
        if self.features is not None:
            self.features = as_feature_matrix(self.features, "features")
            if self.features.shape != (self.num, dim):
                raise ValueError(
                    f"kept features have shape {self.features.shape}, expected ({self.num}, {dim}) from num and mu"
                )

    @property
    def dim(self) -> int:
        """Feature dimensionality D."""
        return int(self.mu.shape[0])

    @classmethod
    def from_features(
        cls, features: np.ndarray, network: str, source: str = "", keep_features: bool = True
    ) -> "FeatureStats":
        """Compute mean and unbiased covariance of an (N, D) feature matrix (N >= 2)."""
        feats = as_feature_matrix(features)
        if feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors to estimate a covariance, got {feats.shape[0]}")
        mu = feats.mean(axis=0)
        sigma = np.cov(feats, rowvar=False)
        return cls(
            mu=mu,
            sigma=np.atleast_2d(sigma),
            num=feats.shape[0],
            network=network,
            source=source,
            features=feats if keep_features else None,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an uncompressed ``.npz`` (strings stored as numpy unicode, no pickling),
        atomically: a full disk or a kill leaves any previous file at ``path`` intact."""
        from ..fileio import atomic_write_bytes

        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "num": np.asarray(self.num, dtype=np.int64),
            "dim": np.asarray(self.dim, dtype=np.int64),
            "network": np.asarray(self.network, dtype=np.str_),
            "source": np.asarray(self.source, dtype=np.str_),
            "format_version": np.asarray(STATS_FORMAT_VERSION, dtype=np.int64),
        }
        if self.features is not None:
            arrays["features"] = self.features
        for key in ("resolution", "channels"):
            if getattr(self, key) is not None:
                arrays[key] = np.asarray(getattr(self, key), dtype=np.int64)
        # Through a buffer: numpy never appends ".npz" to a path that lacks it, and the file lands in one rename.
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by :meth:`save` (``allow_pickle=False``).

        Raises :class:`NotAStatsFile` for a readable ``.npz`` of something else (e.g. images) and ValueError
        naming the file for a truncated or corrupt one."""
        try:
            return cls._load(path)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(
                f"{os.fspath(path)} is not a readable statistics file ({type(e).__name__}: {e}); it is truncated or "
                "corrupt: recompute it with `cdm stats`"
            ) from None

    @classmethod
    def _load(cls, path: str | os.PathLike) -> "FeatureStats":
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise NotAStatsFile(f"{os.fspath(path)} holds a single array, not feature statistics")
        with data:
            missing = {"mu", "sigma", "num", "network"} - set(data.files)
            if missing:
                raise NotAStatsFile(
                    f"{os.fspath(path)} is not a FeatureStats file: missing {sorted(missing)} "
                    f"(found keys {sorted(data.files)})"
                )
            version = int(data["format_version"]) if "format_version" in data.files else STATS_FORMAT_VERSION
            if version > STATS_FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)} has stats format version {version}; this code reads up to "
                    f"{STATS_FORMAT_VERSION}"
                )
            stats = cls(
                mu=data["mu"],
                sigma=data["sigma"],
                num=int(data["num"]),
                network=str(data["network"]),
                source=str(data["source"]) if "source" in data.files else "",
                features=data["features"] if "features" in data.files else None,
                resolution=int(data["resolution"]) if "resolution" in data.files else None,
                channels=int(data["channels"]) if "channels" in data.files else None,
            )
            if stats.resolution is None:  # older files: reference_stats wrote "SPEC @ 32px, n=N" as the source
                match = re.search(r" @ (\d+)px", stats.source)
                stats.resolution = int(match.group(1)) if match else None
            if "dim" in data.files and int(data["dim"]) != stats.dim:
                raise ValueError(f"{os.fspath(path)} is inconsistent: dim={int(data['dim'])} but mu has {stats.dim}")
        return stats


class NotAStatsFile(ValueError):
    """A readable ``.npz`` that does not hold :class:`FeatureStats` (e.g. an image file)."""


def check_images_match(images_shape: tuple[int, ...], reference: FeatureStats, what: str = "samples") -> None:
    """Raise ValueError unless N×H×W×C images have the resolution and channels ``reference`` was computed at
    (when it records them): an 8×8 set scored against 32×32 statistics gives a large, meaningless FID."""
    h, w, c = (int(v) for v in images_shape[1:4])
    where = f"the reference statistics ({reference.source or 'unnamed'})"
    if reference.resolution is not None and (h, w) != (reference.resolution, reference.resolution):
        raise naming(ValueError, "{what} are {h}x{w} but {where} were computed at {r}x{r}; scores across "
                     "resolutions are meaningless. Recompute the reference statistics with {resolution} {h} or pass a "
                     "dataset spec as {option}", {"option": "reference", "resolution": "resolution"}, what=what, h=h,
                     w=w, where=where, r=reference.resolution)
    if reference.channels is not None and c != reference.channels:
        raise naming(ValueError, "{what} have {c} channel(s) but {where} were computed from {rc}-channel images. "
                     "Recompute the reference statistics with {channels} {c} or pass a dataset spec as {option}",
                     {"option": "reference", "channels": "channels"}, what=what, c=c, where=where, rc=reference.channels)


def check_compatible(stats: FeatureStats, reference: FeatureStats) -> None:
    """Raise ValueError unless two statistics come from the same feature network and dimensionality."""
    check_same_feature_dim(stats.dim, reference.dim, f"stats ({stats.source or 'unnamed'})", "reference stats")
    if stats.network != reference.network:
        raise ValueError(
            f"feature networks differ: stats were computed with '{stats.network}' but the reference with "
            f"'{reference.network}'; recompute one of them with the same feature network"
        )
