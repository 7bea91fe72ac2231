"""Serving audit: bad and unusual input from a demanding user, against the real server on
127.0.0.1 (tiny random llava), the real chat command and the real web app."""

from __future__ import annotations

import base64
import io
import time
from types import SimpleNamespace

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
        ("--max-request-mb", "inf", "--max-request-mb: inf must be a finite size"),  # traceback
        ("--max-image-mb", "1e-9", "--max-image-mb: 1e-9 must be a finite size"),  # 0 bytes
        ("--max-image-pixels", "0", "--max-image-pixels: 0 must be >= 1"),
        ("--max-prompt-tokens", "-5", "--max-prompt-tokens: -5 must be >= 1"),
        ("--max-prompt-tokens", "0", "--max-prompt-tokens: 0 must be >= 1"),  # taken as unset
    ],
)
def test_serve_refuses_limits_no_request_could_meet(tmp_path, capsys, flag, value, words):
    """These started a server that refused every image or prompt (--max-prompt-tokens -5: 'the
    limit is -5'), or failed with an OverflowError traceback after the model loaded (inf). A
    missing model folder shows the check comes before any loading: a usage error (exit 2), as
    the command line is read."""
    from llavamed.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", str(tmp_path / "absent"), "--port", "0", flag, value])
    assert exc.value.code == 2
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

    with pytest.raises(SystemExit) as exc:
        main(["web", "--model", str(tmp_path / "absent"), "--max-upload-mb", value])
    assert exc.value.code == 2
    assert f"--max-upload-mb: {value} must be a finite size" in capsys.readouterr().err


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


# --- what OpenAI does with the same request ----------------------------------------------------


def text_body(**extra) -> dict:
    return {
        "model": "tiny-llava",
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def test_top_p_zero_is_accepted_as_the_most_probable_token(engine):
    """OpenAI's top_p runs from 0 to 1; a client sending top_p=0 for determinism got a 400, and
    the sampler itself dropped every token at 0 (multinomial on all zeros)."""
    srv = serve_in_background(engine, max_completion_tokens=8)
    try:
        greedy = post(srv, text_body(temperature=0)).json()["choices"][0]["message"]["content"]
        for seed in (1, 2, 3):
            r = post(srv, text_body(temperature=1.0, top_p=0, seed=seed))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greedy
        # Unrestricted sampling at the same temperature differs, so the test can fail.
        free = {
            post(srv, text_body(temperature=1.0, seed=s)).json()["choices"][0]["message"]["content"]
            for s in (1, 2, 3)
        }
        assert free != {greedy}
        r = post(srv, text_body(top_p=1.01))
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "messages, param, words",
    [
        ([{"role": "user", "content": None}], "messages[0].content", "required in a user message"),
        ([{"role": "user"}], "messages[0].content", "required in a user message"),
        ([{"role": "user", "content": []}], "messages[0].content", "empty array"),
        (
            [{"role": "system", "content": None}, {"role": "user", "content": "hi"}],
            "messages[0].content",
            "required in a system message",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": []},
                {"role": "user", "content": "and?"},
            ],
            "messages[1].content",
            "empty array",
        ),
    ],
)
def test_a_message_without_content_is_a_400_as_in_openai(engine, messages, param, words):
    """An empty user turn prompted the model with nothing and was answered (200)."""
    srv = serve_in_background(engine)
    try:
        r = post(srv, text_body(messages=messages))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err
        # An assistant turn may go without content (it called tools), as in OpenAI.
        ok = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None},
            {"role": "user", "content": "and?"},
        ]
        assert post(srv, text_body(messages=ok)).status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(engine, constant):
    """Python's json module takes them; a NaN temperature was refused as 'less than or equal to
    2', which sends the client looking for a value over 2."""
    srv = serve_in_background(engine)
    try:
        raw = (
            '{"model": "tiny-llava", "max_tokens": 2, "temperature": ' + constant + ", "
            '"messages": [{"role": "user", "content": "hi"}]}'
        )
        r = httpx.post(
            srv.base_url + "/chat/completions",
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert msg == f"request body is not valid JSON ({constant} is not a JSON number)"
    finally:
        srv.stop()


def test_what_the_server_cannot_give_is_refused_instead_of_ignored(engine):
    """A client asking for logprobs read choices[0].logprobs.content from a 200 whose logprobs
    was null; one asking for JSON (response_format) or a forced tool call got prose that passed
    for the answer."""
    srv = serve_in_background(engine)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    forced = {"type": "function", "function": {"name": "lookup"}}
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    try:
        for extra, param in [
            ({"logprobs": True}, "logprobs"),
            ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
            ({"top_logprobs": 3}, "top_logprobs"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"response_format": schema}, "response_format"),
            ({"tools": tools, "tool_choice": "required"}, "tool_choice"),
            ({"tools": tools, "tool_choice": forced}, "tool_choice"),
        ]:
            r = post(srv, text_body(**extra))
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert err["param"] == param and "not supported" in err["message"], err
        for extra in (
            {"logprobs": False},
            {"logprobs": None},
            {"top_logprobs": 0},
            {"response_format": {"type": "text"}},
            {"response_format": None},
            {"tools": tools},  # the model may always answer without a call
            {"tools": tools, "tool_choice": "auto"},
            {"tool_choice": "none"},
        ):
            assert post(srv, text_body(**extra)).status_code == 200, extra
        for extra, param in [
            ({"logprobs": "yes"}, "logprobs"),
            ({"response_format": "json"}, None),
        ]:
            r = post(srv, text_body(**extra))
            assert r.status_code == 400 and r.json()["error"]["param"] == (
                param or "response_format"
            )
    finally:
        srv.stop()


def test_a_max_completion_tokens_error_names_that_field(engine):
    srv = serve_in_background(engine, max_completion_tokens=8)
    try:
        body = text_body()
        del body["max_tokens"]
        r = post(srv, {**body, "max_completion_tokens": 9})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_completion_tokens"
        assert err["message"] == "max_completion_tokens 9 exceeds the server limit 8"
        r = post(srv, {**body, "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    finally:
        srv.stop()


# --- llavamed chat -------------------------------------------------------------------------------


def reader(script):
    """A ``read`` for run_chat that returns the script's lines and raises its exceptions."""
    it = iter(script)

    def read(_prompt):
        item = next(it)
        if isinstance(item, BaseException):
            raise item
        return item

    return read


def test_ctrl_c_at_the_prompt_asks_for_a_second_one_before_leaving(engine):
    """A Ctrl-C meant for an answer that had just ended landed on the prompt and ended the chat,
    losing the conversation; as in Node's REPL, it now takes two in a row."""
    from llavamed.serve.chat import ChatSession, run_chat
    from llavamed.serve.engine import SamplingParams

    session = ChatSession(engine, params=SamplingParams(max_tokens=2, temperature=0))
    out = io.StringIO()
    script = ["hello", KeyboardInterrupt(), "again", KeyboardInterrupt(), EOFError()]
    assert run_chat(session, read=reader(script), out=out) == 0
    assert out.getvalue().count("Ctrl-C again, Ctrl-D or /quit to leave") == 2
    assert len(session.messages) == 4  # both questions were answered: the chat went on

    session.reset()
    out = io.StringIO()
    script = ["hello", KeyboardInterrupt(), KeyboardInterrupt(), "never read"]
    assert run_chat(session, read=reader(script), out=out) == 0
    assert len(session.messages) == 2


def test_chat_says_when_an_answer_was_cut_by_the_token_limit(engine):
    from llavamed.serve.chat import ChatSession, run_chat
    from llavamed.serve.engine import SamplingParams

    session = ChatSession(engine, params=SamplingParams(max_tokens=3, temperature=0))
    session.engine.eos_ids, eos = set(), session.engine.eos_ids  # no early end of turn
    try:
        out = io.StringIO()
        run_chat(session, read=reader(["hello", EOFError()]), out=out)
        assert "[cut at 3 tokens: --max-tokens]" in out.getvalue()
        assert session.finish_reason == "length"
        # --prompt prints the answer alone: scripts read stdout.
        session.reset()
        out = io.StringIO()
        assert run_chat(session, prompt="hello", out=out) == 0
        assert "[cut" not in out.getvalue()
    finally:
        session.engine.eos_ids = eos


def test_chat_image_refuses_a_fifo_or_device_instead_of_hanging(engine, tmp_path):
    """/image /dev/stdin waited for the input the REPL reads; a FIFO blocked until written to;
    /dev/zero was read until memory ran out."""
    import os

    from llavamed.errors import InputError
    from llavamed.serve.chat import ChatSession

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    session = ChatSession(engine)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file"):
            session.attach(path)
    assert session.pending_image is None


# --- llavamed web --------------------------------------------------------------------------------


def test_web_marks_a_stopped_answer_as_not_part_of_the_conversation(engine, tmp_path):
    """Stop leaves the partial answer on the page but out of the model's conversation (as the
    terminal chat says when it stops one); the page showed it like any other answer, so the
    next answers seemed to ignore it."""
    pytest.importorskip("gradio")
    from llavamed.serve.web import UNKEPT, build_app

    demo = build_app(engine, examples_dir=tmp_path)
    respond = next(f.fn for f in demo.fns.values() if f.name == "respond")
    engine.eos_ids, eos = set(), engine.eos_ids  # answers run to max_tokens
    try:
        args = (None, 0.0, 1.0, 6, 1)  # pending, temperature, top_p, max_tokens, seed
        *_, (_, history, conv, _) = respond("first", [], None, *args)
        assert conv["shown"] == 2 and len(conv["messages"]) == 2
        turn = respond("second", history, conv, *args)
        _, partial, conv_seen, _ = next(turn)  # the first tokens of the answer arrive
        turn.close()  # Stop: gradio drops the generator, conv keeps what it was
        assert conv_seen is conv and partial[-1]["role"] == "assistant"
        shown = [
            {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
            for m in partial  # as the Chatbot hands messages back
        ]
        *_, (_, history, conv, _) = respond("third", shown, conv, *args)
        texts = [
            m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
            for m in history
        ]
        assert [t.endswith(UNKEPT) for t in texts] == [False] * 3 + [True] + [False] * 2
        assert texts[3] == partial[-1]["content"] + UNKEPT
        assert len(conv["messages"]) == 4 and conv["shown"] == 6  # first and third turns
        # The Stop button marks the answer it stops at once, and only that one.
        on_stop = next(f.fn for f in demo.fns.values() if f.name == "on_stop")
        running = history + [
            {"role": "user", "content": "fifth"},
            {"role": "assistant", "content": "partial"},
        ]
        marked = on_stop(running, conv)
        assert marked[:-1] == running[:-1] and marked[-1]["content"] == "partial" + UNKEPT
        assert on_stop(history, conv) == history  # nothing running: nothing to mark
        assert on_stop(running[-2:], None)[-1]["content"] == "partial" + UNKEPT  # first turn
        # Stop tells the running answer too: its next update is the marked page, and its last,
        # so a late update of the cancelled stream cannot wipe the mark on_stop put there.
        request = SimpleNamespace(session_hash="s1")
        before = engine.stats["cancelled"]
        turn = respond("sixth", history, conv, *args, request)
        _, running, _, _ = next(turn)
        on_stop(running, conv, request)
        _, final, conv_after, _ = next(turn)
        with pytest.raises(StopIteration):
            next(turn)
        assert final[-1]["content"].endswith(UNKEPT) and conv_after is conv
        deadline = time.time() + 10  # the worker drops the row at its next step
        while engine.stats["cancelled"] == before and time.time() < deadline:
            time.sleep(0.02)
        assert engine.stats["cancelled"] == before + 1  # the engine stopped generating
        # Marked once, however many turns follow.
        *_, (_, history, _, _) = respond("fourth", history, conv, *args)
        assert (
            sum(UNKEPT in (m["content"] if isinstance(m["content"], str) else "") for m in history)
            == 1
        )
    finally:
        engine.eos_ids = eos
        demo.close()
