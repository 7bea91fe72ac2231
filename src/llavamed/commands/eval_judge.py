"""``llavamed eval judge``: the paper's LLM-judge relative score for visual conversation."""

from __future__ import annotations

import argparse
from pathlib import Path

from llavamed.commands import seed_int
from llavamed.llm.args import (
    add_client_arguments,
    add_sampling_arguments,
    client_options_from_args,
    named_counts,
)

DESCRIPTION = """\
Score a model's answers to LLaVA-Med's visual conversation questions with an LLM judge, as the
paper did. For each question (llava_med_eval_qa50_qa.jsonl shape) the judge reads the caption and
inline mentions, the question, Assistant 1 = the reference gpt4_answer and Assistant 2 = the model
answer (answers JSONL from `llavamed eval answer`, matched by question_id), and returns two 1-10
scores. Relative score = 100 x model / reference: the mean of per-question ratios (the paper's
number) and the ratio of means, overall, by type and by domain (first true flag in the order
chest_xray, mri, histology, gross, ct_scan), with counts and invalid judgements. An unparseable
judgement is re-asked once, then counted invalid. --swap also judges with the answers in swapped
order and reports the judge's position bias.

Judgements go to --out (JSONL) as they arrive and responses to a SQLite cache: an interrupted run
resumes, a repeated run costs nothing. Exit code 3: some requests failed; re-run to fill them in."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "judge",
        help="LLM-judge relative score of model answers vs. reference answers",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--questions", required=True, type=Path, help="qa50-shaped questions JSONL")
    p.add_argument("--answers", required=True, type=Path, help="model answers JSONL")
    p.add_argument(
        "--out", type=Path, help="judgements JSONL (default: <answers stem>.judge.jsonl)"
    )
    p.add_argument("--report", type=Path, help="report JSON (default: <out stem>_report.json)")
    p.add_argument("--swap", action="store_true", help="also judge in swapped order")
    add_sampling_arguments(
        p,
        temperature=0.0,
        temperature_help="judge sampling temperature, >= 0 (default 0: the most repeatable scores)",
        max_tokens_help="judge completion limit per request (default 1024)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="API seed, also part of the cache key (default 0)"
    )
    p.add_argument(
        "--prompts", type=Path, metavar="DIR", help="folder overriding the judge prompt files"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from llavamed.errors import format_counts
    from llavamed.eval.judge import JudgeOptions, format_table, run_judge

    out = args.out or args.answers.with_name(args.answers.stem + ".judge.jsonl")
    cache = str(out.with_name(out.stem + ".llm_cache.sqlite"))
    opts = JudgeOptions(
        questions=args.questions,
        answers=args.answers,
        out=out,
        client=client_options_from_args(args, cache),
        swap=args.swap,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        prompts_dir=args.prompts,
        progress=not args.no_progress,
        report_path=args.report,
    )
    report, rc = run_judge(opts)
    print(format_table(report))
    s = report["this_run"]
    issues = named_counts(report["input_issues"], report.get("input_issue_examples") or {})
    if issues:
        print(f"llavamed: skipped input records: {issues}", file=sys.stderr)
    print(
        f"{report['matched_pairs']} questions judged by {report['judge_model']}; input issues "
        f"{issues or 'none'}; this run {s['http_requests']} requests, "
        f"{s['cache_hits']} cache hits, {s['retries']} retries, ${s['cost_usd']:.4f}"
    )
    print(f"wrote {out} and {opts.resolved_report_path}")
    rejected = report.get("rejected_this_run") or {}
    if rejected:
        print(
            f"llavamed: the server rejected {sum(rejected.values())} judge requests "
            f"({format_counts(rejected)}); counted invalid now, asked again by the next run",
            file=sys.stderr,
        )
    if rc:
        reasons = format_counts(s.get("failure_reasons", {}))
        print(
            f"llavamed: {report['pending_after_failures']} judgements failed against "
            f"{args.base_url} ({reasons or 'see the report'}); re-run to retry",
            file=sys.stderr,
        )
    return rc
