"""Screenshot of TensorBoard for docs/training.md ("Watching training"), taken in headless Chromium.

    python scripts/tensorboard_screenshot.py RUN/tensorboard --out docs/images/tensorboard_base8.png

Starts ``tensorboard --logdir LOGDIR`` on a free local port, opens the time-series dashboard with every card
expanded and saves the full page (scalars and the ``samples`` image). Needs ``pip install tensorboard playwright``
and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds for the charts to draw")
    parser.add_argument("--tags", default="samples|loss_q|ema_rate|train/lr|train/loss$|eval/kid$",
                        help="regex of the cards to show (TensorBoard's tag filter)")
    parser.add_argument("--height", type=int, default=1480, help="page height in pixels (the dashboard scrolls "
                                                                   "inside itself, so the picture is the viewport)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host",
                              "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):  # tensorboard takes a few seconds to start
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=args.chromium, headless=True,
                                                           viewport={"width": 1400, "height": args.height}, args=ARGS)
            page = context.new_page()
            page.goto(url + "#timeseries")
            page.wait_for_selector("text=samples", timeout=60_000)
            page.fill("input[placeholder='Filter tags (regex)']", args.tags)
            settings = page.locator("button:has-text('Settings')")
            if page.locator("text=Horizontal Axis").is_visible() and settings.count():
                settings.first.click()  # the settings pane opens by default; the cards need the room
            time.sleep(args.settle)
            page.screenshot(path=args.out, full_page=True)
            context.close()
    finally:
        board.terminate()
        board.wait(10)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
