"""``llavamed web``: example images decode; the slow test drives the real app in headless Chromium
(Debian's package, via Playwright's Python API; no browser download) and saves a screenshot."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

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
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web_screenshot.png"
"""Refreshed only when LLAVAMED_UPDATE_SCREENSHOT=1: a test run must leave the work tree clean."""
REQUIRE_BROWSER = os.environ.get("LLAVAMED_REQUIRE_BROWSER") == "1"
"""Set by CI (.ci/run), which installs the browser: there a missing piece fails the test instead
of skipping it, so the browser test cannot drop out of CI unnoticed."""


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


def _launch_local(engine, **params):
    """The app on a free 127.0.0.1 port, not blocking: (demo, url)."""
    from llavamed.serve.engine import SamplingParams
    from llavamed.serve.web import launch

    port = _free_port()
    demo = launch(engine, "127.0.0.1", port, block=False, default_params=SamplingParams(**params))
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def web(tiny_llava_dir):
    """The app launched on 127.0.0.1 over the tiny llava; ``prompts`` records every prompt the
    engine prepared. Each test talks to it through its own gradio_client (its own session)."""
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    from llavamed.serve.engine import Engine

    engine = Engine.from_path(tiny_llava_dir)
    prompts = []
    prepare = engine.prepare

    def recording_prepare(messages, images=()):
        prompt = prepare(messages, images)
        prompts.append(prompt)
        return prompt

    engine.prepare = recording_prepare
    demo, url = _launch_local(engine, max_tokens=3, temperature=0)
    try:
        yield SimpleNamespace(engine=engine, demo=demo, url=url, prompts=prompts)
    finally:
        demo.close()
        engine.close()


def test_uploads_are_judged_by_their_contents_not_their_names(web, tmp_path):
    """Gradio refused an extension-less DICOM (IM000001), a Siemens .IMA or a .jfif before
    load_image saw it, though ``llavamed chat --image`` takes them."""
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    ct = Path(get_testdata_file("CT_small.dcm"))
    files = [tmp_path / "IM000001", tmp_path / "scan.IMA", tmp_path / "1.3.12.2.1107.5.1.4.54023"]
    for f in files:
        shutil.copy(ct, f)
    Image.new("RGB", (48, 40), (10, 200, 30)).save(tmp_path / "photo.jfif", format="JPEG")
    files.append(tmp_path / "photo.jfif")
    client = Client(web.url, verbose=False)
    for f in files:
        preview = client.predict(handle_file(str(f)), api_name="/on_upload")
        assert preview and Image.open(preview).size[0] > 0, f.name


def test_a_rejected_upload_says_why(web, tmp_path):
    """The warning showed only the reason ("image too large"), not the limit it broke."""
    on_upload = next(f.fn for f in web.demo.fns.values() if f.name == "on_upload")
    huge = tmp_path / "huge.png"
    Image.new("L", (7000, 6000)).save(huge)
    with pytest.warns(UserWarning) as caught:
        assert on_upload(str(huge)) == (None, None)
    assert "image too large (7000x6000 > 40000000 pixels)" in str(caught[0].message)


def test_a_long_rejection_detail_is_shortened_to_one_line():
    from llavamed.errors import InputError
    from llavamed.serve.web import upload_warning

    msg = upload_warning(InputError("x.dcm", "undecodable DICOM pixels", "codec\nmissing " * 80))
    assert msg.startswith("cannot use this file: undecodable DICOM pixels (codec missing")
    assert "\n" not in msg and len(msg) < 260


def test_the_seed_is_bounded_as_the_command_line_bounds_it(web):
    """A seed past 2**64 reached torch.manual_seed: a bare "Error" in the browser and a
    traceback on the server. The box and the handler take -1 (random) .. 2**32-1."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    MAX_SEED = 2**32 - 1
    client = Client(web.url, verbose=False)
    answers = [client.predict("hi", [], 0.7, 1.0, 3, s, api_name="/respond")[1] for s in (5, 5)]
    assert answers[0] == answers[1] and answers[0][-1]["role"] == "assistant"
    client.predict("hi", [], 0.7, 1.0, 3, -1, api_name="/respond")
    client.predict("hi", [], 0.7, 1.0, 3, MAX_SEED, api_name="/respond")
    for bad in (10**20, MAX_SEED + 1, -2):
        with pytest.raises(AppError, match=r"(less|greater) than (minimum|maximum) value"):
            client.predict("hi", [], 0.7, 1.0, 3, bad, api_name="/respond")
    # the handler checks too: the box's bounds are the browser's, a caller may bypass them
    from llavamed.serve.web import seed_value

    assert seed_value(None) is None and seed_value(-1) is None and seed_value(7.0) == 7
    for bad in (10**20, MAX_SEED + 1, -2, 1.5, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="Seed must be a whole number from 0 to 4294967295"):
            seed_value(bad)


def test_an_api_client_calling_respond_attaches_an_upload_once(web):
    """The browser clears the pending upload in a second step after /respond; a client calling
    /respond alone sent the image again every turn (one more image in the prompt per turn)."""
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    client = Client(web.url, verbose=False)
    client.predict(handle_file(get_testdata_file("CT_small.dcm")), api_name="/on_upload")
    start = len(web.prompts)
    history = []
    for q in ("What is it?", "Which organ?", "Any contrast?"):
        _, history = client.predict(q, history, 0.0, 1.0, 3, 1, api_name="/respond")
    prompts = web.prompts[start:]
    assert len(prompts) == 3 and len(history) == 6
    token = web.engine.image_token_id
    for p in prompts:  # the one image stays in the conversation, attached once
        assert p.n_images == 1
        assert (
            sum(1 for i, t in enumerate(p.input_ids) if t == token and p.input_ids[i - 1] != token)
            == 1
        )


def _uploaded(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.rglob(name) if p.is_file()]


def test_uploads_go_to_a_private_folder_that_close_removes(web, tmp_path, monkeypatch):
    """Uploads and previews went to a shared /tmp/gradio, world-readable and never deleted."""
    import os
    import stat

    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    from llavamed.serve.web import DELETE_CACHE

    folder = Path(os.environ["GRADIO_TEMP_DIR"])
    assert folder.name.startswith("llavamed-web-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert web.demo.delete_cache == DELETE_CACHE == (600, 3600)
    scan = tmp_path / "patient_scan_1.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm"), scan)
    Client(web.url, verbose=False).predict(handle_file(str(scan)), api_name="/on_upload")
    assert _uploaded(folder, scan.name)
    # A folder the user names is theirs: used, and left in place.
    mine = tmp_path / "mine"
    mine.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(mine))
    demo, _ = _launch_local(web.engine)
    demo.close()
    assert mine.is_dir() and os.environ["GRADIO_TEMP_DIR"] == str(mine)
    # Without one, an app launched and closed in-process leaves nothing behind.
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    demo, _ = _launch_local(web.engine)
    own = Path(os.environ["GRADIO_TEMP_DIR"])
    assert own != folder and stat.S_IMODE(own.stat().st_mode) == 0o700
    demo.close()
    assert not own.exists() and "GRADIO_TEMP_DIR" not in os.environ


def test_the_web_command_removes_its_upload_folder_on_sigterm(tiny_llava_dir, tmp_path):
    """The real ``llavamed web``: an upload lands in its private folder, which is gone once a
    service manager's SIGTERM has stopped it."""
    import os
    import signal
    import stat
    import subprocess
    import sys
    import time

    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from pydicom.data import get_testdata_file

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), TMPDIR=str(tmp_path))
    log = tmp_path / "web.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llavamed", "web", "--model", str(tiny_llava_dir)]
            + ["--port", str(port), "--max-tokens", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.5)
        (folder,) = set(tmp_path.glob("llavamed-web-*")) - {tmp_path / "llavamed-web-examples"}
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        scan = tmp_path / "patient_scan_2.dcm"
        shutil.copy(get_testdata_file("CT_small.dcm"), scan)
        client.predict(handle_file(str(scan)), api_name="/on_upload")
        assert _uploaded(folder, scan.name)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not folder.exists()


def _browser_or_skip():
    """Playwright's sync API, or a skip naming what is missing (a failure under CI)."""
    try:
        from playwright import sync_api
    except ImportError:
        missing = "Playwright is not installed (scripts/webtest_deps.sh)"
    else:
        if shutil.which(CHROMIUM):
            return sync_api
        missing = "Debian's chromium package is not installed (scripts/webtest_deps.sh)"
    if REQUIRE_BROWSER:
        pytest.fail(f"LLAVAMED_REQUIRE_BROWSER=1 but {missing}")
    pytest.skip(missing)


@pytest.mark.slow
def test_web_ui_in_headless_chromium(tiny_llava_dir, tmp_path):
    pytest.importorskip("gradio")
    sync_api = _browser_or_skip()
    from pydicom.data import get_testdata_file

    from llavamed.serve.engine import Engine

    engine = Engine.from_path(tiny_llava_dir)
    demo, url = _launch_local(engine, max_tokens=24, temperature=0.7)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="load")
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
            shot = tmp_path / "web_screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        if os.environ.get("LLAVAMED_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, DOCS_SCREENSHOT)
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


def _failing_on_forward(engine, n: int):
    """Make ``engine``'s model raise on its ``n``-th forward from now (a failure mid-answer, as
    an out-of-memory error would be); returns a function that heals it."""
    forward, calls = engine.model.forward, [0]

    def fails(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("out of memory")
        return forward(*a, **k)

    engine.model.forward = fails
    return lambda: setattr(engine.model, "forward", forward)


def test_an_answer_that_fails_midway_is_marked_at_once(tiny_lm_dir, tmp_path):
    """An error mid-answer left the partial answer on the page unmarked, like a finished one,
    until the next question was sent; the page now marks it when the error happens (and says
    why), and the mark stays the only one once the conversation goes on."""
    pytest.importorskip("gradio")
    from llavamed.serve.engine import Engine, EngineSettings
    from llavamed.serve.web import FAILED, UNKEPT, build_app

    engine = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=1))
    engine.eos_ids = set()  # answers run to max_tokens, or to the failure
    demo = build_app(engine, examples_dir=tmp_path)
    respond = next(f.fn for f in demo.fns.values() if f.name == "respond")
    args = (None, 0.0, 1.0, 8, 1)  # pending, temperature, top_p, max_tokens, seed
    try:
        *_, (_, page, conv, _) = respond("first", [], None, *args)
        heal = _failing_on_forward(engine, 4)  # the prefill and two steps succeed
        with pytest.warns(UserWarning, match="generation failed: RuntimeError"):
            updates = list(respond("second", page, conv, *args))
        heal()
        _, streamed, _, _ = updates[-2]  # the partial answer as it streamed
        _, failed, conv_after, used = updates[-1]  # the page when the error is reported
        assert streamed[-1]["content"] and not streamed[-1]["content"].endswith(FAILED)
        assert failed[:-1] == streamed[:-1]
        assert failed[-1] == {"role": "assistant", "content": streamed[-1]["content"] + FAILED}
        assert conv_after is conv and used is None  # the model's conversation does not keep it
        shown = [  # as the Chatbot hands messages back
            {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in failed
        ]
        *_, (_, history, conv, _) = respond("third", shown, conv, *args)
        texts = [
            m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            for m in history
        ]
        assert texts[3] == failed[-1]["content"]  # marked once: not "[failed] [stopped]"
        assert not any(t.endswith(UNKEPT) for t in texts)
        assert len(conv["messages"]) == 4 and conv["shown"] == 6  # the first and third turns
        # Stop leaves a failed answer's mark as it is.
        on_stop = next(f.fn for f in demo.fns.values() if f.name == "on_stop")
        assert on_stop(failed, {"shown": 2})[-1] == failed[-1]
    finally:
        demo.close()
        engine.close()


def test_a_failed_answer_is_marked_on_the_page_an_http_client_sees(tiny_lm_dir):
    """Over HTTP, as the browser gets it: the page's last update carries the mark."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    from llavamed.serve.engine import Engine, EngineSettings
    from llavamed.serve.web import FAILED, _message_text

    engine = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=1))
    engine.eos_ids = set()
    demo, url = _launch_local(engine, max_tokens=8, temperature=0)
    try:
        client = Client(url, verbose=False)
        _failing_on_forward(engine, 4)
        job = client.submit("go on", [], 0.0, 1.0, 8, 1, api_name="/respond")
        _, page = job.result(timeout=60)
        answers = [_message_text(history[-1]["content"]) for _, history in job.outputs()]
        assert len(answers) >= 2 and answers[-2] and not answers[-2].endswith(FAILED)
        assert answers[-1] == answers[-2] + FAILED == _message_text(page[-1]["content"])
    finally:
        demo.close()
        engine.close()


@pytest.mark.slow
def test_a_failed_answer_is_marked_in_headless_chromium(tiny_lm_dir, tmp_path):
    """What the browser shows once the error is reported: the partial answer with its mark,
    in view (a failed event's "Error" box covered the whole chat), and the reason in a toast."""
    pytest.importorskip("gradio")
    sync_api = _browser_or_skip()
    from llavamed.serve.engine import Engine, EngineSettings
    from llavamed.serve.web import FAILED

    engine = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=1))
    engine.eos_ids = set()
    demo, url = _launch_local(engine, max_tokens=12, temperature=0)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="load")
            page.wait_for_selector("#question textarea", timeout=60_000)
            _failing_on_forward(engine, 6)
            page.locator("#question textarea").fill("go on")
            page.locator("#send").click()
            page.wait_for_function(
                "mark => document.querySelector('#chatbot').innerText.includes(mark)",
                arg=FAILED.strip(),
                timeout=120_000,
            )
            page.wait_for_timeout(1000)  # the toast, then any late update of the page
            chat = page.locator("#chatbot").inner_text()
            covered = page.locator("#chatbot [data-testid=status-tracker] .error").count()
            shot = tmp_path / "failed_answer.png"
            page.screenshot(path=str(shot), full_page=True)
            body = page.locator("body").inner_text()
            browser.close()
        assert "go on" in chat and chat.count(FAILED.strip()) == 1
        assert covered == 0  # no error box hides the conversation
        assert "generation failed: RuntimeError" in body  # the reason is shown, not only the mark
    finally:
        demo.close()
        engine.close()
