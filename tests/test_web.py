"""``llavamed web``: example images decode; the slow test drives the real app in headless Chromium
(Debian's package, via Playwright's Python API; no browser download) and saves a screenshot."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from llavamed.images import load_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web_screenshot.png"


def test_example_images_are_real_dicom_and_medsynth(tmp_path):
    from llavamed.serve.web import example_images

    paths = example_images(tmp_path)
    names = [p.name for p in paths]
    assert "CT_small.dcm" in names and "MR_small.dcm" in names
    assert any(n.startswith("medsynth_") for n in names)
    for p in paths:
        img = load_image(p)
        assert img.mode == "RGB" and min(img.size) >= 64
        # windowed, not a blank frame
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_web_ui_in_headless_chromium(tiny_llava_dir):
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium package is not installed (apt-get install chromium)")
    from pydicom.data import get_testdata_file

    from llavamed.serve.engine import Engine, SamplingParams
    from llavamed.serve.web import launch

    engine = Engine.from_path(tiny_llava_dir)
    port = _free_port()
    demo = launch(
        engine,
        "127.0.0.1",
        port,
        block=False,
        default_params=SamplingParams(max_tokens=24, temperature=0.7),
    )
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.wait_for_selector("#image-upload", timeout=60_000)
            page.locator("#image-upload input[type=file]").set_input_files(
                get_testdata_file("CT_small.dcm")
            )
            page.wait_for_selector("#image-preview img", timeout=60_000)
            page.locator("#question textarea").fill("What does this CT show?")
            page.locator("#send").click()
            page.wait_for_function(
                "() => document.querySelectorAll('#chatbot .message').length >= 2", timeout=120_000
            )
            page.wait_for_function(
                "() => { const m = document.querySelectorAll('#chatbot .message');"
                " return m[m.length - 1].innerText.trim().length > 0 }",
                timeout=120_000,
            )
            for _ in range(240):
                if engine.stats["completed"] >= 1:
                    break
                page.wait_for_timeout(500)
            chat = page.locator("#chatbot").inner_text()
            assert "What does this CT show?" in chat
            # second turn about the same image
            page.locator("#question textarea").fill("Is there contrast?")
            page.locator("#send").click()
            page.wait_for_function(
                "() => document.querySelectorAll('#chatbot .message').length >= 4", timeout=120_000
            )
            for _ in range(240):  # until the second answer has finished streaming
                if engine.stats["completed"] >= 2:
                    break
                page.wait_for_timeout(500)
            page.wait_for_timeout(1500)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()
        assert SCREENSHOT.stat().st_size > 10_000
        assert engine.stats["completed"] >= 2
    finally:
        demo.close()
        engine.close()
