"""The shipped 256 px emoji cascade (16 -> 64 -> 256, colour): README's command works from any directory and writes
256x256 RGB images of mostly white emoji, the bundle is the measured 16 -> 64 -> 256 chain with its classifier and
the artwork's attribution, and it stays under the 40 MB a pip install can carry."""

from __future__ import annotations

import json

import numpy as np

from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.pretrained import PRETRAINED_ROOT

ROOT = PRETRAINED_ROOT / "emoji-256"


def test_readme_emoji256_command_from_another_directory(readme_sample):
    # README samples 16; 2 keep this 256 px test to ~15 CPU-seconds (10 top-stage steps per image)
    images, labels = readme_sample("emoji-256", 2)
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1]
    # colour (R != B somewhere in every image) over a mostly white background, as the data
    spread = np.abs(images[..., 0].astype(int) - images[..., 2].astype(int)).mean(axis=(1, 2))
    assert (spread > 3).all(), spread
    assert 150 < images.mean() < 245, images.mean()
    corners = np.concatenate([images[:, :8, :8], images[:, :8, -8:]], axis=1)
    assert corners.mean() > 200, corners.mean()


def test_emoji256_bundle_is_the_measured_chain_with_classifier_and_attribution():
    manifest = json.loads((ROOT / "cascade.json").read_text())
    cascade = Cascade.load(pretrained="emoji-256")
    assert cascade.resolutions == [16, 64, 256]
    assert all(s.channels == 3 and s.num_classes == 9 for s in cascade.stages)
    top = cascade.stages[2]
    assert top.config.conditioning.augmentation in ("blur", "none", "noise")
    chosen = manifest["study"]["top_sampler"]
    assert (top.config.sample.sampler, top.config.sample.steps) == (chosen["sampler"], chosen["steps"])
    assert (ROOT / "classifier.safetensors").is_file()
    attribution = (ROOT / "ATTRIBUTION.md").read_text()
    for credit in ("Twemoji", "CC-BY 4.0", "Noto", "Apache", "OpenMoji", "CC BY-SA 4.0"):
        assert credit in attribution, credit
    size = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    assert size < 40 * 2**20, size
