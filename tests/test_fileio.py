"""cascaded_diffusion.fileio: one cache root for every cache, atomic writes, sample files, the grid by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cascaded_diffusion import fileio, images
from cascaded_diffusion.evaluation.evaluate import default_stats_cache
from cascaded_diffusion.evaluation.inception import default_inception_cache_path


def test_every_cache_lives_under_cdm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cdm"))
    assert fileio.cache_dir("data") == tmp_path / "cdm" / "data"
    assert default_stats_cache() == tmp_path / "cdm" / "stats"
    assert default_inception_cache_path().parent == tmp_path / "cdm"
    monkeypatch.delenv("CDM_CACHE")
    assert default_inception_cache_path().parent == Path.home() / ".cache" / "cascaded_diffusion"


def test_atomic_replace_keeps_the_old_file_when_the_writer_refuses(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")

    def refuse(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise ValueError("bad hash")

    with pytest.raises(ValueError, match="bad hash"):
        fileio.atomic_replace(target, refuse)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    fileio.atomic_replace(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]


def test_samples_npz_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
    fileio.save_samples_npz(tmp_path / "sub" / "s.npz", images, np.array([3, 1], dtype=np.int32))
    got, labels = fileio.read_samples_npz(tmp_path / "sub" / "s.npz")
    assert np.array_equal(got, images) and labels.dtype == np.int64 and labels.tolist() == [3, 1]


def test_grid_by_class_shows_every_stage_upsampled_side_by_side() -> None:
    low = np.full((4, 2, 2, 1), 10, np.uint8)
    high = np.full((4, 4, 4, 1), 200, np.uint8)
    grid = images.grid_by_class([low, high], np.array([0, 0, 1, 1]), per_class=2, min_tile=8)
    # 2 rows (classes) x 4 tiles (2 samples x 2 stages) of 8 px, padding 2
    assert grid.shape == (2 * 10 + 2, 4 * 10 + 2, 1)
    assert (grid[2:10, 2:10] == 10).all() and (grid[2:10, 12:20] == 200).all()
