"""``report.md``, ``report.json`` and a bar chart for a VQA evaluation.

The paper's numbers appear as reference rows, marked as reported elsewhere; everything else in
the report was measured by this run. All files are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from llavamed.errors import format_counts
from llavamed.eval import metrics as M
from llavamed.eval.paper_numbers import CITATION, PAPER_SPLIT_SIZES, reference_rows
from llavamed.utils.io import atomic_path, atomic_write_json, atomic_write_text

# The rows of the main table, in order: the paper's metric first, strict ones beside it.
MAIN_ROWS = (
    "llava_med_open_recall",
    "llava_med_closed_acc",
    "strict_closed_acc",
    "closed_unparsed",
    "open_exact_match",
    "open_token_f1",
    "exact_match",
    "token_f1",
    "llava_med_open_hit",
    "bleu1",
    "bleu2",
    "bleu3",
    "bleu4",
)
CHART_METRICS = (
    "llava_med_open_recall",
    "llava_med_closed_acc",
    "strict_closed_acc",
    "open_exact_match",
    "token_f1",
)
SHORT = {
    "llava_med_open_recall": "open recall\n(LLaVA-Med)",
    "llava_med_closed_acc": "closed acc\n(LLaVA-Med)",
    "strict_closed_acc": "closed acc\n(strict)",
    "open_exact_match": "open exact\n(strict)",
    "token_f1": "token F1\n(strict)",
}


def is_partial(result: dict) -> bool:
    """True when ``--limit`` or ``--shard`` left questions out. A limit at or above the number
    of questions selected nothing away (results from before ``n_available`` was recorded count
    any limit)."""
    if result.get("shard"):
        return True
    limit, n = result.get("limit"), result.get("n_available")
    return limit is not None and (n is None or limit < n)


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.2f}"


def _cell(stat: dict | None) -> tuple[str, str, str]:
    if not stat:
        return "–", "–", "0"
    return _pct(stat["mean"]), f"[{_pct(stat['lo'])}, {_pct(stat['hi'])}]", str(stat["n"])


def comparable_reference_rows(result: dict, dataset: str) -> list[dict]:
    """The paper's rows for ``dataset``, or none when this run asked other questions than the
    paper's English ones (SLAKE ``--lang zh``/``all``)."""
    return reference_rows(dataset) if result.get("languages", ["en"]) == ["en"] else []


def render_markdown(result: dict, dataset: str, load_report: dict | None = None) -> str:
    m = result["metrics"]
    english = result.get("languages", ["en"]) == ["en"]
    lines = [f"# VQA evaluation: {dataset}", ""]
    lines += _header_notes(result, dataset, load_report)
    lines += _results_table(m, english)
    lines += _reference_rows(result, dataset)
    lines += _ablation_table(result)
    lines += _group_tables(m)
    lines += _generation_table(result.get("generation", {}))
    return "\n".join(lines) + "\n"


def _header_notes(result: dict, dataset: str, load_report: dict | None) -> list[str]:
    """What was run, and every reason its numbers may not compare with the paper's."""
    m = result["metrics"]
    lines = [
        f"Model `{result.get('model_id')}`; {m['n_answered']} of {m['n_samples']} questions "
        f"answered ({m['n_closed']} closed, {m['n_open']} open); greedy decoding, "
        f"max_new_tokens={result['options']['max_new_tokens']}, "
        f"closed-question suffix {'on' if result['options']['closed_suffix'] else 'off'}."
    ]
    if is_partial(result):
        lines.append(
            f"Partial run: limit={result.get('limit')}, shard={result.get('shard')}"
            + (f" ({result['n_available']} questions in all)" if "n_available" in result else "")
            + ". Not comparable to full-split numbers."
        )
    if m["n_missing"]:
        lines.append(
            f"**{m['n_missing']} questions have no answer** and are left out of every mean."
        )
    english = result.get("languages", ["en"]) == ["en"]
    if not english:
        # SLAKE --lang zh/all: the paper's rows are English-only, and Chinese is scored per Han
        # character, which LLaVA-Med's whitespace split never did.
        lines.append(
            f"Question languages: {', '.join(result['languages'])}. The paper evaluated English "
            "questions only, and Chinese text is scored with each Han character as a token, so "
            "no row here is comparable to the paper."
        )
    lines += _split_notes(result, dataset, english)
    lines += _load_notes(load_report, dataset)
    return lines


def _split_notes(result: dict, dataset: str, english: bool) -> list[str]:
    """A note when the questions are not the paper's test split (other splits, another size,
    another closed/open division)."""
    m = result["metrics"]
    sizes = PAPER_SPLIT_SIZES.get(dataset) if english else None
    if sizes and result.get("splits", ["test"]) != ["test"]:
        return [f"Note: split(s) {', '.join(result['splits'])}; the paper reports test splits."]
    if sizes and (
        m["n_samples"] != sizes["total"]
        or (not m["n_missing"] and (m["n_open"], m["n_closed"]) != (sizes["open"], sizes["closed"]))
    ):
        # Same total, other closed/open split: closed accuracy is over another set of questions.
        return [
            f"Note: the paper's {dataset} test split has {sizes['total']} questions "
            f"({sizes['open']} open / {sizes['closed']} closed); this run has {m['n_samples']}"
            + ("." if m["n_missing"] else f" ({m['n_open']} open / {m['n_closed']} closed).")
        ]
    return []


def _load_notes(load_report: dict | None, dataset: str) -> list[str]:
    """How the questions were read: inferred answer types, and what loaded or was skipped."""
    if not load_report:
        return []
    lines = []
    if load_report.get("n_answer_type_inferred"):
        inferred = (
            f"{load_report['n_answer_type_inferred']} questions carry no answer_type: yes/no "
            "answers were counted closed and the rest open."
        )
        if dataset == "pathvqa":
            # PathVQA has no answer_type anywhere: its closed questions are its yes/no ones
            # (3391 of the 6761 test questions), which is the paper's division as well.
            lines.append(
                f"{inferred} PathVQA's closed questions are its yes/no ones, as in the paper."
            )
        else:
            lines.append(
                f"{inferred} The paper used the datasets' own OPEN/CLOSED labels, under which "
                'closed questions also have answers like "CT" or "left", so closed accuracy here '
                "is over another set of questions."
            )
    lines.append(
        f"Data: {load_report['n_loaded']} samples loaded from `{load_report['source']}` "
        f"({load_report['n_records']} records"
        + ("; skipped " + format_counts(load_report["bad"]) if load_report.get("bad") else "")
        + ")."
    )
    return lines


def _results_table(m: dict, english: bool) -> list[str]:
    lines = ["", "## Results (95% bootstrap CI)", ""]
    lines += ["| metric | value | 95% CI | n |", "|---|---:|---:|---:|"]
    for key in MAIN_ROWS:
        if key in m["overall"]:
            v, ci, n = _cell(m["overall"][key])
            lines.append(f"| {M.METRICS[key][0]} | {v} | {ci} | {n} |")
    lines += [
        "",
        "The *LLaVA-Med metric* rows reproduce the paper's evaluation (normalised substring for "
        'closed questions, so "no" matches "normal"; token recall for open ones)'
        + (" and are the only ones comparable to the paper." if english else ".")
        + " *Strict* rows parse an explicit yes/no (none or both counts as wrong) and require "
        "exact matches.",
    ]
    return lines


def _reference_rows(result: dict, dataset: str) -> list[str]:
    """The paper's rows for this dataset (when comparable), then this run's, side by side."""
    refs = comparable_reference_rows(result, dataset)
    if not refs:
        return []
    lines = ["", f"## Reference rows ({CITATION}; not measured here)", ""]
    lines += ["| model | open recall | closed acc | source |", "|---|---:|---:|---|"]
    for r in refs:
        o = "–" if r["open_recall"] is None else f"{r['open_recall']:.2f}"
        c = "–" if r["closed_acc"] is None else f"{r['closed_acc']:.2f}"
        lines.append(f"| {r['model']} | {o} | {c} | {r['source']} |")
    ov = result["metrics"]["overall"]
    lines.append(
        f"| **this run** (measured) | {_cell(ov.get('llava_med_open_recall'))[0]} | "
        f"{_cell(ov.get('llava_med_closed_acc'))[0]} | this evaluation |"
    )
    return lines


def _ablation_table(result: dict) -> list[str]:
    if not result.get("ablations"):
        return []
    overall = result["metrics"]["overall"]
    lines = ["", "## Image reliance (accuracy drop when the image is replaced)", ""]
    lines += [
        "| condition | metric | with image | replaced | drop | 95% CI of drop | n |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for cond, ab in result["ablations"].items():
        for key in CHART_METRICS:
            d = ab["drop"].get(key)
            if not d:
                continue
            # Both means over the questions answered in both conditions, the drop's own
            # questions (results from before mean_a/mean_b: each condition's overall mean).
            with_image = d.get("mean_a", overall[key]["mean"])
            replaced = d.get("mean_b", ab["metrics"]["overall"][key]["mean"])
            lines.append(
                f"| {cond} | {M.METRICS[key][0]} | {_pct(with_image)} | {_pct(replaced)} | "
                f"{_pct(d['mean'])} | [{_pct(d['lo'])}, {_pct(d['hi'])}] | {d['n']} |"
            )
    lines += [
        "",
        "A drop whose CI includes 0 means the answers do not depend on the image: the model "
        "is not looking. blank = black image; noise = uniform RGB noise; shuffle = another "
        "question's image (a seeded derangement over distinct images). Each row compares "
        "the n questions answered in both conditions.",
    ]
    return lines


def _group_tables(m: dict) -> list[str]:
    """One table per grouping (answer type, question type) that has groups."""
    lines = []
    for title, groups in (
        ("answer type", m["by_answer_type"]),
        ("question type", m["by_question_type"]),
    ):
        if not groups:
            continue
        lines += ["", f"## By {title}", ""]
        lines += [
            "| group | n | LLaVA-Med open recall | LLaVA-Med closed acc | strict closed acc | "
            "exact match | token F1 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for g, agg in groups.items():
            n = max((s["n"] for s in agg.values()), default=0)
            cells = []
            for key in (
                "llava_med_open_recall",
                "llava_med_closed_acc",
                "strict_closed_acc",
                "exact_match",
                "token_f1",
            ):
                v, ci, _ = _cell(agg.get(key))
                cells.append(v if v == "–" else f"{v} {ci}")
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
    return lines


def _generation_table(gen: dict) -> list[str]:
    if not gen:
        return []
    lines = ["", "## Generation", ""]
    lines += ["| condition | generated | resumed | seconds | answers/s | skipped |"]
    lines += ["|---|---:|---:|---:|---:|---|"]
    for cond, g in gen.items():
        sk = ", ".join(f"{n} {r}" for r, n in g["skipped"].items()) or "–"
        lines.append(
            f"| {cond} | {g['n_generated']} | {g['n_resumed']} | {g['seconds']} | "
            f"{g['answers_per_s'] if g['answers_per_s'] is not None else '–'} | {sk} |"
        )
    return lines


def plot_bars(result: dict, dataset: str, path: str | Path) -> None:
    """Grouped bars per metric: with image, each ablation, and the paper's best numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = result["metrics"]["overall"]
    keys = [k for k in CHART_METRICS if k in m]
    series = [("with image", result["metrics"]["overall"])]
    for cond, ab in result.get("ablations", {}).items():
        series.append((f"image: {cond}", ab["metrics"]["overall"]))
    refs = comparable_reference_rows(result, dataset)
    paper = refs[0] if refs else None
    x = np.arange(len(keys))
    width = 0.8 / (len(series) + (1 if paper else 0))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 4.2))
    for i, (label, agg) in enumerate(series):
        vals = [100 * agg[k]["mean"] if k in agg else 0 for k in keys]
        err = [
            [100 * (agg[k]["mean"] - agg[k]["lo"]) if k in agg else 0 for k in keys],
            [100 * (agg[k]["hi"] - agg[k]["mean"]) if k in agg else 0 for k in keys],
        ]
        ax.bar(x + i * width, vals, width, yerr=err, capsize=2, label=label)
    if paper:
        pv = {
            "llava_med_open_recall": paper["open_recall"],
            "llava_med_closed_acc": paper["closed_acc"],
        }
        vals = [pv.get(k) or 0 for k in keys]
        ax.bar(
            x + len(series) * width,
            vals,
            width,
            hatch="//",
            fill=False,
            label="paper (reported, Li et al. 2023)",
        )
    ax.set_xticks(x + width * (len(series) - (0 if paper else 1)) / 2)
    ax.set_xticklabels([SHORT.get(k, k) for k in keys], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{dataset}: {result.get('model_id')} (95% bootstrap CI)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(
    result: dict, out_dir: str | Path, dataset: str, load_report: dict | None = None
) -> dict[str, Path]:
    """Write report.md, report.json and report.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {
        "md": out_dir / "report.md",
        "json": out_dir / "report.json",
        "png": out_dir / "report.png",
    }
    payload = {
        "dataset": dataset,
        **result,
        "load_report": load_report,
        "reference_rows": comparable_reference_rows(result, dataset),
        "metric_labels": {k: v[0] for k, v in M.METRICS.items()},
        "units": "fractions in [0, 1]; reference rows in percent",
    }
    atomic_write_json(paths["json"], payload)
    atomic_write_text(paths["md"], render_markdown(result, dataset, load_report))
    plot_bars(result, dataset, paths["png"])
    return paths
