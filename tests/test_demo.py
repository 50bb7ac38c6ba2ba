"""``cdm demo``: the engine against ``cdm sample``, the HTTP answers (4xx, busy, progress) of a live
server, and the page in a real headless Chromium driven by Playwright.

The bundled cascades with 2 sampler steps per stage keep every sample well under a second on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascaded_diffusion.cascade import Cascade, sample_in_batches
from cascaded_diffusion.demo.engine import DemoBusy, DemoEngine, DemoParameterError
from cascaded_diffusion.pretrained import find_cascade

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium; CI has "
                                                             "it): the demo's browser test needs a real browser")


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def fmnist():
    return Cascade.load(pretrained="fashion-mnist")


@pytest.fixture(scope="module")
def emoji():
    return Cascade.load(pretrained="emoji")


# --- the engine -----------------------------------------------------------------------------------------


def test_demo_sample_is_cdm_samples_first_sample(fmnist):
    """Seed S, class c in the demo = sample 0 of ``cdm sample --seed S --num 1 --class-label c``: a picture seen on
    the page can be reproduced from the CLI."""
    engine = DemoEngine(fmnist, steps=[2])
    result = engine.sample(engine.parse({"class": 4, "seed": 11}))
    stages, _ = sample_in_batches(fmnist, torch.tensor([4]), batch_size=8, seed=11, steps=[2, 2],
                                  autocast=engine.precision.bf16, truncated=False, aug_levels=[0])
    for entry, expected in zip(result["stages"], stages):
        got = decode(entry["output"])
        assert got.shape == (entry["resolution"],) * 2  # grey: one channel
        assert np.array_equal(got, expected[0, ..., 0])
    # the SR stage's input: the 8px base output upsampled (no augmentation) to 32px
    cond = decode(result["stages"][1]["conditioning"])
    assert cond.shape == (32, 32) and result["stages"][0]["conditioning"] is None
    assert abs(cond.astype(float).mean() - stages[0].astype(float).mean()) < 8


def test_conditioning_shows_the_noise_level_and_progress_is_reported(emoji):
    engine = DemoEngine(emoji, steps=[2])
    seen = []
    clean = engine.sample(engine.parse({"class": 2, "seed": 3, "aug_levels": [0, 0]}), on_step=seen.append)
    noisy = engine.sample(engine.parse({"class": 2, "seed": 3, "aug_levels": [400, 0]}))
    # the same base sample; the 32px stage's input is re-noised at s=400 (rougher: larger pixel differences)
    assert clean["stages"][0]["output"] == noisy["stages"][0]["output"]
    rough = [np.abs(np.diff(decode(r["stages"][1]["conditioning"]).astype(float), axis=1)).mean()
             for r in (clean, noisy)]
    assert rough[1] > 2 * rough[0], rough
    assert [decode(s["output"]).shape for s in noisy["stages"]] == [(16, 16, 3), (32, 32, 3), (64, 64, 3)]
    assert [(s.stage, s.step) for s in seen] == [(i, k) for i in range(3) for k in (1, 2)]
    assert engine.progress()["busy"] is False and engine.progress()["fraction"] == 1.0
    truncated = engine.sample(engine.parse({"class": 2, "seed": 3, "aug_levels": [400, 0], "truncated": True}))
    assert "truncated" in truncated["stages"][0]["output_note"] and "z_s" in truncated["stages"][1]["conditioning_note"]


@pytest.mark.parametrize("body, message", [
    ({"class": 10}, r"class must be in \[0, 9\]"),
    ({"class": "3"}, "class must be an integer"),
    ({"seed": -1}, "seed must be in"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"steps": [2]}, "steps must be a list of 2"),
    ({"steps": [0, 2]}, r"steps\[0\] \(stage 1\) must be in \[1, 1000\]"),
    ({"aug_levels": [5]}, "must be 0: the stage's augmentation is 'none'"),
    ({"truncated": 1}, "truncated must be true or false"),
    ({"colour": "red"}, "unknown parameter 'colour'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_parameters_are_named(fmnist, body, message):
    with pytest.raises(DemoParameterError, match=message):
        DemoEngine(fmnist).parse(body)


def test_aug_level_outside_the_trained_range_is_refused(emoji):
    engine = DemoEngine(emoji)
    assert engine.aug_range(1) == (0, 500) and engine.aug_range(2) is None
    with pytest.raises(DemoParameterError, match=r"stage 2.*trained on.*\[0, 500\], got 501"):
        engine.parse({"aug_levels": [501, 0]})
    assert engine.parse({}).aug_levels == [250, 0]  # the bundle's measured default


# --- a live server: HTTP answers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(fmnist):
    from cascaded_diffusion.demo.app import bind, make_server

    classes = find_cascade("fashion-mnist").manifest["card"]["classes"]
    engine = DemoEngine(fmnist, name="fashion-mnist", steps=[2], class_names=classes)
    sock = bind("127.0.0.1", 0)
    srv = make_server(engine)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the demo server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    srv.should_exit = True
    thread.join(10)
    sock.close()


def http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body, status, message", [
    (b'{"class": 12}', 400, r"class must be in \[0, 9\], got 12"),
    (b'{"steps": [2, "many"]}', 400, r"steps\[1\] \(stage 2\) must be an integer"),
    (b"{not json", 400, "the body is not JSON"),
    (b'"a string"', 400, "expected a JSON object"),
    (b"x" * 70000, 413, "request body of 70000 bytes"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, status, message):
    url, _ = server
    code, answer = http(url + "/api/sample", body)
    assert code == status and re.search(message, answer["error"]), answer
    assert "Traceback" not in answer["error"]


def test_unknown_paths_and_methods_answer_json(server):
    url, _ = server
    assert http(url + "/nowhere") == (404, {"error": "GET /nowhere: Not Found"})
    code, answer = http(url + "/api/sample")  # GET
    assert code == 405 and "Method Not Allowed" in answer["error"]


def test_second_request_while_sampling_is_told_busy(server):
    url, engine = server
    results = {}
    slow = json.dumps({"class": 1, "seed": 5, "steps": [30, 15]}).encode()  # seconds on a CPU
    first = threading.Thread(target=lambda: results.update(first=http(url + "/api/sample", slow)))
    first.start()
    deadline = time.time() + 30
    while True:  # the progress endpoint answers while the sample runs on its worker thread
        code, progress = http(url + "/api/progress")
        if progress["busy"] and progress["step"] > 0:
            break
        assert time.time() < deadline and first.is_alive(), "the first sample never reported progress"
        time.sleep(0.02)
    code, answer = http(url + "/api/sample", b'{"class": 2}')
    assert code == 409 and answer["error"].startswith("busy: another sample is being drawn"), answer
    first.join(120)
    code, result = results["first"]
    assert code == 200 and result["steps"] == [30, 15] and result["class"] == 1
    code, answer = http(url + "/api/sample", b'{"class": 2}')  # free again
    assert code == 200 and answer["class_name"] == "Pullover"
    with pytest.raises(DemoBusy):  # the engine itself refuses a second caller too
        engine.try_acquire()
        engine.try_acquire()
    engine.release()
    assert http(url + "/api/sample", b'{"class": 3}')[0] == 200


# --- the page in a real browser -------------------------------------------------------------------------


class DemoProcess:
    """``cdm demo ... --port 0`` started from an empty directory, and the URL it prints."""

    def __init__(self, args: list[str], cwd: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cascaded_diffusion.cli", "demo", *args, "--port", "0"],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+/)", line)
        if not match:
            self.stop()
            raise AssertionError(f"cdm demo did not start: {line}{self.proc.stdout.read()}")
        self.url = match.group(1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # a fresh profile per test (Playwright passes it as --user-data-dir)
        context = p.chromium.launch_persistent_context(tmp_path / "chromium-profile", executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS)
        yield context
        context.close()


def page_images(page) -> list[dict]:
    """Per stage row: the output and conditioning images' sources and natural (not displayed) sizes."""
    return page.eval_on_selector_all("tr.stage-row", """rows => rows.map(r => {
        const img = sel => { const i = r.querySelector(sel + ' img');
                             return i ? {src: i.src, w: i.naturalWidth, h: i.naturalHeight} : null; };
        return {resolution: Number(r.dataset.resolution), output: img('td.output'), cond: img('td.conditioning')};
    })""")


def wait_for_samples(page, n: int) -> None:
    page.wait_for_function(f"document.body.dataset.samples === '{n}' && "
                           "[...document.images].every(i => i.complete && i.naturalWidth > 0)", timeout=120_000)


@needs_chromium
def test_browser_fashion_mnist_first_view_shows_a_sample(tmp_path, browser):
    """The acceptance command: ``cdm demo --pretrained fashion-mnist`` from an empty directory, default steps."""
    empty = tmp_path / "empty"
    empty.mkdir()
    demo = DemoProcess(["--pretrained", "fashion-mnist"], empty)
    try:
        page = browser.new_page()
        page.goto(demo.url)
        wait_for_samples(page, 1)  # no click
        rows = page_images(page)
        assert [r["resolution"] for r in rows] == [8, 32]
        assert rows[0]["output"]["w"] == 8 and rows[0]["cond"] is None
        assert (rows[1]["output"]["w"], rows[1]["output"]["h"], rows[1]["cond"]["w"]) == (32, 32, 32)
        assert "error" not in (page.get_attribute("#status", "class") or "")
    finally:
        demo.stop()
    assert list(empty.iterdir()) == []  # serving writes nothing into the working directory


@needs_chromium
def test_browser_change_class_and_level_gives_new_images(tmp_path, browser):
    demo = DemoProcess(["--pretrained", "emoji", "--steps", "2"], tmp_path)
    try:
        page = browser.new_page()
        page.goto(demo.url)
        wait_for_samples(page, 1)
        before = page_images(page)
        assert [r["resolution"] for r in before] == [16, 32, 64]
        for r in before:
            assert (r["output"]["w"], r["output"]["h"]) == (r["resolution"],) * 2
            assert r["cond"] is None if r["resolution"] == 16 else r["cond"]["w"] == r["resolution"]
        # the measured default (250) is where the slider starts, and is marked on it
        assert page.input_value("#s1") == "250" and "default 250" in page.inner_text(".mark")
        page.select_option("#class", "5")
        page.fill("#s1", "450")  # a range input: fill sets its value and fires input
        assert page.inner_text("#s1-value") == "s = 450"
        page.click("#go")
        wait_for_samples(page, 2)
        after = page_images(page)
        assert [(r["output"]["w"], r["resolution"]) for r in after] == [(16, 16), (32, 32), (64, 64)]
        for old, new in zip(before, after):
            assert old["output"]["src"] != new["output"]["src"]
        assert before[1]["cond"]["src"] != after[1]["cond"]["src"]
        status = page.inner_text("#status")
        assert "Activities" in status and "s = [450, 0]" in status, status
        assert page.get_attribute("#progress", "value") == "1"
        # a bad value typed into the page is answered with the server's message, not a traceback
        page.fill("#steps0", "0")
        page.click("#go")
        page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60_000)
        assert "steps[0] (stage 1) must be in [1, 1000]" in page.inner_text("#status")
    finally:
        demo.stop()


# --- the command's own errors ---------------------------------------------------------------------------


def test_cdm_demo_refuses_bad_invocations_in_one_line(capsys):
    import socket

    from cascaded_diffusion.cli.main import main

    assert main(["demo"]) == 2
    assert "give the run directories of a cascade (base first) or --pretrained NAME" in capsys.readouterr().err
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        assert main(["demo", "--pretrained", "fashion-mnist", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()
    assert main(["demo", "--pretrained", "fashion-mnist", "--port", "70000"]) == 2
    assert "--port must be in [0, 65535]" in capsys.readouterr().err
