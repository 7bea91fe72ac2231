"""Serving audit: bad and unusual input from a demanding user, against the real server on
127.0.0.1 (tiny random llava), the real chat command and the real web app."""

from __future__ import annotations

import base64
import io

import pytest

httpx = pytest.importorskip("httpx")

from llavamed.serve.api import serve_in_background  # noqa: E402
from llavamed.serve.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    eng = Engine.from_path(tiny_llava_dir)
    yield eng
    eng.close()


def noise_png(size=(160, 160), seed=0) -> bytes:
    """An incompressible PNG: its size in bytes is close to 3 * width * height."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def post(srv, body: dict) -> httpx.Response:
    return httpx.post(srv.base_url + "/chat/completions", json=body, timeout=60)


def image_body(url: str, text: str = "What is this?") -> dict:
    return {
        "model": "tiny-llava",
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": text},
                ],
            }
        ],
    }


def test_a_line_wrapped_base64_image_under_the_limit_is_accepted(engine):
    """`base64 scan.png` and Python's encodebytes wrap at 76 columns; the size check counted the
    newlines, so an image up to 1.3% under --max-image-mb was refused as a 413 'larger than'."""
    png = noise_png()
    limit = len(png) + len(png) // 200  # the image is 0.5% under the limit
    wrapped = base64.encodebytes(png).decode()
    assert "\n" in wrapped
    srv = serve_in_background(engine, max_image_bytes=limit)
    try:
        r = post(srv, image_body("data:image/png;base64," + wrapped))
        assert r.status_code == 200, r.text
        # The limit itself still holds, wrapped or not.
        over = base64.encodebytes(noise_png(size=(170, 170))).decode()
        r = post(srv, image_body("data:image/png;base64," + over))
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    finally:
        srv.stop()


def test_text_that_is_not_valid_unicode_is_a_400_naming_the_field(engine):
    """JSON may escape a lone surrogate (\\ud800); the tokenizer refused it with 'prompt rejected
    (TextEncodeInput must be Union[TextInputSequence, ...])', which names no reason."""
    srv = serve_in_background(engine)
    try:
        url = srv.base_url + "/chat/completions"
        for content, param in [
            ('"hi \\ud800 there"', "messages[0].content"),
            ('[{"type": "text", "text": "ok"}, {"type": "text", "text": "\\udcff"}]', None),
        ]:
            raw = (
                '{"model": "tiny-llava", "max_tokens": 2, "messages": '
                f'[{{"role": "user", "content": {content}}}]}}'
            )
            r = httpx.post(
                url, content=raw, headers={"Content-Type": "application/json"}, timeout=60
            )
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert "not valid Unicode" in err["message"], err
            assert err["param"] == (param or "messages[0].content[1].text")
        # and the server goes on answering
        ok = post(
            srv,
            {
                "model": "tiny-llava",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_chat_survives_input_that_is_not_utf8(tiny_llava_dir):
    """Pasted Latin-1 bytes in `llavamed chat` ended the chat with a UnicodeDecodeError traceback
    (strict stdin) or were refused with the tokenizer's 'TextEncodeInput must be Union[...]'
    (surrogateescape stdin); now the line is refused naming the byte and the chat goes on."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for encoding in ("utf-8", "utf-8:surrogateescape"):
        run = subprocess.run(
            [sys.executable, "-m", "llavamed", "chat", "--model", str(tiny_llava_dir)]
            + ["--max-tokens", "2", "--temperature", "0"],
            input=b"caf\xe9 au lait?\nhello\n/quit\n",
            capture_output=True,
            env={**env, "PYTHONIOENCODING": encoding},
            timeout=300,
        )
        out = run.stdout.decode()
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        assert "Traceback" not in run.stderr.decode()
        assert "byte 0xE9 at character 3 is not UTF-8" in out, out
        assert out.count("assistant> ") == 2  # the next line was still answered


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--max-request-mb", "inf", "--max-request-mb must be a finite size"),  # a traceback
        ("--max-image-mb", "1e-9", "--max-image-mb must be a finite size"),  # 0 bytes
        ("--max-image-pixels", "0", "--max-image-pixels must be >= 1"),
        ("--max-prompt-tokens", "-5", "--max-prompt-tokens must be >= 1"),
        ("--max-prompt-tokens", "0", "--max-prompt-tokens must be >= 1"),  # taken as unset
    ],
)
def test_serve_refuses_limits_no_request_could_meet(tmp_path, capsys, flag, value, words):
    """These started a server that refused every image or prompt (--max-prompt-tokens -5: 'the
    limit is -5'), or failed with an OverflowError traceback after the model loaded (inf). A
    missing model folder shows the check comes before any loading."""
    from llavamed.cli import main

    assert main(["serve", "--model", str(tmp_path / "absent"), "--port", "0", flag, value]) == 1
    assert words in capsys.readouterr().err


def test_web_refuses_an_upload_over_the_limit_naming_it(engine, tmp_path):
    """Gradio has no upload limit: a file of any size was stored, then read whole into memory
    (a 600 MB upload held the page for minutes). Now Gradio refuses it while it arrives (413
    naming the limit), and the upload handler refuses a larger file before reading it."""
    import socket

    pytest.importorskip("gradio")
    from llavamed.serve.engine import SamplingParams
    from llavamed.serve.web import launch

    big = tmp_path / "big.png"
    big.write_bytes(noise_png(size=(700, 700)))  # a valid image of ~1.5 MB
    limit = 2**20
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(
        engine,
        "127.0.0.1",
        port,
        block=False,
        default_params=SamplingParams(max_tokens=2),
        max_upload_bytes=limit,
    )
    try:
        with big.open("rb") as f:
            r = httpx.post(
                f"http://127.0.0.1:{port}/gradio_api/upload",
                files={"files": ("big.png", f)},
                timeout=60,
            )
        assert r.status_code == 413 and f"maximum allowed size of {limit} bytes" in r.text
        on_upload = next(f.fn for f in demo.fns.values() if f.name == "on_upload")
        with pytest.warns(UserWarning) as caught:
            assert on_upload(str(big)) == (None, None)
        assert "file too large (1.4" in str(caught[0].message)
        assert "--max-upload-mb" in str(caught[0].message)
        small = tmp_path / "small.png"
        small.write_bytes(noise_png(size=(100, 100)))
        assert on_upload(str(small))[0] is not None
    finally:
        demo.close()


@pytest.mark.parametrize("value", ["0", "inf", "nan", "-3"])
def test_web_refuses_an_upload_limit_no_file_could_meet(tmp_path, capsys, value):
    pytest.importorskip("gradio")
    from llavamed.cli import main

    assert main(["web", "--model", str(tmp_path / "absent"), "--max-upload-mb", value]) == 1
    assert "--max-upload-mb must be a finite size" in capsys.readouterr().err


def test_a_prompt_far_over_the_context_is_refused_without_tokenizing(engine):
    """Tokenizing is serialised (one tokenizer, one lock): a 30 MB prompt, under the 32 MB body
    limit, took 45 s to be refused, and every other request waited for it. The number of
    characters already proves it too long (no token stands for more than max_token_chars)."""
    from llavamed.errors import InputError
    from llavamed.serve.chat import ChatSession

    prepared = []
    prepare = engine.prepare

    def recording_prepare(messages, images=()):
        prepared.append(len(messages))
        return prepare(messages, images)

    engine.prepare = recording_prepare
    srv = serve_in_background(engine, max_prompt_tokens=300)
    try:
        longest = max(len(t) for t in engine.tokenizer.get_vocab())  # 81 characters
        text = "word " * (longest * 300)  # over 300 tokens on characters alone
        r = post(srv, {"model": "tiny-llava", "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded"
        assert "prompt is at least" in err["message"] and "the limit is 300" in err["message"]
        assert prepared == []
        # Just over the limit, but not provably so from its length: tokenized, exact count.
        r = post(
            srv, {"model": "tiny-llava", "messages": [{"role": "user", "content": "word " * 400}]}
        )
        assert r.status_code == 400 and "prompt is 41" in r.json()["error"]["message"]
        assert prepared == [1]
        # The chat and the web page (ChatSession) refuse a pasted book the same way.
        session = ChatSession(engine)
        huge = "word " * (longest * engine.max_context)
        with pytest.raises(InputError, match="too long for the model's context"):
            list(session.ask(huge))
        assert prepared == [1] and session.messages == []
    finally:
        engine.prepare = prepare
        srv.stop()
