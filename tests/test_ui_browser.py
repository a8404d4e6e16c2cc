"""The `browser` tier: `p2v ui` (the real command, in its own process) driven by Debian's
chromium through Playwright: open the page, see a bad request's one-line error, upload a held
clip, caption it, preview the anchor frame, render, and check that the result video plays
(duration > 0) and shows in a screenshot; then render the sample clip (its button); and no
request left this machine. Run:
``pytest tests/test_ui_browser.py`` (it runs wherever chromium is; ``P2V_UI_SCREENSHOT=docs/ui.png``
also saves the page, and ``P2V_UI_MODEL=mini`` serves the trained small model instead of tiny:
the README's picture is taken with both)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from tests.helpers import chromium, free_port

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    """`p2v ui --model tiny` (or ``P2V_UI_MODEL``) on a free port; yields (url, output folder)."""
    root = tmp_path_factory.mktemp("ui-browser")
    port = free_port()
    model = os.environ.get("P2V_UI_MODEL", "tiny")
    cmd = [sys.executable, "-c", "from cli import main; main()", "ui", "--model", model, "--port", str(port),
           "--out", str(root / "out"), "--threads", "1"]
    log = root / "ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (m := re.search(r"^p2v ui: (http://\S+)", log.read_text(), re.M)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"p2v ui did not start: {log.read_text()}")
            time.sleep(0.2)
        yield m.group(1), root / "out"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_page_renders_a_held_clip(server, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from p2v_fast.media.samples import make_sample_clip

    url, out = server
    clip = make_sample_clip(tmp_path / "held.mp4", n_frames=4, size=(128, 96), fps=12.0)
    hosts: set[str] = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(),
                                    args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.on("request", lambda r: r.url.startswith(("http", "ws")) and hosts.add(urlparse(r.url).netloc))
            page.goto(url)
            page.click("#render")  # no clip yet: the one-line error, in the page
            status = page.locator("#status textarea")
            page.wait_for_function("() => document.querySelector('#status textarea').value.startsWith('error:')")
            assert status.input_value() == "error: no clip: upload a video or press 'Use the sample clip'"

            page.locator("#clip input[type=file]").set_input_files(str(clip))
            page.wait_for_selector("#clip video", timeout=60_000)
            page.click("#caption")  # the source prompt, filled by BLIP on request
            page.wait_for_function("() => document.querySelector('#source textarea').value.length > 0")
            assert status.input_value().startswith("caption of frame 1: ")
            page.get_by_text("Options").click()
            for field, value in (("steps", "3"), ("size", "64"), ("frames", "4")):
                box = page.locator(f"#{field} input[type=number]")
                box.fill(value)
                box.press("Enter")
            page.click("#preview")  # the anchor frame alone, in seconds
            page.wait_for_selector("#anchor img", timeout=120_000)
            assert status.input_value().startswith("anchor frame previewed in "), status.input_value()
            page.click("#render")
            page.wait_for_function("() => { const v = document.querySelector('#result video');"
                                   " return v !== null && v.readyState >= 1 && v.duration > 0; }", timeout=180_000)
            duration = page.evaluate("document.querySelector('#result video').duration")
            assert duration == pytest.approx(4 / 12, abs=0.05)  # 4 frames at the clip's 12 fps
            assert status.input_value().startswith("done: held."), status.input_value()
            page.wait_for_timeout(500)
            shot = tmp_path / "result.png"
            page.locator("#result video").screenshot(path=str(shot))

            # the sample clip, picked with its button, rendered in its turn
            first = page.evaluate("document.querySelector('#result video').src")
            page.click("#sample")
            page.wait_for_function("() => (document.querySelector('#clip video') || {}).src?.includes('sample')")
            page.click("#render")
            page.wait_for_function("first => { const v = document.querySelector('#result video');"
                                   " return v !== null && v.src !== first && v.readyState >= 1 && v.duration > 0; }",
                                   arg=first, timeout=180_000)
            assert status.input_value().startswith("done: sample."), status.input_value()
            assert page.evaluate("document.querySelector('#result video').duration") > 0
            if target := os.environ.get("P2V_UI_SCREENSHOT"):  # the README's picture, in few colours (small)
                page.get_by_text("Options").click()
                page.evaluate("window.scrollTo(0, 0)")
                page.wait_for_timeout(500)
                page.screenshot(path=target, full_page=False)
                Image.open(target).convert("RGB").quantize(96, dither=Image.Dither.NONE).save(target, optimize=True)
        finally:
            browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 50 and pixels.std() > 10, pixels.std()  # the edited frames, not a blank box
    assert hosts == {urlparse(url).netloc}, hosts  # nothing loaded from anywhere else (blob: and data: aside)
    assert len(list(out.glob("held.*.mp4"))) == len(list(out.glob("sample.*.mp4"))) == 2  # edits and side-by-sides
