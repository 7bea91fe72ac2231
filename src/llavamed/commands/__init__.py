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


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype, in the one vocabulary of every command that loads a model for inference."""
    from llavamed.utils.precision import DTYPE_ALIASES, MODEL_DTYPES

    p.add_argument(
        "--dtype",
        type=lambda s: DTYPE_ALIASES.get(s, s),  # float32 etc. still work, as fp32 etc.
        choices=MODEL_DTYPES,
        default="fp32",
        help="weights dtype (default fp32; on CPU bf16 is faster only with AVX512-BF16 or AMX "
        "and much slower elsewhere; auto picks bf16 where the CPU has it; fp16 is for GPUs)",
    )


def positive_int(text: str) -> int:
    """argparse type for counts such as --limit: a negative or zero count is a typo (Python's
    slicing would quietly take "all but the last N")."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def seed_int(text: str) -> int:
    """argparse type for --seed: numpy's generators (synthesis, noise ablations, bootstrap CIs)
    take 0 .. 2**32-1 only, so a negative seed would fail after the work it seeds, not before."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"{n} must be in 0 .. 2**32-1")
    return n
