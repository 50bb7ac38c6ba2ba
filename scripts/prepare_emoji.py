#!/usr/bin/env python
"""Google's Noto emoji (npm ``emoji-datasource-google``) as a class-per-category image folder (docs/emoji.md).

    python scripts/prepare_emoji.py --out /data/emoji                        # npm pack, then build
    python scripts/prepare_emoji.py --out /data/emoji --tarball emoji-datasource-google-16.0.0.tgz

Writes ``OUT/train/<class>/<image>.png`` and ``OUT/test/<class>/<image>.png`` -- the ``imagefolder:PATH``
layout of ``cascaded_diffusion.data`` (sorted class folder names give labels 0..K-1) -- and
``OUT/manifest.json``. Train on ``imagefolder:OUT/train``; ``imagefolder:OUT/test`` is the held-out split.

What it does to the package's 64x64 PNGs (``package/img/google/64/``, categories from ``package/emoji.json``):

* drops the "Component" category (skin-tone swatches and hair pieces, not emoji on their own);
* ``--skin-tones default`` (the default) keeps only the default-tone (yellow) image of each emoji; ``all`` also
  keeps every skin-tone variant, in the same split as its emoji so no person leaks from train into test;
* drops exact pixel duplicates (e.g. the flags of Heard & McDonald Islands and of Australia), keeping the
  first in Unicode order, so the same image can never be in both splits;
* composites the RGBA image over an opaque ``--background`` (white by default) and saves RGB;
* splits each class deterministically: the emoji of a class are ranked by sha256(seed, code points) and the
  first round(test_fraction * n) go to test. The rank of an emoji does not depend on the other emoji, so a
  later package version with new emoji keeps the old ones on the same side.

Class folders are ``<index>_<slug>`` in Unicode's category order, so the labels are fixed:
0 smileys_emotion, 1 people_body, 2 animals_nature, 3 food_drink, 4 travel_places, 5 activities,
6 objects, 7 symbols, 8 flags.

Re-running with the same arguments writes nothing (files whose bytes are already right are left alone, which
keeps their mtimes and so the loader's decode cache valid); files and folders under ``OUT/train`` and
``OUT/test`` that the current arguments do not produce are removed. Only PIL and the standard library are
needed; ``npm`` only when no ``--tarball`` is given and none is cached.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

PACKAGE = "emoji-datasource-google"
IMAGE_DIR = "package/img/google/64/"
GENERATOR = "scripts/prepare_emoji.py"
# Unicode's category order (emoji-test.txt, the package's categories.json) without "Component": the class
# index of each category. A category not listed here is an error, so labels never shift silently.
CATEGORIES = [
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
    "Flags",
]
DROPPED_CATEGORIES = {"Component"}
# sha256 of the registry tarballs this script was checked against; a mismatch is an error.
KNOWN_SHA256 = {"16.0.0": "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"}
SKIN_TONE_POLICIES = ("default", "all")


def class_folder(index: int, category: str) -> str:
    """``"1_people_body"`` for index 1, "People & Body": filesystem-safe, and sorting gives index order."""
    slug = re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")
    return f"{index:0{len(str(len(CATEGORIES) - 1))}d}_{slug}"


def parse_color(text: str) -> tuple[int, int, int]:
    """``white``, ``black``, ``gray``/``grey``, ``#RRGGBB`` or ``R,G,B`` -> an RGB triple."""
    named = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
    t = text.strip().lower()
    if t in named:
        return named[t]
    if re.fullmatch(r"#[0-9a-f]{6}", t):
        return tuple(int(t[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    parts = t.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"background {text!r}: use white, black, gray, #RRGGBB or R,G,B")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where ``npm pack`` puts the tarball: ``$CDM_CACHE/npm``, else ``~/.cache/cascaded_diffusion/npm``."""
    root = os.environ.get("CDM_CACHE")
    base = Path(os.path.expanduser(root)) if root else Path.home() / ".cache" / "cascaded_diffusion"
    return base / "npm"


def npm_pack(version: str, cache_dir: Path) -> Path:
    """The package tarball for ``version``: from ``cache_dir`` if there, else fetched with ``npm pack``."""
    filename = f"{PACKAGE}-{version}.tgz"
    return npm_pack_spec(f"{PACKAGE}@{version}", filename, cache_dir,
                         without_npm=f"download {filename} and pass --tarball")


def npm_pack_spec(spec: str, filename: str, cache_dir: Path, check_name: bool = False,
                  without_npm: str | None = None) -> Path:
    """``cache_dir/filename``, fetched with ``npm pack SPEC`` when not there yet (``check_name``: refuse a tarball
    that npm names otherwise, e.g. a scoped package's; ``without_npm``: what to do instead, when npm is missing)."""
    target = cache_dir / filename
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        sys.exit(f"npm not found: install Node.js/npm, or {without_npm or f'put {filename} ({spec}) into {cache_dir}'}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as tmp:
        cmd = [npm, "pack", spec, "--ignore-scripts", "--json", "--pack-destination", tmp]
        print("running:", " ".join(cmd), flush=True)
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"npm pack failed (exit {result.returncode}):\n{result.stderr.strip()}")
        packed = list(Path(tmp).glob("*.tgz"))
        if len(packed) != 1:
            sys.exit(f"npm pack wrote {len(packed)} .tgz files, expected one:\n{result.stdout}")
        if check_name and packed[0].name != filename:
            sys.exit(f"npm pack {spec} wrote {packed[0].name}, expected {filename}")
        os.replace(packed[0], target)
    return target


@dataclass
class Item:
    """One image to write: where it goes and which emoji it is."""

    member: str  # tar member name of the source PNG
    category: str
    group: str  # code points of the emoji it belongs to (a skin-tone variant's group is its emoji's)
    unified: str
    name: str
    short_name: str
    subcategory: str
    sort_key: tuple
    skin_tone: str = ""  # "" for the default tone, else the variation key, e.g. "1F3FB" or "1F3FB-1F3FC"
    pixels: bytes = field(default=b"", repr=False)  # encoded output PNG
    split: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name


def read_package(tarball: Path, version: str) -> tuple[list[dict], dict[str, bytes]]:
    """(emoji.json entries, {image member name: PNG bytes}) from the npm tarball, checking its version."""
    try:
        tar = tarfile.open(tarball, "r:*")
    except (OSError, tarfile.TarError) as exc:
        sys.exit(f"{tarball}: cannot open as a tar archive ({exc})")
    files: dict[str, bytes] = {}
    meta: dict[str, bytes] = {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            in_image_dir = member.name.startswith(IMAGE_DIR) and "/" not in member.name[len(IMAGE_DIR):]
            if in_image_dir and member.name.endswith(".png"):
                files[member.name] = tar.extractfile(member).read()
            elif member.name in ("package/emoji.json", "package/package.json"):
                meta[member.name] = tar.extractfile(member).read()
    for name in ("package/emoji.json", "package/package.json"):
        if name not in meta:
            sys.exit(f"{tarball}: no {name}; is this an {PACKAGE} tarball (npm pack {PACKAGE}@VERSION)?")
    package = json.loads(meta["package/package.json"])
    if package.get("name") != PACKAGE or package.get("version") != version:
        sys.exit(
            f"{tarball}: holds {package.get('name')}@{package.get('version')}, expected {PACKAGE}@{version} "
            "(pass the matching --version)"
        )
    if not files:
        sys.exit(f"{tarball}: no PNGs under {IMAGE_DIR}")
    return json.loads(meta["package/emoji.json"]), files


def select_items(entries: list[dict], files: dict[str, bytes], skin_tones: str) -> list[Item]:
    """The images to keep under the skin-tone policy, in Unicode order (Component dropped)."""
    items: list[Item] = []
    for e in entries:
        category = e["category"]
        if category in DROPPED_CATEGORIES:
            continue
        if category not in CATEGORIES:
            sys.exit(f"emoji.json: unknown category {category!r} (known: {CATEGORIES}); update CATEGORIES")
        common = dict(
            category=category,
            group=e["unified"],
            name=e.get("name") or "",
            short_name=e.get("short_name") or "",
            subcategory=e.get("subcategory") or "",
        )
        sort_order = e.get("sort_order", 0)
        variants = [("", e)]
        if skin_tones == "all":
            variants += sorted((e.get("skin_variations") or {}).items())
        for tone, v in variants:
            if not v.get("has_img_google", False):
                continue
            member = IMAGE_DIR + v["image"]
            if member not in files:
                sys.exit(f"emoji.json lists {v['image']} ({e.get('short_name')}) but the tarball has no {member}")
            items.append(Item(member=member, unified=v["unified"], skin_tone=tone,
                              sort_key=(sort_order, e["unified"], tone), **common))
    items.sort(key=lambda it: (CATEGORIES.index(it.category), it.sort_key))
    return items


def composite(png: bytes, background: tuple[int, int, int], member: str) -> bytes:
    """RGBA (or LA / palette with transparency) PNG over an opaque background -> RGB PNG bytes."""
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    if rgba.size != (64, 64):
        sys.exit(f"{member}: {rgba.size[0]}x{rgba.size[1]}, expected 64x64")
    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")  # no timestamps or text chunks: the same pixels give the same bytes
    return buffer.getvalue()


def drop_duplicates(items: list[Item]) -> tuple[list[Item], list[list[str]]]:
    """Keep the first (Unicode order) of each set of identical output images; also report the sets."""
    first: dict[bytes, Item] = {}
    sets: dict[str, list[str]] = {}
    kept = []
    for it in items:
        key = hashlib.sha256(it.pixels).digest()
        if key in first:
            sets.setdefault(first[key].filename, [first[key].filename]).append(it.filename)
        else:
            first[key] = it
            kept.append(it)
    return kept, list(sets.values())


def split_rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def assign_splits(items: list[Item], test_fraction: float, seed: int) -> None:
    """Per class, the round(test_fraction * emoji) emoji with the smallest hash rank go to test (with all
    their skin-tone variants); at least one each way when a class has two or more emoji."""
    for category in CATEGORIES:
        groups = sorted({it.group for it in items if it.category == category}, key=lambda g: split_rank(seed, g))
        n_test = round(test_fraction * len(groups))
        if len(groups) >= 2 and test_fraction > 0:
            n_test = min(max(n_test, 1), len(groups) - 1)
        test = set(groups[:n_test])
        for it in items:
            if it.category == category:
                it.split = "test" if it.group in test else "train"


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically unless the file already holds exactly ``data``; returns whether it wrote."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return True


def check_output_dir(out: Path, generator: str = GENERATOR) -> None:
    """Refuse a non-empty OUT that ``generator`` (this script by default) did not write (its train/ and test/ are
    pruned)."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("generator") != generator:
        sys.exit(f"{out} is not empty and has no manifest.json from {generator}; choose a new or empty --out")


def prune(out: Path, expected: set[Path], expected_dirs: set[Path]) -> int:
    """Remove files and folders under OUT/train and OUT/test that are not expected; returns the file count."""
    removed = 0
    for split in ("train", "test"):
        root = out / split
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                path = Path(dirpath) / name
                if path not in expected:
                    path.unlink()
                    removed += 1
            for name in dirnames:
                path = Path(dirpath) / name
                if path not in expected_dirs and not any(path.iterdir()):
                    path.rmdir()
        if root not in expected_dirs and not any(root.iterdir()):
            root.rmdir()
    return removed


def build(args: argparse.Namespace) -> dict:
    out = Path(os.path.expanduser(args.out)).resolve()
    check_output_dir(out)
    tarball = Path(args.tarball) if args.tarball else npm_pack(args.version, Path(args.cache_dir))
    digest = sha256_file(tarball)
    known = KNOWN_SHA256.get(args.version)
    if known is not None and digest != known:
        sys.exit(f"{tarball}: sha256 {digest}, but {PACKAGE}@{args.version} is {known}; re-download it")
    entries, files = read_package(tarball, args.version)

    items = select_items(entries, files, args.skin_tones)
    for it in items:
        it.pixels = composite(files[it.member], args.background, it.member)
    items, duplicates = drop_duplicates(items)
    assign_splits(items, args.test_fraction, args.seed)

    folders = {c: class_folder(i, c) for i, c in enumerate(CATEGORIES)}
    # Every class folder exists in every split, empty or not: the loader numbers the folders it finds, so a
    # missing one would shift the labels of the classes after it.
    splits = ("train", "test") if args.test_fraction > 0 else ("train",)
    expected_dirs = {out / s for s in splits} | {out / s / folders[c] for s in splits for c in CATEGORIES}
    for d in sorted(expected_dirs):
        d.mkdir(parents=True, exist_ok=True)
    expected: set[Path] = set()
    written = 0
    for it in items:
        path = out / it.split / folders[it.category] / it.filename
        expected.add(path)
        written += write_if_changed(path, it.pixels)
    removed = prune(out, expected, expected_dirs)

    classes = []
    for i, c in enumerate(CATEGORIES):
        mine = [it for it in items if it.category == c]
        classes.append({
            "index": i,
            "folder": folders[c],
            "category": c,
            "train": sum(it.split == "train" for it in mine),
            "test": sum(it.split == "test" for it in mine),
        })
    manifest = {
        "generator": GENERATOR,
        "package": PACKAGE,
        "version": args.version,
        "tarball": tarball.name,
        "tarball_sha256": digest,
        "license": "images: Noto Emoji, Apache-2.0 (github.com/googlefonts/noto-emoji); "
                   "emoji.json: MIT (github.com/iamcal/emoji-data)",
        "background": "#%02x%02x%02x" % tuple(args.background),
        "skin_tones": args.skin_tones,
        "dropped_categories": sorted(DROPPED_CATEGORIES),
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "resolution": 64,
        "recommended_flip": False,
        "flip_note": "left-right flips off: flags, text, digits, clocks and arrows change identity when mirrored",
        "classes": classes,
        "totals": {"train": sum(c["train"] for c in classes), "test": sum(c["test"] for c in classes)},
        "duplicates_dropped": duplicates,
        "images": [
            {
                "path": f"{it.split}/{folders[it.category]}/{it.filename}",
                "unified": it.unified,
                "short_name": it.short_name,
                "name": it.name,
                "subcategory": it.subcategory,
                "skin_tone": it.skin_tone,
            }
            for it in items
        ],
    }
    empty = [f"{s}/{c['folder']}" for c in classes for s in splits if c[s] == 0]
    if empty:
        print(f"warning: empty class folders (their labels exist but have no images): {', '.join(empty)}",
              file=sys.stderr)
    manifest_changed = write_if_changed(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    manifest["_written"] = written
    manifest["_removed"] = removed
    manifest["_manifest_changed"] = manifest_changed
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/, test/, manifest.json)")
    p.add_argument("--version", default="16.0.0", help=f"{PACKAGE} version (default 16.0.0)")
    p.add_argument("--tarball", help="an already downloaded .tgz of that version (skips npm pack)")
    p.add_argument("--cache-dir", default=str(default_cache_dir()),
                   help="where npm pack puts, and later runs find, the tarball (default: %(default)s)")
    p.add_argument("--background", type=parse_color, default=(255, 255, 255),
                   help="colour under the transparent pixels: white (default), black, gray, #RRGGBB or R,G,B")
    p.add_argument("--test-fraction", type=float, default=0.15, help="held-out share of each class (0.15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (0)")
    p.add_argument("--skin-tones", choices=SKIN_TONE_POLICIES, default="default",
                   help="default: only the default-tone image of each emoji; all: every skin-tone variant too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.test_fraction < 1.0:
        sys.exit(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    start = time.perf_counter()
    manifest = build(args)
    seconds = time.perf_counter() - start
    out = Path(os.path.expanduser(args.out)).resolve()
    print(f"{'label':>5}  {'folder':<20} {'train':>6} {'test':>5}")
    for c in manifest["classes"]:
        print(f"{c['index']:>5}  {c['folder']:<20} {c['train']:>6} {c['test']:>5}")
    totals = manifest["totals"]
    print(f"total: {totals['train']} train + {totals['test']} test = {totals['train'] + totals['test']} images "
          f"({sum(len(s) - 1 for s in manifest['duplicates_dropped'])} exact duplicates dropped)")
    print(f"{out}: {manifest['_written']} files written, {manifest['_removed']} removed, manifest "
          f"{'updated' if manifest['_manifest_changed'] else 'unchanged'}; {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
