"""The paper's ImageNet stages (Appendix B) build at full size on the meta device (no memory, no compute)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascaded_diffusion.config import load_config
from cascaded_diffusion.stage import build_network

ROOT = Path(__file__).resolve().parents[1]

# name: (parameters, attention layers, input channels, output channels)
EXPECTED = {
    # ch 256, mult 1,2,3,4, 6 blocks, attention at 16 and 8: 12 encoder + 1 middle + 14 decoder layers
    "base32": (825_506_566, 27, 3, 6),
    # ch 256, mult 1,2,3,4, 5 blocks, attention at 16 and 8; x_t and the upsampled 32px image concatenated
    "sr32to64": (751_691_782, 23, 6, 6),
    # ch 128, mult 1,2,4,8,8, 3 blocks, attention at 16 only; fixed variances
    "sr64to128": (575_283_715, 3 + 1 + 4, 6, 3),
    "sr64to256": (634_046_979, 3 + 1 + 4, 6, 3),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_imagenet_stage_builds_at_full_size(name):
    config = load_config(ROOT / "configs/imagenet" / f"{name}.toml")
    net = build_network(config, "meta")
    params, attention, in_ch, out_ch = EXPECTED[name]
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == params
    assert sum(1 for k in state if k.endswith("qkv.weight")) == attention
    assert state["input_conv.weight"].shape[1] == in_ch
    assert state["out_conv.weight"].shape[0] == out_ch
    assert ("aug_embed.0.weight" in state) == (config.conditioning.augmentation == "noise" and config.is_sr)
    # Appendix B: the 32->64 model is trained with noise augmentation, the 64->128/256 ones with blur
    expected_aug = {"base32": "none", "sr32to64": "noise", "sr64to128": "blur", "sr64to256": "blur"}[name]
    assert config.conditioning.augmentation == expected_aug
