"""``llavamed data ingest``: PMC OA packages -> figures.jsonl + images/ + ingest_report.json."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llavamed.commands import UsageError, non_negative_int, positive_int

DESCRIPTION = """\
Build a figure-caption corpus (PMC-15M style) from PubMed Central Open Access packages you have
downloaded. SRC can be package .tar.gz files, folders of them, or folders of unpacked articles
(.nxml plus image files). Tarballs are read as streams, never extracted to disk.

For every <fig> it writes one record to DIR/figures.jsonl (pair_id, pmid, pmcid, fig_id, fig_label,
fig_caption, graphic_ref, image, in_text_mention, domain, plus image_sha1, width, height, source)
and the image as DIR/images/<pair_id>.jpg (RGB JPEG, quality 95). Inline mentions are the body
sentences that cite the figure through <xref ref-type="fig">, ranges and lists included.
Supplementary and table figures, figures without caption or graphic, missing, undecodable, tiny
and duplicate images are skipped and counted per reason in DIR/ingest_report.json.

Exits non-zero when it processed packages and none gave a figure (all corrupt, say); a re-run
with nothing new to do exits 0, as does one whose packages gave only figures DIR already holds
(a moved source folder).

Safe to interrupt (even kill -9): re-running the same command skips finished packages and never
duplicates a pair_id. A re-run into the same DIR needs the options of its first run (--domains,
--no-domains, --min-size, --max-side, --keep-missing-images; --workers may change): other ones
are refused, as finished packages would not be redone with them.

--shard K/N takes a deterministic share of the packages (K = 0..N-1, e.g.
--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); give each shard its own --out."""


def _domains_arg(text: str) -> tuple[str, ...]:
    from llavamed.data.figures import DOMAINS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in DOMAINS and n != "other"]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown domain(s) {bad}; choose from {', '.join(DOMAINS)}, other"
        )
    return names


def _shard_arg(text: str) -> str:
    """K/N with 0 <= K < N, checked as the command line is read (the library parses it again)."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 0/4)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: N must be >= 1")
    if k >= n:
        raise argparse.ArgumentTypeError(f"{text}: K must be in 0 .. {n - 1} (0-based)")
    return text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="PMC OA packages -> figure-caption pairs with mentions and domain labels",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help=".tar.gz packages or folders")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: min(2, CPUs)); 1 runs in this process",
    )
    p.add_argument(
        "--shard", type=_shard_arg, metavar="K/N", help="process only shard K of N (0-based)"
    )
    p.add_argument(
        "--keep-missing-images",
        action="store_true",
        help="keep figures whose image file is missing, with image: null",
    )
    p.add_argument(
        "--min-size",
        type=non_negative_int,
        default=32,
        metavar="PX",
        help="drop images whose shorter side is below PX pixels (default 32)",
    )
    p.add_argument(
        "--max-side",
        type=positive_int,
        metavar="PX",
        help="downscale images whose longer side exceeds PX, at least --min-size "
        "(default: keep size)",
    )
    p.add_argument(
        "--domains",
        type=_domains_arg,
        metavar="LIST",
        help="keep only figures labelled with one of these (comma-separated; 'other' = none)",
    )
    p.add_argument(
        "--no-domains", action="store_true", help="don't run the domain classifier (all false)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavamed.data.pmc.ingest import IngestOptions, ingest
    from llavamed.errors import LlavamedError
    from llavamed.utils.io import require_writable

    # Ranges that depend on another flag: usage errors too, like the ranges argparse checks.
    if args.max_side is not None and args.max_side < args.min_size:
        raise UsageError(
            f"argument --max-side: {args.max_side} must be >= --min-size ({args.min_size}): "
            "images would be downscaled under the minimum size"
        )
    if args.no_domains and args.domains:
        raise UsageError("argument --domains: needs the domain classifier; drop --no-domains")
    # Before any package is read: an --out that cannot be made (/proc/x) ended in a traceback.
    require_writable(args.out, "--out", folder=True)
    opts = IngestOptions(
        keep_missing_images=args.keep_missing_images,
        min_image_size=args.min_size,
        max_image_side=args.max_side,
        label_domains=not args.no_domains,
        keep_domains=args.domains,
    )
    report = ingest(
        args.sources,
        args.out,
        opts,
        workers=args.workers,
        shard=args.shard,
        progress=not args.no_progress,
    )
    run_info = report.get("last_run", {})
    print(
        f"{run_info.get('figures_written', 0)} figures written this run "
        f"({report['figures_written']} in total) from {run_info.get('packages_processed', 0)} "
        f"packages ({run_info.get('packages_skipped_as_done', 0)} already done) "
        f"-> {args.out / 'figures.jsonl'}"
    )
    reasons = report.get("reasons", {})
    if reasons:
        print("skipped / noted: " + json.dumps(reasons))
    processed = run_info.get("packages_processed", 0)
    present = run_info.get("figures_already_present", 0)
    if processed and not run_info.get("figures_written", 0) and present:
        # Packages done before under other keys (a moved or renamed source folder): their
        # figures are all there. Nothing failed, and the corpus is not empty.
        print(
            f"note: the {processed} package(s) processed gave {present} figure(s) already in "
            f"{args.out / 'figures.jsonl'} (packages done before under another path?)"
        )
    elif processed and not run_info.get("figures_written", 0):
        # Every package corrupt, XML only, or filtered out: a pipeline must not go on to train
        # on nothing. A re-run with nothing new to do (all packages done) is not this.
        raise LlavamedError(
            f"no figures written: none of the {processed} package(s) processed this run gave a "
            f"figure-image pair (reasons above and in {args.out / 'ingest_report.json'})"
        )
    return 0
