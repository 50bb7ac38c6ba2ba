"""`cdm prepare` and the `prepared:` source: bit-for-bit equal to the imagefolder decode, resumable, atomic,
one-line errors before any decoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascaded_diffusion.data import partial, prepare
from cascaded_diffusion.cli import main
from cascaded_diffusion.data import load_images
from cascaded_diffusion.errors import UserError
from cascaded_diffusion.data.prepare import load_prepared, prepare_dataset, read_manifest


def make_folder(root: Path) -> Path:
    """Three classes of mixed sizes and formats (JPEG, PNG, grey, 16-bit, palette with transparency), two
    corrupt files in the middle of the listing and a non-image file."""
    rng = np.random.default_rng(0)
    sizes = [(37, 23), (64, 48), (20, 70), (16, 16), (90, 33)]
    for c, name in enumerate(("apple", "bear", "cloud")):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.jpg" if i % 2 else root / name / f"{i}.png", quality=90)
    Image.fromarray(rng.integers(0, 256, (30, 25), dtype=np.uint8)).save(root / "bear" / "grey.png")
    Image.fromarray(rng.integers(0, 65536, (19, 27), dtype=np.uint16)).save(root / "bear" / "deep.png")
    palette = Image.fromarray(rng.integers(0, 256, (22, 22, 3), dtype=np.uint8)).convert("P")
    palette.info["transparency"] = 0
    palette.save(root / "cloud" / "pal.png")
    (root / "bear" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    jpeg = (root / "apple" / "1.jpg").read_bytes()
    (root / "apple" / "2_cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cloud" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


def oracle(folder: Path, resolution: int, channels: int = 3):
    """The imagefolder path's own decode (no cache): what prepare must reproduce bit for bit."""
    with pytest.warns(UserWarning, match="skipped 2 of 20"):
        return load_images(f"imagefolder:{folder}", resolution, channels=channels, use_cache=False, num_workers=1)


def assert_same(a, b) -> None:
    assert a.images.shape == b.images.shape
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert np.array_equal(a.labels, b.labels) and a.class_names == b.class_names


def test_prepare_equals_the_imagefolder_decode_bit_for_bit(folder, tmp_path):
    out = tmp_path / "prepared"
    result = prepare_dataset(f"imagefolder:{folder}", [16, 8], out, workers=1, chunk_size=4)
    m = result.manifest
    assert m["resolutions"] == [8, 16] and m["channels"] == 3 and m["num_images"] == 18 and m["file_count"] == 20
    assert [s.split(":")[0] for s in m["skipped"]] == ["apple/2_cut.jpg", "bear/broken.png"]
    assert m["fingerprint"]["file_count"] == 20 and len(m["fingerprint"]["mtimes_hash"]) == 64
    assert m["class_names"] == ["apple", "bear", "cloud"] and m["class_counts"] == [5, 7, 6]
    assert m["arrays"]["16"] == {"file": "images_16px_3ch.npy", "shape": [18, 16, 16, 3], "dtype": "uint8"}
    assert sorted(p.name for p in out.iterdir()) == [
        ".prepare.lock", "images_16px_3ch.npy", "images_8px_3ch.npy", "labels.npy", "manifest.json"]
    for resolution in (8, 16):
        data = load_images(f"prepared:{out}", resolution)
        assert isinstance(data.images, np.memmap) and data.source == f"prepared:{out.resolve()}"
        assert_same(data, oracle(folder, resolution))
    # grayscale: converted before resizing, as the imagefolder path does
    grey = prepare_dataset(folder, [8], tmp_path / "grey", channels=1, workers=1, chunk_size=5)
    assert grey.manifest["channels"] == 1
    assert_same(load_prepared(tmp_path / "grey", 8, channels=1), oracle(folder, 8, channels=1))


def test_two_worker_processes_write_the_same_arrays(folder, tmp_path):
    prepare_dataset(folder, [8], tmp_path / "one", workers=1, chunk_size=3)
    result = prepare_dataset(folder, [8], tmp_path / "two", workers=2, chunk_size=3)
    assert result.decoded == 20
    assert_same(load_prepared(tmp_path / "two", 8), load_prepared(tmp_path / "one", 8))


def test_interrupted_prepare_resumes_with_the_chunks_not_done(folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    real = partial._decode_chunk
    calls: list[int] = []

    def interrupted(job):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(job[0])
        return real(job)

    monkeypatch.setattr(partial, "_decode_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(folder, [8, 16], out, workers=1, chunk_size=4)
    # nothing final appeared: no manifest, no arrays, and training refuses the directory
    assert sorted(p.name for p in out.iterdir()) == [".partial", ".prepare.lock"]
    assert len((out / ".partial" / "done.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="incomplete.*rerun the same `cdm prepare`"):
        load_prepared(out, 8)

    calls.clear()
    monkeypatch.setattr(partial, "_decode_chunk", lambda job: (calls.append(job[0]), real(job))[1])
    result = prepare_dataset(folder, [8, 16], out, workers=1, chunk_size=99)  # the partial's chunk size wins
    assert calls == [2, 3, 4] and result.decoded == 12
    assert not (out / ".partial").exists()
    for resolution in (8, 16):
        assert_same(load_prepared(out, resolution), oracle(folder, resolution))


def test_interrupted_compaction_is_redone_from_the_first_unreadable_file(folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    real_compact, real_decode = prepare._compact, partial._decode_chunk

    def cut_short(path, keep, first):
        real_compact(path, keep[: first + 2], first)  # moves a few rows, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_compact", cut_short)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(folder, [8], out, workers=1, chunk_size=4)
    assert (out / ".partial" / "compacting.json").is_file() and not (out / "manifest.json").exists()
    monkeypatch.setattr(prepare, "_compact", real_compact)
    calls: list[int] = []
    monkeypatch.setattr(partial, "_decode_chunk", lambda job: (calls.append(job[0]), real_decode(job))[1])
    prepare_dataset(folder, [8], out, workers=1, chunk_size=4)
    assert calls == [0, 1, 2, 3, 4]  # the first unreadable file is index 3, in chunk 0: every chunk again
    assert_same(load_prepared(out, 8), oracle(folder, 8))


def test_a_complete_directory_is_reused_or_refused(folder, tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    prepare_dataset(folder, [8, 16], out, workers=1)
    monkeypatch.setattr(partial, "_decode_chunk", lambda job: pytest.fail("decoded although prepared"))
    again = prepare_dataset(folder, [16], out, workers=1)
    assert again.already_prepared and again.decoded == 0
    with pytest.raises(UserError, match=r"holds resolutions \[8, 16\], not \[8, 32\]"):
        prepare_dataset(folder, [8, 32], out, workers=1)
    with pytest.raises(UserError, match="holds 3-channel images, not 1"):
        prepare_dataset(folder, [8], out, channels=1, workers=1)
    other = tmp_path / "other"
    (other / "x").mkdir(parents=True)
    Image.new("RGB", (9, 9)).save(other / "x" / "a.png")
    with pytest.raises(UserError, match=f"prepared from imagefolder:{folder}, not imagefolder:{other}"):
        prepare_dataset(other, [8], out, workers=1)
    Image.new("RGB", (9, 9)).save(folder / "apple" / "new.png")
    with pytest.raises(UserError, match="the source changed since.*20 files.*now 21 files"):
        prepare_dataset(folder, [8], out, workers=1)
    assert read_manifest(out)["num_images"] == 18  # refused: nothing was touched


def test_bad_inputs_are_one_line_errors_before_decoding(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(partial, "_decode_chunk", lambda job: pytest.fail("decoding started"))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (9, 9)).save(flat / "a.png")
    cases = [
        (["prepare", f"imagefolder:{flat}", "--resolutions", "8", "--out", str(tmp_path / "o1")],
         "no class subfolders"),
        (["prepare", f"imagefolder:{tmp_path / 'nope'}", "--resolutions", "8", "--out", str(tmp_path / "o2")],
         "image folder not found"),
        (["prepare", f"npz:{tmp_path / 'x.npz'}", "--resolutions", "8", "--out", str(tmp_path / "o3")],
         "needs no preparation"),
        (["prepare", f"imagefolder:{folder}", "--resolutions", "8,8", "--out", str(tmp_path / "o4")],
         "must not repeat"),
        (["prepare", f"imagefolder:{folder}", "--resolutions", "8", "--out", str(folder / "apple")],
         "inside the image folder"),
    ]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    cases.append((["prepare", f"imagefolder:{folder}", "--resolutions", "8", "--out", str(foreign)],
                  "not empty and holds no prepared dataset"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("cdm prepare: error: ") and expected in err and "\n" not in err, err


def test_training_reads_check_the_manifest(folder, tmp_path):
    out = tmp_path / "prepared"
    prepare_dataset(folder, [8, 16], out, workers=1)
    # the library names prepare_dataset's own argument; `cdm` shows its option (--resolutions) in its place
    with pytest.raises(UserError, match=r"holds resolutions 8px, 16px, not 32px; prepare it with resolutions 8,16,32") as info:
        load_images(f"prepared:{out}", 32)
    from cascaded_diffusion.cli.main import cli_option
    from cascaded_diffusion.errors import render

    assert "prepare it with --resolutions 8,16,32 (into a new --out)" in render(info.value, cli_option)
    with pytest.raises(UserError, match="holds 3-channel images, the stage needs 1"):
        load_images(f"prepared:{out}", 8, channels=1)
    with pytest.raises(ValueError, match=r"cannot decode image .*2_cut\.jpg.*on_corrupt = 'error'"):
        load_images(f"prepared:{out}", 8, on_corrupt="error")
    # a relative DIR resolves against data.root
    assert len(load_images("prepared:prepared", 8, root=tmp_path)) == 18
    with pytest.raises(UserError, match="no such directory"):
        load_images(f"prepared:{tmp_path / 'missing'}", 8)
    with pytest.raises(UserError, match="not a prepared dataset"):
        load_images(f"prepared:{folder}", 8)
    # a truncated or replaced array is caught by its recorded shape and size
    path = out / "images_16px_3ch.npy"
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(UserError, match="truncated or modified"):
        load_images(f"prepared:{out}", 8)
    np.save(path, np.zeros((3, 16, 16, 3), np.uint8))
    with pytest.raises(UserError, match=r"holds uint8 \[3, 16, 16, 3\], the manifest records uint8 \[18, 16, 16, 3\]"):
        load_images(f"prepared:{out}", 16)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="version 99"):
        load_images(f"prepared:{out}", 8)


def test_npy_rows_are_changed_in_place(tmp_path):
    path = tmp_path / "a.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(1000, 3, 3, 1))
    array[:] = np.arange(9000).reshape(array.shape) % 251
    array.flush()
    del array
    prepare._set_npy_rows(path, 7)
    prepare._set_npy_rows(path, 7)  # idempotent
    loaded = np.load(path)
    assert loaded.shape == (7, 3, 3, 1)
    assert np.array_equal(loaded, (np.arange(9000).reshape(1000, 3, 3, 1) % 251)[:7])
