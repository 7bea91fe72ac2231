"""Quickstart audit: the report's ablated column."""

from __future__ import annotations


def test_the_blank_image_column_shows_the_open_metrics_the_ablation_measured():
    from llavamed.quickstart import _headline, render_markdown

    def stat(m):
        return {"mean": m, "lo": m, "hi": m, "n": 4}

    closed = {"strict_closed_acc": stat(0.9), "llava_med_closed_acc": stat(0.9)}
    closed["closed_unparsed"] = stat(0.0)
    opened = {"llava_med_open_recall": stat(0.8), "open_exact_match": stat(0.75)}
    overall = {"token_f1": stat(0.85)}
    result = {
        "metrics": {"by_answer_type": {"closed": closed, "open": opened}, "overall": overall},
        "ablations": {
            "blank": {
                "metrics": {
                    "by_answer_type": {
                        "closed": {**closed, "strict_closed_acc": stat(0.5)},
                        "open": {**opened, "llava_med_open_recall": stat(0.25)},
                    },
                    "overall": {"token_f1": stat(0.4)},
                },
                "drop": {"strict_closed_acc": stat(0.4)},
            }
        },
    }
    head = _headline(result)
    assert head["ablation_blank"]["llava_med_open_recall"]["mean"] == 0.25
    assert head["ablation_blank"]["token_f1"]["mean"] == 0.4
    report = {
        "size": "tiny",
        "seed": 0,
        "metrics": {"zero_shot": {}, "finetuned": head},
        "stages": {},
        "wall_time_s_all_stages": 0,
        "data": {},
        "try_it": {},
    }
    md = render_markdown(report)
    assert "| open recall, LLaVA-Med metric | – | 80.0 [80.0, 80.0] | 25.0 [25.0, 25.0] |" in md
    assert "| token F1 (strict) | – | 85.0 [85.0, 85.0] | 40.0 [40.0, 40.0] |" in md
    assert "| closed accuracy, strict yes/no parse | – | 90.0 [90.0, 90.0] | 50.0" in md
