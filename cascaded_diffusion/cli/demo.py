"""``cdm demo``: serve a web page that samples a cascade stage by stage (docs/demo.md)."""

from __future__ import annotations

import argparse

from ..cascade import Cascade
from ..errors import UserError
from ..hardware import resolve_device
from .common import nonneg_int, positive_int


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.app import bind, make_server
    from ..demo.engine import DemoEngine
    from ..pretrained import find_cascade

    if args.pretrained and args.run_dirs:
        raise UserError("give either run directories or --pretrained, not both")
    if not args.pretrained and not args.run_dirs:
        raise UserError("give the run directories of a cascade (base first) or --pretrained NAME")
    if args.port > 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    # bound before the (slow) load, so a port in use is reported at once
    sock = bind(args.host, args.port)
    try:
        cascade = Cascade.load(args.run_dirs, pretrained=args.pretrained, device=resolve_device(args.device))
        manifest = find_cascade(args.pretrained).manifest if args.pretrained else {}
        if args.steps and len(args.steps) not in (1, len(cascade.stages)):
            raise UserError(f"--steps: got {len(args.steps)} values for {len(cascade.stages)} stages")
        engine = DemoEngine(cascade, name=args.pretrained or " -> ".join(args.run_dirs),
                            class_names=manifest.get("card", {}).get("classes"), steps=args.steps,
                            study_aug_level=manifest.get("study", {}).get("aug_level"))
        server = make_server(engine)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"cdm demo: serving {engine.name} ({' -> '.join(f'{r}px' for r in cascade.resolutions)}) on "
              f"http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"cdm demo: listening on {args.host}: anyone who can reach this machine can use the page",
                  flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="a web page that samples a cascade and shows every stage's input and output")
    p.add_argument("run_dirs", nargs="*", help="run or exported stage directories, base first")
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="a bundled cascade (fashion-mnist, emoji), hf://OWNER/REPO[@REVISION] or an exported folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--port", type=nonneg_int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--steps", type=lambda t: [positive_int(v) for v in t.split(",") if v.strip()], default=None,
                   help="the page's initial sampler steps, one value or one per stage (default: each stage's "
                        "[sample] steps)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.set_defaults(func=cmd_demo)
