"""``llavamed web``: example images decode; the slow test drives the real app in headless Chromium
(Debian's package, via Playwright's Python API; no browser download) and saves a screenshot."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

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


def test_an_upload_during_a_streamed_answer_stays_pending():
    from llavamed.serve.web import settle_pending

    a, b = {"id": "a", "image": None}, {"id": "b", "image": None}
    assert settle_pending(a, "a") == (None, None)  # the turn attached it: now in the chat
    assert settle_pending(b, "a") == (b, None)  # uploaded while "a"'s answer streamed
    assert settle_pending(b, None) == (b, None)  # a text-only or stopped turn


def test_web_events_one_turn_at_a_time_and_stop_and_reset_cancel_it(tiny_llava_dir, tmp_path):
    """The wiring the browser runs: the answer never writes the pending upload back (an upload
    made mid-answer was lost), Enter and Send are one event (two parallel turns lost one from
    the model's context), and Stop / New conversation cancel a running answer (a reset mid-answer
    came back with the old conversation)."""
    pytest.importorskip("gradio")
    from llavamed.serve.engine import Engine, SamplingParams
    from llavamed.serve.web import build_app

    engine = Engine.from_path(tiny_llava_dir)
    try:
        demo = build_app(
            engine, default_params=SamplingParams(max_tokens=8, temperature=3.0, top_p=0.01, seed=7)
        )
        cfg = demo.config
        on_upload = next(f.fn for f in demo.fns.values() if f.name == "on_upload")
    finally:
        engine.close()
    # A rejected file clears what was pending (the file box shows the rejected file).
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.warns(UserWarning, match="cannot use this file: corrupt image"):
        assert on_upload(str(bad)) == (None, None)
    # Uploads are held for the whole session: bounded as the API bounds requests. A 17000x100
    # strip was kept at full size, and anything up to PIL's 179 MP limit was decoded.
    strip = tmp_path / "strip.png"
    Image.new("RGB", (17000, 100), (90, 90, 90)).save(strip)
    img, pending_upload = on_upload(str(strip))
    assert max(img.size) == 2048 and pending_upload["image"] is img
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 6000)).save(huge)  # 42 MP > 40 MP
    with pytest.warns(UserWarning, match="cannot use this file: image too large"):
        assert on_upload(str(huge)) == (None, None)
    comp = {c["id"]: c for c in cfg["components"]}
    by_elem = {c["props"].get("elem_id"): i for i, c in comp.items() if c["props"].get("elem_id")}
    deps = {d["api_name"]: d for d in cfg["dependencies"]}
    respond, upload = deps["respond"], deps["on_upload"]
    pending = upload["outputs"][1]
    assert comp[pending]["type"] == "state"
    assert sorted(respond["targets"]) == sorted(
        [(by_elem["send"], "click"), (by_elem["question"], "submit")]
    )
    assert respond["trigger_mode"] == "once" and pending in respond["inputs"]
    assert pending not in respond["outputs"]
    settle = deps["settle_pending"]
    assert settle["trigger_after"] == respond["id"] and pending in settle["outputs"]
    for button in ("stop", "reset"):
        cancelling = [d for d in cfg["dependencies"] if (by_elem[button], "click") in d["targets"]]
        assert any(respond["id"] in d["cancels"] for d in cancelling), button
    # The command line's sampling values fit the controls (a slider refuses values outside it).
    values = {c["props"].get("label"): c["props"] for c in comp.values()}
    t = values["Temperature (0 = greedy)"]
    assert t["minimum"] <= 3.0 <= t["maximum"] and t["value"] == 3.0
    p = values["Top-p"]
    assert p["minimum"] <= 0.01 <= p["maximum"]
    assert values["Seed (-1 = random)"]["value"] == 7
