"""Figures per second of ``llavamed data ingest``, streaming from PMC-style tarballs, with 1 and 2
worker processes, on the same MedSynth packages.

    python benchmarks/ingest.py                          # 80 articles, 512 px images
    python benchmarks/ingest.py --articles 200 --image-size 1024 --workers 1 2

The packages are generated once into --cache (MedSynth is deterministic) and every run ingests
into a fresh folder, so each number covers the full path: gzip stream -> JATS parse -> mentions
-> domain labels -> image decode -> JPEG q95 encode -> hash/dedupe -> atomic writes. Setup
(world generation) is not timed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--articles", type=int, default=80)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per setting")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llavamed-bench")
    args = ap.parse_args()

    from llavamed.data.pmc.ingest import ingest
    from llavamed.data.synth import generate_world
    from llavamed.data.synth.world import min_vqa_images

    world = args.cache / f"medsynth-{args.articles}-{args.image_size}"
    t0 = time.perf_counter()
    generate_world(
        world, articles=args.articles, seed=0, image_size=args.image_size, workers=2,
        progress=False, vqa_images=min_vqa_images(),  # the fewest: only the packages are read
    )  # fmt: skip
    packages = world / "packages"
    mb = sum(p.stat().st_size for p in packages.glob("*.tar.gz")) / 1e6
    print(
        f"setup: {args.articles} packages, {mb:.1f} MB of tar.gz ({time.perf_counter() - t0:.1f} s)"
    )

    rows = []
    for workers in args.workers:
        best = None
        for _ in range(args.repeats):
            out = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
            self0 = resource.getrusage(resource.RUSAGE_SELF)
            kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            try:
                t = time.perf_counter()
                report = ingest([packages], out, workers=workers)
                dt = time.perf_counter() - t
            finally:
                shutil.rmtree(out, ignore_errors=True)
            self1 = resource.getrusage(resource.RUSAGE_SELF)
            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_self = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
            cpu_kids = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
            n = report["figures_written"]
            if best is None or dt < best[1]:
                best = (n, dt, cpu_self, cpu_kids)
        n, dt, cpu_self, cpu_kids = best
        rows.append((workers, n, dt, n / dt, args.articles / dt, cpu_self, cpu_kids))
    # The parent is the only writer: its CPU time bounds the speed-up more workers can give.
    print(
        f"\nload average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{'workers':>7} {'figures':>8} {'seconds':>8} {'figures/s':>10} {'packages/s':>11}"
        f" {'parent CPU s':>13} {'worker CPU s':>13}"
    )
    for workers, n, dt, fps, pps, cs, ck in rows:
        print(f"{workers:>7} {n:>8} {dt:>8.2f} {fps:>10.1f} {pps:>11.1f} {cs:>13.2f} {ck:>13.2f}")
    if len(rows) > 1:
        print(f"\nspeed-up {rows[-1][0]} vs {rows[0][0]} workers: {rows[-1][3] / rows[0][3]:.2f}x")


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "ingest")
