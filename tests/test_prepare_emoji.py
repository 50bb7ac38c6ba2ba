"""scripts/prepare_emoji.py on a tiny fake npm tarball with the real package's layout (no network): categories,
skin-tone policy, compositing, duplicate removal, a deterministic split, the manifest, idempotent reruns, and
that the library's image-folder loader reads the result."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_module

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.0.1-test"


prep = load_module("scripts/prepare_emoji.py", "prepare_emoji_under_test")


def _png(color: tuple[int, int, int], mark: int, mode: str = "RGBA") -> bytes:
    """64x64: transparent everywhere except an opaque 8x8 square of ``color`` at (mark, mark) and a
    half-transparent pixel at (0, 63)."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[mark : mark + 8, mark : mark + 8] = (*color, 255)
    a[0, 63] = (0, 0, 0, 128)
    image = Image.fromarray(a, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _entry(unified, category, short_name, sort_order, skin=None, has_img=True):
    e = {
        "name": short_name.upper(), "unified": unified, "non_qualified": None, "image": f"{unified.lower()}.png",
        "sheet_x": 0, "sheet_y": 0, "short_name": short_name, "short_names": [short_name], "text": None,
        "texts": None, "category": category, "subcategory": "sub", "sort_order": sort_order, "added_in": "1.0",
        "has_img_apple": True, "has_img_google": has_img, "has_img_twitter": True, "has_img_facebook": False,
    }
    if skin:
        e["skin_variations"] = {
            tone: {"unified": f"{unified}-{tone}", "non_qualified": None,
                   "image": f"{unified.lower()}-{tone.lower()}.png", "sheet_x": 0, "sheet_y": 0, "added_in": "1.0",
                   "has_img_apple": True, "has_img_google": True, "has_img_twitter": True, "has_img_facebook": False}
            for tone in skin
        }
    return e


def _fake_tarball(path: Path) -> list[dict]:
    """Smileys: 6 emoji; People & Body: 4 emoji with 2 skin tones each; Flags: 3 flags, two of them identical
    pixels; Component: 1; one entry without a Google image. Images differ by the position of their square."""
    entries = [_entry(f"1F60{i}", "Smileys & Emotion", f"smiley{i}", i) for i in range(6)]
    entries += [_entry(f"1F46{i}", "People & Body", f"person{i}", 10 + i, skin=["1F3FB", "1F3FF"])
                for i in range(4)]
    entries += [_entry("1F1E6-1F1FA", "Flags", "flag-au", 30), _entry("1F1ED-1F1F2", "Flags", "flag-hm", 31),
                _entry("1F1EB-1F1F7", "Flags", "fr", 32)]
    entries += [_entry("1F3FB", "Component", "skin-tone-2", 40),
                _entry("1FAAA", "Objects", "no-google", 50, has_img=False)]
    images: dict[str, bytes] = {}
    for n, e in enumerate(entries):
        if e["has_img_google"]:
            mode = "LA" if e["short_name"] == "smiley1" else "RGBA"
            images[e["image"]] = _png((200, 40, 10 + 15 * n), mark=2 * n, mode=mode)
        for k, (tone, v) in enumerate(sorted((e.get("skin_variations") or {}).items())):
            images[v["image"]] = _png((90, 60 + 40 * k, 5 * n), mark=2 * n + 1 + k)
    images["1f1ed-1f1f2.png"] = images["1f1e6-1f1fa.png"]  # HM's flag is Australia's
    members = {
        "package/package.json": json.dumps({"name": "emoji-datasource-google", "version": VERSION}).encode(),
        "package/emoji.json": json.dumps(entries).encode(),
        "package/categories.json": b"{}",
        "package/img/google/sheets/32.png": b"not a real sheet",
        **{f"package/img/google/64/{name}": data for name, data in sorted(images.items())},
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return entries


@pytest.fixture()
def tarball(tmp_path):
    path = tmp_path / "emoji-datasource-google-test.tgz"
    _fake_tarball(path)
    return path


def _run(out: Path, tarball: Path, *extra: str) -> dict:
    assert prep.main(["--out", str(out), "--tarball", str(tarball), "--version", VERSION, *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_categories_policy_split_compositing_and_manifest(tmp_path, tarball):
    out = tmp_path / "emoji"
    manifest = _run(out, tarball, "--test-fraction", "0.34", "--seed", "3")

    # Component and the image-less entry are gone; class folders sort into Unicode's category order.
    folders = [c["folder"] for c in manifest["classes"]]
    assert folders == sorted(folders) and folders[0] == "0_smileys_emotion" and folders[8] == "8_flags"
    counts = {c["folder"]: (c["train"], c["test"]) for c in manifest["classes"]}
    # 6 smileys: round(0.34 * 6) = 2 test; 4 people (default tone only): 1 test; flags: HM dropped as a
    # duplicate of AU, 2 left: 1 test.
    assert counts["0_smileys_emotion"] == (4, 2)
    assert counts["1_people_body"] == (3, 1)
    assert counts["8_flags"] == (1, 1)
    assert all(counts[f] == (0, 0) for f in folders if f not in ("0_smileys_emotion", "1_people_body", "8_flags"))
    assert manifest["duplicates_dropped"] == [["1f1e6-1f1fa.png", "1f1ed-1f1f2.png"]]
    assert manifest["totals"] == {"train": 8, "test": 4}
    assert manifest["version"] == VERSION and manifest["skin_tones"] == "default"
    assert manifest["background"] == "#ffffff" and manifest["recommended_flip"] is False
    assert len(manifest["tarball_sha256"]) == 64

    files = _files(out)
    pngs = sorted(f for f in files if f.endswith(".png"))
    assert pngs == sorted(im["path"] for im in manifest["images"])
    assert not any("-1f3f" in f for f in pngs)  # no skin-tone variants
    assert sorted(p.name for p in (out / "test").iterdir()) == folders  # every class folder, even if empty

    # Compositing: RGB, alpha 0 -> the background, opaque -> the colour, half alpha -> halfway; LA works too.
    for f in pngs:
        with Image.open(out / f) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            a = np.asarray(im)
        assert (a[40:, :2] == 255).all()  # untouched corner: the white background
        assert tuple(a[0, 63]) == (127, 127, 127)
    smiley0 = np.asarray(Image.open(next(out.glob("*/0_smileys_emotion/1f600.png"))))
    assert tuple(smiley0[0, 0]) == (200, 40, 10) and tuple(smiley0[0, 8]) == (255, 255, 255)
    smiley1 = np.asarray(Image.open(next(out.glob("*/0_smileys_emotion/1f601.png"))))
    assert smiley1[2, 2, 0] == smiley1[2, 2, 1] == smiley1[2, 2, 2] < 255  # LA: grey square on white

    # The split is a function of (seed, emoji) alone: the same seed reproduces it in a new folder, another
    # seed moves some emoji.
    again = _run(tmp_path / "again", tarball, "--test-fraction", "0.34", "--seed", "3")
    assert [im["path"] for im in again["images"]] == [im["path"] for im in manifest["images"]]
    assert _files(tmp_path / "again") == files
    other = _run(tmp_path / "other", tarball, "--test-fraction", "0.34", "--seed", "4")
    assert {im["path"] for im in other["images"]} != {im["path"] for im in manifest["images"]}


def test_all_skin_tones_stay_with_their_emoji_and_background(tmp_path, tarball):
    manifest = _run(tmp_path / "all", tarball, "--skin-tones", "all", "--test-fraction", "0.34",
                    "--background", "#102030")
    people = [im for im in manifest["images"] if "/1_people_body/" in im["path"]]
    assert len(people) == 12  # 4 emoji x (default + 2 tones)
    split_of: dict[str, set[str]] = {}
    for im in people:
        base = im["unified"].split("-")[0]
        split_of.setdefault(base, set()).add(im["path"].split("/")[0])
    assert all(len(s) == 1 for s in split_of.values())  # a person and its tones are on one side
    assert sorted(im["skin_tone"] for im in people).count("1F3FF") == 4
    with Image.open(tmp_path / "all" / people[0]["path"]) as im:
        assert tuple(np.asarray(im)[63, 0]) == (0x10, 0x20, 0x30)


def test_rerun_is_idempotent_and_prunes_stale_files(tmp_path, tarball):
    out = tmp_path / "emoji"
    _run(out, tarball, "--skin-tones", "all")
    before_all = _files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    _run(out, tarball, "--skin-tones", "all")
    assert _files(out) == before_all
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes  # nothing rewritten

    # Switching policy removes the variants; a stray class folder would become a class, so it goes too.
    (out / "train" / "9_stray").mkdir()
    (out / "train" / "9_stray" / "x.png").write_bytes(b"x")
    manifest = _run(out, tarball)
    pngs = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert pngs == sorted(im["path"] for im in manifest["images"])
    assert not (out / "train" / "9_stray").exists()
    fresh = tmp_path / "fresh"
    _run(fresh, tarball)
    assert _files(fresh) == _files(out)


def test_refuses_foreign_output_and_wrong_version(tmp_path, tarball):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit, match="not empty"):
        _run(foreign, tarball)
    with pytest.raises(SystemExit, match="expected emoji-datasource-google@9.9.9"):
        prep.main(["--out", str(tmp_path / "v"), "--tarball", str(tarball), "--version", "9.9.9"])
    # The real version's checksum is pinned: a different file under its name is refused.
    with pytest.raises(SystemExit, match="sha256"):
        prep.main(["--out", str(tmp_path / "v"), "--tarball", str(tarball), "--version", "16.0.0"])


def test_class_folders_and_colours():
    assert [prep.class_folder(i, c) for i, c in enumerate(prep.CATEGORIES)] == [
        "0_smileys_emotion", "1_people_body", "2_animals_nature", "3_food_drink", "4_travel_places",
        "5_activities", "6_objects", "7_symbols", "8_flags",
    ]
    assert prep.parse_color("white") == (255, 255, 255)
    assert prep.parse_color("#FF8000") == (255, 128, 0)
    assert prep.parse_color("1, 2, 3") == (1, 2, 3)


def test_library_loader_reads_the_folder(tmp_path, tarball):
    from cascaded_diffusion.data import load_images

    out = tmp_path / "emoji"
    _run(out, tarball, "--test-fraction", "0.34")
    train = load_images(f"imagefolder:{out / 'train'}", 16, channels=3, use_cache=False, num_workers=1)
    test = load_images(f"imagefolder:{out / 'test'}", 64, channels=3, use_cache=False, num_workers=1)
    # Every class folder is written, empty or not, so the labels are the fixed category indices.
    assert train.images.shape == (8, 16, 16, 3) and test.images.shape == (4, 64, 64, 3)
    folders = [prep.class_folder(i, c) for i, c in enumerate(prep.CATEGORIES)]
    assert train.class_names == test.class_names == folders
    assert np.bincount(train.labels, minlength=9).tolist() == [4, 3, 0, 0, 0, 0, 0, 0, 1]
    assert np.bincount(test.labels, minlength=9).tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 1]


def test_small_fraction_still_holds_out_one_per_class(tmp_path, tarball):
    manifest = _run(tmp_path / "small", tarball, "--test-fraction", "0.05")  # round(0.05 * 6) = 0
    counts = {c["folder"]: (c["train"], c["test"]) for c in manifest["classes"] if c["train"] + c["test"]}
    assert counts == {"0_smileys_emotion": (5, 1), "1_people_body": (3, 1), "8_flags": (1, 1)}


def test_emoji_configs_match_the_folder():
    """configs/emoji: 9 classes (the script's categories), RGB, no flips, a 16 -> 32 -> 64 chain whose noise
    augmentation uses the base model's forward process; each builds (on the meta device)."""
    from cascaded_diffusion.config import load_config
    from cascaded_diffusion.stage import build_network

    stages = [load_config(ROOT / "configs/emoji" / f"{n}.toml") for n in ("base16", "sr16to32", "sr32to64")]
    base, sr32, sr64 = stages
    for c in stages:
        assert c.stage.channels == 3 and c.stage.num_classes == len(prep.CATEGORIES)
        assert c.data.source == "imagefolder:train" and c.data.flip is False
        build_network(c, "meta")
    assert (base.stage.kind, base.stage.resolution) == ("base", 16)
    assert (sr32.stage.low_res, sr32.stage.resolution, sr32.conditioning.augmentation) == (16, 32, "noise")
    assert (sr32.conditioning.noise_schedule, sr32.conditioning.noise_timesteps) == (
        base.diffusion.schedule, base.diffusion.timesteps)
    assert (sr64.stage.low_res, sr64.stage.resolution, sr64.conditioning.augmentation) == (32, 64, "blur")
    blur = sr64.conditioning
    assert blur.blur_kernel == 3 and 0.4 <= blur.blur_sigma_min <= blur.blur_sigma_max <= 0.6 and blur.blur_prob == 0.5
