"""``llavamed web``: a Gradio web page to chat with a model about uploaded images."""

from __future__ import annotations

import sys

from llavamed.commands import int_in, positive_int, size_mib
from llavamed.commands.chat import add_sampling_args, sampling_params
from llavamed.commands.serve import add_model_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "web",
        help="web UI: upload an image (PNG, JPEG, DICOM) and chat about it",
        description="A Gradio app: upload an image, chat over several turns, try example images "
        "(pydicom CT/MR, MedSynth), adjust sampling. Needs the 'web' extra "
        "(pip install 'llavamed[web]').",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    # No 0 (any free port) here: the page's address is printed before Gradio picks a port.
    p.add_argument("--port", type=int_in(1, 65535), default=7860, help="port (default 7860)")
    p.add_argument(
        "--max-batch-size", type=positive_int, default=8, help="browser sessions decoded together"
    )
    p.add_argument(
        "--max-upload-mb",
        type=size_mib,
        default=256.0,
        help="largest file a page may upload, in MiB; a larger one is refused with a message "
        "naming this limit (default %(default)s)",
    )
    add_sampling_args(p)
    # Ctrl-C is how one stops it: nothing to resume.
    p.set_defaults(func=run, on_interrupt="stopped")


def run(args) -> int:
    from llavamed.errors import LlavamedError
    from llavamed.serve.engine import Engine, EngineSettings

    params = sampling_params(args)
    max_upload = args.max_upload_mb * 2**20
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LlavamedError("llavamed web needs gradio: pip install 'llavamed[web]'") from None
    from llavamed.commands.serve import listen
    from llavamed.serve.web import launch

    listen(args.host, args.port).close()  # a busy port fails now, not after the model loads
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "llavamed: warning: the web UI has no authentication; anyone who reaches "
            f"{args.host}:{args.port} can use the model",
            file=sys.stderr,
        )
    engine = Engine.from_path(
        args.model,
        dtype=args.dtype,
        pack_weights=args.pack_weights,
        settings=EngineSettings(max_batch_size=args.max_batch_size),
    )
    try:
        print(f"llavamed: web UI for {engine.name!r} at http://{args.host}:{args.port}/")
        launch(
            engine,
            args.host,
            args.port,
            block=True,
            default_params=params,
            concurrency=args.max_batch_size,
            max_upload_bytes=int(max_upload),
        )
    finally:
        engine.close()
    return 0
