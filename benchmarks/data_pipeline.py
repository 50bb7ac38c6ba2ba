#!/usr/bin/env python
"""The ImageNet input path on this machine: ``cdm prepare`` throughput (images/s with 1 and 2 decoding workers,
and the projected time for ImageNet's 1.28M JPEGs) and the trainer's batch reads from the prepared memory-mapped
arrays (batches/s at 64 and 256 px, with and without the prefetching thread), to compare with what a GPU consumes
(docs/performance.md: ~440 img/s for adm-64 training on an H200).

    python benchmarks/data_pipeline.py --images 2000 --out /tmp/pipeline_bench [--json results.json]

The folder is generated: JPEGs of mixed sizes (ImageNet's are ~400×350 on average, quality 90), in 10 classes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

IMAGENET_TRAIN = 1_281_167


def make_folder(root: Path, num: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "jpegs"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == num:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for i in range(num):
        w, h = int(rng.integers(250, 550)), int(rng.integers(200, 500))
        # smooth colour fields plus noise: compresses like a photo, not like a flat colour
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        cls = folder / f"class_{i % 10:02d}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(cls / f"{i:06d}.jpg", quality=90)
    return folder


def time_prepare(folder: Path, out: Path, resolutions: list[int], workers: int) -> dict:
    from cascaded_diffusion.data.prepare import prepare_dataset

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = prepare_dataset(f"imagefolder:{folder}", resolutions, out, workers=workers)
    seconds = time.perf_counter() - start
    n = result.num_images if hasattr(result, "num_images") else sum(1 for _ in folder.rglob("*.jpg"))
    rate = n / seconds
    return {"workers": workers, "images": n, "seconds": seconds, "images_per_s": rate,
            "imagenet_hours": IMAGENET_TRAIN / rate / 3600}


def time_loader(data_dir: Path, resolution: int, batch: int, depth: int, batches: int) -> dict:
    from cascaded_diffusion.data.loader import BatchStream, PrefetchLoader
    from cascaded_diffusion.data.prepare import load_prepared

    data = load_prepared(data_dir, resolution)
    images, labels = data.images, data.labels
    loader = PrefetchLoader(images, labels, BatchStream(len(labels), batch, seed=0), depth=depth)
    loader.next()  # start the thread / warm the page cache
    start = time.perf_counter()
    for _ in range(batches):
        x, _y = loader.next()
        x.float().div_(127.5).sub_(1)  # the trainer's conversion to [-1, 1]
    seconds = time.perf_counter() - start
    if hasattr(loader, "close"):
        loader.close()
    return {"resolution": resolution, "batch": batch, "prefetch_depth": depth,
            "batches_per_s": batches / seconds, "images_per_s": batches * batch / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("/tmp/pipeline_bench"))
    p.add_argument("--resolutions", default="32,64,256")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    resolutions = [int(r) for r in args.resolutions.split(",")]
    folder = make_folder(args.out, args.images)
    results = {"prepare": [], "loader": []}
    for w in (int(x) for x in args.workers.split(",")):
        r = time_prepare(folder, args.out / "prepared", resolutions, w)
        results["prepare"].append(r)
        print(f"prepare, {w} worker(s): {r['images_per_s']:.1f} images/s ({r['images']} JPEGs at {resolutions}); "
              f"ImageNet's 1.28M: {r['imagenet_hours']:.1f} h", flush=True)
    for res, batch in ((64, 64), (256, 64)):
        if res not in resolutions:
            continue
        for depth in (0, 2):
            r = time_loader(args.out / "prepared", res, batch, depth, args.batches)
            results["loader"].append(r)
            print(f"loader {res}px, batch {batch}, prefetch {depth}: {r['batches_per_s']:.1f} batches/s "
                  f"({r['images_per_s']:.0f} img/s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
