#!/usr/bin/env python
"""Three open vector emoji designs rendered at 256x256 as a class-per-category image folder (docs/emoji256.md).

    python scripts/prepare_emoji256.py --out /data/emoji256        # npm pack (pinned), render, write
    cdm prepare imagefolder:/data/emoji256/train --resolutions 16,64,256 --out /data/emoji256-prepared

Designs (each an npm package, version and tarball sha256 pinned in DESIGNS; the *graphics* licences differ from
the packages' code licences and are what matters for images and for models trained on them):

* ``twemoji``  -- Twemoji 15.0 (``@twemoji/svg``), graphics CC-BY 4.0, (c) Twitter, Inc and other contributors;
* ``noto``     -- Noto Emoji (``@svgmoji/noto``, one SVG sprite), graphics Apache License 2.0, (c) Google;
* ``openmoji`` -- OpenMoji 17.0 (``openmoji``, ``color/svg``), graphics CC BY-SA 4.0, (c) OpenMoji / HfG
  Schwaebisch Gmuend.

Categories (the 9 classes of scripts/prepare_emoji.py, same folder names and labels) come from ``emoji.json``
of ``emoji-datasource`` 16.0.0 (MIT). An emoji is the same across designs when its code points agree after
dropping the FE0F variation selector; only default-tone emoji are kept (skin-tone variants would make People &
Body half the data set), "Component" is dropped, and a design that lacks an emoji simply has no image of it.

Held-out split **by emoji, across designs**: the emoji of each class are ranked by sha256(seed, code points) --
the rule of prepare_emoji.py -- and the first round(test_fraction * n) go to test *with every design's drawing*,
so a held-out emoji is new to a model, not another vendor's drawing of a memorised one.

Rendering: ``resvg-py`` (resvg, a Rust SVG renderer shipped as a self-contained wheel: no system libraries),
fitted into 256x256 keeping the aspect ratio (Noto's flags are 3:2), composited over an opaque ``--background``
(white, as the 64-px emoji data) and saved as RGB PNG. Exact pixel duplicates are dropped (first in design,
then Unicode order). Re-running writes nothing that is already right; stale files are removed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_emoji as emoji64  # noqa: E402  (same class list, split rule, atomic writes and pruning)

GENERATOR = "scripts/prepare_emoji256.py"
RESOLUTION = 256
SVG_NS = "http://www.w3.org/2000/svg"

# name -> npm spec, tarball file name (as npm pack writes it), graphics licence, attribution
DESIGNS: dict[str, dict[str, str]] = {
    "twemoji": {
        "spec": "@twemoji/svg@15.0.0",
        "tarball": "twemoji-svg-15.0.0.tgz",
        "license": "CC-BY-4.0",
        "attribution": "Twemoji graphics (c) Twitter, Inc and other contributors, licensed under CC-BY 4.0 "
                       "(https://creativecommons.org/licenses/by/4.0/); https://github.com/jdecked/twemoji",
    },
    "noto": {
        "spec": "@svgmoji/noto@3.2.0",
        "tarball": "svgmoji-noto-3.2.0.tgz",
        "license": "Apache-2.0",
        "attribution": "Noto Emoji graphics (c) Google Inc., licensed under the Apache License 2.0; "
                       "https://github.com/googlefonts/noto-emoji (SVG sprite packaged by svgmoji, MIT)",
    },
    "openmoji": {
        "spec": "openmoji@17.0.0",
        "tarball": "openmoji-17.0.0.tgz",
        "license": "CC-BY-SA-4.0",
        "attribution": "All emojis designed by OpenMoji - the open-source emoji and icon project. License: "
                       "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); https://openmoji.org",
    },
}
METADATA = {
    "spec": "emoji-datasource@16.0.0",
    "tarball": "emoji-datasource-16.0.0.tgz",
    "license": "MIT",
    "attribution": "emoji.json from emoji-data (c) Cal Henderson, MIT licence; https://github.com/iamcal/emoji-data",
}
# sha256 of the registry tarballs this script was checked against; a mismatch is an error.
KNOWN_SHA256 = {
    "twemoji-svg-15.0.0.tgz": "1d2907557a422c7c4e3feca50ef915c39da1db3d76b4a4d7e73fb59bce4403c3",
    "svgmoji-noto-3.2.0.tgz": "4bd1ef9824efaa08f124541a4c3420899a273333169aada20761384f9c7a35d0",
    "openmoji-17.0.0.tgz": "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68",
    "emoji-datasource-16.0.0.tgz": "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9",
}


def checked_tarball(spec: str, filename: str, cache_dir: Path) -> tuple[Path, str]:
    path = emoji64.npm_pack_spec(spec, filename, cache_dir, check_name=True)
    digest = emoji64.sha256_file(path)
    known = KNOWN_SHA256.get(filename)
    if known and digest != known:
        sys.exit(f"{path}: sha256 {digest}, but {spec} is {known}; delete it and re-run")
    return path, digest


def emoji_key(codepoints: str) -> str:
    """``"2764-FE0F-200D-1F525"`` and ``"2764-200d-1f525"`` -> ``"2764-200D-1F525"``: one key per emoji."""
    return "-".join(p for p in codepoints.upper().split("-") if p and p != "FE0F")


def read_svgs(design: str, tarball: Path) -> dict[str, str]:
    """{emoji key: standalone SVG text} of one design's package."""
    svgs: dict[str, str] = {}
    with tarfile.open(tarball, "r:*") as tar:
        if design == "noto":
            sprite = tar.extractfile("package/sprites/all.svg").read()
            ET.register_namespace("", SVG_NS)
            ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")
            for child in ET.fromstring(sprite):
                if child.tag == f"{{{SVG_NS}}}svg" and child.get("id"):
                    svgs.setdefault(emoji_key(child.get("id")), ET.tostring(child, encoding="unicode"))
            return svgs
        prefix = {"twemoji": "package/", "openmoji": "package/color/svg/"}[design]
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if member.isfile() and name.startswith(prefix) and name.endswith(".svg") and "/" not in name[len(prefix):]:
                key = emoji_key(Path(name).stem)
                if key not in svgs:
                    svgs[key] = tar.extractfile(member).read().decode("utf-8")
    return svgs


def render(svg: str, background: tuple[int, int, int], resolution: int = RESOLUTION) -> bytes:
    """SVG -> RGB PNG bytes, fitted into resolution^2 keeping the aspect ratio, over an opaque background."""
    import resvg_py  # a wheel with no system libraries; imported here so --help works without it

    match = re.search(r'viewBox="\s*([-\d.eE]+)[\s,]+([-\d.eE]+)[\s,]+([-\d.eE]+)[\s,]+([-\d.eE]+)', svg[:2000])
    width, height = (float(match.group(3)), float(match.group(4))) if match else (1.0, 1.0)
    if width >= height:
        size = {"width": resolution, "height": max(1, round(resolution * height / width))}
    else:
        size = {"width": max(1, round(resolution * width / height)), "height": resolution}
    png = bytes(resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True, **size))
    with Image.open(io.BytesIO(png)) as image:
        rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", (resolution, resolution), (*background, 255))
    canvas.alpha_composite(rgba, ((resolution - rgba.width) // 2, (resolution - rgba.height) // 2))
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, format="PNG")  # no text chunks: the same pixels give the same bytes
    return buffer.getvalue()


@dataclass
class Item:
    design: str
    category: str
    group: str  # the emoji key: the split unit, shared by every design's drawing
    unified: str
    short_name: str
    sort_key: tuple
    pixels: bytes = field(default=b"", repr=False)
    split: str = ""

    @property
    def filename(self) -> str:
        return f"{self.design}_{self.unified.lower()}.png"


def select_items(entries: list[dict], svgs: dict[str, dict[str, str]]) -> tuple[list[Item], dict]:
    """Every (design, emoji) pair that the design draws, in design then Unicode order; and per-design misses."""
    items: list[Item] = []
    missing: dict[str, list[str]] = {d: [] for d in svgs}
    for design, drawings in svgs.items():
        for e in entries:
            category = e["category"]
            if category in emoji64.DROPPED_CATEGORIES:
                continue
            if category not in emoji64.CATEGORIES:
                sys.exit(f"emoji.json: unknown category {category!r}; update CATEGORIES in prepare_emoji.py")
            key = emoji_key(e["unified"])
            if key not in drawings:
                missing[design].append(e["unified"])
                continue
            items.append(Item(design=design, category=category, group=key, unified=e["unified"],
                              short_name=e.get("short_name") or "", sort_key=(e.get("sort_order", 0), key)))
    order = {d: i for i, d in enumerate(svgs)}
    items.sort(key=lambda it: (emoji64.CATEGORIES.index(it.category), order[it.design], it.sort_key))
    return items, missing


def attribution_text(designs: list[str]) -> str:
    lines = ["# Emoji artwork in this data set (and in models trained on it)", ""]
    for d in designs:
        lines.append(f"- **{d}** ({DESIGNS[d]['spec']}, graphics licence {DESIGNS[d]['license']}): "
                     f"{DESIGNS[d]['attribution']}")
    lines.append(f"- Categories: {METADATA['attribution']}")
    lines += ["", "Images were rendered from the SVG sources at 256x256 with resvg and composited over a plain "
              "background; no other changes were made to the drawings.", ""]
    return "\n".join(lines)


def build(args: argparse.Namespace) -> dict:
    out = Path(os.path.expanduser(args.out)).resolve()
    emoji64.check_output_dir(out, GENERATOR)
    cache = Path(args.cache_dir)
    designs = args.designs
    tarballs = {d: checked_tarball(DESIGNS[d]["spec"], DESIGNS[d]["tarball"], cache) for d in designs}
    meta_path, meta_digest = checked_tarball(METADATA["spec"], METADATA["tarball"], cache)
    with tarfile.open(meta_path, "r:*") as tar:
        entries = json.loads(tar.extractfile("package/emoji.json").read())

    svgs = {d: read_svgs(d, tarballs[d][0]) for d in designs}
    items, missing = select_items(entries, svgs)
    for i, it in enumerate(items):
        it.pixels = render(svgs[it.design][it.group], args.background)
        if (i + 1) % 500 == 0:
            print(f"rendered {i + 1}/{len(items)}", flush=True)
    items, duplicates = emoji64.drop_duplicates(items)
    emoji64.assign_splits(items, args.test_fraction, args.seed)

    folders = {c: emoji64.class_folder(i, c) for i, c in enumerate(emoji64.CATEGORIES)}
    splits = ("train", "test") if args.test_fraction > 0 else ("train",)
    expected_dirs = {out / s for s in splits} | {out / s / folders[c] for s in splits for c in emoji64.CATEGORIES}
    for d in sorted(expected_dirs):
        d.mkdir(parents=True, exist_ok=True)
    expected: set[Path] = set()
    written = 0
    for it in items:
        path = out / it.split / folders[it.category] / it.filename
        expected.add(path)
        written += emoji64.write_if_changed(path, it.pixels)
    removed = emoji64.prune(out, expected, expected_dirs)

    classes = []
    for i, c in enumerate(emoji64.CATEGORIES):
        mine = [it for it in items if it.category == c]
        row = {"index": i, "folder": folders[c], "category": c,
               "train": sum(it.split == "train" for it in mine), "test": sum(it.split == "test" for it in mine)}
        for d in designs:
            row[d] = sum(it.design == d for it in mine)
        classes.append(row)
    test_groups = {it.group for it in items if it.split == "test"}
    train_groups = {it.group for it in items if it.split == "train"}
    assert not test_groups & train_groups, "an emoji on both sides of the split"
    manifest = {
        "generator": GENERATOR,
        "resolution": RESOLUTION,
        "renderer": "resvg-py (resvg)",
        "designs": {d: {**{k: DESIGNS[d][k] for k in ("spec", "license", "attribution")},
                        "tarball": tarballs[d][0].name, "tarball_sha256": tarballs[d][1],
                        "images": sum(it.design == d for it in items), "not_drawn": missing[d]}
                    for d in designs},
        "metadata": {"spec": METADATA["spec"], "tarball_sha256": meta_digest, "license": METADATA["license"]},
        "background": "#%02x%02x%02x" % tuple(args.background),
        "skin_tones": "default",
        "dropped_categories": sorted(emoji64.DROPPED_CATEGORIES),
        "split": "by emoji across designs: every design's drawing of an emoji is on the same side",
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "recommended_flip": False,
        "classes": classes,
        "totals": {"train": sum(c["train"] for c in classes), "test": sum(c["test"] for c in classes),
                   "emoji_train": len(train_groups), "emoji_test": len(test_groups)},
        "duplicates_dropped": duplicates,
        "images": [{"path": f"{it.split}/{folders[it.category]}/{it.filename}", "design": it.design,
                    "unified": it.unified, "short_name": it.short_name} for it in items],
    }
    written += emoji64.write_if_changed(out / "ATTRIBUTION.md", attribution_text(designs).encode())
    changed = emoji64.write_if_changed(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    manifest["_written"], manifest["_removed"], manifest["_manifest_changed"] = written, removed, changed
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/, test/, manifest.json, ATTRIBUTION.md)")
    p.add_argument("--designs", type=lambda s: [d.strip() for d in s.split(",") if d.strip()],
                   default=list(DESIGNS), help=f"comma-separated subset of {','.join(DESIGNS)} (default: all)")
    p.add_argument("--cache-dir", default=str(emoji64.default_cache_dir()),
                   help="where npm pack puts, and later runs find, the tarballs (default: %(default)s)")
    p.add_argument("--background", type=emoji64.parse_color, default=(255, 255, 255),
                   help="colour under the transparent pixels: white (default), black, gray, #RRGGBB or R,G,B")
    p.add_argument("--test-fraction", type=float, default=0.15, help="held-out share of each class's emoji (0.15)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = [d for d in args.designs if d not in DESIGNS]
    if unknown or not args.designs:
        sys.exit(f"--designs: unknown {unknown} (choose from {', '.join(DESIGNS)})")
    if not 0.0 <= args.test_fraction < 1.0:
        sys.exit(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    start = time.perf_counter()
    manifest = build(args)
    out = Path(os.path.expanduser(args.out)).resolve()
    header = "".join(f" {d:>8}" for d in args.designs)
    print(f"{'label':>5}  {'folder':<20} {'train':>6} {'test':>5}{header}")
    for c in manifest["classes"]:
        per = "".join(f" {c[d]:>8}" for d in args.designs)
        print(f"{c['index']:>5}  {c['folder']:<20} {c['train']:>6} {c['test']:>5}{per}")
    t = manifest["totals"]
    print(f"total: {t['train']} train + {t['test']} test images ({t['emoji_train']} + {t['emoji_test']} emoji); "
          f"{sum(len(s) - 1 for s in manifest['duplicates_dropped'])} exact duplicates dropped")
    print(f"{out}: {manifest['_written']} files written, {manifest['_removed']} removed, manifest "
          f"{'updated' if manifest['_manifest_changed'] else 'unchanged'}; {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
