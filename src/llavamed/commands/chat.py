"""``llavamed chat``: talk to a model in the terminal, with images."""

from __future__ import annotations

import argparse
import sys

from llavamed.commands import finite_float, positive_int, seed_int
from llavamed.commands.serve import add_model_args


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.2) -> None:
    # Ranges are argparse types: 'nan' or '1.5' is a usage error before the model loads.
    # SamplingParams checks them again for library callers (sampling_params below).
    p.add_argument(
        "--temperature",
        type=finite_float(0),
        default=temperature,
        help=f">= 0; 0 = greedy (default {temperature})",
    )
    p.add_argument(
        "--top-p",
        type=finite_float(0, high=1),
        default=1.0,
        help="nucleus sampling mass, in [0, 1] (default 1)",
    )
    p.add_argument(
        "--max-tokens", type=positive_int, default=512, help="longest answer (default 512)"
    )
    p.add_argument("--seed", type=seed_int, default=None, help="sampling seed (default: random)")


def sampling_params(args):
    """The options add_sampling_args added, checked; a bad value is a ConfigError that names it."""
    from llavamed.errors import ConfigError
    from llavamed.serve.engine import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (images: PNG, JPEG, DICOM)",
        description="Interactive multi-turn chat with streamed answers. Commands: /image PATH, "
        "/reset, /help, /quit. With --prompt, answers once and exits. Runs on CPU in fp32 or "
        "bf16 (--dtype).",
    )
    add_model_args(p)
    p.add_argument("--image", metavar="PATH", help="image for the first message")
    p.add_argument("--prompt", metavar="TEXT", help="ask once, print the answer and exit")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    add_sampling_args(p)
    # Ctrl-C is how one stops it: nothing to resume.
    p.set_defaults(func=run, on_interrupt="stopped")


def run(args) -> int:
    from llavamed.serve.chat import ChatSession, run_chat
    from llavamed.serve.engine import Engine, EngineSettings

    params = sampling_params(args)
    if hasattr(sys.stdin, "reconfigure"):
        # Bytes that are not UTF-8 (pasted Latin-1 text) reach the engine, which names them,
        # instead of a UnicodeDecodeError that ended the chat and lost the rest of the input.
        sys.stdin.reconfigure(errors="surrogateescape")
    engine = Engine.from_path(
        args.model,
        dtype=args.dtype,
        pack_weights=args.pack_weights,
        settings=EngineSettings(max_batch_size=1, max_queue=4),
    )
    try:
        session = ChatSession(engine, params=params, system=args.system)
        if args.image:
            session.attach(args.image)
        return run_chat(session, prompt=args.prompt)
    finally:
        engine.close()
