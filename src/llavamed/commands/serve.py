"""``llavamed serve``: an OpenAI-compatible HTTP API for a llava checkpoint or a plain chat LM."""

from __future__ import annotations

import argparse
import os
import sys

from llavamed.commands import (
    add_dtype_arg,
    add_pack_weights_arg,
    finite_float,
    non_negative_int,
    port_int,
    positive_int,
    size_mib,
)
from llavamed.errors import ConfigError


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared by serve, chat and web."""
    p.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a llava checkpoint folder or a training run's folder (its checkpoint-final), a "
        "plain causal LM folder (text-only mode; detected from config.json), or 'embedded' for "
        "the bundled SmolLM2-135M-Instruct",
    )
    add_dtype_arg(p)
    add_pack_weights_arg(p)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve GET /v1/models, POST /v1/chat/completions (streaming and not) and "
        "GET /health. Images (PNG, JPEG, DICOM, ...) are sent as base64 data: URLs in "
        "image_url content parts. Concurrent requests are batched; when the queue is full the "
        "server answers 503 with Retry-After.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=port_int, default=8000, help="port (default 8000; 0 = any free)")
    key = p.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (prefer --api-key-env: command "
        "lines are visible to other users; an empty KEY is an error)",
    )
    key.add_argument("--api-key-env", metavar="VAR", help="read the API key from env var VAR")
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="model id clients must send (default: the model folder's name; for a training "
        "run's folder or its checkpoint-final, the run folder's name)",
    )
    p.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="requests decoded together (default %(default)s)",
    )
    p.add_argument(
        "--prefix-cache",
        type=non_negative_int,
        default=32,
        help="images whose prompt prefix (KV cache) is kept for follow-up turns and repeated "
        "questions, least recently used dropped first (default 32, ~4 MB each for the embedded "
        "model in fp32; 0 = off)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests allowed to wait; beyond that 503 + Retry-After (default %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=1024,
        dest="max_completion_tokens",
        help="largest max_tokens a request may ask for, and what a request without one gets (default %(default)s)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help="longest prompt in tokens (default: the model's context window)",
    )
    p.add_argument(
        "--max-images",
        type=positive_int,
        default=4,
        help="images per request (default %(default)s)",
    )
    p.add_argument(
        "--max-image-mb",
        type=size_mib,
        default=16.0,
        help="bytes per image, in MiB (default %(default)s)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=40_000_000,
        help="pixels per image (default %(default)s)",
    )
    p.add_argument(
        "--max-request-mb",
        type=size_mib,
        default=32.0,
        help="request body, in MiB (default %(default)s)",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="also fetch http(s) image URLs (off by default; file: URLs and paths "
        "are always refused)",
    )
    p.add_argument(
        "--remote-timeout",
        type=finite_float(0, above=True),
        default=10.0,
        metavar="SECONDS",
        help="with --allow-remote-images: the most one image download may take, in all "
        "(default %(default)s)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="uvicorn log level (default info)",
    )
    # Ctrl-C is how one stops it: nothing to resume.
    p.set_defaults(func=run, on_interrupt="stopped")


def resolve_api_key(args) -> str | None:
    if args.api_key_env:
        value = os.environ.get(args.api_key_env)
        if not value:
            raise ConfigError(
                f"--api-key-env: environment variable {args.api_key_env} is unset or empty"
            )
        return value
    if args.api_key == "":  # e.g. --api-key "$KEY" with KEY unset: not a request for no auth
        raise ConfigError("--api-key: the key is empty; omit the flag to serve without a key")
    return args.api_key


def listen(host: str, port: int):
    """A socket bound to ``host:port``, or a one-line error naming them (a busy port, a bad
    address): checked before a model loads, not after."""
    from llavamed.serve.api import bind_socket

    try:
        return bind_socket(host, port)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"--host {host} --port {port}: cannot listen ({reason})") from exc


def run(args) -> int:
    import logging

    api_key = resolve_api_key(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    # Bound before the model loads: a busy port or a bad address fails in a second, not after
    # the load, and the port stays ours while the weights load.
    sock = listen(args.host, args.port)
    try:
        return _serve(args, sock, api_key)
    finally:
        sock.close()


def _serve(args, sock, api_key: str | None) -> int:
    """Load the model and serve on the bound socket until stopped."""
    import uvicorn

    from llavamed.serve.api import ServerSettings, create_app
    from llavamed.serve.engine import Engine, EngineSettings

    engine = Engine.from_path(
        args.model,
        dtype=args.dtype,
        pack_weights=args.pack_weights,
        name=args.served_model_name,
        settings=EngineSettings(
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            prefix_cache=args.prefix_cache,
        ),
    )
    settings = ServerSettings(
        served_model_name=args.served_model_name,
        api_key=api_key,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_image_bytes=int(args.max_image_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        allow_remote_images=args.allow_remote_images,
        remote_timeout_s=args.remote_timeout,
    )
    app = create_app(engine, settings)
    host, port = sock.getsockname()[:2]
    kind = "llava (images + text)" if engine.is_multimodal else "text-only"
    print(
        f"llavamed: serving {engine.name!r} [{kind}] at http://{host}:{port}/v1"
        f"{' (API key required)' if api_key else ''}",
        file=sys.stderr,
        flush=True,
    )
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print("llavamed: warning: listening beyond localhost without an API key", file=sys.stderr)
    # The access log records method, path and status only, never bodies or headers.
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
    return 0
