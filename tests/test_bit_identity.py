"""Issue 16's acceptance: a run directory made by the code before the redesign (tests/fixtures/tiny_run) and the
shipped pretrained bundle load and sample bit-identically to what that code produced
(tests/fixtures/bit_identity.npz, written by tests/fixtures/make_bit_identity.py).

One deliberate change since: issue 17 seeds every sample of ``cdm sample`` from (seed, sample index), so its
samples are the same for any batch size and number of processes; ``cli_sample_uint8`` was re-recorded once then
(the library-level cases, which pass a plain torch.Generator, are still the pre-redesign bytes)."""

from __future__ import annotations

import numpy as np
import pytest

from bit_identity_cases import CASES, FIXTURES, cli_sample, sample_case


@pytest.fixture(scope="module")
def recorded():
    with np.load(FIXTURES / "bit_identity.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", sorted(CASES))
def test_samples_are_bit_identical(name, recorded):
    got = sample_case(name)
    assert got.dtype == recorded[name].dtype and got.shape == recorded[name].shape
    assert np.array_equal(got, recorded[name]), f"{name}: max |diff| {np.abs(got - recorded[name]).max()}"


def test_cdm_sample_is_bit_identical(tmp_path, recorded):
    assert np.array_equal(cli_sample(tmp_path), recorded["cli_sample_uint8"])
