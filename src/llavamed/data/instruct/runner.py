"""``llavamed data instruct``: the resumable self-instruct job.

Crash safety: every finished figure (kept or dropped, with its reason) is appended and flushed to
``<out>.partial.jsonl`` the moment its response is cleaned (fsynced in batches every second). A restart skips pair_ids already in
the log (unless the record's caption, mentions, domain or image changed since: see
:func:`record_source`), so SIGKILL at any instant loses at most the requests in flight (and those are usually in
the response cache). Only at the end is ``<out>`` written, atomically, as a JSON list in selection
order. Transient request failures are *not* logged, so the next run retries them. A request the
server rejects outright (HTTP 4xx) is logged as dropped (``request_rejected``) and the run moves
on, but the next run asks it again: the fault may be the server's or the command's, and a
rejected request costs nothing. A model's refusal (``model_refusal``) is an answer and is final.
A run in which the server rejected every request fails instead of writing an empty output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from llavamed.data.figures import iter_figures, primary_domain, rebase_image
from llavamed.data.instruct.clean import (
    clean_turns,
    drop_cut_answer,
    parse_turns,
    sample_image,
    to_llava_sample,
)
from llavamed.data.instruct.prompts import (
    InstructPrompts,
    build_messages,
    conversation_to_text,
    load_prompts,
)
from llavamed.data.instruct.select import round_robin
from llavamed.errors import InputError, LlavamedError
from llavamed.llm.args import named_counts, refuse_overwriting_inputs
from llavamed.llm.client import (
    MODEL_REFUSAL,
    ClientOptions,
    LLMClient,
    LLMError,
    check_sampling,
    estimate_tokens,
    for_each_concurrently,
)
from llavamed.utils.io import JsonlAppender, atomic_write_json, exclusive_lock, iter_jsonl

EXIT_INCOMPLETE = 3
# finish_reason values that cut a reply short, and the reason a pair or figure lost to it counts as
CUT_REASONS = {"length": "cut_by_max_tokens", "content_filter": "cut_by_content_filter"}
REQUEST_REJECTED = "request_rejected"


def _asked_again(entry: dict) -> bool:
    """A logged figure that a later run asks again rather than counting as done."""
    return entry.get("reason") == REQUEST_REJECTED


def record_source(rec: dict, prompts: InstructPrompts, inline_mentions: bool) -> str:
    """A hash of what a figure's log entry was made from: the prompt it sends (caption and
    mentions) and what its sample copies from the record (domain, image). A figure whose
    caption or labels changed in place since it was logged (``data domains --out`` over its
    input, a re-ingest into the same folder) is asked again rather than resumed with the old
    text."""
    blob = json.dumps(
        [build_messages(rec, prompts, inline_mentions), rec.get("domain"), rec.get("image")],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class InstructOptions:
    figures: Path
    """figures.jsonl or LLaVA-Med's {domain: [records]} caption JSON."""
    out: Path
    """Output LLaVA conversation JSON (a list)."""
    client: ClientOptions
    inline_mentions: bool = False
    """Add "Figure Context:" bullets from in_text_mention (the paper's 60K-IM variant)."""
    max_samples: int | None = None
    """Cap on figures asked about, chosen round-robin across domains (10K / 60K variants)."""
    temperature: float = 0.7
    max_tokens: int = 1024
    seed: int = 0
    """Sent to the API (where supported), part of the cache key, and seeds <image> placement."""
    min_turns: int = 2
    """Keep conversations with at least this many question/answer pairs after cleaning."""
    prompts_dir: Path | None = None
    """Folder overriding system_prompt.txt and/or few_shot.json."""
    few_shot: int | None = None
    """Use only the first N few-shot examples (the defaults' first five cover the five domains):
    small local models are much faster with a short prompt. None = all."""
    dry_run: bool = False
    progress: bool = True
    report_path: Path | None = None
    """Default: ``<out stem>_report.json`` beside the output."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_sampling(self.max_tokens, self.temperature)

    @property
    def partial_path(self) -> Path:
        return self.out.with_name(self.out.name + ".partial.jsonl")

    @property
    def resolved_report_path(self) -> Path:
        return self.report_path or self.out.with_name(self.out.stem + "_report.json")


def run_fingerprint(opts: InstructOptions, prompts: InstructPrompts) -> str:
    """Everything that changes what a figure's conversation would be. A log written under another
    fingerprint is refused rather than silently mixed into this output."""
    blob = json.dumps(
        {
            "model": opts.client.model,
            "inline": opts.inline_mentions,
            "temperature": opts.temperature,
            "max_tokens": opts.max_tokens,
            "seed": opts.seed,
            "min_turns": opts.min_turns,
            "system": prompts.system,
            "few_shot": prompts.few_shot,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


EXAMPLES_PER_REASON = 3


def load_selection(opts: InstructOptions) -> tuple[list[dict], Counter, int, dict[str, list[str]]]:
    """Valid records in round-robin order, input errors per reason, duplicate count, and the
    first few skipped records per reason (pair_id, or ``record N`` counting from 0)."""
    errors: Counter = Counter()
    examples: dict[str, list[str]] = {}
    valid = []
    for i, rec in enumerate(iter_figures(opts.figures)):
        pid, caption = rec.get("pair_id"), rec.get("fig_caption")
        # As data align reads them: a pair_id or caption that is a list or an object is
        # malformed. Its Python repr ("['Panel A ...']") was sent as the caption, or became the
        # sample's id.
        good_pid = isinstance(pid, str | int) and not isinstance(pid, bool) and pid != ""
        try:
            if pid is None or pid == "":
                raise InputError(f"{opts.figures} record {i}", "missing_pair_id")
            if not good_pid:
                raise InputError(f"{opts.figures} record {i}", "malformed_pair_id")
            if caption is not None and not isinstance(caption, str):
                raise InputError(f"{opts.figures} {pid}", "malformed_caption")
            if not (caption or "").strip():
                raise InputError(f"{opts.figures} {pid}", "missing_caption")
            sample_image(rec)  # no image, no training sample: skip before paying for a call
        except InputError as exc:
            errors[exc.reason] += 1
            named = examples.setdefault(exc.reason, [])
            if len(named) < EXAMPLES_PER_REASON:
                named.append(str(pid) if good_pid else f"record {i}")
            continue
        valid.append(rec)
    selected, dups = round_robin(valid, opts.max_samples)
    return selected, errors, dups, examples


def _dry_run(opts, prompts, pending, done_n, selected) -> dict:
    prompt_tokens = 0
    cached = 0
    # A completion is budgeted at the few-shot conversations' mean length: what the model imitates.
    shots = [estimate_tokens(conversation_to_text(e["conversations"])) for e in prompts.few_shot]
    per_completion = min(opts.max_tokens, int(sum(shots) / len(shots)) if shots else 300)
    cache_file = opts.client.cache_path
    client = LLMClient(opts.client) if cache_file and Path(cache_file).exists() else None
    try:
        for rec in pending:
            msgs = build_messages(rec, prompts, opts.inline_mentions)
            if client is not None:
                params = client.sampling_params(opts.temperature, opts.max_tokens, None, opts.seed)
                if client.is_cached(msgs, params):
                    cached += 1
                    continue
            prompt_tokens += estimate_tokens(msgs)
    finally:
        if client is not None:
            asyncio.run(client.aclose())
    to_call = len(pending) - cached
    completion_tokens = per_completion * to_call
    price = opts.client.prices()
    cost = None
    if price is not None:
        cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
    return {
        "dry_run": True,
        "selected": len(selected),
        "already_done": done_n,
        "cached_responses": cached,
        "requests_needed": to_call,
        "estimated_prompt_tokens": prompt_tokens,
        "estimated_completion_tokens": completion_tokens,
        "estimated_cost_usd": None if cost is None else round(cost, 4),
        "price_per_mtok": price,
        "estimate_method": "heuristic: 4 characters per token; completions sized like the few-shot "
        "conversations; no tokenizer used",
    }


def _fsync_path(path: Path) -> None:
    if not path.exists():  # nothing appended yet (the log opens at its first record)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # syncs the inode, whichever descriptor wrote the data
    finally:
        os.close(fd)


async def _group_fsync(path: Path, every_s: float = 1.0) -> None:
    """Each log line is flushed to the OS as it is written, which is all SIGKILL safety needs.
    Durability against power loss is batched here, off the event loop: an fsync per record
    (~7 ms on a plain disk) inside the loop would cap the whole job at ~150 records/s."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(_fsync_path, path)


@dataclass
class _RunOutcome:
    """What one run's requests came to, beyond what the log records."""

    stats: dict = field(default_factory=dict)
    failed: Counter = field(default_factory=Counter)
    """Transient failures per error kind: not logged, the next run asks again."""
    failed_ids: set = field(default_factory=set)
    """The pair_ids of those failures: pending, whatever an earlier run logged for them."""
    rejected: Counter = field(default_factory=Counter)
    """Requests the server rejected (a non-fatal 4xx) per status: logged, asked again next run."""
    rejected_ids: set = field(default_factory=set)
    first_rejection: str = ""
    length_cut: int = 0


async def _generate(opts, prompts, pending, appender, fp, sources, bar) -> _RunOutcome:
    """Ask for every pending record; append each outcome to the log as it completes."""
    outcome = _RunOutcome()
    failed = outcome.failed
    async with LLMClient(opts.client, seed=opts.seed) as client:

        async def one(rec: dict) -> None:
            pid = str(rec["pair_id"])
            messages = build_messages(rec, prompts, opts.inline_mentions)
            entry: dict = {"pair_id": pid, "fp": fp, "src": sources[pid]}
            try:
                r = await client.chat(
                    messages,
                    temperature=opts.temperature,
                    max_tokens=opts.max_tokens,
                    seed=opts.seed,
                )
            except LLMError as exc:
                if exc.fatal:
                    raise
                if exc.rejected:  # not this run; a 429 after the last retry is only postponed
                    reason = MODEL_REFUSAL if exc.kind == MODEL_REFUSAL else REQUEST_REJECTED
                    if reason == REQUEST_REJECTED:
                        outcome.rejected[exc.kind] += 1
                        outcome.rejected_ids.add(pid)
                        outcome.first_rejection = (
                            outcome.first_rejection or f"{exc.kind}: {exc.detail}"
                        )
                    entry.update(status="dropped", reason=reason, detail=exc.kind)
                    appender.append(entry)
                else:
                    failed[exc.kind] += 1
                    outcome.failed_ids.add(pid)
                return
            parsed = parse_turns(r.text)
            # Azure OpenAI's output filter cuts a reply where it trips and says content_filter:
            # the cut answer ("a large mass in the right lo") was kept as training data.
            cut = CUT_REASONS.get(r.finish_reason or "")
            if r.finish_reason == "length":
                outcome.length_cut += 1
            if cut is not None:
                drop_cut_answer(parsed, r.text, cut)
            cleaned = clean_turns(parsed.turns)
            drops = parsed.dropped + cleaned.dropped
            entry.update(
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                cost_usd=r.cost_usd,
                cached=r.cached,
                turns_parsed=len(parsed.turns),
                turn_drops=dict(drops),
            )
            if not parsed.turns:
                # Nothing usable: a reply cut before its first answer ended (raise --max-tokens),
                # a reply with no text at all (finish_reason names why), or text in no format.
                if cut is not None:
                    reason = cut
                elif not r.text.strip():
                    reason = "empty_reply"
                else:
                    reason = "unparseable"
                entry.update(status="dropped", reason=reason, raw=r.text[:2000])
                if reason == "empty_reply":
                    entry["finish_reason"] = r.finish_reason
            elif len(cleaned.turns) < opts.min_turns:
                entry.update(status="dropped", reason="too_few_turns")
            else:
                image = rec.get("image")
                if isinstance(image, str) and image:
                    # Relative to figures.jsonl's folder in the record, to OUT's in the sample:
                    # the trainer's default image folder is the data file's.
                    image = rebase_image(image, Path(opts.figures).parent, Path(opts.out).parent)
                sample = to_llava_sample(rec, cleaned.turns, opts.seed, image=image)
                entry.update(status="kept", sample=sample)
            appender.append(entry)

        def progress() -> None:
            if bar is not None:
                bar.update(1)
                s = client.stats
                bar.set_postfix(
                    cache=s.cache_hits,
                    retries=s.retries,
                    failed=sum(failed.values()),
                    refresh=False,
                )

        syncer = asyncio.create_task(_group_fsync(appender.path))
        try:
            await for_each_concurrently(pending, one, opts.client.concurrency, after=progress)
        finally:
            syncer.cancel()
            await asyncio.gather(syncer, return_exceptions=True)
            _fsync_path(appender.path)
        outcome.stats = client.stats.as_dict()
        return outcome


def summarise(entries: list[dict], selected: list[dict]) -> dict:
    """Kept/dropped counts, turn-level drop reasons, tokens and cost over the log (all runs)."""
    dropped: Counter = Counter()
    dropped_examples: dict[str, list[str]] = {}
    turn_drops: Counter = Counter()
    by_domain: dict[str, Counter] = {}
    domain_of = {str(r["pair_id"]): primary_domain(r.get("domain")) for r in selected}
    kept = pt = ct = 0
    cost = 0.0
    for e in entries:
        d = by_domain.setdefault(domain_of.get(e["pair_id"], "other"), Counter())
        if e.get("status") == "kept":
            kept += 1
            d["kept"] += 1
        else:
            reason = e.get("reason", "unknown")
            dropped[reason] += 1
            d["dropped"] += 1
            named = dropped_examples.setdefault(reason, [])
            if len(named) < EXAMPLES_PER_REASON:
                named.append(e["pair_id"])
        turn_drops.update(e.get("turn_drops") or {})
        pt += int(e.get("prompt_tokens") or 0)
        ct += int(e.get("completion_tokens") or 0)
        cost += float(e.get("cost_usd") or 0.0)
    done = kept + sum(dropped.values())
    return {
        "kept": kept,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dict(dropped),
        "dropped_examples": dropped_examples,
        "kept_share": round(kept / done, 4) if done else None,
        "turns_dropped_by_reason": dict(turn_drops),
        "by_domain": {k: dict(v) for k, v in by_domain.items()},
        "prompt_tokens": pt,
        "completion_tokens": ct,
        "cost_usd": round(cost, 6),
    }


def run_instruct(opts: InstructOptions) -> tuple[dict, int]:
    """Run (or resume) the job. Returns (report, exit code): 0 complete, 3 when some requests
    failed transiently and a re-run is needed."""
    refuse_overwriting_inputs(
        {"--figures": opts.figures},
        {
            "--out": opts.out,
            "its log": opts.partial_path,
            "--report": opts.resolved_report_path,
            "--cache": opts.client.cache_path,
        },
    )
    prompts = load_prompts(opts.prompts_dir)
    if opts.few_shot is not None:
        prompts = replace(prompts, few_shot=prompts.few_shot[: opts.few_shot])
    selected, input_errors, dups, input_examples = load_selection(opts)
    fp = run_fingerprint(opts, prompts)
    partial = opts.partial_path
    sources = {str(r["pair_id"]): record_source(r, prompts, opts.inline_mentions) for r in selected}

    def current(e: dict) -> bool:
        """Logged from the record as it is now (logs from before ``src`` existed are trusted)."""
        return e.get("src") in (None, sources.get(str(e.get("pair_id"))))

    rejected_before: set[str] = set()  # figures an earlier run logged as rejected

    def done_ids() -> set[str]:
        done = set()
        rejected_before.clear()
        for e in iter_jsonl(partial, skip_bad=True) if partial.exists() else []:
            if e.get("fp") != fp:
                raise LlavamedError(
                    f"{partial}: written by a run with different settings (one of --model, "
                    "--temperature, --max-tokens, --seed, --min-turns, --inline-mentions, "
                    "--few-shot, --prompts); re-run with that run's options to resume, or use "
                    "another --out or delete that log"
                )
            if current(e) and not _asked_again(e):
                done.add(str(e.get("pair_id")))
            elif current(e):
                rejected_before.add(str(e.get("pair_id")))
        return done

    if opts.dry_run:  # reads the log, writes nothing
        done = done_ids()
        pending = [r for r in selected if str(r["pair_id"]) not in done]
        report = _dry_run(opts, prompts, pending, len(selected) - len(pending), selected)
        report["input_errors"] = dict(input_errors)
        report["input_error_examples"] = input_examples
        return report, 0
    if not selected:
        # An empty OUT with exit 0 let a pipeline go on to train on nothing (data align, given
        # the same file, fails): a file with no usable record is an input error.
        why = "it holds no records"
        if input_errors:
            why = f"skipped {named_counts(dict(input_errors), input_examples)}"
        raise LlavamedError(f"{opts.figures}: no figure to ask about ({why})")
    with exclusive_lock(partial.with_name(partial.name + ".lock"), "another `data instruct` run"):
        with JsonlAppender(partial) as appender:  # opening it repairs a torn last line
            done = done_ids()
            pending = [r for r in selected if str(r["pair_id"]) not in done]
            bar = None
            if opts.progress and pending:
                from tqdm import tqdm

                bar = tqdm(
                    total=len(selected),
                    initial=len(selected) - len(pending),
                    desc="instruct",
                    unit="fig",
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            try:
                outcome = asyncio.run(_generate(opts, prompts, pending, appender, fp, sources, bar))
            except LLMError as exc:
                raise LlavamedError(
                    f"{opts.client.base_url}: {exc} - stopping; finished records are kept, "
                    "re-run to resume"
                ) from exc
            finally:
                if bar is not None:
                    bar.close()
        entries: dict[str, dict] = {}
        for e in JsonlAppender(partial).existing():
            pid = str(e["pair_id"])
            if not current(e):  # made from an older caption or labels: asked again above
                continue
            if pid in outcome.failed_ids:
                # An earlier run's rejection, asked again and failed transiently this time: the
                # figure is pending (exit 3), not "dropped" by a request that was since retried.
                continue
            if pid not in entries or _asked_again(entries[pid]):  # a later run's answer wins
                entries[pid] = e
        ordered = [entries[str(r["pair_id"])] for r in selected if str(r["pair_id"]) in entries]
        samples = [e["sample"] for e in ordered if e.get("status") == "kept"]
        pending_n = len(selected) - len(ordered)
        # With nothing finished (every request failed or was rejected) an empty OUT would only
        # let a pipeline go on to train on nothing; the report says why, and a re-run writes OUT.
        finished_any = any(not _asked_again(e) for e in ordered)
        wrote_out = finished_any
        if wrote_out:
            atomic_write_json(opts.out, samples, indent=1)
        report = {
            "figures": str(opts.figures),
            "out": str(opts.out) if wrote_out else None,
            "model": opts.client.model,
            "base_url": opts.client.base_url,
            "inline_mentions": opts.inline_mentions,
            "selected": len(selected),
            "input_errors": dict(input_errors),
            "input_error_examples": input_examples,
            "duplicate_pair_ids": dups,
            "complete": pending_n == 0,
            "pending_after_failures": pending_n,
            "failed_this_run": dict(outcome.failed),
            "rejected_this_run": dict(outcome.rejected),
            "truncated_by_max_tokens_this_run": outcome.length_cut,
            "totals": summarise(ordered, selected),
            "this_run": outcome.stats,
            # The prices the costs were computed with: with only --price-out given, the report
            # named the table's prices for the model (or a null output price with --price-in).
            "price_per_mtok": opts.client.prices(),
            "fingerprint": fp,
            "prompts": prompts.source,
        }
        atomic_write_json(opts.resolved_report_path, report)
    rejected = sum(outcome.rejected.values())
    # Only figures an earlier run also had rejected, in a job with finished figures: the same
    # outcome as that run's (a few prompts past the context window, say), not a server or
    # options that reject everything; a re-run of a finished job must not turn exit 0 into 1.
    same_as_before = finished_any and outcome.rejected_ids <= rejected_before
    if pending and rejected == len(pending) and not same_as_before:
        # Not one figure's fault but the server's or the command's (a proxy's 400, a 422 for a
        # parameter the server does not take): exit 0 would pass for a finished job.
        raise LlavamedError(
            f"{opts.client.base_url}: the server rejected all {rejected} requests of this run "
            f"(first: {outcome.first_rejection}); nothing new was kept. Fix the server or the "
            f"options and re-run: rejected figures are asked again ({opts.resolved_report_path})"
        )
    return report, (0 if pending_n == 0 else EXIT_INCOMPLETE)


def default_cache_path(out: Path) -> str:
    return os.fspath(out.with_name(out.stem + ".llm_cache.sqlite"))
