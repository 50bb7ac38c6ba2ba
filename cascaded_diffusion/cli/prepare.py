"""``cdm prepare``: decode an image folder once into memory-mapped arrays (``prepared:DIR``)."""

from __future__ import annotations

import sys

from ..data.prepare import DEFAULT_CHUNK_SIZE, MANIFEST, prepare_dataset
from .common import int_list, positive_int


def cmd_prepare(args) -> int:
    result = prepare_dataset(
        args.source, args.resolutions, args.out, channels=args.channels, workers=args.workers,
        on_corrupt=args.on_corrupt, progress=not args.quiet, chunk_size=args.chunk_size,
    )
    m = result.manifest
    res = ",".join(str(r) for r in m["resolutions"])
    if result.already_prepared:
        print(f"{result.out} is already prepared from {m['source']} ({m['num_images']} images at {res} px); nothing to do")
        return 0
    for line in m["skipped"][:20]:
        print(f"skipped: {line}", file=sys.stderr)
    if len(m["skipped"]) > 20:
        print(f"skipped: ... {len(m['skipped']) - 20} more, listed in {result.out / MANIFEST}", file=sys.stderr)
    rate = result.decoded / max(result.seconds, 1e-9)
    print(
        f"prepared {m['num_images']} images ({len(m['skipped'])} unreadable skipped) of {m['num_classes']} classes "
        f"at {res} px, {m['channels']} channels, in {result.seconds:.1f} s ({rate:.1f} img/s decoded); "
        f"train with data.source = \"prepared:{result.out}\""
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="decode an image folder once into memory-mapped arrays (prepared:DIR)")
    p.add_argument("source", help="imagefolder:PATH (one subfolder per class)")
    p.add_argument("--resolutions", type=int_list, required=True, help="comma-separated, e.g. 32,64,256")
    p.add_argument("--out", required=True, help="the prepared dataset directory (DATA_DIR)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3)
    p.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: all CPUs)")
    p.add_argument("--on-corrupt", choices=["skip", "error"], default="skip")
    p.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE,
                   help="files per resumable unit of work")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
