"""`cdm upscale` and `Cascade.upscale`: your own low-resolution images through a cascade's SR stages,
resized by the training data's rule, deterministic, unreadable files reported while the rest are written, nothing
overwritten without --force."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cascaded_diffusion.cascade import Cascade
from cascaded_diffusion.cli import main
from cascaded_diffusion.data.imagefolder import preprocess_image
from cascaded_diffusion.upscale import upscale_files

QUICK = ["--steps", "4", "--quiet"]  # the SR stage at 4 DPM-Solver++ steps: the properties, not the quality


@pytest.fixture(scope="module")
def fm():
    return Cascade.load(pretrained="fashion-mnist")


def shirt(size: int, mode: str = "L") -> Image.Image:
    """A bright T-shaped garment on black, the look of Fashion-MNIST."""
    a = np.zeros((size, size), np.uint8)
    q = size // 8
    a[q: 2 * q, q: size - q] = 200
    a[q: size - q, 3 * q: size - 3 * q] = 220
    return Image.fromarray(a).convert(mode)


def test_acceptance_one_8px_image_to_32px(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shirt(8).save("in8.png")
    assert main(["upscale", "in8.png", "--pretrained", "fashion-mnist", "--label", "0", "--out", "up/", *QUICK]) == 0
    out = Image.open(tmp_path / "up/in8.png")
    assert out.size == (32, 32) and out.mode == "L"
    assert "upscaled 1 of 1 images 8px -> 32px" in capsys.readouterr().out
    # the 32 px result, shrunk back the way training made its 8 px inputs, is close to the input
    back = np.asarray(out.resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(back - np.asarray(shirt(8), dtype=np.float64)).mean() < 20


def test_deterministic_and_independent_of_the_other_inputs(tmp_path, capsys):
    shirt(8).save(tmp_path / "a.png")
    shirt(16).save(tmp_path / "b.png")
    def run(out: str, *args: str, seed: str = "7") -> int:
        return main(["upscale", *args, "--pretrained", "fashion-mnist", "--label", "3", "--seed", seed,
                     "--out", str(tmp_path / out), *QUICK])

    assert run("one", str(tmp_path / "a.png")) == 0
    assert run("two", str(tmp_path / "b.png"), str(tmp_path / "a.png"), "--batch-size", "1") == 0
    assert (tmp_path / "one/a.png").read_bytes() == (tmp_path / "two/a.png").read_bytes()
    assert run("three", str(tmp_path / "a.png"), seed="8") == 0
    assert (tmp_path / "three/a.png").read_bytes() != (tmp_path / "one/a.png").read_bytes()


def test_nothing_overwritten_without_force(tmp_path, capsys):
    shirt(8).save(tmp_path / "a.png")
    out = tmp_path / "up"
    out.mkdir()
    (out / "a.png").write_bytes(b"mine")
    args = ["upscale", str(tmp_path / "a.png"), "--pretrained", "fashion-mnist", "--label", "0", "--out", str(out),
            *QUICK]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "a.png exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "a.png").read_bytes() == b"mine"
    assert main([*args, "--force"]) == 0
    assert Image.open(out / "a.png").size == (32, 32)


def test_folder_with_a_corrupt_image_processes_the_rest(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shirt(8).save(folder / "small.png")
    shirt(64, "RGB").save(folder / "photo.jpg", quality=95)  # colour, 8x the input size: converted and warned
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image")  # not an image extension: not an input
    rc = main(["upscale", str(folder), "--pretrained", "fashion-mnist", "--label", "1", "--out", str(tmp_path / "up"),
               *QUICK])
    captured = capsys.readouterr()
    assert rc == 1  # some failed
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["photo.png", "small.png"]
    err_lines = captured.err.strip().splitlines()
    skipped = [line for line in err_lines if "skipped" in line]
    assert len(skipped) == 1 and "broken.png" in skipped[0] and "cannot read the image" in skipped[0]
    assert any("warning" in line and "photo.jpg is 64x64, much larger" in line for line in err_lines)
    assert "upscaled 2 of 3 images" in captured.out and f"failed: {folder / 'broken.png'}" in captured.out


def test_labels_csv_and_save_stages(tmp_path, capsys):
    shirt(8).save(tmp_path / "a.png")
    shirt(8).save(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("name,label\na.png,0\nb,9\n")
    rc = main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--pretrained", "fashion-mnist",
               "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "up"), "--save-stages", *QUICK])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["a.png", "a_8px.png", "b.png", "b_8px.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "up/a_8px.png")), np.asarray(shirt(8)))  # fed as is
    # the class matters: same input, classes 0 and 9
    assert (tmp_path / "up/a.png").read_bytes() != (tmp_path / "up/b.png").read_bytes()
    (tmp_path / "labels.csv").write_text("a.png,0\n")
    rc = main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--pretrained", "fashion-mnist",
               "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "up2"), *QUICK])
    assert rc == 2 and "no label for" in capsys.readouterr().err and not (tmp_path / "up2/a.png").exists()


def test_refusals_before_any_work(tmp_path, capsys):
    shirt(8).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    shirt(8).save(tmp_path / "sub/a.jpg")
    base = ["--pretrained", "fashion-mnist", "--out", str(tmp_path / "up"), *QUICK]
    assert main(["upscale", str(tmp_path / "a.png"), "--label", "10", *base]) == 2
    assert "outside the cascade's classes 0..9" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "sub/a.jpg"), "--label", "0", *base]) == 2
    assert "would both be written as a.png" in capsys.readouterr().err
    assert main(["upscale", str(tmp_path / "a.png"), *base]) == 2
    assert "--label N" in capsys.readouterr().err
    assert not (tmp_path / "up/a.png").exists()


def test_python_api_resizes_by_the_training_data_rule(fm):
    big = shirt(32)
    out = fm.upscale([big, np.asarray(shirt(8))], labels=[0, 0], seed=1, steps=4)
    assert [a.shape for a in out] == [(2, 8, 8, 1), (2, 32, 32, 1)]
    assert np.array_equal(out[0][0], preprocess_image(big, 8, "L"))  # BOX-halved twice: the ADM rule
    assert np.array_equal(out[0][1], np.asarray(shirt(8))[..., None])
    # the same image gives the same output under the same key
    again = fm.upscale(np.asarray(shirt(8))[None, ..., None], labels=0, seed=1, keys=[1], steps=4)
    assert np.array_equal(again[1][0], out[1][1])


def test_upscale_files_on_the_three_stage_colour_cascade(tmp_path):
    emoji = Cascade.load(pretrained="emoji")
    image = Image.new("RGB", (16, 16), "white")
    image.paste((250, 200, 0), (3, 3, 13, 13))
    image.save(tmp_path / "sun.png")
    report = upscale_files(emoji, [tmp_path / "sun.png"], tmp_path / "up", label=0, save_stages=True, steps=2)
    assert not report.failed and (report.input_resolution, report.resolution) == (16, 64)
    sizes = {p.name: Image.open(p).size for p in report.written}
    assert sizes == {"sun.png": (64, 64), "sun_16px.png": (16, 16), "sun_32px.png": (32, 32)}
