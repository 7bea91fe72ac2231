"""Figures per second of ``llavamed data ingest``, streaming from PMC-style tarballs, with 1 and 2
worker processes, on the same MedSynth packages.

    python benchmarks/ingest.py                          # 80 articles, 512 px images
    python benchmarks/ingest.py --articles 200 --image-size 1024 --workers 1 2

The packages are generated once into --cache (MedSynth is deterministic) and every run ingests
into a fresh folder, so each number covers the full path: gzip stream -> JATS parse -> mentions
-> domain labels -> image decode -> JPEG q95 encode -> hash/dedupe -> atomic writes. Setup
(world generation) is not timed. Each repeat runs every worker count once, in an order rotated
per repeat, so a shared machine's drift hits them alike. Printed per worker count: the median
and the best run's seconds and figures/s, the best run's CPU seconds, and the speed-up of the
last count against the first from the medians and from the best runs. Every run must write the
same figures (checked: the speed-up is for the same work).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--articles", type=int, default=80)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--repeats", type=int, default=2, help="runs per worker count; median and best shown"
    )
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "llavamed-bench")
    args = ap.parse_args()
    if args.repeats < 1 or args.articles < 1 or min(args.workers) < 1:
        ap.error("--repeats, --articles and every --workers value must be >= 1")

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

    counts = list(dict.fromkeys(args.workers))
    runs: dict[int, list[tuple[int, float, float, float]]] = {w: [] for w in counts}
    for r in range(args.repeats):
        # Rotated each repeat, so a drifting shared machine hits every worker count alike.
        for workers in counts[r % len(counts) :] + counts[: r % len(counts)]:
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
            runs[workers].append((report["figures_written"], dt, cpu_self, cpu_kids))
    written = {n for rs in runs.values() for n, *_ in rs}
    if len(written) != 1:
        raise SystemExit(f"ingest: runs wrote different figure counts {sorted(written)}")
    (n,) = written
    rows = []
    for workers in counts:
        _, best, cpu_self, cpu_kids = min(runs[workers], key=lambda run: run[1])
        med = statistics.median(dt for _, dt, _, _ in runs[workers])
        rows.append((workers, med, best, cpu_self, cpu_kids))
    # The parent is the only writer: its CPU time bounds the speed-up more workers can give.
    print(
        f"\nload average (1 min) after the runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"{n} figures per run; median and best of {args.repeats} run(s) per worker count; "
        "CPU seconds of the best run"
    )
    print_table(
        [
            "workers",
            "median s",
            "best s",
            "figures/s (median)",
            "figures/s (best)",
            "packages/s (best)",
            "parent CPU s",
            "worker CPU s",
        ],
        [
            [w, f"{med:.2f}", f"{best:.2f}", f"{n / med:.1f}", f"{n / best:.1f}",
             f"{args.articles / best:.1f}", f"{cs:.2f}", f"{ck:.2f}"]
            for w, med, best, cs, ck in rows
        ],
    )  # fmt: skip
    if len(rows) > 1:
        (w0, med0, best0, *_), (w1, med1, best1, *_) = rows[0], rows[-1]
        print(
            f"\nspeed-up {w1} vs {w0} workers (time with {w0} / time with {w1}): "
            f"{med0 / med1:.2f}x from the medians, {best0 / best1:.2f}x from the best runs"
        )


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "ingest")
