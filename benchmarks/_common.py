"""Helpers shared by the benchmark scripts: machine matmul peak and a median timer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_flops(dtype, n: int = 2048, repeats: int = 7) -> float:
    """Measured dense matmul FLOP/s on this machine for ``dtype``: the best of ``repeats``
    (a peak, so the fastest run is the estimate; the median understates it on a noisy host)."""
    import time

    import torch

    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def of_peak(flops_per_s: float, peak: float | None) -> str:
    """``flops_per_s`` as a share of ``peak``; never a share of a zero or unknown peak."""
    if peak is None or not peak > 0:
        return "n/a"
    return f"{flops_per_s / peak:.0%}"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_script(main: Callable[[], object], name: str) -> None:
    """Run a benchmark's ``main`` and exit with its code. A bad argument that llavamed reports
    (a missing or wrong folder, a non-checkpoint, a bad key=value) or a path of the wrong kind is
    one line naming the script, as ``llavamed``'s own commands print it, not a traceback."""
    import sys

    from llavamed.errors import LlavamedError

    try:
        code = main()
    except LlavamedError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(int(code or 0))
