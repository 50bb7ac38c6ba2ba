"""TF-FID Inception port: architecture, TF1 resize, weight loading paths and error messages.

No real weights are available offline, so the test writes a randomly initialised state dict of the
port (torch.save and safetensors) and loads it through every supported route.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cascaded_diffusion.evaluation import inception as inception_module
from cascaded_diffusion.evaluation import inception_weights as weights_module
from cascaded_diffusion.evaluation.features import InceptionFeatureExtractor, get_feature_extractor
from cascaded_diffusion.evaluation.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    FIDInceptionV3,
    load_inception,
    preprocess_uint8,
    resize_bilinear_tf1,
)


def randomized_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-init state dict with non-trivial BN statistics (so that loading them matters)."""
    torch.manual_seed(seed)
    state = FIDInceptionV3().state_dict()
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.endswith("running_mean") or key.endswith("bn.bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The same random weights as .pth (with BN counters) and .safetensors (without them)."""
    directory = tmp_path_factory.mktemp("inception")
    state = randomized_state_dict()
    pth = directory / INCEPTION_WEIGHTS_FILENAME
    torch.save(state, pth)
    converted = {k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    safetensors_path = directory / "inception.safetensors"
    save_file(converted, str(safetensors_path))
    return {"state": state, "pth": pth, "safetensors": safetensors_path}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def gray_image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(1, 32, 32, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference_outputs(weights, images, gray_image):
    """Outputs of a model given the state dict directly: the 2 RGB images, then the gray one as RGB."""
    model = FIDInceptionV3().eval()
    model.load_state_dict(weights["state"])
    batch = np.concatenate([images, np.repeat(gray_image, 3, axis=-1)])
    with torch.no_grad():
        return model(torch.from_numpy(batch).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------
# Architecture and preprocessing
# ----------------------------------------------------------------------------------------------


def test_architecture_matches_pytorch_fid_layout() -> None:
    state = FIDInceptionV3().state_dict()
    # torchvision's Inception-v3 without the aux head has 23,834,568 parameters for 1000 classes;
    # the FID graph has 1008 classes: 8 more rows of (2048 weights + 1 bias).
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == (
        23_834_568 + 8 * 2049
    )
    for key in [
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_4a_3x3.bn.running_var",
        "Mixed_5b.branch5x5_2.conv.weight",
        "Mixed_6a.branch3x3dbl_3.conv.weight",
        "Mixed_6e.branch7x7dbl_5.bn.weight",
        "Mixed_7a.branch7x7x3_4.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.running_mean",
        "fc.bias",
    ]:
        assert key in state
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(key.startswith("AuxLogits") for key in state)


def test_tf1_resize_known_values() -> None:
    # TF1 legacy resize samples at dst * in / out (no half-pixel offset): [0, 1] -> [0, .5, 1, 1].
    x = torch.tensor([[[[0.0, 1.0]]]])
    np.testing.assert_allclose(resize_bilinear_tf1(x, (1, 4))[0, 0, 0].numpy(), [0.0, 0.5, 1.0, 1.0])
    # Downscaling 4 -> 2 picks source pixels 0 and 2 exactly (no averaging, no antialiasing).
    y = torch.tensor([[[[10.0, 20.0, 30.0, 40.0]]]])
    np.testing.assert_allclose(resize_bilinear_tf1(y, (1, 2))[0, 0, 0].numpy(), [10.0, 30.0])


def test_tf1_resize_matches_direct_formula() -> None:
    rng = np.random.default_rng(1)
    source = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    out_h, out_w = 11, 4
    expected = np.empty((2, 3, out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        fy = i * 5 / out_h
        y0 = int(np.floor(fy)); y1 = min(y0 + 1, 4); wy = fy - y0  # noqa: E702
        for j in range(out_w):
            fx = j * 7 / out_w
            x0 = int(np.floor(fx)); x1 = min(x0 + 1, 6); wx = fx - x0  # noqa: E702
            top = source[..., y0, x0] * (1 - wx) + source[..., y0, x1] * wx
            bottom = source[..., y1, x0] * (1 - wx) + source[..., y1, x1] * wx
            expected[..., i, j] = top * (1 - wy) + bottom * wy
    actual = resize_bilinear_tf1(torch.from_numpy(source), (out_h, out_w)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_grayscale_repeats_and_normalizes() -> None:
    gray = torch.tensor([[[[0, 128], [255, 64]]]], dtype=torch.uint8)
    x = preprocess_uint8(gray)
    assert x.shape == (1, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    assert x[0, 0, 0, 0].item() == pytest.approx(-1.0)  # pixel 0 -> (0 - 128) / 128
    assert x.max().item() == pytest.approx((255 - 128) / 128)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        preprocess_uint8(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 255\], got negative"):
        preprocess_uint8(torch.rand(1, 3, 8, 8) * 2 - 1)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_load_from_path_argument(weights, images, reference_outputs) -> None:
    model = load_inception(weights["pth"])
    assert not model.training
    with torch.no_grad():
        features, logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(features, reference_outputs[0][:2])
    torch.testing.assert_close(logits, reference_outputs[1][:2])
    # Logits omit the fc bias (original IS code); the bias is non-zero here, so this is a real check.
    assert model.fc.bias.abs().max() > 0
    torch.testing.assert_close(logits, features @ model.fc.weight.T)


def test_load_safetensors_via_env_var_through_feature_extractor(
    weights, images, gray_image, reference_outputs, monkeypatch
) -> None:
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(weights["safetensors"]))
    extractor = get_feature_extractor("inception")
    assert isinstance(extractor, InceptionFeatureExtractor)
    assert (extractor.name, extractor.dim) == ("inception", 2048)
    features, probs = extractor.features_and_probs(images)
    assert features.dtype == np.float64 and features.shape == (2, 2048)
    assert probs.shape == (2, 1008)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(features, reference_outputs[0][:2].double().numpy(), rtol=1e-5, atol=1e-6)
    # Grayscale input is the same as its RGB replication.
    np.testing.assert_allclose(
        extractor.features(gray_image), reference_outputs[0][2:].double().numpy(), rtol=1e-5, atol=1e-6
    )


def test_missing_path_argument_error_names_path_and_env_var(tmp_path) -> None:
    missing = tmp_path / "nowhere" / INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        load_inception(missing)
    message = str(info.value)
    assert str(missing) in message and INCEPTION_WEIGHTS_ENV in message and "pytorch-fid" in message


def test_missing_env_var_file_error(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "env.pth"
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_ENV) as info:
        load_inception()
    assert str(missing) in str(info.value)


def test_missing_cache_without_download_names_cache_path(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "cascaded_diffusion" / INCEPTION_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as info:
        load_inception(download=False)
    assert str(expected) in str(info.value) and INCEPTION_WEIGHTS_ENV in str(info.value)


def test_failed_download_gives_instructions_and_leaves_no_file(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # Port 9 (discard) on localhost refuses connections immediately: a fast, offline failure.
    monkeypatch.setattr(weights_module, "INCEPTION_WEIGHTS_URL", "http://127.0.0.1:9/weights.pth")
    with pytest.raises(FileNotFoundError, match="downloading it failed") as info:
        load_inception()
    assert INCEPTION_WEIGHTS_ENV in str(info.value)
    assert not (tmp_path / ".cache" / "cascaded_diffusion" / INCEPTION_WEIGHTS_FILENAME).exists()


def test_cache_path_is_used_when_present(weights, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    # the cached file is checked against the hash prefix in its name: name the random weights after their own hash
    prefix = inception_module.file_sha256(weights["pth"], length=8)
    monkeypatch.setattr(weights_module, "INCEPTION_WEIGHTS_FILENAME", f"pt_inception-test-{prefix}.pth")
    cached = tmp_path / ".cache" / "cascaded_diffusion" / f"pt_inception-test-{prefix}.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights["pth"])
    assert inception_module.resolve_inception_weights(download=False) == cached


def test_rejects_wrong_state_dict(tmp_path, weights) -> None:
    state = dict(weights["state"])
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\].*unexpected keys \['extra.weight'\]"):
        load_inception(path)


class NotATensor:
    pass


def test_never_unpickles_arbitrary_objects(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": NotATensor()}, path)
    with pytest.raises(inception_module.WeightsFileError, match="UnpicklingError"):  # refused, not unpickled
        load_inception(path)
