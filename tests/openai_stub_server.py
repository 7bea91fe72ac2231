"""A real OpenAI-compatible HTTP server for tests, with scriptable faults.

It binds 127.0.0.1 on an ephemeral port (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive) and
answers ``POST /v1/chat/completions`` (plain and streamed) and ``GET /v1/models``. Tests drive it:

    with StubServer(latency=0.05) as srv:
        srv.plan(["429", "500", "ok"])        # next three requests: 429, 500, then success
        srv.responder = lambda body: "User: ...\\nAssistant: ..."
        client = LLMClient(ClientOptions(base_url=srv.base_url, model="stub"))

Behaviours (one per request, taken from the plan FIFO, else ``default``):
``ok``, ``429`` (Retry-After: ``retry_after`` s), ``429ms`` (retry-after-ms), ``500``, ``503``,
``400``, ``401``, ``hang`` (sleep ``hang_s`` before answering, to trip client timeouts),
``malformed`` (200 with a non-JSON body), ``nochoices`` (200 JSON without choices),
``truncated`` (body shorter than Content-Length / stream without ``[DONE]``), ``reset`` (close the
socket without a response), ``nousage`` (success without a usage block), ``length`` (the text
cut at its last 10 characters, ``finish_reason: length``), ``refusal`` (200 with
``content: null``, a ``refusal`` message and ``finish_reason: content_filter``),
``streamerror`` (a streamed reply with an error chunk halfway, then carrying on).
Shapes a real server may send: ``emptychoices`` (``choices: []``), ``nullcontent`` (content
null, ``finish_reason: stop``), ``nulllength`` (content null, ``finish_reason: length``: a
reasoning model that spent max_tokens thinking), ``toolcall`` (content null, a ``tool_calls``
list, ``finish_reason: tool_calls``), ``parts`` (content as a list of ``{"type": "text"}``
parts), ``retrydate`` (429 with an HTTP-date ``Retry-After`` ``retry_after`` s ahead), ``quota``
(OpenAI's 429 ``insufficient_quota``: no credits left),
``redirect`` (307 to ``/v2/chat/completions``), ``badjson`` (200 whose Content-Length matches a
body that is cut JSON), ``nostream`` (a plain JSON completion whatever ``stream`` asked),
``failed`` (half the text with ``finish_reason: error``, as OpenRouter reports a generation
that broke off; ``abort`` is vLLM's word for the same), ``garbled`` (valid JSON in the wrong
shapes: a message that is a string; streamed, ``choices`` a string) and ``badfinish``
(``finish_reason`` a list), ``filtered`` (the text cut at its last 10 characters,
``finish_reason: content_filter``, as Azure OpenAI's output filter sends it), ``badgzip`` (a
200 whose ``Content-Encoding: gzip`` body is not gzip, as a broken proxy sends it),
``deepjson`` (JSON nested past Python's recursion limit), ``surrogate`` (the text ending in a
lone ``\\ud83d`` escape, half an emoji) and ``badusage`` (a usage block with
``1e400`` and ``-5`` for counts).

Run standalone (used by benchmarks, which want the server out of the client's process):
``python tests/openai_stub_server.py --latency 0.2`` prints ``PORT <n>`` and serves until its
standard input closes (or it is killed), so it dies with the process that started it. Started in
the background from a script, whose stdin is ``/dev/null``, it exits at once: keep its stdin open
(``... < <(sleep infinity) &``).
"""

from __future__ import annotations

import argparse
import email.utils
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Responder = Callable[[dict], str]


def default_responder(body: dict) -> str:
    last = ""
    for m in body.get("messages", []):
        if m.get("role") == "user":
            last = str(m.get("content", ""))
    return (
        "User: What does the image show?\n"
        f"Assistant: The image shows a finding ({len(last)} characters of context).\n"
        "User: Is anything abnormal visible?\n"
        "Assistant: There is an area of abnormal appearance in the image."
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # benchmarks open 32+ connections at once
    allow_reuse_address = True


class StubServer:
    def __init__(
        self,
        latency: float = 0.0,
        default: str = "ok",
        retry_after: float = 0.05,
        hang_s: float = 2.0,
        responder: Responder | None = None,
        strict_paths: bool = False,
    ):
        self.latency = latency
        self.default = default
        self.retry_after = retry_after
        self.hang_s = hang_s
        self.responder: Responder = responder or default_responder
        # Like vLLM or OpenAI: only /v1/chat/completions (else any path ending in it).
        self.strict_paths = strict_paths
        self._plan: deque[str] = deque()
        self._lock = threading.Lock()
        self.requests: list[dict] = []
        self.behaviours: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- control ----------------------------------------------------------------------------

    def plan(self, behaviours: Iterable[str]) -> None:
        with self._lock:
            self._plan.extend(behaviours)

    def next_behaviour(self) -> str:
        with self._lock:
            return self._plan.popleft() if self._plan else self.default

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def start(self) -> StubServer:
        stub = self

        class Handler(_Handler):
            server_stub = stub

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_stub: StubServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle + delayed ACK adds
        # ~40 ms to every keep-alive response, which would swamp any latency being measured.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(
        self, status: int, body: bytes, headers: dict | None = None, ctype="application/json"
    ):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            body = {"object": "list", "data": [{"id": "stub", "object": "model"}]}
            self._send(200, json.dumps(body).encode())
        else:
            self._send(404, b'{"error": {"message": "not found"}}')

    def do_POST(self) -> None:
        stub = self.server_stub
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?")[0].rstrip("/")
        if stub.strict_paths:
            served = path == "/v1/chat/completions"
        else:
            served = path.endswith("/chat/completions")
        if not served:
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(400, b'{"error": {"message": "bad json"}}')
            return
        behaviour = stub.next_behaviour()
        with stub._lock:
            stub.requests.append(body)
            stub.behaviours.append(behaviour)
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
        try:
            if stub.latency:
                time.sleep(stub.latency)
            self._respond(stub, body, behaviour)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered
        finally:
            with stub._lock:
                stub.in_flight -= 1

    def _respond(self, stub: StubServer, body: dict, behaviour: str) -> None:
        err = {"error": {"message": f"stub {behaviour}", "type": "stub"}}
        if behaviour == "429":
            self._send(429, json.dumps(err).encode(), {"Retry-After": f"{stub.retry_after:g}"})
            return
        if behaviour == "429ms":
            ms = str(int(stub.retry_after * 1000))
            self._send(429, json.dumps(err).encode(), {"retry-after-ms": ms})
            return
        if behaviour == "quota":  # OpenAI's "no credits left": a 429 no wait will cure
            quota = {
                "error": {
                    "message": "You exceeded your current quota, please check your plan and "
                    "billing details.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            }
            self._send(429, json.dumps(quota).encode())
            return
        if behaviour == "retrydate":
            when = email.utils.formatdate(time.time() + stub.retry_after, usegmt=True)
            self._send(429, json.dumps(err).encode(), {"Retry-After": when})
            return
        if behaviour == "redirect":
            self._send(307, b"", {"Location": "/v2/chat/completions"})
            return
        if behaviour.isdigit():
            self._send(int(behaviour), json.dumps(err).encode())
            return
        if behaviour == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour == "malformed":
            self._send(200, b'{"id": "x", "choices": [{"message": {"content": "oops"')
            return
        if behaviour == "nochoices":
            self._send(200, b'{"id": "x", "object": "chat.completion"}')
            return
        if behaviour == "emptychoices":
            self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
            return
        if behaviour == "badgzip":  # a body its Content-Encoding does not decode
            self._send(200, b"this is not gzip", {"Content-Encoding": "gzip"})
            return
        if behaviour == "deepjson":  # valid JSON nested past Python's recursion limit
            self._send(200, b"[" * 100_000 + b"]" * 100_000)
            return
        if behaviour == "badjson":
            self._send(200, b'{"id": "x", "choices": [{"message": {"content": "cut')
            return
        if behaviour in ("garbled", "badfinish"):  # valid JSON in shapes no server should send
            if body.get("stream"):
                chunk = {"choices": "garbled"}
                if behaviour == "badfinish":
                    chunk = {"choices": [{"delta": {"content": "x"}, "finish_reason": ["stop"]}]}
                sse = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
                self._send(200, sse.encode(), ctype="text/event-stream")
            else:
                choice = {"message": "garbled", "finish_reason": "stop"}
                if behaviour == "badfinish":
                    choice = {"message": {"content": "x"}, "finish_reason": ["stop"]}
                self._send(200, json.dumps({"id": "x", "choices": [choice]}).encode())
            return
        if behaviour == "hang":
            time.sleep(stub.hang_s)
        text = stub.responder(body)
        finish = "stop"
        if behaviour == "length":
            text, finish = text[:-10], "length"
        if behaviour == "failed":
            text, finish = text[: len(text) // 2], "error"
        if behaviour == "surrogate":  # half an emoji: JSON's "\ud83d" escape, a lone surrogate
            text += " \ud83d"
        if behaviour == "filtered":  # Azure's output filter: the text cut where it tripped
            text, finish = text[:-10], "content_filter"
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        usage = {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": len(text) // 4 + 1,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream") and behaviour != "nostream":
            self._stream(text, usage, behaviour, finish)
            return
        resp = {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
        }
        if behaviour == "refusal":
            resp["choices"][0]["message"] = {
                "role": "assistant",
                "content": None,
                "refusal": "I can't help with that.",
            }
            resp["choices"][0]["finish_reason"] = "content_filter"
        msg = resp["choices"][0]
        if behaviour in ("nullcontent", "nulllength", "toolcall"):
            msg["message"]["content"] = None
            msg["finish_reason"] = {"nulllength": "length", "toolcall": "tool_calls"}.get(
                behaviour, "stop"
            )
        if behaviour == "toolcall":
            call = {"name": "describe", "arguments": json.dumps({"text": text[:40]})}
            msg["message"]["tool_calls"] = [{"id": "call_1", "type": "function", "function": call}]
        if behaviour == "parts":
            half = len(text) // 2
            msg["message"]["content"] = [
                {"type": "text", "text": text[:half]},
                {"type": "text", "text": text[half:]},
            ]
        if behaviour != "nousage":
            resp["usage"] = usage
        data = json.dumps(resp).encode()
        if behaviour == "badusage":  # counts no int can hold, or below zero
            usage_json = json.dumps(usage).encode()
            data = data.replace(usage_json, b'{"prompt_tokens": 1e400, "completion_tokens": -5}')
        if behaviour == "truncated":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(200, data)

    def _stream(self, text: str, usage: dict, behaviour: str, finish: str = "stop") -> None:
        truncated = behaviour == "truncated"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        words = text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        if behaviour == "refusal":  # a refusal streams as delta.refusal, not content
            refusal = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
            chunk = {"choices": [{"index": 0, "delta": refusal, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}
            self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
            return
        if truncated:
            pieces = pieces[: max(1, len(pieces) // 2)]
        for i, p in enumerate(pieces):
            chunk = {"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
            if behaviour == "streamerror" and i == len(pieces) // 2:
                chunk = {"error": {"message": "upstream overloaded", "type": "server_error"}}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if not truncated:
            final = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


try:  # a ready-made fixture for test modules that `from openai_stub_server import openai_stub`
    import pytest

    @pytest.fixture
    def openai_stub():
        with StubServer() as srv:
            yield srv

except ImportError:  # pragma: no cover - standalone use without pytest
    pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--default", default="ok")
    args = ap.parse_args(argv)
    srv = StubServer(latency=args.latency, default=args.default).start()
    print(f"PORT {srv.port}", flush=True)
    try:
        # Serve until stdin closes or we are killed: a parent that dies takes us with it.
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
