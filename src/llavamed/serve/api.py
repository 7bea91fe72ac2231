"""OpenAI-compatible HTTP API over the :class:`~llavamed.serve.engine.Engine`.

``create_app(engine, settings)`` builds the FastAPI app: ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` (JSON or SSE). Limits are checked before any work is queued, every
client error is an OpenAI-shaped 4xx, a full engine queue is 503 with Retry-After, and a client
that goes away cancels its generation. Request bodies, image bytes and keys are never logged.

``serve_in_background(model, port=0)`` runs the whole server in a thread for tests, benchmarks and
the quickstart.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: route annotations are resolved from here

from llavamed.errors import InputError, LlavamedError
from llavamed.serve import protocol as P
from llavamed.serve.engine import (
    MAX_IMAGE_PIXELS,
    Engine,
    EngineClosed,
    EngineSettings,
    Event,
    QueueFull,
    SamplingParams,
    load_user_image,
)

log = logging.getLogger("llavamed.serve")


@dataclass
class ServerSettings:
    """HTTP-side settings and limits. Sizes in bytes."""

    served_model_name: str | None = None
    """Model id in /v1/models and the only one accepted; default: the engine's name."""
    api_key: str | None = None
    """When set, /v1/* requires ``Authorization: Bearer <key>``."""
    max_request_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_images: int = 4
    max_prompt_tokens: int | None = None
    """Default: the model's context window minus one."""
    max_completion_tokens: int = 1024
    """Largest ``max_tokens`` a request may ask for; also the default when it asks for none."""
    allow_remote_images: bool = False
    """Fetch ``http(s)`` image URLs. Off by default: it lets clients make the server fetch URLs."""
    remote_timeout_s: float = 10.0
    created: int = field(default_factory=lambda: int(time.time()))


def _error(exc: P.ProtocolError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _busy(exc: QueueFull) -> P.ProtocolError:
    return P.ProtocolError(
        503,
        "server busy: request queue full",
        type="server_error",
        code="queue_full",
        headers={"Retry-After": str(exc.retry_after)},
    )


def create_app(engine: Engine, settings: ServerSettings | None = None):
    """The FastAPI app serving ``engine``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServerSettings()
    name = settings.served_model_name or engine.name
    max_prompt = min(settings.max_prompt_tokens or engine.max_context - 1, engine.max_context - 1)
    app = FastAPI(title="llavamed", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(P.ProtocolError)
    async def _protocol_error(_req, exc: P.ProtocolError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return _error(P.ProtocolError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc):
        return _error(P.ProtocolError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _internal(_req, exc: Exception):
        log.error("internal error: %s", type(exc).__name__)
        return JSONResponse(
            {
                "error": {
                    "message": "internal server error",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        )
        if not ok:
            raise P.ProtocolError(
                401,
                "missing or invalid API key",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check_model(model: str) -> None:
        if model != name:
            raise P.ProtocolError(
                404,
                f"model {model[:100]!r} not found; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": name,
            "multimodal": engine.is_multimodal,
            "queue_depth": engine.queue_depth,
            "stats": dict(engine.stats),
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return P.ModelList(data=[P.ModelCard(id=name, created=settings.created)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str, request: Request):
        check_auth(request)
        check_model(model_id)
        return P.ModelCard(id=name, created=settings.created).model_dump()

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise P.ProtocolError(
                413, f"request body larger than {limit} bytes", code="request_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise P.ProtocolError(
                    413, f"request body larger than {limit} bytes", code="request_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def load_images(refs: list[P.ImageRef]) -> list:
        out = []
        for ref in refs:
            data = ref.data if ref.data is not None else await _fetch(ref, settings)
            try:
                out.append(
                    await run_in_threadpool(
                        load_user_image, data, name=ref.where, max_pixels=settings.max_image_pixels
                    )
                )
            except InputError as exc:
                raise P.ProtocolError(
                    400,
                    f"{ref.where}: {exc.reason}" + (f" ({exc.detail})" if exc.detail else ""),
                    param=ref.where,
                    code="invalid_image",
                ) from None
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_body(request)
        try:
            data = json.loads(body, parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
            # RecursionError: a few KB of nested brackets exhaust the parser's stack.
            why = f" ({exc})" if isinstance(exc, _NotJSON) else ""
            raise P.ProtocolError(400, f"request body is not valid JSON{why}") from None
        req = P.parse_request(data)
        check_model(req.model)
        most = max_choices(engine)
        if req.n > most:
            by_queue = most < engine.settings.max_batch_size
            raise P.ProtocolError(
                400,
                f"n {req.n} exceeds the server limit {most} (a request's choices are queued and "
                "decoded together, one batch row each: llavamed serve "
                f"{'--max-queue' if by_queue else '--max-batch-size'})",
                param="n",
            )
        if (refused := req.unsupported()) is not None:
            # Refused rather than ignored: a client that asked for logprobs read
            # choices[0].logprobs.content from "logprobs": null, and one that asked for JSON
            # or a tool call got prose that looked like an answer.
            raise P.ProtocolError(400, refused[1], param=refused[0])
        hf_messages, refs = P.to_hf_messages(
            req.messages,
            allow_remote=settings.allow_remote_images,
            max_image_bytes=settings.max_image_bytes,
        )
        if refs and not engine.is_multimodal:
            raise P.ProtocolError(
                400,
                f"model {name!r} is text-only and accepts no images",
                param="messages",
                code="images_not_supported",
            )
        at_least = engine.min_prompt_tokens(hf_messages)
        if at_least > max_prompt:
            # Without tokenizing it: that is serialised, so a 30 MB prompt held every other
            # request for 45 s before this same answer.
            raise P.ProtocolError(
                400,
                f"prompt is at least {at_least} tokens; the limit is {max_prompt}",
                param="messages",
                code="context_length_exceeded",
            )
        if len(refs) > settings.max_images:
            raise P.ProtocolError(
                400,
                f"too many images: {len(refs)} > {settings.max_images}",
                param="messages",
                code="too_many_images",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        # Greedy (or top_p 0) choices are all the same answer: decoded once and given n times,
        # so they are identical (n rows of one batch may round differently) and cost one row.
        once = SamplingParams(temperature=temperature, top_p=top_p).deterministic
        generations = 1 if once else req.n
        try:
            engine.check_capacity(generations)
        except QueueFull as exc:
            raise _busy(exc) from None
        images = await load_images(refs)
        try:
            prompt = await run_in_threadpool(engine.prepare, hf_messages, images)
        except InputError as exc:
            raise P.ProtocolError(
                400,
                f"messages: {exc.reason}" + (f" ({exc.detail})" if exc.detail else ""),
                param="messages",
            ) from None
        n_prompt = len(prompt.input_ids)
        if n_prompt > max_prompt:
            raise P.ProtocolError(
                400,
                f"prompt is {n_prompt} tokens; the limit is {max_prompt}",
                param="messages",
                code="context_length_exceeded",
            )
        asked, field = req.requested_max_tokens(), req.max_tokens_param()
        cap = min(settings.max_completion_tokens, engine.max_context - n_prompt)
        if asked is not None and asked > settings.max_completion_tokens:
            raise P.ProtocolError(
                400,
                f"{field} {asked} exceeds the server limit {settings.max_completion_tokens}",
                param=field,
            )
        if asked is not None and asked > cap:
            raise P.ProtocolError(
                400,
                f"prompt ({n_prompt}) + {field} ({asked}) exceeds the "
                f"context window ({engine.max_context})",
                param=field,
                code="context_length_exceeded",
            )
        params = SamplingParams(
            max_tokens=asked or cap,
            temperature=temperature,
            top_p=top_p,
            seed=req.seed,
            stop=req.stop_list(),
        )
        n = req.n
        # Generation g answers choices[g]: every choice when decoded once, else choice g alone.
        choices = [list(range(n))] if once else [[i] for i in range(n)]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def on_event(g: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (g, ev))

        try:
            # Submitted together: the engine queues them at once (all or none) and its batcher
            # decodes them side by side. Choice i's seed is seed + i (SamplingParams.for_choice).
            handles = engine.submit_many(
                prompt,
                [params.for_choice(g) for g in range(len(choices))],
                [on_event(g) for g in range(len(choices))],
            )
        except QueueFull as exc:
            raise _busy(exc) from None
        except EngineClosed:
            raise P.ProtocolError(
                503, "server shutting down", type="server_error", headers={"Retry-After": "5"}
            ) from None
        except InputError as exc:
            raise P.ProtocolError(400, str(exc), code="context_length_exceeded") from None

        def cancel_all() -> None:
            for h in handles:
                h.cancel()  # no-op when finished

        last_check = [time.monotonic()]

        async def next_event() -> tuple[int, Event] | None:
            """The next (generation, event), or None once the client has gone (the work is then
            cancelled). The client is checked every 0.25 s even while tokens keep arriving."""
            while True:
                now = time.monotonic()
                if now - last_check[0] >= 0.25:
                    last_check[0] = now
                    if await request.is_disconnected():
                        cancel_all()
                        return None
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    continue

        cid, created = P.completion_id(), P.now()
        if not req.stream:
            parts: list[list[str]] = [[] for _ in choices]
            done: dict[int, Event] = {}
            try:
                while len(done) < len(choices):
                    got = await next_event()
                    if got is None:
                        return JSONResponse({}, status_code=499)
                    g, ev = got
                    if ev.kind == "error":
                        raise P.ProtocolError(
                            500, ev.error or "generation failed", type="server_error"
                        )
                    parts[g].append(ev.text)
                    if ev.kind == "done":
                        done[g] = ev
            finally:
                cancel_all()  # stops the others after an error, or work if we are torn down
            answers: dict[int, P.Choice] = {}
            for g, ev in done.items():
                for i in choices[g]:
                    answers[i] = P.Choice(
                        index=i,
                        message=P.AssistantMessage(content="".join(parts[g])),
                        finish_reason=ev.finish_reason or "stop",
                    )
            return P.ChatCompletion(
                id=cid,
                created=created,
                model=name,
                choices=[answers[i] for i in range(n)],
                # The prompt once (OpenAI bills it once), every choice's completion.
                usage=P.usage(
                    handles[0].prompt_tokens,
                    sum(ev.completion_tokens * len(choices[g]) for g, ev in done.items()),
                ),
            ).model_dump()

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def sse(chunk: P.ChatCompletionChunk | dict) -> str:
            if isinstance(chunk, dict):
                return f"data: {json.dumps(chunk)}\n\n"
            return f"data: {chunk.model_dump_json(exclude_none=False)}\n\n"

        def chunk(index: int, delta: P.Delta, finish: str | None = None) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(
                id=cid,
                created=created,
                model=name,
                choices=[P.ChunkChoice(index=index, delta=delta, finish_reason=finish)],
            )

        async def stream() -> AsyncIterator[str]:
            """One choice per chunk, as OpenAI and vLLM send them for n > 1: each choice opens
            with its role, its deltas follow as they are decoded (the choices interleave), and
            each ends with its own finish_reason; then the usage (if asked for) and [DONE]."""
            try:
                for i in range(n):
                    yield sse(chunk(i, P.Delta(role="assistant", content="")))
                finished, completion = 0, 0
                while finished < len(choices):
                    got = await next_event()
                    if got is None:
                        return
                    g, ev = got
                    if ev.kind == "error":
                        err = P.ProtocolError(
                            500, ev.error or "generation failed", type="server_error"
                        )
                        yield sse(err.body())
                        yield "data: [DONE]\n\n"  # as vLLM does: clients wait for it
                        return
                    for i in choices[g]:
                        if ev.text:
                            yield sse(chunk(i, P.Delta(content=ev.text)))
                        if ev.kind == "done":
                            yield sse(chunk(i, P.Delta(), ev.finish_reason or "stop"))
                    if ev.kind == "done":
                        finished += 1
                        completion += ev.completion_tokens * len(choices[g])
                if include_usage:
                    yield sse(
                        P.ChatCompletionChunk(
                            id=cid,
                            created=created,
                            model=name,
                            choices=[],
                            usage=P.usage(handles[0].prompt_tokens, completion),
                        )
                    )
                yield "data: [DONE]\n\n"
            finally:
                cancel_all()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


def max_choices(engine: Engine) -> int:
    """The largest ``n`` a request may ask for: the engine's batch size, and its queue. The n
    choices of a request decode side by side, one batch row each (a KV cache as long as the
    prompt and the answer), so more than a batch would hold could not decode together, and
    one request would take every row (and that memory) from the other clients for its whole
    answer. The n generations are queued at once, so more than the queue holds could never be
    queued (that request would be refused as busy for ever). 8 by default (--max-batch-size);
    OpenAI allows up to 128."""
    most = engine.settings.max_batch_size
    if engine.settings.max_queue > 0:
        most = min(most, engine.settings.max_queue)
    return max(1, most)


class _NotJSON(ValueError):
    pass


def _not_json(name: str):
    """``json.loads``' hook for ``NaN``, ``Infinity`` and ``-Infinity``: Python's parser takes
    them, JSON (and OpenAI) does not, and a NaN temperature was then refused as "less than or
    equal to 2"."""
    raise _NotJSON(f"{name} is not a JSON number")


async def _fetch(ref: P.ImageRef, settings: ServerSettings) -> bytes:
    """Download a remote image (only when allowed), capped in size and in total time: httpx's
    timeout bounds each read, so a host sending a byte every few seconds would hold the request
    open for ever."""
    import httpx

    limit = settings.max_image_bytes
    try:
        async with (
            asyncio.timeout(settings.remote_timeout_s),
            httpx.AsyncClient(timeout=settings.remote_timeout_s, follow_redirects=True) as client,
        ):
            async with client.stream("GET", ref.url) as resp:
                if resp.status_code != 200:
                    raise P.ProtocolError(
                        400,
                        f"{ref.where}: image URL answered HTTP {resp.status_code}",
                        param=ref.where,
                        code="invalid_image_url",
                    )
                chunks, size = [], 0
                async for part in resp.aiter_bytes():
                    size += len(part)
                    if size > limit:
                        raise P.ProtocolError(
                            413,
                            f"{ref.where}: image larger than {limit} bytes",
                            param=ref.where,
                            code="image_too_large",
                        )
                    chunks.append(part)
                return b"".join(chunks)
    except TimeoutError:
        raise P.ProtocolError(
            400,
            f"{ref.where}: image URL took longer than {settings.remote_timeout_s:g} s",
            param=ref.where,
            code="invalid_image_url",
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
        # URLs were checked when parsed (protocol._check_fetchable); what is left here is the
        # network: HTTP errors and socket failures httpx did not wrap.
        raise P.ProtocolError(
            400,
            f"{ref.where}: could not fetch image URL ({type(exc).__name__})",
            param=ref.where,
            code="invalid_image_url",
        ) from None


# --- running the server ----------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A server running in a background thread: ``base_url`` ends in ``/v1``."""

    base_url: str
    host: str
    port: int
    engine: Engine
    _server: Any
    _thread: threading.Thread
    _own_engine: bool

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve_in_background(
    model: str | Path | Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    dtype: str | None = None,
    engine_settings: EngineSettings | None = None,
    pack_weights: bool = True,
    log_level: str = "warning",
    startup_timeout: float = 120.0,
    **settings: Any,
) -> ServerHandle:
    """Start an OpenAI-compatible server in a daemon thread and return once it accepts
    connections. ``model``: a folder, ``"embedded"`` or a ready Engine (then ``stop()`` leaves
    it open). ``port=0`` picks a free port. Extra keyword arguments are ServerSettings fields."""
    import uvicorn

    own = not isinstance(model, Engine)
    engine = (
        Engine.from_path(model, dtype=dtype, settings=engine_settings, pack_weights=pack_weights)
        if own
        else model
    )
    app = create_app(engine, ServerSettings(**settings))
    sock = bind_socket(host, port)
    real_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name="llavamed-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        dead, late = not thread.is_alive(), time.monotonic() > deadline
        if dead or late:
            server.should_exit = True
            sock.close()
            if own:
                engine.close()
            why = (
                f"{type(failure[0]).__name__}: {failure[0]}"
                if failure
                else "the server thread stopped"
                if dead
                else f"not accepting connections after {startup_timeout:g} s"
            )
            raise LlavamedError(f"server on {host}:{real_port} failed to start ({why})")
        time.sleep(0.02)
    shown = f"[{host}]" if ":" in host else host
    return ServerHandle(
        f"http://{shown}:{real_port}/v1", host, real_port, engine, server, thread, own
    )
