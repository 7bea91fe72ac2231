"""The official ``openai`` SDK against the real server on 127.0.0.1 (tiny random models)."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llavamed.serve.api import serve_in_background  # noqa: E402
from llavamed.serve.engine import Engine, EngineSettings, SamplingParams  # noqa: E402
from serve_helpers import (  # noqa: E402
    engine_failing_at_forward,
    image_msg,
    png_url,
    wait_until_running,
)

KEY = "sk-test-0123456789abcdef"


def jpeg_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 50), (10, 120, 30)).save(buf, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def dicom_url(name="CT_small.dcm") -> str:
    from pydicom.data import get_testdata_file

    data = open(get_testdata_file(name), "rb").read()
    return "data:application/dicom;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def llava_server(tiny_llava_dir):
    eng = Engine.from_path(tiny_llava_dir, settings=EngineSettings(max_batch_size=4))
    srv = serve_in_background(
        eng,
        api_key=KEY,
        max_images=2,
        max_image_bytes=200_000,
        max_image_pixels=1_000_000,
        max_request_bytes=1_000_000,
        max_completion_tokens=64,
        max_prompt_tokens=300,
    )
    yield srv
    srv.stop()
    eng.close()


@pytest.fixture(scope="module")
def client(llava_server):
    return openai.OpenAI(base_url=llava_server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm_server(tiny_lm_dir):
    srv = serve_in_background(tiny_lm_dir, engine_settings=EngineSettings(max_batch_size=8))
    yield srv
    srv.stop()


def test_models_and_health(client, llava_server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    r = httpx.get(llava_server.base_url.removesuffix("/v1") + "/health")
    assert r.status_code == 200 and r.json()["multimodal"] is True


def test_non_streaming_with_image_and_usage(client):
    r = client.chat.completions.create(
        model="tiny-llava", messages=[image_msg(png_url())], max_tokens=5, temperature=0
    )
    assert r.object == "chat.completion" and r.model == "tiny-llava"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 5
    # 16 image tokens + the chat template around the question
    assert r.usage.prompt_tokens > 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny-llava", messages=[image_msg(jpeg_url())], max_tokens=8, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # On the wire, a delta carries only what it sets, as OpenAI's do: no "role": null.
    raw = [c.choices[0].delta.to_dict() for c in chunks if c.choices]  # only fields sent
    assert raw[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in raw[1:]) and raw[-1] == {}


def test_multi_turn_with_image_in_earlier_turn(client):
    messages = [
        image_msg(png_url(), "Describe the image."),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Is it large?"},
    ]
    r = client.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=4, temperature=0
    )
    one_turn = client.chat.completions.create(
        model="tiny-llava", messages=messages[:1], max_tokens=4, temperature=0
    )
    assert r.usage.prompt_tokens > one_turn.usage.prompt_tokens + 5


def test_sampling_params_seed_and_stop(client):
    kw = dict(
        model="tiny-llava",
        messages=[image_msg(png_url())],
        max_tokens=12,
        temperature=1.5,
        top_p=0.95,
        seed=7,
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    if len(a) > 4:
        stop = a[2:4]
        c = client.chat.completions.create(**kw, stop=[stop]).choices[0]
        assert c.message.content == a[: a.find(stop)] and c.finish_reason == "stop"


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_data_url(client, name):
    r = client.chat.completions.create(
        model="tiny-llava", messages=[image_msg(dicom_url(name))], max_tokens=3, temperature=0
    )
    assert r.usage.prompt_tokens > 16


def _status(client, **kw):
    kw.setdefault("model", "tiny-llava")
    kw.setdefault("max_tokens", 2)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**kw)
    return err.value


@pytest.mark.parametrize(
    "url, status, words",
    [
        ("data:image/png;base64,@@@notbase64@@@", 400, "malformed base64"),
        (
            "data:image/png;base64," + base64.b64encode(b"just some text").decode(),
            400,
            "not an image",
        ),
        ("data:text/plain;base64,aGVsbG8=", 400, "unsupported media type"),
        ("data:image/png,rawbytes", 400, "base64"),
        ("file:///etc/passwd", 400, "file: URLs are refused"),
        ("/etc/hostname", 400, "paths are refused"),
        ("http://127.0.0.1:9/x.png", 400, "remote image URLs are disabled"),
        ("data:image/png;base64," + "A" * 300_000, 413, "larger than"),
    ],
)
def test_bad_images_are_4xx(client, url, status, words):
    err = _status(client, messages=[image_msg(url)])
    assert err.status_code == status
    assert words in err.message
    assert "AAAA" not in err.message and "passwd" not in err.message.replace("file:", "")


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"stream": "no"}, "stream", "valid boolean"),  # used to stream
        ({"max_tokens": "2"}, "max_tokens", "valid integer"),
        ({"temperature": "0.5"}, "temperature", "valid number"),
        ({"seed": 2**64}, "seed", "less than or equal"),  # used to be a 500
        ({"stop": 5}, "stop", "a valid string or a valid list"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "when stream is true"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
            "Field required",
        ),
        (  # 200k tiny messages held the prompt lock for 14 s; OpenAI caps the list at 2048
            {"messages": [{"role": "user", "content": "hi"}] * 2049},
            "messages",
            "at most 2048 items",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "messages[0].content[0].image_url",
            "valid dictionary",
        ),
    ],
)
def test_wrongly_typed_fields_are_400s_naming_the_field_as_openai_does(
    llava_server, extra, param, words
):
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = httpx.post(
        llava_server.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (
        err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
    )


def test_null_stream_and_n_mean_their_defaults(llava_server):
    """OpenAI's schema and vLLM take null for both; they were 400s."""
    for field in ("stream", "n"):
        body = {
            "model": "tiny-llava",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            field: None,
        }
        r = httpx.post(
            llava_server.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text


def test_data_urls_as_clients_write_them(client):
    # Upper-case scheme and media type, base64 without its "=" padding: both decode.
    raw = png_url().split(",", 1)[1]
    assert raw.endswith("=")  # so stripping it tests something
    for url in ("DATA:IMAGE/PNG;BASE64," + raw, "data:image/png;base64," + raw.rstrip("=")):
        r = client.chat.completions.create(
            model="tiny-llava", max_tokens=1, temperature=0, messages=[image_msg(url)]
        )
        assert r.usage.prompt_tokens > 16


def test_limits(client):
    err = _status(client, messages=[image_msg(png_url(size=(1200, 1000)))])
    assert err.status_code == 400 and "too large" in err.message
    three = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": png_url()}}] * 3,
    }
    err = _status(client, messages=[three])
    assert err.status_code == 400 and "too many images" in err.message
    err = _status(client, messages=[{"role": "user", "content": "word " * 400}])
    assert err.status_code == 400 and err.code == "context_length_exceeded"
    err = _status(client, messages=[image_msg(png_url())], max_tokens=100_000)
    assert err.status_code == 400 and "max_tokens" in err.message
    err = _status(client, messages=[image_msg(png_url())], temperature=5)
    assert err.status_code == 400 and "temperature" in err.message
    err = _status(client, messages=[{"role": "user", "content": "x" * 1_100_000}])
    assert err.status_code == 413
    err = _status(client, messages=[])
    assert err.status_code == 400


def test_auth_and_unknown_model(llava_server, client):
    for key in ("wrong-key", ""):
        bad = openai.OpenAI(base_url=llava_server.base_url, api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(
                base_url=llava_server.base_url,
                api_key="x",
                max_retries=0,
                default_headers={"Authorization": ""},
            )
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny-llava", messages=[image_msg(png_url())])
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[image_msg(png_url())])
    assert err.value.code == "model_not_found"


def test_garbage_never_crashes_and_nothing_secret_is_logged(llava_server, caplog):
    base = llava_server.base_url
    secret_b64 = base64.b64encode(b"SECRETPIXELS" * 10).decode()
    hdr = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [
        b"",
        b"{",
        b"[]",
        b'"x"',
        b"\xff\xfe",
        json.dumps({"model": 1}).encode(),
        json.dumps({"model": "tiny-llava", "messages": "hi"}).encode(),
        json.dumps(
            {"model": "tiny-llava", "messages": [{"role": "robot", "content": "x"}]}
        ).encode(),
        json.dumps(
            {
                "model": "tiny-llava",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64," + secret_b64},
                            }
                        ],
                    }
                ],
            }
        ).encode(),
        json.dumps(
            {
                "model": "tiny-llava",
                "messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}],
            }
        ).encode(),
        json.dumps(
            {"model": "tiny-llava", "messages": [{"role": "assistant", "content": "only me"}]}
        ).encode(),
        # 4 KB of nesting exhausts json's recursion limit: was a 500
        b'{"model":"tiny-llava","messages":' + b"[" * 2000 + b"]" * 2000 + b"}",
    ]
    with caplog.at_level(logging.DEBUG):
        for body in bodies:
            r = httpx.post(base + "/chat/completions", content=body, headers=hdr, timeout=30)
            assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
            assert "error" in r.json()
        r = httpx.post(
            base + "/chat/completions",
            content=bodies[-4],
            headers={"Authorization": "Bearer nope"},
            timeout=30,
        )
        assert r.status_code == 401
    assert httpx.get(base.removesuffix("/v1") + "/health").status_code == 200
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert secret_b64[:20] not in logged and KEY not in logged


def _streamed_go_on(max_tokens: int) -> dict:
    """A greedy streamed request to the text-only tiny LM."""
    return {
        "model": "tiny-lm",
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
    }


def test_a_stream_that_fails_mid_way_still_ends_with_done(tiny_lm_dir):
    """After a generation error the stream ended with the error object alone; vLLM sends
    "data: [DONE]" after it, and clients read until they see it."""
    eng = engine_failing_at_forward(tiny_lm_dir, 4, max_batch_size=1)
    srv = serve_in_background(eng)
    try:
        body = _streamed_go_on(10)
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        assert '"generation failed: RuntimeError"' in lines[-2] and lines[-1] == "data: [DONE]"
    finally:
        srv.stop()


def test_client_disconnect_cancels_generation(tiny_lm_dir):
    eng = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=2))
    eng.eos_ids = set()  # the tiny LM would otherwise be free to stop early
    srv = serve_in_background(eng, max_completion_tokens=400)
    try:
        body = _streamed_go_on(400)
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", srv.base_url + "/chat/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:") and '"content":""' not in line:
                        break
        deadline = time.time() + 20
        while eng.stats["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert eng.stats["cancelled"] == 1
        assert eng.stats["tokens"] < 400
    finally:
        srv.stop()
        eng.close()


def test_queue_full_is_503_with_retry_after(tiny_lm_dir):
    eng = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=1, max_queue=1))
    eng.eos_ids = set()
    srv = serve_in_background(eng, max_completion_tokens=300)
    statuses: list = []
    lock = threading.Lock()

    def one():
        r = httpx.post(
            srv.base_url + "/chat/completions",
            timeout=120,
            json={
                "model": "tiny-lm",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 300,
                "temperature": 0,
            },
        )
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after")))

    try:
        ts = [threading.Thread(target=one) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        codes = [s for s, _ in statuses]
        assert codes.count(200) >= 2 and 503 in codes
        assert all(int(ra) >= 1 for s, ra in statuses if s == 503)
        assert set(codes) <= {200, 503}
    finally:
        srv.stop()
        eng.close()


def test_text_only_server(lm_server):
    c = openai.OpenAI(base_url=lm_server.base_url, api_key="unused", max_retries=0)
    assert c.models.list().data[0].id == "tiny-lm"
    r = c.chat.completions.create(
        model="tiny-lm",
        max_tokens=6,
        temperature=0,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi"},
        ],
    )
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny-lm", messages=[image_msg(png_url())])
    assert "text-only" in err.value.message


def test_llavamed_llm_client_drives_text_only_server(lm_server):
    """The path ``llavamed data instruct --base-url`` takes (the quickstart's generator)."""
    import asyncio

    from llavamed.llm.client import ClientOptions, LLMClient

    async def main():
        opts = ClientOptions(
            base_url=lm_server.base_url, model="tiny-lm", concurrency=4, max_retries=0
        )
        async with LLMClient(opts) as cl:
            return await asyncio.gather(
                *[
                    cl.chat(
                        [{"role": "user", "content": f"Question {i}"}],
                        temperature=0.7,
                        max_tokens=8,
                        seed=i,
                    )
                    for i in range(6)
                ]
            )

    results = asyncio.run(main())
    assert len(results) == 6 and all(r.completion_tokens >= 1 for r in results)
    assert not any(r.usage_estimated for r in results)


def test_serve_command_refuses_a_negative_prefix_cache(tiny_lm_dir, capsys):
    from llavamed.cli import main

    with pytest.raises(SystemExit) as exc:  # a usage error, as the command line is read
        main(["serve", "--model", str(tiny_lm_dir), "--prefix-cache", "-1"])
    assert exc.value.code == 2
    assert "argument --prefix-cache: -1 must be >= 0" in capsys.readouterr().err


def test_serve_command_end_to_end(tiny_lm_dir):
    """``llavamed serve`` as users run it: key from the environment, port 0, SIGINT to stop."""
    import os
    import re
    import signal
    import subprocess
    import sys

    env = dict(os.environ, LLAVAMED_TEST_KEY=KEY)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llavamed",
            "serve",
            "--model",
            str(tiny_lm_dir),
            "--port",
            "0",
            "--api-key-env",
            "LLAVAMED_TEST_KEY",
            "--served-model-name",
            "demo",
            "--prefix-cache",
            "4",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        lines = []
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at (http://\S+/v1)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert c.models.list().data[0].id == "demo"
        r = c.chat.completions.create(
            model="demo", max_tokens=3, temperature=0, messages=[{"role": "user", "content": "hi"}]
        )
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="bad", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert KEY not in "".join(lines) + err
    assert proc.returncode in (0, 130)
    # Ctrl-C is how a server is stopped: there is nothing to resume.
    assert "resume" not in err and (proc.returncode == 0 or "llavamed: stopped" in err), err


def test_remote_images_only_with_the_flag(tiny_llava_dir, tmp_path):
    """With allow_remote_images the server fetches http URLs (size-capped); file: stays refused."""
    import functools
    import http.server

    from PIL import Image

    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "big.bin").write_bytes(b"\0" * 300_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a, **k):
            pass

        def do_GET(self):
            if self.path != "/drip":
                return super().do_GET()
            # A byte every 0.2 s: each read is quick, the whole download never ends.
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(200):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass

    handler = functools.partial(Handler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{httpd.server_address[1]}"
    srv = serve_in_background(
        tiny_llava_dir, allow_remote_images=True, max_image_bytes=200_000, remote_timeout_s=2.0
    )
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        r = c.chat.completions.create(
            model="tiny-llava", max_tokens=2, temperature=0, messages=[image_msg(f"{host}/ok.png")]
        )
        assert r.usage.prompt_tokens > 16
        for url, status in (
            (f"{host}/big.bin", 413),
            (f"{host}/missing.png", 400),
            ("file:///etc/hostname", 400),
            # URLs httpx cannot fetch at all: were 500s (InvalidURL, an OverflowError)
            ("http://127.0.0.1:99999/a.png", 400),
            ("http://[::1/a.png", 400),
        ):
            with pytest.raises(openai.APIStatusError) as err:
                c.chat.completions.create(model="tiny-llava", messages=[image_msg(url)])
            assert err.value.status_code == status
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="tiny-llava", messages=[image_msg(f"{host}/drip")])
        assert "took longer than 2 s" in err.value.message and time.monotonic() - t0 < 10
    finally:
        srv.stop()
        httpd.shutdown()


def test_non_streaming_disconnect_cancels(tiny_lm_dir):
    eng = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=2))
    eng.eos_ids = set()
    srv = serve_in_background(eng, max_completion_tokens=500)
    try:
        body = {
            "model": "tiny-lm",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 450,
            "temperature": 0,
        }
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.base_url + "/chat/completions", json=body, timeout=0.1)
        deadline = time.time() + 20
        while eng.stats["cancelled"] < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert eng.stats["cancelled"] == 1 and eng.stats["tokens"] < 450
    finally:
        srv.stop()
        eng.close()


@pytest.mark.parametrize("template", ["mistral_instruct", "vicuna_v1", "chatml"])
def test_every_system_and_developer_message_becomes_the_leading_system_prompt(template):
    # The templates read only messages[0] as the system prompt; a later system turn used to be
    # rendered as an assistant reply, and a developer turn after a system turn likewise.
    import jinja2

    from llavamed.model.templates import get_template
    from llavamed.serve import protocol as P

    req = P.parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "SYS-A"},
                {"role": "developer", "content": [{"type": "text", "text": "DEV-B"}]},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "system", "content": "SYS-C"},
                {"role": "user", "content": "again"},
            ],
        }
    )
    hf, _ = P.to_hf_messages(req.messages, allow_remote=False, max_image_bytes=1 << 20)
    assert [m["role"] for m in hf] == ["system", "user", "assistant", "user"]
    assert hf[0]["content"] == [{"type": "text", "text": "SYS-A\n\nDEV-B\n\nSYS-C"}]
    env = jinja2.Environment()
    text = env.from_string(get_template(template).jinja(eos="</s>")).render(
        messages=hf, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert text.count("SYS-A\n\nDEV-B\n\nSYS-C") == 1
    assert text.index("SYS-C") < text.index("hi") < text.index("hello") < text.index("again")


def test_a_full_queue_refuses_before_decoding_the_images(tiny_llava_dir, monkeypatch):
    """Up to 4 images of 40 MP each per request: a server that decodes them only to answer 503
    spends gigabytes on requests it will refuse."""
    import llavamed.images

    eng = Engine.from_path(tiny_llava_dir, settings=EngineSettings(max_batch_size=1, max_queue=1))
    eng.eos_ids = set()
    srv = serve_in_background(eng, max_completion_tokens=300)
    try:
        p = eng.prepare([{"role": "user", "content": [{"type": "text", "text": "go on"}]}])
        running = eng.submit(p, SamplingParams(max_tokens=300, temperature=0))
        wait_until_running(eng)  # taken by the worker: the queue is empty again
        queued = eng.submit(p, SamplingParams(max_tokens=300, temperature=0))
        decoded = []
        real = llavamed.images.load_image
        monkeypatch.setattr(
            llavamed.images, "load_image", lambda *a, **k: decoded.append(1) or real(*a, **k)
        )
        r = httpx.post(
            srv.base_url + "/chat/completions",
            timeout=60,
            json={"model": "tiny-llava", "messages": [image_msg(png_url())], "max_tokens": 2},
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1 and decoded == []
        queued.cancel()
        running.cancel()
    finally:
        srv.stop()
        eng.close()


def test_a_server_that_cannot_start_says_why_and_frees_the_engine(tiny_llava_dir, monkeypatch):
    """The thread's own error used to vanish behind a bare RuntimeError("server failed to
    start"), which the CLI printed as a traceback naming no cause."""
    import uvicorn

    from llavamed.errors import LlavamedError
    from llavamed.serve.engine import Engine

    closed = []
    real_close = Engine.close
    monkeypatch.setattr(Engine, "close", lambda self: closed.append(1) or real_close(self))

    def refuses(self, sockets=None):
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(uvicorn.Server, "run", refuses)
    with pytest.raises(LlavamedError, match=r"failed to start \(OSError: .*Address already in use"):
        serve_in_background(tiny_llava_dir)
    assert closed == [1]

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: time.sleep(1))
    with pytest.raises(LlavamedError, match="not accepting connections after 0.2 s"):
        serve_in_background(tiny_llava_dir, startup_timeout=0.2)


def test_an_image_sent_after_its_question_is_prompted_first_as_in_training(tiny_llava_dir):
    """Training puts every image at the front of its turn (LLaVA's preprocess_multimodal); a
    request with the text part first rendered "Q\\n<image>", a prompt shape never trained."""
    from PIL import Image

    from llavamed.serve import protocol as P

    eng = Engine.from_path(tiny_llava_dir)
    prompts = []
    for first, second in ((0, 1), (1, 0)):
        parts = [
            {"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "text", "text": "What organ is shown?"},
        ]
        req = P.parse_request(
            {"model": "m", "messages": [{"role": "user", "content": [parts[first], parts[second]]}]}
        )
        hf, refs = P.to_hf_messages(req.messages, allow_remote=False, max_image_bytes=1 << 20)
        assert [p["type"] for p in hf[0]["content"]] == ["image", "text"]
        prompts.append(eng.prepare(hf, [Image.new("RGB", (32, 32))] * len(refs)).input_ids)
    assert prompts[0] == prompts[1]
