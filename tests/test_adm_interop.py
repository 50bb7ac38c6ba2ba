"""Interop with guided-diffusion (ADM): its reference batches as `cdm eval --ref`, and our sample npz in the
layout its evaluator streams (uncompressed arr_0.npy with a version 1.0 header, uint8 NHWC; arr_1 int64)."""

from __future__ import annotations

import json
import warnings
import zipfile

import numpy as np
import pytest

from cascaded_diffusion.cli import main
from cascaded_diffusion.evaluation.evaluate import adm_precomputed_stats, reference_stats


def adm_reference_batch(path, images, mu, sigma):
    """What guided-diffusion's evaluations/README.md ships: arr_0 plus precomputed statistics."""
    np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:3], sigma_s=sigma[:3, :3])
    return path


def rgb_images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 1, 3))
    noise = rng.integers(-40, 40, size=(n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class TinyExtractor:
    """A 4-d 'Inception': channel means and overall std, enough to check how the reference is used."""

    name = "inception"

    def features(self, images):
        x = images.astype(np.float64) / 255.0
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2, 3))[:, None]], axis=1)


def test_precomputed_statistics_cross_check_the_inception_features(tmp_path):
    images = rgb_images(80)
    features = TinyExtractor().features(images)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    good = adm_reference_batch(tmp_path / "VIRTUAL_tiny_labeled.npz", images, mu, sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = reference_stats(str(good), TinyExtractor(), resolution=32, channels=3, cache_dir=tmp_path / "c")
    assert "guided-diffusion reference batch; FID 0.0000 to its precomputed mu/sigma" in stats.source
    assert np.allclose(stats.mu, mu) and stats.num == 80
    bad = adm_reference_batch(tmp_path / "bad.npz", images, mu + 3.0, sigma)
    with pytest.warns(UserWarning, match="not comparable"):
        reference_stats(str(bad), TinyExtractor(), resolution=32, channels=3, cache_dir=tmp_path / "c")
    # statistics without the images are refused with a clear message
    np.savez(tmp_path / "only_stats.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="no arr_0 images"):
        adm_precomputed_stats(tmp_path / "only_stats.npz")
    # a plain image npz is not a reference batch
    np.savez(tmp_path / "plain.npz", arr_0=images)
    assert adm_precomputed_stats(tmp_path / "plain.npz") is None


def test_cdm_eval_accepts_an_adm_reference_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cache"))
    samples = tmp_path / "samples.npz"
    assert main(["sample", "--pretrained", "fashion-mnist", "--num", "20", "--steps", "2", "--device", "cpu",
                 "--out", str(samples), "--quiet"]) == 0
    ref = adm_reference_batch(tmp_path / "VIRTUAL_tiny_labeled.npz", rgb_images(40, seed=1),
                              np.zeros(2048), np.eye(2048))  # RGB, no labels, Inception-sized statistics
    out = tmp_path / "m.json"
    assert main(["eval", str(samples), "--ref", str(ref), "--features", "classifier", "--metrics", "fid,kid",
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and np.isfinite(result["fid"])
    assert "guided-diffusion reference batch" in result["reference"]["source"]
    assert "not used with classifier" in result["reference"]["source"]


def read_like_adm_evaluator(path, name):
    """guided-diffusion evaluations/evaluator.py: open_npz_array + StreamingNpzArrayReader, condensed."""
    with zipfile.ZipFile(path, "r") as archive:
        assert f"{name}.npy" in archive.namelist()
        info = archive.getinfo(f"{name}.npy")
        assert info.compress_type == zipfile.ZIP_STORED
        with archive.open(f"{name}.npy", "r") as f:
            version = np.lib.format.read_magic(f)
            assert version in ((1, 0), (2, 0))
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            assert not fortran and dtype.hasobject is False
            data = f.read(int(np.prod(shape)) * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def test_our_sample_npz_streams_through_the_adm_evaluator_reader(tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--pretrained", "fashion-mnist", "--num", "6", "--steps", "1", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    images = read_like_adm_evaluator(out, "arr_0")
    labels = read_like_adm_evaluator(out, "arr_1")
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 1)
    assert labels.dtype == np.int64 and labels.shape == (6,)
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)
