"""One module per CLI command (``register`` builds its parser, ``run`` executes it), plus the
argument helpers several commands share."""

from __future__ import annotations

import argparse


def add_pack_weights_arg(p: argparse.ArgumentParser) -> None:
    """--pack-weights/--no-pack-weights, for every command that runs a model for inference."""
    p.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prepack the linear weights into oneDNN's blocked layout on CPU (default: on; "
        "about 1.9x faster decoding, same answers up to float rounding). Off: run the model "
        "exactly as transformers loads it",
    )
