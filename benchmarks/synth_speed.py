"""MedSynth speed: per-domain render time and whole-world generation time.

    .venv/bin/python benchmarks/synth_speed.py [--articles 150] [--workers 1 2] [--size 256]

Prints a table. Wall time depends on what else runs on the machine; CPU time (all processes) is
the steadier number: on an idle machine, wall ~= CPU / workers.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np

from llavamed.data.synth import DOMAINS, generate_world, render, sample_attributes


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--articles", type=int, default=150)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()

    print(f"{'domain':<12} {'ms/image (CPU)':>15}")
    for d in DOMAINS:
        t = time.process_time()
        for i in range(40):
            rng = np.random.default_rng(i)
            render(d, sample_attributes(d, rng), rng, args.size)
        print(f"{d:<12} {(time.process_time() - t) / 40 * 1000:>15.1f}")

    print(
        f"\n{'workers':>7} {'articles':>8} {'images':>7} {'wall s':>7} {'CPU s':>7} {'images/s':>9}"
    )
    for w in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            t, c = time.perf_counter(), _cpu()
            m = generate_world(
                f"{tmp}/w", articles=args.articles, image_size=args.size, workers=w, progress=False
            )
            wall, cpu = time.perf_counter() - t, _cpu() - c
        n = len(m["images"])
        print(f"{w:>7} {args.articles:>8} {n:>7} {wall:>7.1f} {cpu:>7.1f} {n / wall:>9.1f}")


if __name__ == "__main__":
    main()
