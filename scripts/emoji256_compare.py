"""The top-stage ablation as a picture: held-out real 64 px inputs (shown enlarged), what each 64 -> 256 stage of
the study drew from them (the same inputs, the same seed) and the real 256 px images, one row each:

    python scripts/emoji256_compare.py /work/runs/emoji256/study --out docs/images/emoji256_top_ablation.png

Reads ``in64_real.npz`` and ``gt256_{blur,noaug,noise}.npz`` (whichever exist) of ``emoji256_study.py``'s output
and the held-out split's 256 px images from ``--data``; ``--crop`` zooms into each image's centre to show edges.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROWS = (("gt256_blur", "blur aug"), ("gt256_noaug", "no aug"), ("gt256_noise", "noise aug"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path)
    p.add_argument("--data", type=Path, default=Path("/work/data"), help="holds emoji256-test/ (cdm prepare)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--indices", default="0,1,2,3,4,5", help="which of the study's held-out inputs to show")
    p.add_argument("--crop", type=int, default=0, help="show only the central CROP x CROP pixels, enlarged to 256")
    args = p.parse_args()
    from cascaded_diffusion.data import load_images

    picks = [int(i) for i in args.indices.split(",")]
    with np.load(args.study / "in64_real.npz") as f:
        inputs = f["arr_0"][picks]
    real = np.asarray(load_images(f"prepared:{args.data / 'emoji256-test'}", 256, channels=3).images)[picks]
    rows = [("64 px input", np.stack([np.asarray(Image.fromarray(a).resize((256, 256), Image.NEAREST))
                                      for a in inputs]))]
    for name, title in ROWS:
        path = args.study / f"{name}.npz"
        if path.exists():
            with np.load(path) as f:
                rows.append((title, f["arr_0"][picks]))
    rows.append(("real 256 px", real))
    label_w, cell, pad = 90, 256, 4
    sheet = Image.new("RGB", (label_w + len(picks) * (cell + pad), len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, images) in enumerate(rows):
        y = r * (cell + pad)
        draw.text((4, y + cell // 2), title, fill="black")
        for c, image in enumerate(images):
            tile = Image.fromarray(image)
            if args.crop:
                lo = (256 - args.crop) // 2
                tile = tile.crop((lo, lo, lo + args.crop, lo + args.crop)).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (cell + pad), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(rows)} rows x {len(picks)} images)")


if __name__ == "__main__":
    main()
