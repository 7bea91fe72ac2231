"""``llavamed data domains``: (re)label the five LLaVA-Med domains from captions and mentions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavamed.commands import UsageError

DESCRIPTION = """\
Label each figure with the five LLaVA-Med domains (chest_xray, mri, ct_scan, histology, gross;
multi-label; all false means "other") from its caption and inline mentions, with a rule-based
classifier that knows modality names and abbreviations (CXR, HRCT, T2WI, FLAIR), stains and
magnifications (H&E, PAS, IHC, x400), anatomy, and negations ("MRI was not performed").

--in accepts our figures.jsonl or LLaVA-Med's {domain: [records]} caption JSON; --out is written
as figures.jsonl (atomically; --out may equal --in) with one record per pair_id: a figure the
caption JSON files under several domains is written and counted once. With --eval, records'
existing domain labels (ORed over such copies) are taken as the reference and per-domain
precision/recall is printed instead of relabelling."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "domains",
        help="(re)label the five LLaVA-Med domains from caption text",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--in",
        dest="inp",
        required=True,
        type=Path,
        metavar="FIGURES",
        help="figures.jsonl to label (from `data ingest`)",
    )
    p.add_argument("--out", type=Path, metavar="FIGURES", help="output figures.jsonl")
    p.add_argument(
        "--eval",
        action="store_true",
        help="compare with the records' own domain labels: per-domain precision and recall",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavamed.data.domains import evaluate_domains, label_record, merge_duplicate_figures
    from llavamed.data.figures import DOMAINS, iter_figures
    from llavamed.errors import InputError, LlavamedError
    from llavamed.utils.io import require_writable, write_jsonl

    if args.out is None and not args.eval:
        raise UsageError("the following arguments are required: --out (unless --eval is given)")
    if not args.inp.exists():
        raise LlavamedError(f"{args.inp}: file not found")
    if not args.eval:
        require_writable(args.out, "--out")
    # Read everything first: --out may be the same file as --in. A figure LLaVA-Med's caption JSON
    # files under several domains is one record (its reference domains ORed), written and counted
    # once.
    figures, merged = merge_duplicate_figures(iter_figures(args.inp))
    # The labels come from fig_caption (and mentions). A file of records without one (a LLaVA
    # conversation JSON such as `data align`'s output) was "labelled": every figure written as
    # "other" over its own labels, and as JSONL over the JSON list when --out was --in.
    uncaptioned = sum(1 for r in figures if not _caption(r))
    if figures and uncaptioned == len(figures):
        raise InputError(
            args.inp,
            "no record has a fig_caption",
            "expected figures.jsonl from `data ingest` or LLaVA-Med's {domain: [records]} caption "
            "JSON; domains are labelled from captions",
        )
    if args.eval:
        result = evaluate_domains(figures)
        if merged:
            result["duplicate_copies_merged"] = merged
        print(json.dumps(result, indent=2))
        return 0
    records = [label_record(r) for r in figures]
    n = write_jsonl(args.out, records)
    per = {d: sum(1 for r in records if r["domain"][d]) for d in DOMAINS}
    other = sum(1 for r in records if not any(r["domain"].values()))
    dups = f" ({merged} duplicate copies of a pair_id merged)" if merged else ""
    print(f"{n} records labelled -> {args.out}{dups}: {json.dumps({**per, 'other': other})}")
    if uncaptioned:
        print(
            f"llavamed data domains: {uncaptioned} record(s) without a fig_caption, labelled from "
            "their mentions only",
            file=sys.stderr,
        )
    return 0


def _caption(record: dict) -> bool:
    caption = record.get("fig_caption")
    return isinstance(caption, str) and bool(caption.strip())
