"""Tests for the dataset specs (data, readers, imagefolder, caching), BatchStream, tensor conversion, grids."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascaded_diffusion.data import partial, readers
from cascaded_diffusion.data import load_images
from cascaded_diffusion.data.loader import BatchStream
from cascaded_diffusion.data.readers import FASHION_MNIST_CLASSES, ImageArray
from cascaded_diffusion.images import images_to_tensor, make_grid, save_grid, tensor_to_images

FASHION_DIR = Path(readers.FASHION_MNIST_DEFAULT_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)",
)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------


def _read_raw_idx_images(path: Path) -> np.ndarray:
    """Independent reader: the idx3 header is 16 bytes, images are 28x28 uint8."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)


@pytest.fixture(scope="module")
def fashion_train() -> ImageArray:
    return load_images("fashion-mnist", 32)


@pytest.fixture(scope="module")
def fashion_test() -> ImageArray:
    return load_images("fashion-mnist:test", 32)


@needs_fashion_mnist
def test_fashion_mnist_train_shapes_labels_and_zero_padding(fashion_train: ImageArray) -> None:
    ds = fashion_train
    assert ds.images.shape == (60000, 32, 32, 1) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (60000,) and ds.labels.dtype == np.int64
    assert set(np.unique(ds.labels).tolist()) == set(range(10))
    assert ds.num_classes == 10 and ds.class_names == FASHION_MNIST_CLASSES
    assert ds.source == "fashion-mnist:train"
    # 2-pixel zero border on every side, original pixels untouched inside.
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert ds.images[:, border, 0].max() == 0
    raw = _read_raw_idx_images(FASHION_DIR / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(ds.images[:, 2:30, 2:30, 0], raw)


@needs_fashion_mnist
def test_fashion_mnist_test_split(fashion_test: ImageArray) -> None:
    assert fashion_test.images.shape == (10000, 32, 32, 1)
    assert fashion_test.labels.min() == 0 and fashion_test.labels.max() == 9
    assert fashion_test.source == "fashion-mnist:test"


@needs_fashion_mnist
def test_fashion_mnist_resize_to_8_is_a_box_average(fashion_test: ImageArray) -> None:
    small = load_images("fashion-mnist:test", 8)
    assert small.images.shape == (10000, 8, 8, 1)
    np.testing.assert_array_equal(small.labels, fashion_test.labels)
    # 32 -> 8 with a BOX filter is the mean of each 4x4 block (up to rounding).
    block_mean = fashion_test.images[:500, :, :, 0].reshape(500, 8, 4, 8, 4).mean(axis=(2, 4))
    assert np.abs(small.images[:500, :, :, 0].astype(float) - block_mean).max() <= 1.0


@needs_fashion_mnist
def test_fashion_mnist_rgb_replicates_gray(fashion_test: ImageArray) -> None:
    rgb = load_images("fashion-mnist:test", 32, channels=3)
    assert rgb.images.shape == (10000, 32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb.images[..., c], fashion_test.images[..., 0])


def test_fashion_mnist_missing_dir_error_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_images("fashion-mnist", 32, root=tmp_path / "nowhere")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "https://github.com/zalandoresearch/fashion-mnist" in message
    assert "CDM_FASHION_MNIST" in message


def _write_idx(path: Path, magic: int, array: np.ndarray, truncate_to: int | None = None) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    payload = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(payload)
    if truncate_to is not None:
        path.write_bytes(path.read_bytes()[:truncate_to])


def _write_fake_fashion(directory: Path, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for split_images, split_labels in (readers.FASHION_MNIST_FILES["train"], readers.FASHION_MNIST_FILES["test"]):
        _write_idx(directory / split_images, 0x803, images)
        _write_idx(directory / split_labels, 0x801, labels)
    return images, labels


def test_fashion_mnist_env_var_and_synthetic_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _write_fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("CDM_FASHION_MNIST", str(tmp_path / "fm"))
    ds = load_images("fashion-mnist:test", 32)
    assert ds.images.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(ds.images[:, 2:30, 2:30, 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.images[:, :2].max() == 0 and ds.images[:, :, 30:].max() == 0


def test_fashion_mnist_corrupt_files_raise_clearly(tmp_path: Path) -> None:
    directory = tmp_path / "fm"
    images, labels = _write_fake_fashion(directory)
    image_file = directory / "train-images-idx3-ubyte.gz"

    _write_idx(image_file, 0x801, images)  # labels magic on an image file
    with pytest.raises(ValueError, match="magic"):
        load_images("fashion-mnist", 32, root=directory)

    full_size = len(gzip.compress(np.zeros(16 + images.size, np.uint8).tobytes()))
    _write_idx(image_file, 0x803, images, truncate_to=full_size // 2)  # cut the gzip stream
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_images("fashion-mnist", 32, root=directory)

    header = np.array([0x803, 6, 28, 28], dtype=">u4").tobytes()  # header claims one image more
    with gzip.open(image_file, "wb") as f:
        f.write(header + images.tobytes())
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_images("fashion-mnist", 32, root=directory)

    _write_idx(image_file, 0x803, images[:4])
    with pytest.raises(ValueError, match="4 images but 5 labels"):
        load_images("fashion-mnist", 32, root=directory)


def test_unknown_spec_lists_valid_forms() -> None:
    with pytest.raises(ValueError) as info:
        load_images("cifar10", 32)
    for form in ("fashion-mnist", "fashion-mnist:test", "imagefolder:PATH", "npz:PATH"):
        assert form in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_images("fashion-mnist:validation", 32)
    with pytest.raises(ValueError, match="resolution"):
        load_images("fashion-mnist", 0)
    with pytest.raises(ValueError, match="channels"):
        load_images("fashion-mnist", 32, channels=2)


# ----------------------------------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------------------------------


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def _build_folder(root: Path) -> Path:
    """Two classes; 'dog' holds a garbage .png and a truncated .jpg besides two good JPEGs."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    _solid((255, 0, 0)).save(root / "cat" / "a.png")
    _solid((0, 255, 0)).save(root / "cat" / "b.png")
    _solid((0, 0, 255), (20, 12)).save(root / "cat" / "c.png")
    _solid((200, 200, 200), (20, 20)).save(root / "dog" / "a.jpg", quality=95)
    _solid((50, 50, 50), (20, 20)).save(root / "dog" / "b.jpg", quality=95)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "dog" / "cut.jpg", quality=95)
    jpeg = (root / "dog" / "cut.jpg").read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_skips_corrupt_files_with_warning(tmp_path: Path) -> None:
    folder = _build_folder(tmp_path / "images")
    with pytest.warns(UserWarning, match=r"skipped 2 of 7") as record:
        ds = load_images(f"imagefolder:{folder}", 8, cache_dir=tmp_path / "cache")
    message = str(record[0].message)
    assert "broken.png" in message and "cut.jpg" in message
    assert ds.images.shape == (5, 8, 8, 3)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.source == f"imagefolder:{folder.resolve()}"
    np.testing.assert_array_equal(ds.images[0], np.broadcast_to([255, 0, 0], (8, 8, 3)))
    np.testing.assert_array_equal(ds.images[2], np.broadcast_to([0, 0, 255], (8, 8, 3)))
    assert np.abs(ds.images[3].astype(int) - 200).max() <= 3  # JPEG of a flat colour


def test_imagefolder_on_corrupt_error_names_the_path(tmp_path: Path) -> None:
    folder = _build_folder(tmp_path / "images")
    with pytest.raises(ValueError, match=r"broken\.png"):
        load_images(f"imagefolder:{folder}", 8, cache_dir=tmp_path / "cache", on_corrupt="error")
    assert not list((tmp_path / "cache").glob("*/manifest.json")), "a failed build must not leave a valid cache"
    assert not list((tmp_path / "cache").rglob("*.tmp*")), "temporary files must be cleaned up"


def test_imagefolder_cache_created_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _build_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    spec = f"imagefolder:{folder}"
    with pytest.warns(UserWarning):
        first = load_images(spec, 8, cache_dir=cache)
    # the cache entry is a prepared dataset (cascaded_diffusion.data.prepare) at the one resolution
    manifests = list(cache.glob("*/manifest.json"))
    assert len(manifests) == 1 and len(list(cache.glob("*/*.npy"))) == 2
    manifest = json.loads(manifests[0].read_text())
    assert manifest["source"] == spec.replace(str(folder), str(folder.resolve()))
    fingerprint = manifest["fingerprint"]
    assert manifest["resolutions"] == [8] and fingerprint["file_count"] == 7 and manifest["num_images"] == 5
    image_files = [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt"]
    assert fingerprint["total_bytes"] == sum(p.stat().st_size for p in image_files)
    assert len(fingerprint["mtimes_hash"]) == 64 and len(manifest["skipped"]) == 2
    assert isinstance(first.images, np.memmap)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoding ran although the cache is valid")

    monkeypatch.setattr(partial, "_decode_chunk", must_not_decode)
    with pytest.warns(UserWarning, match="skipped 2"):  # the cached skip list is still reported
        again = load_images(spec, 8, cache_dir=cache)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)

    monkeypatch.undo()
    original = partial._decode_chunk
    calls = []

    def counting_decode(job):
        calls.extend(job[2])  # the chunk's files
        return original(job)

    monkeypatch.setattr(partial, "_decode_chunk", counting_decode)
    _solid((10, 20, 30)).save(folder / "dog" / "c.png")
    with pytest.warns(UserWarning):
        grown = load_images(spec, 8, cache_dir=cache)
    assert len(calls) == 8, "adding a file must rebuild the cache"
    assert len(grown) == 6 and grown.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(grown.images[5], np.broadcast_to([10, 20, 30], (8, 8, 3)))
    assert len(list(cache.glob("*/manifest.json"))) == 1, "the rebuilt cache replaces the old one"

    # Editing a file in place (same name, new content and mtime) also invalidates it.
    calls.clear()
    _solid((0, 255, 255)).save(folder / "cat" / "a.png")
    stat = (folder / "cat" / "a.png").stat()
    os.utime(folder / "cat" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning):
        edited = load_images(spec, 8, cache_dir=cache)
    assert len(calls) == 8
    np.testing.assert_array_equal(edited.images[0], np.broadcast_to([0, 255, 255], (8, 8, 3)))

    # A different resolution gets its own cache entry.
    with pytest.warns(UserWarning):
        assert load_images(spec, 4, cache_dir=cache).images.shape == (6, 4, 4, 3)
    assert len(list(cache.glob("*/manifest.json"))) == 2


def test_imagefolder_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    (folder / "only").mkdir(parents=True)
    _solid((1, 2, 3)).save(folder / "only" / "x.png")
    monkeypatch.setenv("CDM_CACHE", str(tmp_path / "cdm"))
    ds = load_images(f"imagefolder:{folder}", 8)
    assert len(list((tmp_path / "cdm" / "data").glob("*/manifest.json"))) == 1
    assert ds.images.shape == (1, 8, 8, 3)


def test_imagefolder_without_cache_writes_nothing(tmp_path: Path) -> None:
    folder = _build_folder(tmp_path / "images")
    with pytest.warns(UserWarning):
        ds = load_images(f"imagefolder:{folder}", 8, cache_dir=tmp_path / "cache", use_cache=False, num_workers=1)
    assert len(ds) == 5 and not isinstance(ds.images, np.memmap)
    assert not (tmp_path / "cache").exists()


def _thirds(size: tuple[int, int], vertical: bool) -> Image.Image:
    """Red / green / blue thirds along the long side."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    long_side = h if vertical else w
    for i, color in enumerate(([255, 0, 0], [0, 255, 0], [0, 0, 255])):
        sl = slice(i * long_side // 3, (i + 1) * long_side // 3)
        if vertical:
            array[sl] = color
        else:
            array[:, sl] = color
    return Image.fromarray(array)


def test_imagefolder_center_crops_non_square_images(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "shapes").mkdir(parents=True)
    _thirds((24, 8), vertical=False).save(folder / "shapes" / "a_wide.png")
    _thirds((8, 24), vertical=True).save(folder / "shapes" / "b_tall.png")
    _thirds((96, 32), vertical=False).save(folder / "shapes" / "c_wide_big.png")  # BOX-halved twice first
    ds = load_images(f"imagefolder:{folder}", 8, cache_dir=tmp_path / "cache")
    green = np.broadcast_to(np.array([0, 255, 0], np.uint8), (8, 8, 3))
    for i in range(3):
        np.testing.assert_array_equal(ds.images[i], green, err_msg=f"image {i} not center-cropped")


def test_imagefolder_grayscale_matches_pil_luma(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "k").mkdir(parents=True)
    _solid((200, 100, 50)).save(folder / "k" / "x.png")
    ds = load_images(f"imagefolder:{folder}", 8, channels=1, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (1, 8, 8, 1)
    expected = np.asarray(_solid((200, 100, 50)).convert("L"))[0, 0]
    assert (ds.images == expected).all()


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_images(f"imagefolder:{tmp_path / 'missing'}", 8)
    (tmp_path / "flat").mkdir()
    _solid((0, 0, 0)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="class subfolders"):
        load_images(f"imagefolder:{tmp_path / 'flat'}", 8, cache_dir=tmp_path / "cache")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        load_images(f"imagefolder:{tmp_path / 'empty'}", 8, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="PATH"):
        load_images("imagefolder:", 8)


# ----------------------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0, 1])
    np.savez(tmp_path / "s.npz", images, labels)
    ds = load_images(f"npz:{tmp_path / 's.npz'}", 8)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 3 and ds.class_names == ["0", "1", "2"]

    np.savez(tmp_path / "nolabels.npz", images)
    ds = load_images("npz:nolabels.npz", 8, root=tmp_path)  # relative PATH resolved against root
    assert ds.labels.tolist() == [0] * 6 and ds.num_classes == 1


def test_npz_resize_and_channel_conversion(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    images[0] = 77  # a flat image must stay flat through the resize
    np.savez(tmp_path / "big.npz", images)
    ds = load_images(f"npz:{tmp_path / 'big.npz'}", 8)
    assert ds.images.shape == (3, 8, 8, 3)
    assert (ds.images[0] == 77).all()
    # 16 -> 8 is one BOX halving: 2x2 block means.
    block = images[1].reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
    assert np.abs(ds.images[1].astype(float) - block).max() <= 1.0

    gray = load_images(f"npz:{tmp_path / 'big.npz'}", 16, channels=1)
    assert gray.images.shape == (3, 16, 16, 1)
    np.testing.assert_array_equal(gray.images[1, :, :, 0], np.asarray(Image.fromarray(images[1]).convert("L")))

    np.savez(tmp_path / "gray.npz", images[:, :, :, :1])
    rgb = load_images(f"npz:{tmp_path / 'gray.npz'}", 16, channels=3)
    assert rgb.images.shape == (3, 16, 16, 3)
    assert (rgb.images == rgb.images[..., :1]).all()


def test_npz_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    good = np.zeros((2, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "named.npz", images=good)
    with pytest.raises(ValueError, match="arr_0"):
        load_images(f"npz:{tmp_path / 'named.npz'}", 8)
    np.savez(tmp_path / "float.npz", good.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_images(f"npz:{tmp_path / 'float.npz'}", 8)
    np.savez(tmp_path / "rank3.npz", good[..., 0])
    with pytest.raises(ValueError, match="rank 3"):
        load_images(f"npz:{tmp_path / 'rank3.npz'}", 8)
    np.savez(tmp_path / "badlabels.npz", good, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="arr_1"):
        load_images(f"npz:{tmp_path / 'badlabels.npz'}", 8)
    np.savez(tmp_path / "rgba.npz", np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="4 channels"):
        load_images(f"npz:{tmp_path / 'rgba.npz'}", 8)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        load_images(f"npz:{tmp_path / 'garbage.npz'}", 8)
    with pytest.raises(FileNotFoundError):
        load_images(f"npz:{tmp_path / 'absent.npz'}", 8)


# ----------------------------------------------------------------------------------------------------------
# BatchStream
# ----------------------------------------------------------------------------------------------------------


def _take(stream: BatchStream, steps: int) -> list[np.ndarray]:
    return [stream.next_indices() for _ in range(steps)]


def test_batch_stream_epochs_are_permutations() -> None:
    stream = BatchStream(num_items=10, batch_size=4, seed=3)
    flat = np.concatenate(_take(stream, 25))  # 100 items = exactly 10 epochs, batches straddle epochs
    epochs = flat.reshape(10, 10)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10))
    assert len({tuple(e) for e in epochs}) > 1, "each epoch must be reshuffled"
    assert stream.state_dict()["epoch"] == 10 and stream.state_dict()["position"] == 0

    ordered = BatchStream(num_items=10, batch_size=5, seed=3, shuffle=False)
    assert np.concatenate(_take(ordered, 4)).tolist() == list(range(10)) * 2

    seed1, seed2 = BatchStream(10, 10, seed=1), BatchStream(10, 10, seed=2)
    assert not np.array_equal(seed1.next_indices(), seed2.next_indices())


def test_batch_stream_resume_equals_uninterrupted() -> None:
    uninterrupted = _take(BatchStream(num_items=37, batch_size=8, seed=11), 30)
    first = BatchStream(num_items=37, batch_size=8, seed=11)
    head = _take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = BatchStream(num_items=37, batch_size=8, seed=11)
    resumed.load_state_dict(state)
    tail = _take(resumed, 17)
    for expected, got in zip(uninterrupted, head + tail):
        np.testing.assert_array_equal(expected, got)


def test_batch_stream_ranks_are_disjoint_slices_of_the_global_batch() -> None:
    world, per_rank = 3, 4
    ranks = [
        BatchStream(num_items=50, batch_size=per_rank, seed=5, rank=r, world_size=world) for r in range(world)
    ]
    single = BatchStream(num_items=50, batch_size=per_rank * world, seed=5)
    for step in range(10):
        parts = [r.next_indices() for r in ranks]
        global_batch = single.next_indices()
        np.testing.assert_array_equal(np.concatenate(parts), global_batch)
        if step < 4:  # entirely inside epoch 0: no item can repeat
            assert len(set(np.concatenate(parts).tolist())) == world * per_rank
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)


def test_batch_stream_state_validation() -> None:
    stream = BatchStream(num_items=10, batch_size=3, seed=0)
    with pytest.raises(ValueError, match="num_items"):
        stream.load_state_dict({"epoch": 0, "position": 2, "num_items": 11})
    with pytest.raises(ValueError, match="position"):
        stream.load_state_dict({"epoch": 0, "position": 10})
    with pytest.raises(ValueError, match="missing"):
        stream.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="rank"):
        BatchStream(num_items=10, batch_size=3, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(num_items=10, batch_size=0, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Tensor conversion and flips
# ----------------------------------------------------------------------------------------------------------


def test_images_tensor_round_trip_and_layout() -> None:
    images = np.random.default_rng(4).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 255, 128]
    x = images_to_tensor(images)
    assert x.shape == (3, 3, 5, 6) and x.dtype == torch.float32
    assert x[0, 0, 0, 0] == -1.0 and x[0, 1, 0, 0] == 1.0
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(tensor_to_images(x), images)
    np.testing.assert_array_equal(tensor_to_images(images_to_tensor(torch.from_numpy(images))), images)


def test_images_to_tensor_accepts_read_only_memmap(tmp_path: Path) -> None:
    images = np.random.default_rng(5).integers(0, 256, (4, 4, 4, 1), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on non-writable arrays
        x = images_to_tensor(mapped)
    np.testing.assert_array_equal(tensor_to_images(x), images)


def test_flip_mask_mirrors_selected_images() -> None:
    images = np.random.default_rng(6).integers(0, 256, (4, 3, 5, 2), dtype=np.uint8)
    mask = torch.tensor([True, False, True, False])
    flipped = tensor_to_images(images_to_tensor(images, flip_mask=mask))
    np.testing.assert_array_equal(flipped[0], images[0, :, ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])
    np.testing.assert_array_equal(flipped[2], images[2, :, ::-1])
    with pytest.raises(ValueError, match="flip_mask"):
        images_to_tensor(images, flip_mask=torch.ones(3, dtype=torch.bool))


def test_tensor_to_images_rounds_and_clamps() -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0 / 127.5 * 0.4, 1.0, 7.0]).view(1, 1, 1, 6)
    assert tensor_to_images(x)[0, 0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]
    with pytest.raises(ValueError, match="NaN"):
        tensor_to_images(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="uint8"):
        images_to_tensor(np.zeros((1, 2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="N x H x W x C"):
        images_to_tensor(np.zeros((2, 2, 1), np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------------------


def test_make_grid_layout() -> None:
    images = np.stack([np.full((4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (3 * 5 + 1, 2 * 6 + 1, 3)  # 3 rows of 2, each cell 4x5 plus 1 px padding
    assert (grid[1:5, 1:6] == 10).all() and (grid[1:5, 7:12] == 20).all()
    assert (grid[6:10, 1:6] == 30).all() and (grid[11:15, 1:6] == 50).all()
    assert (grid[11:15, 7:12] == 255).all(), "the missing last cell is padding"
    assert (grid[0] == 255).all() and (grid[:, 6] == 255).all()
    from_tensor = make_grid(images_to_tensor(images), nrow=2, padding=1)
    np.testing.assert_array_equal(from_tensor, grid)
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.astype(np.float32), nrow=2)


def test_save_grid_writes_png(tmp_path: Path) -> None:
    gray = np.zeros((6, 4, 4, 1), np.uint8)
    path = save_grid(gray, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (3 * 6 + 2, 2 * 6 + 2)
