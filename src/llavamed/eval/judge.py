"""The paper's LLM-judge visual-chat score (DESIGN.md §4), through the shared LLM client.

For each question of a ``llava_med_eval_qa50_qa.jsonl``-shaped file, a text-only judge sees the
caption and inline mentions, the question, Assistant 1 = the reference ``gpt4_answer`` and
Assistant 2 = our model's answer, and returns two 1-10 scores on its first line. The relative score
is the mean over questions of 100 x s2 / s1 (the paper), reported overall, by type and by domain,
next to the ratio of means 100 x mean(s2) / mean(s1). With ``swap`` every question is also judged
with the answers in the other order, which measures the judge's position bias.

Judgements are appended to a JSONL log as they arrive, so an interrupted run resumes; responses are
cached, so re-running costs nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from llavamed.data.figures import DOMAINS, primary_domain
from llavamed.errors import InputError, LlavamedError
from llavamed.llm.args import refuse_overwriting_inputs
from llavamed.llm.client import (
    MODEL_REFUSAL,
    ClientOptions,
    LLMClient,
    LLMError,
    check_sampling,
    for_each_concurrently,
)
from llavamed.utils.io import (
    JsonlAppender,
    atomic_write_json,
    exclusive_lock,
    iter_jsonl_numbered,
)

NORMAL, SWAPPED = "normal", "swapped"
EXAMPLES_PER_REASON = 3
TYPES = ("conversation", "detailed_description")


# -- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgePrompts:
    system: str
    instruction: str


def load_judge_prompts(directory: str | os.PathLike | None = None) -> JudgePrompts:
    default = Path(str(resources.files("llavamed") / "resources" / "judge"))
    user = Path(directory) if directory else None
    if user is not None and not user.is_dir():
        raise InputError(user, "prompt directory not found")

    def read(name: str) -> str:
        path = user / name if user is not None and (user / name).exists() else default / name
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise InputError(path, "empty prompt file")
        return text

    return JudgePrompts(read("system_prompt.txt"), read("instruction.txt"))


def _mentions(value: object) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for m in items:
        s = m.get("tokens") if isinstance(m, dict) else m
        if isinstance(s, str) and s.strip():
            out.append(" ".join(s.split()))
    return out


def question_text(question: dict) -> str:
    """The question as the user typed it: the ``<image>`` placeholder means nothing to a judge."""
    return re.sub(r"\s*<image>\s*", "\n", str(question.get("text", ""))).strip()


def build_judge_messages(question: dict, ans1: str, ans2: str, prompts: JudgePrompts) -> list[dict]:
    label = str(question.get("fig_label") or "").strip()
    caption = " ".join(str(question.get("fig_caption") or "").split())
    ctx = f"[Context]\nFigure Caption:\n{label + ': ' if label else ''}{caption}\n\n"
    mentions = _mentions(question.get("in_text_mention"))
    if mentions:
        ctx += "Figure Context:\n\t- " + "\n\t- ".join(mentions) + "\n\n"
    body = (
        f"{ctx}[Question]\n{question_text(question)}\n\n"
        f"[Assistant 1]\n{ans1.strip()}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{ans2.strip()}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{prompts.instruction}\n\n"
    )
    return [{"role": "system", "content": prompts.system}, {"role": "user", "content": body}]


# -- parsing and scoring (pure) ------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
_HEADING = re.compile(
    r"(?:#+\s*)?\**\s*(?:final\s+)?(?:scores?|ratings?|evaluation|judge?ment|output|result)s?"
    r"\s*\**\s*:?\s*\**",
    re.I,
)
_LABELLED = [re.compile(rf"assistant\s*{i}\s*\**\s*[:=\-]?\s*\**\s*(?:score\s*[:=]?\s*)?{_NUM}", re.I) for i in (1, 2)]  # fmt: skip


def parse_scores(text: str) -> tuple[float, float] | None:
    """The two scores from a judgement, or None. The protocol puts them on the first line, and
    the explanation after it often labels other numbers ("Assistant 1: 3 key points"), so the
    first line decides: "8 7", "8, 7", "8/10 7/10", "**8 7**", "Scores: 8 and 7", "8 7 (out of
    10)", or "Assistant 1: 8, Assistant 2: 7". Only when it holds no pair are "Assistant 1: 8 ...
    Assistant 2: 7" labels looked for across lines. A first line naming Assistant 2 before
    Assistant 1 gives its numbers in that order. A bare label line ("Scores:", "## Evaluation")
    before the first line is skipped. Scores must lie in 1..10."""
    if not text:
        return None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(lines) > 1 and _HEADING.fullmatch(first.strip()):
        # "Scores:" or "## Evaluation" on a line of its own, the pair under it: small local
        # judges write this. Only such bare labels are skipped, never a sentence.
        first = lines[1]
    pair = _labelled_pair(first)
    if pair is None:
        line = re.sub(rf"{_NUM}\s*/\s*10\b|\(?\bout of 10\b\)?", r"\1", first, flags=re.I)
        line = re.sub(r"^\W*\d+[.)]\s", " ", line)  # a list marker ("1. 8") is not a score
        line = re.sub(r"assistant\s*\d", " ", line, flags=re.I)  # nor is a label's number
        # A minus that is not between two numbers ("8-9") is a sign: "-3 7" is out of range,
        # not the pair (3, 7).
        nums = re.findall(r"((?<![\d.])-?\d+(?:\.\d+)?)", line)
        pair = (float(nums[0]), float(nums[1])) if len(nums) == 2 else _labelled_pair(text)
        if len(nums) == 2 and re.findall(r"assistant\s*([12])\b", first, re.I) == ["2", "1"]:
            # Both named, Assistant 2 first: "Assistant 2 scores 7 and Assistant 1 scores 8",
            # "7 for Assistant 2, 8 for Assistant 1": the numbers come in the labels' order.
            pair = (pair[1], pair[0])
    if pair is None or not all(1.0 <= s <= 10.0 for s in pair):
        return None
    return pair


def _labelled_pair(text: str) -> tuple[float, float] | None:
    found = [p.search(text) for p in _LABELLED]
    return (float(found[0].group(1)), float(found[1].group(1))) if all(found) else None


def relative_score(pairs: Iterable[tuple[float, float] | None]) -> dict:
    """Relative score of s2 against s1 over valid pairs (None = invalid judgement)."""
    pairs = list(pairs)
    valid = [p for p in pairs if p is not None]
    out: dict = {"n": len(pairs), "valid": len(valid), "invalid": len(pairs) - len(valid)}
    if not valid:
        out.update(mean_of_ratios=None, ratio_of_means=None, mean_s1=None, mean_s2=None)
        return out
    m1 = sum(s1 for s1, _ in valid) / len(valid)
    m2 = sum(s2 for _, s2 in valid) / len(valid)
    out["mean_of_ratios"] = round(100.0 * sum(s2 / s1 for s1, s2 in valid) / len(valid), 4)
    out["ratio_of_means"] = round(100.0 * m2 / m1, 4)
    out["mean_s1"] = round(m1, 4)
    out["mean_s2"] = round(m2, 4)
    return out


def as_reference_model(order: str, scores: tuple[float, float] | None):
    """(reference score, model score) whatever the order the judge saw them in."""
    if scores is None:
        return None
    return scores if order == NORMAL else (scores[1], scores[0])


def breakdown(rows: list[dict]) -> dict:
    """rows: {"type", "domain", "pair": (ref, model) | None}. Overall, by type, by domain."""
    out = {"overall": relative_score(r["pair"] for r in rows), "by_type": {}, "by_domain": {}}
    for t in sorted({r["type"] for r in rows}, key=lambda t: (t not in TYPES, t)):
        out["by_type"][t] = relative_score(r["pair"] for r in rows if r["type"] == t)
    order = [*DOMAINS, "other"]
    for d in sorted({r["domain"] for r in rows}, key=order.index):
        out["by_domain"][d] = relative_score(r["pair"] for r in rows if r["domain"] == d)
    return out


def position_bias(normal: dict[str, tuple], swapped: dict[str, tuple]) -> dict:
    """Judge's preference for the first position, from questions valid in both orders.

    Both dicts map question_id -> (reference score, model score). For one question the first slot
    gains ((ref_n - ref_s) + (model_s - model_n)) / 2 points: the same answer scored in slot 1
    minus in slot 2, averaged over both answers. Also: how often the winner flips with the order."""
    both = [q for q in normal if q in swapped and normal[q] and swapped[q]]
    if not both:
        return {"questions": 0, "first_position_advantage": None, "preference_flip_rate": None}
    adv = []
    flips = 0
    for q in both:
        (rn, mn), (rs, ms) = normal[q], swapped[q]
        adv.append(((rn - rs) + (ms - mn)) / 2)

        def sign(x: float) -> int:
            return (x > 0) - (x < 0)

        flips += sign(mn - rn) != sign(ms - rs)
    return {
        "questions": len(both),
        "first_position_advantage": round(sum(adv) / len(adv), 4),
        "preference_flip_rate": round(flips / len(both), 4),
    }


# -- the job -----------------------------------------------------------------------------------


@dataclass
class JudgeOptions:
    questions: Path
    answers: Path
    out: Path
    """JSONL log of judgements (one per question and order); also the resume state."""
    client: ClientOptions
    swap: bool = False
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int = 0
    prompts_dir: Path | None = None
    progress: bool = True
    report_path: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_sampling(self.max_tokens, self.temperature)

    @property
    def resolved_report_path(self) -> Path:
        return self.report_path or self.out.with_name(self.out.stem + "_report.json")


def load_pairs(
    opts: JudgeOptions, examples: dict[str, list[str]] | None = None
) -> tuple[list[tuple[dict, str]], Counter]:
    """(question, model answer) pairs matched by question_id, and counts of what didn't match.
    ``examples``, if given, gets the first few records skipped per reason ("FILE:LINE" or
    "question_id X")."""
    issues: Counter = Counter()
    examples = {} if examples is None else examples

    def skip(reason: str, where: str) -> None:
        issues[reason] += 1
        named = examples.setdefault(reason, [])
        if len(named) < EXAMPLES_PER_REASON:
            named.append(where)

    def bad(reason: str):
        return lambda e: skip(reason, e.source)

    answers: dict[str, str] = {}
    # A bad record is counted (under the report's issues) and skipped: the rest still get judged.
    for line, a in iter_jsonl_numbered(opts.answers, on_bad=bad("bad_answer_record")):
        if "question_id" not in a or not isinstance(a.get("text"), str):
            skip("bad_answer_record", f"{opts.answers}:{line}")
            continue
        qid = str(a["question_id"])
        if qid in answers:
            skip("duplicate_answers", f"{opts.answers}:{line}")
        answers.setdefault(qid, a["text"])
    pairs, seen = [], set()
    for line, q in iter_jsonl_numbered(opts.questions, on_bad=bad("bad_question_record")):
        if "question_id" not in q or not isinstance(q.get("gpt4_answer"), str):
            skip("bad_question_record", f"{opts.questions}:{line}")
            continue
        qid = str(q["question_id"])
        if qid in seen:
            skip("duplicate_questions", f"{opts.questions}:{line}")
            continue
        seen.add(qid)
        if qid not in answers:
            skip("missing_answer", f"question_id {qid}")
            continue
        pairs.append((q, answers[qid]))
    unmatched = [qid for qid in answers if qid not in seen]
    issues["unmatched_answers"] = len(unmatched)
    if unmatched:
        examples["unmatched_answers"] = [
            f"question_id {q}" for q in unmatched[:EXAMPLES_PER_REASON]
        ]
    return pairs, +issues


def _fingerprint(opts: JudgeOptions, prompts: JudgePrompts) -> str:
    blob = json.dumps(
        [opts.client.model, prompts.system, prompts.instruction, opts.temperature, opts.seed],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pair_key(q: dict, answer: str, prompts: JudgePrompts) -> str:
    """What one judgement judged: the judge's messages (question, context, both answers). A
    judgement is reused only for the same pair; one for an answer since regenerated is not."""
    msgs = build_judge_messages(q, q["gpt4_answer"], answer, prompts)
    return hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()[:16]


async def _judge_all(
    opts, prompts, jobs, appender, fp, bar, rejections: list[str], failed: set, rejected: set
) -> dict:
    """Judge every job, appending each judgement to the log; returns the client's stats, adds
    each request the server rejected (``kind: detail``) to ``rejections`` and its (question_id,
    order) to ``rejected``, and each (question_id, order) that failed transiently to
    ``failed``."""
    async with LLMClient(opts.client, seed=opts.seed) as client:

        async def one(q: dict, answer: str, order: str) -> None:
            ref = q["gpt4_answer"]
            a1, a2 = (ref, answer) if order == NORMAL else (answer, ref)
            msgs = build_judge_messages(q, a1, a2, prompts)
            raws = []
            scores = None
            was_rejected = False
            try:
                for variant in (0, 1):  # one re-ask, with its own cache key, on a bad judgement
                    r = await client.chat(
                        msgs,
                        temperature=opts.temperature,
                        max_tokens=opts.max_tokens,
                        seed=opts.seed,
                        variant=variant,
                    )
                    raws.append(r.text)
                    scores = parse_scores(r.text)
                    if scores is not None:
                        break
            except LLMError as exc:
                if exc.fatal:
                    raise
                if not exc.rejected:
                    # Transient (429s, 5xx, timeouts): not logged, a re-run asks again.
                    failed.add((str(q["question_id"]), order))
                    return
                # Refused (a content filter) or rejected (a 4xx): an invalid judgement, recorded
                # so the report counts it. A refusal is the judge's answer and is final; a
                # rejection may be the server's fault or the command's, costs nothing, and is
                # asked again by the next run.
                was_rejected = exc.kind != MODEL_REFUSAL
                raws.append(f"<{'request rejected' if was_rejected else 'refused'}: {exc.kind}>")
                if was_rejected:
                    rejections.append(f"{exc.kind}: {exc.detail}")
                    rejected.add((str(q["question_id"]), order))
            appender.append(
                {
                    "question_id": q["question_id"],
                    "order": order,
                    "fp": fp,
                    "pair": _pair_key(q, answer, prompts),
                    "type": q.get("type") or "unknown",
                    "domain": primary_domain(q.get("domain")),
                    "scores": list(scores) if scores else None,
                    "attempts": len(raws),
                    "max_tokens": opts.max_tokens,
                    "judgement": raws[-1] if raws else "",
                }
                | ({"rejected": True} if was_rejected else {})
            )

        await for_each_concurrently(
            jobs,
            lambda job: one(*job),
            opts.client.concurrency,
            after=None if bar is None else lambda: bar.update(1),
        )
        return client.stats.as_dict()


def _ask_again(entry: dict, opts: JudgeOptions) -> bool:
    """A logged judgement the next run asks again: a rejected request, or an invalid judgement
    made under another --max-tokens (a judge that ran out of tokens, a reasoning model with
    nothing left for its answer, gets another chance once the limit is raised)."""
    if entry.get("rejected"):
        return True
    made_with = entry.get("max_tokens", opts.max_tokens)
    return entry.get("scores") is None and made_with != opts.max_tokens


def run_judge(opts: JudgeOptions) -> tuple[dict, int]:
    """Judge every (question, answer) pair (twice with ``swap``); returns (report, exit code:
    0 complete, 3 when some requests failed transiently and a re-run is needed)."""
    refuse_overwriting_inputs(
        {"--questions": opts.questions, "--answers": opts.answers},
        {
            "--out": opts.out,
            "--report": opts.resolved_report_path,
            "--cache": opts.client.cache_path,
        },
    )
    prompts = load_judge_prompts(opts.prompts_dir)
    issue_examples: dict[str, list[str]] = {}
    pairs, issues = load_pairs(opts, issue_examples)
    if not pairs:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(issues.items()))
        if issues.get("bad_question_record") and not issues.get("missing_answer"):
            # Every usable question was rejected: the questions file is at fault, not the answers.
            raise InputError(
                opts.questions,
                "no usable question records (each needs question_id and gpt4_answer)",
                counts,
            )
        raise InputError(opts.answers, "no answers match the questions by question_id", counts)
    fp = _fingerprint(opts, prompts)
    orders = (NORMAL, SWAPPED) if opts.swap else (NORMAL,)
    current = {str(q["question_id"]): _pair_key(q, a, prompts) for q, a in pairs}

    def judged(entries) -> dict[tuple[str, str], dict]:
        """Judgements of the current pairs (one for an answer regenerated since is stale; the
        newest of several counts). Records from before pair keys existed count as current."""
        out: dict[tuple[str, str], dict] = {}
        for e in entries:
            qid = str(e["question_id"])
            if e.get("pair", current.get(qid)) == current.get(qid):
                out[(qid, e["order"])] = e
        return out

    # One run per log: two at once would both ask (and pay for) every pending judgement.
    lock = opts.out.with_name(opts.out.name + ".lock")
    with (
        exclusive_lock(lock, "another `eval judge` run"),
        JsonlAppender(opts.out, fsync=True) as appender,
    ):
        existing = list(appender.existing())
        for e in existing:
            if e.get("fp") != fp:
                raise LlavamedError(
                    f"{opts.out}: written by a judge run with other settings (model, prompts, "
                    "temperature or seed); use another --out or delete it"
                )
        done = {k: e for k, e in judged(existing).items() if not _ask_again(e, opts)}
        jobs = [
            (q, a, o) for q, a in pairs for o in orders if (str(q["question_id"]), o) not in done
        ]
        bar = None
        rejections: list[str] = []
        failed: set[tuple[str, str]] = set()
        rejected_keys: set[tuple[str, str]] = set()
        rejected_before = {k for k, e in judged(existing).items() if e.get("rejected")}
        if opts.progress and jobs:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="judge", unit="q", file=sys.stderr)
        try:
            stats = asyncio.run(
                _judge_all(
                    opts, prompts, jobs, appender, fp, bar, rejections, failed, rejected_keys
                )
            )
        except LLMError as exc:
            raise LlavamedError(
                f"{opts.client.base_url}: {exc} - stopping; re-run to resume"
            ) from exc
        finally:
            if bar is not None:
                bar.close()
        # A judgement asked again (an earlier run's rejection) that failed transiently this time
        # is pending (exit 3), not the old invalid one.
        done = {k: e for k, e in judged(appender.existing()).items() if k not in failed}

    per_order: dict[str, dict[str, tuple | None]] = {o: {} for o in orders}
    rows: dict[str, list[dict]] = {o: [] for o in orders}
    meta = {}
    for q, _ in pairs:
        qid = str(q["question_id"])
        meta[qid] = (q.get("type") or "unknown", primary_domain(q.get("domain")))
        for o in orders:
            e = done.get((qid, o))
            if e is None:
                continue
            pair = as_reference_model(o, tuple(e["scores"]) if e.get("scores") else None)
            per_order[o][qid] = pair
            rows[o].append({"type": meta[qid][0], "domain": meta[qid][1], "pair": pair})
    pending = sum(len(pairs) - len(per_order[o]) for o in orders)
    report: dict = {
        "questions": str(opts.questions),
        "answers": str(opts.answers),
        "judge_model": opts.client.model,
        "matched_pairs": len(pairs),
        "input_issues": dict(issues),
        "input_issue_examples": issue_examples,
        "complete": pending == 0,
        "pending_after_failures": pending,
        "relative_score": breakdown(rows[NORMAL]),
        "this_run": stats,
        "note": "relative score = 100 x model score / reference (gpt4_answer) score; "
        "mean_of_ratios is the paper's number, ratio_of_means is steadier",
    }
    if opts.swap:
        report["relative_score_swapped"] = breakdown(rows[SWAPPED])
        avg_rows = []
        for qid, (t, d) in meta.items():
            n, s = per_order[NORMAL].get(qid), per_order[SWAPPED].get(qid)
            pair = ((n[0] + s[0]) / 2, (n[1] + s[1]) / 2) if n and s else None
            if qid in per_order[NORMAL] and qid in per_order[SWAPPED]:
                avg_rows.append({"type": t, "domain": d, "pair": pair})
        report["relative_score_order_averaged"] = breakdown(avg_rows)
        report["position_bias"] = position_bias(per_order[NORMAL], per_order[SWAPPED])
    report["rejected_this_run"] = dict(Counter(r.split(":", 1)[0] for r in rejections))
    atomic_write_json(opts.resolved_report_path, report)
    # Only judgements an earlier run also had rejected, beside finished ones: that run's outcome
    # again (a few prompts past a small judge's context window), and a re-run of a finished job
    # must not turn its exit 0 into 1. New judgements all rejected still fail.
    finished_any = any(not e.get("rejected") for e in done.values())
    same_as_before = finished_any and rejected_keys <= rejected_before
    if jobs and len(rejections) == len(jobs) and not same_as_before:
        # Not one question's fault but the server's or the command's (a 400 for a parameter or
        # a context too short): exit 0 with every judgement invalid would pass for a result.
        raise LlavamedError(
            f"{opts.client.base_url}: the server rejected all {len(jobs)} judge requests of this "
            f"run (first: {rejections[0]}); no score was made. Fix the server or the options and "
            f"re-run: rejected judgements are asked again ({opts.resolved_report_path})"
        )
    return report, (0 if pending == 0 else 3)


def format_table(report: dict) -> str:
    """A plain-text table of the relative score (normal order) for the terminal."""
    rs = report["relative_score"]
    lines = [f"{'group':<24}{'n':>5}{'invalid':>9}{'rel(mean ratio)':>17}{'rel(ratio means)':>18}"]

    def row(name: str, r: dict) -> None:
        mr = "-" if r["mean_of_ratios"] is None else f"{r['mean_of_ratios']:.1f}"
        rm = "-" if r["ratio_of_means"] is None else f"{r['ratio_of_means']:.1f}"
        lines.append(f"{name:<24}{r['n']:>5}{r['invalid']:>9}{mr:>17}{rm:>18}")

    row("overall", rs["overall"])
    for k, v in rs["by_type"].items():
        row(f"type: {k}", v)
    for k, v in rs["by_domain"].items():
        row(f"domain: {k}", v)
    if "position_bias" in report:
        pb = report["position_bias"]
        if not pb["questions"]:  # no question has valid judgements in both orders
            lines.append("position bias: no question was judged validly in both orders")
        else:
            lines.append(
                f"position bias: first slot {pb['first_position_advantage']:+} points, "
                f"preference flips {pb['preference_flip_rate']} over {pb['questions']} questions"
            )
    return "\n".join(lines)
