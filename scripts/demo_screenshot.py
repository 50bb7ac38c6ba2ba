"""Screenshot of the ``cdm demo`` page for docs/demo.md, taken in headless Chromium (as the browser test drives it).

    python scripts/demo_screenshot.py --pretrained emoji --out docs/images/demo_emoji.png

Starts ``cdm demo`` on a free port, lets the page draw its first sample (no click), sets the class and the level s
given here, samples again and saves the full page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdm_command import cdm_background  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="emoji")
    parser.add_argument("--out", required=True)
    parser.add_argument("--class-label", default="2")
    parser.add_argument("--seed", default="7")
    parser.add_argument("--aug-level", default=None, help="s of the first SR stage (default: its default)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    demo = cdm_background("demo", "--pretrained", args.pretrained, "--port", "0", stdout=subprocess.PIPE, text=True)
    try:
        url = re.search(r"on (http://\S+/)", demo.stdout.readline()).group(1)
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=args.chromium, headless=True, viewport={"width": 1000, "height": 900},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("document.body.dataset.samples === '1'", timeout=300_000)
            page.select_option("#class", args.class_label)
            page.fill("#seed", args.seed)
            if args.aug_level is not None:
                page.fill("#s1", args.aug_level)
            page.click("#go")
            page.wait_for_function("document.body.dataset.samples === '2'", timeout=300_000)
            page.screenshot(path=args.out, full_page=True)
            context.close()
    finally:
        demo.terminate()
        demo.wait(10)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
