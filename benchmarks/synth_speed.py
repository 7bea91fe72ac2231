"""MedSynth speed: per-domain render time, and whole-world generation with W worker processes
against one process (the baseline), side by side in one run.

    .venv/bin/python benchmarks/synth_speed.py [--articles 150] [--workers 2] [--size 256] [--repeats 3]

The one-process run is always measured as the baseline (``--workers 1`` needs no listing). Each
repeat generates the same world once per worker count, in an order rotated per repeat, so a
shared machine's drift hits every count alike. Printed: medians over the repeats of wall time,
CPU time (all processes) and images/s, and the speed-up of W workers against 1, taken from the
median wall times. Wall time depends on what else runs on the machine; CPU time is the steadier
number: on an idle machine, wall ~= CPU / workers, and a speed-up below the worker count shows
the parallel run's overhead (forking, pickling results) or a busy machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llavamed.data.synth import DOMAINS, generate_world, render, sample_attributes

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--articles", type=_positive, default=150)
    ap.add_argument(
        "--workers",
        type=_positive,
        nargs="+",
        default=[2],
        help="worker counts to compare with 1 (the baseline, always measured)",
    )
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=_positive, default=3, help="medians over this many")
    ap.add_argument("--render-images", type=_positive, default=40, help="per domain")
    args = ap.parse_args(argv)
    if args.size < 64:
        ap.error("--size must be >= 64 px (MedSynth's smallest image)")

    render_rows = []
    for d in DOMAINS:
        per_repeat = []
        for _ in range(args.repeats):
            t = time.process_time()
            for i in range(args.render_images):
                rng = np.random.default_rng(i)
                render(d, sample_attributes(d, rng), rng, args.size)
            per_repeat.append((time.process_time() - t) / args.render_images * 1000)
        render_rows.append([d, f"{statistics.median(per_repeat):.1f}"])
    print(f"render, {args.size} px, {args.render_images} images per domain (median of repeats)")
    print_table(["domain", "ms/image (CPU)"], render_rows)

    counts = [1] + sorted({w for w in args.workers if w != 1})
    walls: dict[int, list[float]] = {w: [] for w in counts}
    cpus: dict[int, list[float]] = {w: [] for w in counts}
    images = 0
    for r in range(args.repeats):
        for w in counts[r % len(counts) :] + counts[: r % len(counts)]:
            with tempfile.TemporaryDirectory() as tmp:
                t, c = time.perf_counter(), _cpu()
                m = generate_world(
                    f"{tmp}/w",
                    articles=args.articles,
                    image_size=args.size,
                    workers=w,
                    progress=False,
                )
                walls[w].append(time.perf_counter() - t)
                cpus[w].append(_cpu() - c)
            images = len(m["images"])
            print(f"  [repeat {r + 1}] {w} worker(s): {walls[w][-1]:.2f} s wall", file=sys.stderr)

    base = statistics.median(walls[1])
    rows = []
    for w in counts:
        wall, cpu = statistics.median(walls[w]), statistics.median(cpus[w])
        rows.append(
            [
                w,
                images,
                f"{wall:.2f}",
                f"{cpu:.2f}",
                f"{images / wall:.1f}",
                "1.00x (baseline)" if w == 1 else f"{base / wall:.2f}x",
            ]
        )
    print(
        f"\nwhole world: {args.articles} articles, {images} images, {args.size} px; "
        f"medians of {args.repeats} repeat(s)"
    )
    print_table(
        ["workers", "images", "wall s", "CPU s", "images/s", "speed-up vs 1 worker (wall)"], rows
    )
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "synth_speed")
