"""One module per CLI command (``register`` builds its parser, ``run`` executes it), plus the
argument helpers several commands share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


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


# -- argparse types: a value out of range is a usage error (exit 2, the command's usage line,
# "argument --flag: VALUE must be ..."), refused as the command line is read, before any work.
# A range checked in ``run`` instead exited 1 with a bare line, unlike every other bad flag.
# Library functions keep their own checks for callers that do not come through the CLI.


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _finite_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def int_at_least(low: int | Callable[[], int], why: str = "") -> Callable[[str], int]:
    """argparse type: a whole number >= ``low``. ``low`` may be a function (synth's
    ``min_vqa_images``), called only when the flag is given, so building the parser imports
    nothing heavy. ``why`` follows the message ("...: with fewer, ...")."""

    def parse(text: str) -> int:
        n = _whole_number(text)
        bound = low() if callable(low) else low
        if n < bound:
            raise argparse.ArgumentTypeError(f"{n} must be >= {bound}{why}")
        return n

    parse.__name__ = "int"  # argparse's fallback message: "invalid int value"
    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in ``low .. high`` (a port)."""

    def parse(text: str) -> int:
        n = _whole_number(text)
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"{n} must be in {low} .. {high}")
        return n

    parse.__name__ = "int"
    return parse


def finite_float(
    low: float | None = None,
    *,
    above: bool = False,
    high: float | None = None,
) -> Callable[[str], float]:
    """argparse type: a finite number (``float`` takes 'nan' and 'inf', which passed a ``< 0``
    check and failed later: a traceback, or a limit silently off), at least ``low`` (more than
    ``low`` with ``above``) and at most ``high``."""
    if low is not None and high is not None:
        rule = f"a finite number in [{low:g}, {high:g}]"
    elif low is not None:
        rule = f"a finite number {'>' if above else '>='} {low:g}"
    else:
        rule = "a finite number" + (f" <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        x = _finite_number(text)
        ok = math.isfinite(x)
        if ok and low is not None:
            ok = x > low if above else x >= low
        if ok and high is not None:
            ok = x <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return x

    parse.__name__ = "float"
    return parse


def size_mib(text: str) -> float:
    """argparse type for sizes in MiB (--max-request-mb, --max-upload-mb): finite, and at least
    one byte once converted (1e-9 MiB is 0 bytes: a limit nothing could meet)."""
    x = _finite_number(text)
    if not (math.isfinite(x) and int(x * 2**20) >= 1):
        raise argparse.ArgumentTypeError(
            f"{text} must be a finite size in MiB of at least 1 byte (>= {2**-20:.3g})"
        )
    return x


# Counts such as --limit: a negative or zero count is a typo (Python's slicing would quietly
# take "all but the last N").
positive_int = int_at_least(1)
# Counts where 0 means none or "one per core" (--caption-pairs, synth's --workers, --prefix-cache).
non_negative_int = int_at_least(0)
port_int = int_in(0, 65535)  # 0: any free port


def seed_int(text: str) -> int:
    """argparse type for --seed: numpy's generators (synthesis, noise ablations, bootstrap CIs)
    take 0 .. 2**32-1 only, so a negative seed would fail after the work it seeds, not before."""
    n = _whole_number(text)
    if not 0 <= n < 2**32:
        raise argparse.ArgumentTypeError(f"{n} must be in 0 .. 2**32-1")
    return n


class UsageError(Exception):
    """Flags that cannot go together, or a value whose range depends on another flag, found in
    a command's ``run``: :func:`llavamed.cli.main` reports it as argparse reports a bad flag
    (the command's usage line, "llavamed CMD: error: ...", exit 2), before any work."""
