"""A bundle records its sampling mode (truncated or not) in cascade.json; `cdm sample --pretrained` uses it
unless told otherwise, and run directories default to non-truncated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cascaded_diffusion.pretrained as pretrained
from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.cli.main import main

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_run"


@pytest.fixture
def bundle_root(tmp_path, monkeypatch):
    root = tmp_path / "pretrained"
    for truncated in (True, False):
        bundle = root / f"tiny-{'trunc' if truncated else 'plain'}"
        for stage in ("base8", "sr8to16"):
            shutil.copytree(FIXTURE / stage, bundle / stage)
        (bundle / "cascade.json").write_text(json.dumps(
            {"name": bundle.name, "stages": ["base8", "sr8to16"], "sampling": {"truncated": truncated}}))
    monkeypatch.setattr(pretrained, "PRETRAINED_ROOT", root)
    return root


def test_the_bundle_mode_is_the_default_and_the_flag_overrides_it(bundle_root, tmp_path):
    assert Cascade.load(pretrained="tiny-trunc").default_truncated is True
    assert Cascade.load(pretrained="tiny-plain").default_truncated is False
    assert Cascade.load([FIXTURE / "base8", FIXTURE / "sr8to16"]).default_truncated is False

    def sample(name, *flags):
        out = tmp_path / f"{name}{''.join(flags)}.npz"
        assert main(["sample", "--pretrained", name, "--num", "4", "--out", str(out), "--quiet",
                     "--device", "cpu", *flags]) == 0
        return np.load(out)["arr_0"]

    # the SR stage's sample_s is 10 > 0, so the two modes draw different images from the same seed
    by_default = sample("tiny-trunc")
    assert np.array_equal(by_default, sample("tiny-trunc", "--truncated"))
    assert np.array_equal(by_default, sample("tiny-plain", "--truncated"))
    assert not np.array_equal(by_default, sample("tiny-trunc", "--no-truncated"))
    assert np.array_equal(sample("tiny-trunc", "--no-truncated"), sample("tiny-plain"))
