"""``report.md``, ``report.json`` and ``loss.png`` from the stages' results."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from llavamed.errors import InputError
from llavamed.quickstart.pipeline import StageResult, _local, _portable
from llavamed.quickstart.presets import EVAL_DATASET, SIZES, QuickstartOptions
from llavamed.utils.io import atomic_write_json, atomic_write_text, read_json

HEADLINE = (
    "strict_closed_acc",
    "llava_med_closed_acc",
    "llava_med_open_recall",
    "open_exact_match",
    "token_f1",
    "closed_unparsed",
)


def _pick(metrics: dict) -> dict:
    """The HEADLINE statistics of one evaluation's ``metrics``: closed ones over the closed
    questions, open ones over the open questions, the rest over all of them."""
    by = metrics.get("by_answer_type", {})
    overall = metrics.get("overall", {})
    out = {}
    for k in HEADLINE:
        src = (
            by.get("closed", {})
            if "closed" in k
            else by.get("open", {})
            if "open" in k
            else overall
        )
        stat = src.get(k) or overall.get(k)
        if stat:
            out[k] = _stat(stat)
    return out


def _headline(result: dict) -> dict:
    """The report's numbers from a ``run_vqa_eval`` result (or its saved report.json)."""
    metrics = result.get("metrics", {})
    out = {k: metrics.get(k) for k in ("n_answered", "n_closed", "n_open")}
    out |= _pick(metrics)
    out["limit"] = result.get("limit")
    # English test questions there were to ask: a limit over it evaluated the whole split.
    out["n_in_split"] = (result.get("load_report") or {}).get("n_loaded")
    for name, abl in (result.get("ablations") or {}).items():
        # Every metric the ablated run measured (open questions too), as in the other columns.
        out[f"ablation_{name}"] = _pick(abl.get("metrics", {}))
        # The paired per-question drop with its own CI (not a difference of two means).
        drop = abl.get("drop", {})
        keys = ("strict_closed_acc", "llava_med_closed_acc", "closed_unparsed")
        out[f"ablation_{name}_drop"] = {k: _stat(drop[k]) for k in keys if k in drop}
    return out


def _stat(stat: dict) -> dict:
    return {k: stat[k] for k in ("mean", "lo", "hi", "n")}


def _eval_metrics(out: Path, name: str) -> dict:
    path = out / "eval" / name / "report.json"
    return _headline(read_json(path)) if path.exists() else {}


def build_report(opts: QuickstartOptions, results: list[StageResult], wall_s: float) -> dict:
    """Write ``report.md``, ``report.json`` and ``loss.png`` into the output folder."""
    out = Path(opts.out)
    stages = {
        r.name: {
            "wall_s": round(r.wall_s, 1),
            "resumed_after_s": r.resumed_after_s,
            "skipped_this_run": r.skipped,
            **r.info,
        }
        for r in results
    }
    zs = _eval_metrics(out, "zero_shot")
    ft = _eval_metrics(out, "finetuned")
    data_stats = {}
    for name, path in (
        ("ingest", out / "corpus" / "ingest_report.json"),
        ("instruct", out / "corpus" / "instruct" / "instruct_report.json"),
    ):
        if path.exists():
            data_stats[name] = _relocated(read_json(path), path, out)
    # With --vision, an earlier run's stage-0 curve in the same folder is not this model's.
    loss_png = _plot_losses(out, stage0=opts.vision is None)
    total_stage_s = sum(r.wall_s for r in results)
    report = {
        "size": opts.size,
        "seed": opts.seed,
        "vision": str(opts.vision) if opts.vision else None,
        "output": str(out),
        "wall_time_s_all_stages": round(total_stage_s, 1),
        "wall_time_s_this_run": round(wall_s, 1),
        "stages": stages,
        "data": data_stats,
        "metrics": {"zero_shot": zs, "finetuned": ft},
        "loss_curves": str(loss_png) if loss_png else None,
        "try_it": _try_it(out),
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _relocated(tool_report: Any, path: Path, out: Path) -> Any:
    """A tool's report at ``path`` with the paths it wrote under the output folder it ran in put
    under ``out``, where that folder is now: self-instruct's report names its own
    ``instruct.json`` ("out"), so a moved folder's report.json named the old folder's files."""
    written = tool_report.get("out") if isinstance(tool_report, dict) else None
    if not isinstance(written, str):
        return tool_report
    rel = path.parent.relative_to(out)  # corpus/instruct
    was = Path(written).parent
    if was.parts[-len(rel.parts) :] != rel.parts:
        return tool_report
    old_out = Path(*was.parts[: -len(rel.parts)])
    if old_out == out:
        return tool_report
    return _local(_portable(tool_report, old_out), out)


def _try_it(out: Path) -> dict:
    """Commands to try the fine-tuned model, on a held-out test image whose questions the final
    evaluation asked, with the reference answers and this run's own answers to them: a user's
    first chat then starts from a question the model is known to handle (it was fine-tuned for
    short answers, not free-text descriptions)."""
    from llavamed.data.vqa import load_vqa
    from llavamed.utils.io import iter_jsonl

    ckpt = out / "finetune" / "checkpoint-final"
    try:
        samples, _ = load_vqa(EVAL_DATASET, out / "world" / "slake", split="test", lang="en")
    except InputError:
        samples = []
    scores = out / "eval" / "finetuned" / "scores.jsonl"
    scored = {
        str(r["qid"]): r
        for r in (iter_jsonl(scores, skip_bad=True) if scores.exists() else [])
        if "qid" in r
    }
    by_image: dict[str, list] = {}
    for s in samples:
        if s.qid in scored and isinstance(s.image, str):
            by_image.setdefault(s.image, []).append(s)
    image, asked = max(by_image.items(), key=lambda kv: len(kv[1]), default=(None, []))
    chat = ["llavamed", "chat", "--model", str(ckpt)] + (["--image", image] if image else [])
    # shlex: paths and questions may hold spaces or quotes, and the lines are meant to be pasted.
    commands = {"chat": shlex.join(chat)}
    if asked:
        commands["one question"] = shlex.join(
            [*chat, "--prompt", asked[0].question, "--temperature", "0"]
        )
    commands["serve"] = shlex.join(["llavamed", "serve", "--model", str(ckpt), "--port", "8000"])
    commands["web"] = shlex.join(["llavamed", "web", "--model", str(ckpt)])
    questions = [
        {"question": s.question, "answer": s.answer, "model_answer": scored[s.qid]["prediction"]}
        for s in asked[:6]
    ]
    return {"commands": commands, "image": image, "questions": questions}


def _plot_losses(out: Path, stage0: bool = True) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llavamed.train.plots import ema
    from llavamed.train.vision_pretrain import LOG_FILE as STAGE0_LOG
    from llavamed.utils.io import atomic_path, iter_jsonl

    curves = []
    for name in ("stage1", "stage2", "finetune"):
        path = out / name / "metrics.jsonl"
        if path.exists():
            rows = [r for r in iter_jsonl(path, skip_bad=True) if "loss" in r]
            if rows:
                curves.append((name, [r["step"] for r in rows], [r["loss"] for r in rows]))
    s0 = out / "stage0" / STAGE0_LOG
    if stage0 and s0.exists():
        rows = [r for r in iter_jsonl(s0, skip_bad=True) if "loss" in r and "step" in r]
        if rows:
            curves.insert(
                0, ("stage0 (contrastive)", [r["step"] for r in rows], [r["loss"] for r in rows])
            )
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    axes = [axes] if len(curves) == 1 else list(axes)
    for ax, (name, steps, losses) in zip(axes, curves, strict=True):
        ax.plot(steps, losses, alpha=0.3, color="C0")
        ax.plot(steps, ema(losses), color="C0")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    dest = out / "loss.png"
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def _fmt(stat: Any) -> str:
    if isinstance(stat, dict) and "mean" in stat:
        return f"{100 * stat['mean']:.1f} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"
    if isinstance(stat, (int, float)):
        return f"{100 * stat:.1f}"
    return "–"


def _eval_scope(metrics: dict) -> str:
    limit, n = metrics.get("limit"), metrics.get("n_in_split")
    if limit and (n is None or limit < n):  # a subset: say so, as the evaluation's report does
        of = f" (of {n})" if n else ""
        return f"the first {limit} English questions{of} of the SLAKE-shaped test split"
    return "the SLAKE-shaped English test split" + (f" ({n} questions)" if n else "")


def _cell(text: str) -> str:
    """``text`` as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(report: dict) -> str:
    m = report["metrics"]
    zs, ft = m.get("zero_shot", {}), m.get("finetuned", {})
    blank = ft.get("ablation_blank", {})
    lines = [
        f"# llavamed quickstart report (size: {report['size']}, seed {report['seed']})",
        "",
        "Everything below was measured by this run on MedSynth (procedurally generated; see "
        f"docs/medsynth.md). Evaluation: {_eval_scope(ft or zs)}, greedy decoding.",
        "",
        *(
            [f"Vision tower given with `--vision {report['vision']}`: stage 0 was skipped.", ""]
            if report.get("vision")
            else []
        ),
        "## VQA metrics (%; 95% bootstrap CI)",
        "",
        "| metric | zero-shot (after stage 2) | fine-tuned | fine-tuned, blank image |",
        "|---|---|---|---|",
    ]
    for k, label in (
        ("strict_closed_acc", "closed accuracy, strict yes/no parse"),
        ("llava_med_closed_acc", "closed accuracy, LLaVA-Med metric"),
        ("llava_med_open_recall", "open recall, LLaVA-Med metric"),
        ("open_exact_match", "open exact match (strict)"),
        ("token_f1", "token F1 (strict)"),
        ("closed_unparsed", "closed answers with no yes/no (counted wrong by the strict parse)"),
    ):
        lines.append(f"| {label} | {_fmt(zs.get(k))} | {_fmt(ft.get(k))} | {_fmt(blank.get(k))} |")
    preset = SIZES.get(report["size"])
    cut = (
        f" (the `{report['size']}` size keeps only the LM's first {preset.lm_layers} layers, "
        "which VQA fine-tuning has to turn into a working answerer)"
        if preset is not None and preset.lm_layers
        else ""
    )
    for name, col in (("zero-shot", zs), ("fine-tuned", ft)):
        unparsed = (col.get("closed_unparsed") or {}).get("mean")
        if unparsed is not None and unparsed >= 0.5:
            lines += [
                "",
                f"The {name} model answered {100 * unparsed:.1f}% of closed questions without a "
                "yes or no, so its closed accuracy says little about what it sees; its answers "
                f"are in `eval/`{cut}.",
            ]
    drop = ft.get("ablation_blank_drop", {}).get("strict_closed_acc")
    if drop:
        lines += [
            "",
            f"Blank-image drop in strict closed accuracy, paired per question: **{_fmt(drop)} "
            "points** (a model that doesn't drop isn't looking at the image).",
        ]
    lines += ["", "## Wall time per stage", "", "| stage | seconds | note |", "|---|---|---|"]
    for name, st in report["stages"].items():
        notes = ["skipped (finished earlier)"] if st.get("skipped_this_run") else []
        if st.get("resumed_after_s"):
            notes.append(f"resumed; {st['resumed_after_s']:.0f} s of it before an interruption")
        if st.get("stopped_early"):
            notes.append(st["stopped_early"])
        note = "; ".join(notes)
        lines.append(f"| {name} | {st['wall_s']:.0f} | {note} |")
    lines.append(f"| **total** | **{report['wall_time_s_all_stages']:.0f}** | |")
    lines += ["", "## Data", ""]
    ing = report["data"].get("ingest", {})
    if ing:
        kept = {k: ing.get(k) for k in ("articles", "figures_written", "reasons")}
        lines.append(f"- PMC ingestion (figures kept, skipped per reason): `{json.dumps(kept)}`")
    totals = report["data"].get("instruct", {}).get("totals", {})
    if totals:
        keys = (
            "kept",
            "dropped",
            "kept_share",
            "dropped_by_reason",
            "turns_dropped_by_reason",
            "prompt_tokens",
            "completion_tokens",
        )
        shown = {k: totals.get(k) for k in keys}
        lines.append(
            f"- self-instruct (conversations kept, dropped per reason): `{json.dumps(shown)}`"
        )
    for name in ("align", "stage0_pairs", "stage0_vision"):
        st = report["stages"].get(name, {})
        extra = {
            k: v
            for k, v in st.items()
            if k not in ("wall_s", "resumed_after_s", "skipped_this_run")
        }
        if extra:
            lines.append(f"- {name}: `{json.dumps(extra, default=str)[:600]}`")
    if report.get("loss_curves"):
        lines += ["", "## Loss curves", "", "![loss curves](loss.png)"]
    lines += ["", "## Try the model", ""]
    try_it = report["try_it"]
    if preset is not None and preset.lm_layers:
        lines += [
            f"This model answers short questions about MedSynth images (its LM is the first "
            f"{preset.lm_layers} layers of SmolLM2, fine-tuned on VQA): findings, modality, "
            "organ, position, size, counts. It was not trained to describe an image at length.",
            "",
        ]
    for k, cmd in try_it.get("commands", {}).items():
        lines.append(f"- {k}: `{cmd}`")
    if try_it.get("questions"):
        lines += [
            "",
            "The final evaluation asked these held-out test questions about that image "
            "(greedy decoding, as `--temperature 0`):",
            "",
            "| question | reference | this model |",
            "|---|---|---|",
        ]
        for q in try_it["questions"]:
            cells = (q["question"], q["answer"], q["model_answer"])
            # One line per row: a model's answer with a line break split the table.
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
