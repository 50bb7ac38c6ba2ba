"""scripts/prepare_emoji256.py on tiny fake npm tarballs with the real packages' layouts (no network): one key per
emoji across designs (FE0F dropped, case folded), the split by emoji *across designs*, aspect-preserving rendering
over the background, pinned tarball hashes, the attribution file, idempotent reruns, and the prepared arrays."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_module

pytest.importorskip("resvg_py")

prep = load_module("scripts/prepare_emoji256.py", "prepare_emoji256_under_test")

# (unified as in emoji.json, category, short name): three classes, enough emoji for a split in each
EMOJI = [
    ("1F600", "Smileys & Emotion", "grinning"), ("1F601", "Smileys & Emotion", "grin"),
    ("1F602", "Smileys & Emotion", "joy"), ("1F603", "Smileys & Emotion", "smiley"),
    ("2764-FE0F", "Smileys & Emotion", "heart"),
    ("1F436", "Animals & Nature", "dog"), ("1F431", "Animals & Nature", "cat"),
    ("1F42D", "Animals & Nature", "mouse"),
    ("1F1E6-1F1F4", "Flags", "flag-ao"), ("1F1E7-1F1EA", "Flags", "flag-be"), ("1F1E8-1F1E6", "Flags", "flag-ca"),
    ("1F3FB", "Component", "skin-tone-2"),
]


def _svg(index: int, design: int, view: str = "0 0 36 36", fill_all: bool = False) -> str:
    """A distinct drawing per (emoji, design): a coloured square whose position encodes both."""
    w, h = (float(v) for v in view.split()[2:])
    colour = f"#{(37 * index) % 200 + 40:02x}{(91 * design) % 200 + 40:02x}80"
    if fill_all:
        shape = f'<rect x="0" y="0" width="{w}" height="{h}" fill="{colour}"/>'
    else:
        shape = f'<rect x="{2 + index % 5}" y="{2 + design}" width="{w / 3}" height="{h / 3}" fill="{colour}"/>'
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{view}">{shape}</svg>'


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _make_cache(cache: Path, drop_from_openmoji: str = "1F42D") -> None:
    cache.mkdir(parents=True, exist_ok=True)
    entries = [{"unified": u, "category": c, "short_name": s, "sort_order": i} for i, (u, c, s) in enumerate(EMOJI)]
    _tar(cache / "emoji-datasource-16.0.0.tgz", {"package/emoji.json": json.dumps(entries).encode()})
    # Twemoji: lower case, FE0F dropped from single characters (as the real package)
    tw = {f"package/{u.lower().replace('-fe0f', '')}.svg": _svg(i, 0).encode() for i, (u, _, _) in enumerate(EMOJI)}
    tw["package/package.json"] = b"{}"
    _tar(cache / "twemoji-svg-15.0.0.tgz", tw)
    # Noto: one sprite of nested <svg id=...>; flags are 3:2 and fill their whole viewBox
    parts = []
    for i, (u, c, _) in enumerate(EMOJI):
        view = "0 0 900 600" if c == "Flags" else "0 0 128 128"
        body = _svg(i, 1, view, fill_all=c == "Flags").replace("<svg ", f'<svg id="{u}" ', 1)
        parts.append(body)
    sprite = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 10">' + "".join(parts) + "</svg>"
    _tar(cache / "svgmoji-noto-3.2.0.tgz", {"package/sprites/all.svg": sprite.encode()})
    om = {f"package/color/svg/{u}.svg": _svg(i, 2, "0 0 72 72").encode()
          for i, (u, _, _) in enumerate(EMOJI) if u != drop_from_openmoji}
    om["package/black/svg/1F600.svg"] = _svg(0, 3, "0 0 72 72").encode()  # the outline set: never used
    _tar(cache / "openmoji-17.0.0.tgz", om)


@pytest.fixture()
def unpinned(monkeypatch):
    monkeypatch.setattr(prep, "KNOWN_SHA256", {})


def _run(out: Path, cache: Path, *extra: str) -> None:
    assert prep.main(["--out", str(out), "--cache-dir", str(cache), "--test-fraction", "0.34", *extra]) == 0


def test_split_by_emoji_across_designs_and_rendering(tmp_path, unpinned, capsys):
    cache, out = tmp_path / "npm", tmp_path / "emoji256"
    _make_cache(cache)
    _run(out, cache)
    manifest = json.loads((out / "manifest.json").read_text())

    # 11 emoji (Component dropped) x 3 designs, less the one OpenMoji lacks
    assert len(manifest["images"]) == 11 * 3 - 1
    assert manifest["designs"]["openmoji"]["not_drawn"] == ["1F42D"]
    sides: dict[str, set] = {}
    for image in manifest["images"]:
        sides.setdefault(image["unified"], set()).add(image["path"].split("/")[0])
    assert all(len(s) == 1 for s in sides.values()), "every design's drawing of an emoji is on one side"
    assert {next(iter(s)) for s in sides.values()} == {"train", "test"}
    # FE0F and case do not split an emoji: the heart is drawn by all three designs
    assert {i["design"] for i in manifest["images"] if i["unified"] == "2764-FE0F"} == {"twemoji", "noto", "openmoji"}
    assert not any("skin-tone" in i["short_name"] for i in manifest["images"])

    # 256x256 RGB over white; a 3:2 flag keeps its aspect ratio (white bands above and below)
    flag = next(i for i in manifest["images"] if i["design"] == "noto" and i["unified"] == "1F1E6-1F1F4")
    pixels = np.asarray(Image.open(out / flag["path"]))
    assert pixels.shape == (256, 256, 3)
    band = (256 - round(256 * 600 / 900)) // 2
    assert (pixels[: band - 1] == 255).all() and (pixels[-(band - 1):] == 255).all()
    assert (pixels[band + 2 : 256 - band - 2] != 255).any(axis=-1).all()
    # classes are the 64-px data set's folders, and the counts add up
    assert [c["folder"] for c in manifest["classes"]][:1] == ["0_smileys_emotion"]
    assert sum(c["train"] + c["test"] for c in manifest["classes"]) == len(manifest["images"])
    attribution = (out / "ATTRIBUTION.md").read_text()
    for needle in ("CC-BY-4.0", "Apache-2.0", "CC-BY-SA-4.0", "OpenMoji", "Twemoji", "Noto"):
        assert needle in attribution

    # a rerun writes nothing and keeps mtimes; the loader reads the folder
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    capsys.readouterr()
    _run(out, cache)
    assert "0 files written, 0 removed, manifest unchanged" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    from cascaded_diffusion.data import load_images

    data = load_images(f"imagefolder:{out / 'train'}", 64, channels=3)
    assert data.images.shape[1:] == (64, 64, 3)
    assert len(data.labels) == sum(c["train"] for c in manifest["classes"])


def test_pinned_hash_mismatch_and_foreign_out_are_refused(tmp_path, monkeypatch):
    cache = tmp_path / "npm"
    _make_cache(cache)
    monkeypatch.setattr(prep, "KNOWN_SHA256", {"twemoji-svg-15.0.0.tgz": "0" * 64})
    with pytest.raises(SystemExit, match="sha256"):
        prep.main(["--out", str(tmp_path / "a"), "--cache-dir", str(cache), "--designs", "twemoji"])
    foreign = tmp_path / "b"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    monkeypatch.setattr(prep, "KNOWN_SHA256", {})
    with pytest.raises(SystemExit, match="not empty"):
        prep.main(["--out", str(foreign), "--cache-dir", str(cache)])
    with pytest.raises(SystemExit, match="unknown"):
        prep.main(["--out", str(tmp_path / "c"), "--cache-dir", str(cache), "--designs", "apple"])
