"""``llavamed data instruct``: self-instruct visual conversations from figure captions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavamed.commands import non_negative_int, positive_int, seed_int
from llavamed.llm.args import (
    add_client_arguments,
    add_sampling_arguments,
    client_options_from_args,
    named_counts,
)

DESCRIPTION = """\
Generate multi-turn biomedical visual conversations from figure captions with any OpenAI-compatible
LLM (the LLaVA-Med self-instruct recipe). The LLM reads each caption - and with --inline-mentions
the sentences citing the figure - and writes a User/Assistant conversation as if it could see the
image. Responses are parsed robustly, cleaned as in the paper, and written as LLaVA conversation
JSON. Paper variants: 10K (--max-samples 10000), 60K (--max-samples 60000) and 60K-IM
(--max-samples 60000 --inline-mentions).

Safe to interrupt: finished figures go to OUT.partial.jsonl at once, responses to a SQLite cache;
re-running the same command resumes and costs nothing for work already done. A report with kept
and dropped counts per reason, retries, tokens and cost is written to <OUT stem>_report.json.
Exit code 3 means some requests failed after all retries: re-run to fill them in. OUT then
holds the figures finished so far; when none finished, OUT is not written. A request the server
rejects (a 4xx other than 401/402/403/404, which stop the run) is asked again by the next run;
when the server rejected every request of a run, the command fails with exit code 1, as it
does when --figures holds no record it can ask about."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "instruct",
        help="self-instruct conversations from captions with an OpenAI-compatible LLM",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--figures",
        required=True,
        type=Path,
        help="figures.jsonl, or LLaVA-Med's {domain: [records]} caption JSON",
    )
    p.add_argument("--out", required=True, type=Path, help="output conversation JSON (a list)")
    p.add_argument(
        "--inline-mentions",
        action="store_true",
        help='add "Figure Context:" bullets from in_text_mention (the paper\'s best, 60K-IM)',
    )
    p.add_argument(
        "--max-samples",
        type=positive_int,
        metavar="N",
        help="ask about at most N figures (round-robin)",
    )
    add_sampling_arguments(
        p,
        temperature=0.7,
        temperature_help="sampling temperature, >= 0 (default 0.7)",
        max_tokens_help="completion limit per request (default 1024); a reply cut by it loses "
        "its cut turn",
    )
    p.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="API seed, part of the cache key, and the <image> placement coin (default 0)",
    )
    p.add_argument(
        "--min-turns",
        type=positive_int,
        default=2,
        metavar="N",
        help="keep conversations with >= N Q/A pairs after cleaning (default 2)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="DIR",
        help="folder overriding system_prompt.txt and/or few_shot.json "
        "(defaults ship in llavamed/resources/instruct)",
    )
    p.add_argument(
        "--few-shot",
        type=non_negative_int,
        metavar="N",
        help="use only the first N few-shot examples (default all 8; the first 5 cover the five "
        "domains). A short prompt makes small local models several times faster",
    )
    p.add_argument("--report", type=Path, help="report path (default <OUT stem>_report.json)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the request count and a heuristic token/cost estimate; call nothing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavamed.data.instruct.runner import InstructOptions, default_cache_path, run_instruct

    opts = InstructOptions(
        figures=args.figures,
        out=args.out,
        client=client_options_from_args(args, default_cache_path(args.out)),
        inline_mentions=args.inline_mentions,
        max_samples=args.max_samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        min_turns=args.min_turns,
        prompts_dir=args.prompts,
        few_shot=args.few_shot,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        report_path=args.report,
    )
    report, rc = run_instruct(opts)
    skipped = _skipped_line(args.figures, report)
    if skipped:
        print(skipped, file=sys.stderr)
    if args.dry_run:
        print(json.dumps(report, indent=2))
        return 0
    t = report["totals"]
    share = "n/a" if t["kept_share"] is None else f"{100 * t['kept_share']:.1f}%"
    print(
        f"kept {t['kept']} / {t['kept'] + t['dropped']} conversations ({share}); "
        f"dropped {named_counts(t['dropped_by_reason'], t['dropped_examples']) or 'none'}; "
        f"this run: {report['this_run']['http_requests']} "
        f"requests, {report['this_run']['cache_hits']} cache hits, "
        f"{report['this_run']['retries']} retries, ${report['this_run']['cost_usd']:.4f}"
    )
    if report["out"] is None:
        print(f"wrote {opts.resolved_report_path}; nothing finished, so no {args.out}")
    else:
        print(f"wrote {args.out} and {opts.resolved_report_path}")
    if rc:
        print(
            f"llavamed: {report['pending_after_failures']} figures failed after retries "
            f"({report['failed_this_run']}); re-run the same command to retry them",
            file=sys.stderr,
        )
    return rc


def _skipped_line(figures: Path, report: dict) -> str:
    """What of --figures was never asked about, and why, naming the first records."""
    parts = []
    if report.get("input_errors"):
        parts.append(named_counts(report["input_errors"], report.get("input_error_examples") or {}))
    if report.get("duplicate_pair_ids"):
        parts.append(f"{report['duplicate_pair_ids']} duplicate pair_id")
    if not parts:
        return ""
    return f"llavamed: skipped records of {figures}: {'; '.join(parts)}"
