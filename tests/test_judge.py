"""LLM judge: score parsing, the relative-score maths by hand, and a run over HTTP."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from eval_fixtures import write_judge_inputs
from llavamed.errors import InputError
from llavamed.eval.judge import (
    JudgeOptions,
    build_judge_messages,
    load_judge_prompts,
    parse_scores,
    position_bias,
    relative_score,
    run_judge,
)
from llavamed.llm.client import ClientOptions
from openai_stub_server import StubServer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8 7\nAssistant 1 was more detailed.", (8, 7)),
        ("8, 7\n...", (8, 7)),
        ("**8 7**\n...", (8, 7)),
        ("\n\n  9 10  \nexplanation with 3 numbers 4", (9, 10)),
        ("8/10 6/10\nbecause", (8, 6)),
        ("Scores: 7.5 and 6\n", (7.5, 6)),
        ("Assistant 1: 8\nAssistant 2: 3\nAssistant 1 is better", (8, 3)),
        ("**Assistant 1:** 9/10, **Assistant 2:** 4/10", (9, 4)),
        ("Assistant 1 score: 6\nAssistant 2 score: 7", (6, 7)),
        ("Both assistants did well.", None),
        # The first line decides; labelled numbers in the explanation are not scores.
        ("9 6\nAssistant 1: 3 key points were given; Assistant 2: 1 was missing.", (9, 6)),
        ("8 7\nAssistant 1 - 2 sentences ... Assistant 2 - 4 are vague", (8, 7)),
        ("8 7 (out of 10)\nfine", (8, 7)),
        ("1. 8\n2. 7", None),  # a numbered list is not "1 8"
        ("8\nAssistant 2 gets 7", None),
        ("11 7", None),
        ("0 5", None),
        ("-3 7", None),  # a negative score, not (3, 7)
        ("8 -2", None),
        ("8-9\nclose call", (8, 9)),  # a dash between numbers is no sign
        ("", None),
        ("8 7 6", None),
        # Assistant 2 named first: the numbers follow the labels, not the slots (read (7, 8)).
        ("Assistant 2 scores 7 and Assistant 1 scores 8", (8, 7)),
        ("Assistant 2 receives a 7/10, while Assistant 1 receives 9/10.", (9, 7)),
        ("7 for Assistant 2 and 9 for Assistant 1", (9, 7)),
        ("Assistant 2 and Assistant 1 scored 6 and 9 respectively", (9, 6)),
        ("Assistant 1 and Assistant 2 scored 9 and 6 respectively", (9, 6)),
        ("Assistant 2: 7, Assistant 1: 8", (8, 7)),
        # A bare label on a line of its own, the pair under it (small local judges).
        ("Scores:\n8 7\nAssistant 1 was better.", (8, 7)),
        ("**Scores**\n9/10 6/10", (9, 6)),
        ("## Evaluation\n\n7 8", (7, 8)),
        ("Final scores:\nAssistant 1: 8, Assistant 2: 6", (8, 6)),
        # ... but a sentence is no label: its next line is explanation, not the scores.
        ("Both did well:\n8 7", None),
        ("Scores\n", None),
    ],
)
def test_parse_scores(text, expected):
    assert parse_scores(text) == expected


def test_relative_score_by_hand():
    r = relative_score([(8, 4), (6, 9), None, (5, 5)])
    assert r["n"] == 4 and r["valid"] == 3 and r["invalid"] == 1
    assert r["mean_of_ratios"] == pytest.approx((50 + 150 + 100) / 3, abs=1e-4)
    assert r["ratio_of_means"] == pytest.approx(100 * (18 / 3) / (19 / 3), abs=1e-4)
    empty = relative_score([None])
    assert empty["mean_of_ratios"] is None and empty["invalid"] == 1


def test_position_bias_by_hand():
    normal = {"a": (8, 6), "b": (5, 5), "c": (7, 3)}
    swapped = {"a": (7, 7), "b": (4, 6), "c": None}
    pb = position_bias(normal, swapped)
    # a: ((8-7) + (7-6))/2 = 1 ; b: ((5-4) + (6-5))/2 = 1 ; c skipped (invalid in one order)
    assert pb["questions"] == 2 and pb["first_position_advantage"] == 1.0
    # a: model loses then ties -> flip; b: tie then model wins -> flip
    assert pb["preference_flip_rate"] == 1.0


def test_the_terminal_table_words_the_position_bias_sign_and_its_absence():
    from llavamed.eval.judge import format_table, relative_score

    rs = relative_score([(8, 6)])
    report = {"relative_score": {"overall": rs, "by_type": {}, "by_domain": {}}}
    later = position_bias({"a": (6, 8)}, {"a": (8, 6)})  # the second slot scores 2 higher
    assert "first slot -2.0 points" in format_table(report | {"position_bias": later})
    none = position_bias({"a": (8, 6)}, {"a": None})  # printed "+None points" before
    assert "no question was judged validly in both orders" in format_table(
        report | {"position_bias": none}
    )


def test_judge_prompt_layout():
    q = {
        "question_id": 1,
        "fig_label": "Fig 2",
        "fig_caption": "CT of the  chest.",
        "in_text_mention": [{"tokens": "As Fig 2 shows."}],
        "text": "What is seen?\n<image>",
    }
    msgs = build_judge_messages(q, "REF", "MODEL", load_judge_prompts())
    body = msgs[1]["content"]
    assert body.startswith("[Context]\nFigure Caption:\nFig 2: CT of the chest.\n\n")
    assert "Figure Context:\n\t- As Fig 2 shows.\n\n[Question]\nWhat is seen?\n\n" in body
    assert body.index("[Assistant 1]\nREF") < body.index("[Assistant 2]\nMODEL")
    assert "<image>" not in body and "[System]\n" in body and "1 to 10" in body
    q["in_text_mention"] = None
    assert (
        "Figure Context"
        not in build_judge_messages(q, "a", "b", load_judge_prompts())[1]["content"]
    )


# -- end to end over HTTP ------------------------------------------------------------------------

BIAS = {"first": 0}


def _section(body: str, name: str) -> str:
    return body.split(f"[{name}]\n")[1].split("\n\n[")[0]


def judge_responder(req: dict) -> str:
    """Scores = word count of each answer (1..10, set per question in
    eval_fixtures.JUDGE_QUESTIONS), + optional first-slot bias; formats vary by question so the
    parser is exercised; Q4 needs the re-ask, Q5 never parses."""
    body = req["messages"][-1]["content"]
    qn = int(re.search(r"\[Question\]\nQ(\d+)", body).group(1))
    s1 = min(10, len(_section(body, "Assistant 1").split()) + BIAS["first"])
    s2 = min(10, len(_section(body, "Assistant 2").split()))
    variant = req.get("seed", 0)
    if qn == 5 or (qn == 4 and variant == 0):
        return "Both answers are reasonable; I would not assign numbers."
    if qn == 2:
        return f"**Scores:** {s1}/10 {s2}/10\nAssistant 2 is better."
    if qn == 3:
        return f"Assistant 1: {s1}\nAssistant 2: {s2}\nThey are equal."
    return f"{s1} {s2}\nAssistant 1 gives more detail."


@pytest.fixture
def stub():
    BIAS["first"] = 0
    with StubServer(responder=judge_responder) as srv:
        yield srv


def make_opts(srv, tmp_path, **kw):
    qs, ans = write_judge_inputs(tmp_path)
    client = ClientOptions(
        base_url=srv.base_url,
        model="judge",
        concurrency=4,
        backoff_base=0.01,
        backoff_max=0.02,
        cache_path=str(tmp_path / "cache.sqlite"),
    )
    base = dict(
        questions=qs, answers=ans, out=tmp_path / "judge.jsonl", client=client, progress=False
    )
    base.update(kw)
    return JudgeOptions(**base)


def test_judge_run_hand_computed(stub, tmp_path):
    opts = make_opts(stub, tmp_path)
    stub.plan(["429", "500"])  # faults go through the shared client's retries
    report, rc = run_judge(opts)
    assert rc == 0 and report["complete"]
    assert report["input_issues"] == {"missing_answer": 1}
    rs = report["relative_score"]
    o = rs["overall"]
    assert (o["n"], o["valid"], o["invalid"]) == (5, 4, 1)
    assert o["mean_of_ratios"] == pytest.approx((50 + 150 + 100 + 200 / 9) / 4, abs=1e-3)
    assert o["ratio_of_means"] == pytest.approx(100 * 5.0 / 7.0, abs=1e-3)
    conv = rs["by_type"]["conversation"]
    assert conv["n"] == 3 and conv["mean_of_ratios"] == pytest.approx(
        (50 + 100 + 200 / 9) / 3, abs=1e-3
    )
    assert conv["ratio_of_means"] == pytest.approx(100 * 11 / 22, abs=1e-3)
    det = rs["by_type"]["detailed_description"]
    assert (det["n"], det["invalid"], det["mean_of_ratios"]) == (2, 1, 150.0)
    assert set(rs["by_domain"]) == {"chest_xray", "mri", "histology", "gross"}
    assert rs["by_domain"]["chest_xray"]["mean_of_ratios"] == pytest.approx(
        (50 + 200 / 9) / 2, abs=1e-3
    )
    assert rs["by_domain"]["gross"]["invalid"] == 1
    # Q4 re-asked once (and succeeded), Q5 re-asked once (and stayed invalid): 5 + 2 requests.
    log = [json.loads(line) for line in opts.out.read_text().splitlines()]
    attempts = {e["question_id"]: e["attempts"] for e in log}
    assert attempts == {1: 1, 2: 1, 3: 1, 4: 2, 5: 2}
    assert report["this_run"]["retries"] == 2 and stub.count == 7 + 2
    assert json.loads(opts.resolved_report_path.read_text())["relative_score"] == rs
    # Re-run: resumes from the log, no request.
    report2, _ = run_judge(opts)
    assert stub.count == 9 and report2["relative_score"] == rs
    # One answer regenerated (another model wrote answers.jsonl again): its judgement is stale
    # and asked again; the others are reused.
    lines = opts.answers.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps(first | {"text": first["text"] + " and more"})
    opts.answers.write_text("\n".join(lines) + "\n")
    report3, _ = run_judge(opts)
    assert stub.count == 10
    log = [json.loads(line) for line in opts.out.read_text().splitlines()]
    assert [e["question_id"] for e in log].count(first["question_id"]) == 2
    assert report3["relative_score"]["overall"]["n"] == 5


def _one_at_a_time(opts):
    """One request at a time and no retry: a planned fault is the first question's last word."""
    opts.client = dataclasses.replace(opts.client, concurrency=1, max_retries=0)
    return opts


def test_a_rate_limited_judgement_is_asked_again_not_recorded_invalid(stub, tmp_path):
    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.plan(["429"])  # the first question's request, with no retry left
    report, rc = run_judge(opts)
    assert rc == 3 and not report["complete"]  # postponed, not judged
    logged = [json.loads(line) for line in opts.out.read_text().splitlines()]
    assert len(logged) == 4 and all("rejected" not in e["judgement"] for e in logged)
    report2, rc2 = run_judge(opts)
    assert rc2 == 0 and report2["complete"]
    assert report2["relative_score"]["overall"]["valid"] == 4  # as with no 429 at all


def test_a_refused_judgement_is_recorded_invalid_once(stub, tmp_path):
    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.plan(["refusal"])  # a content filter on the first question
    report, rc = run_judge(opts)
    assert rc == 0 and report["complete"]
    logged = [json.loads(line) for line in opts.out.read_text().splitlines()]
    refused = [e for e in logged if e["judgement"].startswith("<refused")]
    assert len(refused) == 1 and refused[0]["scores"] is None
    assert report["relative_score"]["overall"]["invalid"] == 2  # the refusal and Q5
    sent = stub.count
    run_judge(opts)
    assert stub.count == sent  # a re-run does not pay for the refusal again


def test_a_rejected_judgement_is_recorded_invalid_and_asked_again(stub, tmp_path):
    """A 4xx (a context window too short, a bad parameter) was final: fixing the server
    changed nothing, every later run reused the invalid judgement."""
    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.plan(["400"])  # the first question's request
    report, rc = run_judge(opts)
    assert rc == 0 and report["relative_score"]["overall"]["invalid"] == 2  # it and Q5
    logged = [json.loads(line) for line in opts.out.read_text().splitlines()]
    assert [e["judgement"].startswith("<request rejected") for e in logged].count(True) == 1
    sent = stub.count
    report2, _ = run_judge(opts)  # the server answers now
    assert stub.count == sent + 1
    assert report2["relative_score"]["overall"]["invalid"] == 1  # only Q5, as with no 400
    run_judge(opts)
    assert stub.count == sent + 1


def test_a_rejected_judgement_that_then_fails_transiently_is_pending(stub, tmp_path):
    """Asked again after a rejection, a judgement whose request then failed (a 500 with no
    retry left) still counted as its old invalid one: exit 0, "complete", the failure unsaid."""
    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.plan(["400"])
    report, rc = run_judge(opts)
    assert rc == 0 and report["complete"]
    stub.plan(["500"])  # the rejected judgement, asked again
    report, rc = run_judge(opts)
    assert rc == 3 and not report["complete"] and report["pending_after_failures"] == 1
    assert report["relative_score"]["overall"]["n"] == 4  # Q1 not counted invalid, but pending
    report, rc = run_judge(opts)
    assert rc == 0 and report["relative_score"]["overall"]["invalid"] == 1  # only Q5


def test_judge_swap_measures_position_bias(stub, tmp_path):
    BIAS["first"] = 1  # this judge adds a point to whichever answer comes first
    report, rc = run_judge(make_opts(stub, tmp_path, swap=True))
    assert rc == 0
    pb = report["position_bias"]
    assert pb["questions"] == 4 and pb["first_position_advantage"] == pytest.approx(1.0)
    # Normal order: ref gets +1; swapped: model gets +1; the average cancels the bias.
    avg = report["relative_score_order_averaged"]["overall"]
    assert avg["ratio_of_means"] == pytest.approx(100 * (20 + 4 * 0.5) / (28 + 4 * 0.5), abs=1e-3)
    sw = report["relative_score_swapped"]["overall"]
    assert sw["ratio_of_means"] == pytest.approx(100 * 24 / 28, abs=1e-3)


def test_judge_cli(stub, tmp_path, capsys):
    from llavamed.cli import main

    qs, ans = write_judge_inputs(tmp_path)
    rc = main(
        ["eval", "judge", "--questions", str(qs), "--answers", str(ans), "--base-url",
         stub.base_url, "--model", "judge", "--no-progress", "--api-key-env", "NO_SUCH_VAR"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "overall" in out and "domain: chest_xray" in out
    assert (tmp_path / "answers.judge.jsonl").exists()
    assert (tmp_path / "answers.judge_report.json").exists()


def test_skipped_questions_and_answers_are_named(stub, tmp_path, capsys):
    """The judge counted skipped records ("input issues {'missing_answer': 1}") and named none."""
    from llavamed.cli import main

    qs, ans = write_judge_inputs(tmp_path)
    with open(ans, "a") as fh:
        fh.write('{"question_id": 99, "text": "x"}\n{"text": "no id"}\nnot json\n')
    argv = ["eval", "judge", "--questions", str(qs), "--answers", str(ans), "--base-url",
            stub.base_url, "--model", "judge", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 missing_answer (question_id 6)" in err
    assert f"2 bad_answer_record ({ans}:7, {ans}:8)" in err
    assert "1 unmatched_answers (question_id 99)" in err
    report = json.loads((tmp_path / "answers.judge_report.json").read_text())
    assert report["input_issue_examples"]["missing_answer"] == ["question_id 6"]


def test_a_questions_file_with_no_usable_record_is_named_not_the_answers(stub, tmp_path):
    """Every question lacked gpt4_answer (or was not JSON), and the error blamed the answers
    file: "no answers match the questions by question_id"."""
    opts = make_opts(stub, tmp_path)
    lines = opts.questions.read_text().splitlines()
    stripped = [
        json.dumps({k: v for k, v in json.loads(x).items() if k != "gpt4_answer"}) for x in lines
    ]
    opts.questions.write_text("\n".join(stripped + ["notjson"]) + "\n")
    with pytest.raises(InputError, match=r"no usable question records.*bad_question_record=") as e:
        run_judge(opts)
    assert str(e.value).startswith(str(opts.questions))
    # Questions fine, answers under other ids: the answers file is named, with the counts.
    write_judge_inputs(tmp_path)
    opts.answers.write_text(json.dumps({"question_id": "zz", "text": "a"}) + "\n")
    with pytest.raises(
        InputError, match=r"no answers match the questions by question_id.*missing_answer="
    ):
        run_judge(opts)


def test_a_judgement_without_text_is_counted_invalid_not_retried_forever(stub, tmp_path):
    """A judge that ends without text (content null: a reasoning model out of max_tokens) was
    a 'malformed' reply: retried, then left pending, so every re-run paid for it again."""
    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.default = "nulllength"
    report, rc = run_judge(opts)
    assert rc == 0 and report["complete"]
    assert report["relative_score"]["overall"]["invalid"] == 5
    sent = stub.count
    assert sent == 10  # each question asked, and re-asked once
    run_judge(opts)
    assert stub.count == sent
    # With a higher --max-tokens the invalid judgements are asked again, the valid ones not.
    stub.default = "ok"
    report, rc = run_judge(dataclasses.replace(opts, max_tokens=4096))
    assert rc == 0 and report["relative_score"]["overall"]["invalid"] == 1  # Q5 never parses
    assert stub.count == sent + 7  # five questions, and the re-asks of Q4 and Q5
    run_judge(dataclasses.replace(opts, max_tokens=4096))
    assert stub.count == sent + 7


def test_judge_refuses_a_max_tokens_no_server_takes(stub, tmp_path, capsys):
    from llavamed.cli import main

    qs, ans = write_judge_inputs(tmp_path)
    argv = ["eval", "judge", "--questions", str(qs), "--answers", str(ans), "--base-url",
            stub.base_url, "--model", "judge", "--no-progress", "--max-tokens", "0"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:  # a usage error, before any request
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: llavamed eval judge [-h]"), err
    assert err[-1] == "llavamed eval judge: error: argument --max-tokens: 0 must be >= 1", err
    assert stub.count == 0


def test_a_second_judge_run_on_the_same_log_is_refused(stub, tmp_path):
    """Two runs on one --out both asked (and paid for) every pending judgement and logged it
    twice."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llavamed.errors import LlavamedError

    opts = make_opts(stub, tmp_path)
    lock = opts.out.with_name(opts.out.name + ".lock")
    holder = subprocess.Popen(  # another run, mid-way
        [sys.executable, "-c", "import sys, time; from llavamed.utils.io import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, 'x'):\n    print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LlavamedError, match="another `eval judge` run"):
            run_judge(opts)
        assert stub.count == 0
    finally:
        holder.kill()
        holder.wait()
    report, rc = run_judge(opts)
    assert rc == 0 and stub.count > 0


def test_an_output_that_would_replace_an_input_is_refused(stub, tmp_path):
    """--out answers.jsonl cut the answers' last record (a log's torn line is repaired on open)
    and then advised deleting the file."""
    from llavamed.errors import LlavamedError

    opts = make_opts(stub, tmp_path)
    opts.answers.write_text(opts.answers.read_text().rstrip("\n"))  # no final newline
    before = opts.answers.read_text(), opts.questions.read_text()
    for kw in ({"out": opts.answers}, {"out": opts.questions}, {"report_path": opts.answers}):
        with pytest.raises(LlavamedError, match="would overwrite --(answers|questions)"):
            run_judge(dataclasses.replace(opts, **kw))
    assert (opts.answers.read_text(), opts.questions.read_text()) == before
    assert stub.count == 0
    # Nor may two outputs share a path: the report replaced the judgement log it summed up.
    with pytest.raises(LlavamedError, match="--out and --report are the same file"):
        run_judge(dataclasses.replace(opts, report_path=opts.out))
    assert stub.count == 0 and not opts.out.exists()


def test_a_run_whose_every_request_was_rejected_fails(stub, tmp_path, capsys):
    """Every judge request rejected (a 400 for a parameter the server does not take) exited 0
    with "5 questions judged" and every judgement invalid."""
    from llavamed.cli import main
    from llavamed.errors import LlavamedError

    opts = make_opts(stub, tmp_path)
    stub.default = "400"
    with pytest.raises(LlavamedError, match=r"rejected all 5 judge requests.*http_400"):
        run_judge(opts)
    report = json.loads(opts.resolved_report_path.read_text())
    assert report["rejected_this_run"] == {"http_400": 5}
    # Some rejected: the run goes on, and says so.
    stub.default = "ok"
    stub.plan(["400"])
    argv = ["eval", "judge", "--questions", str(opts.questions), "--answers", str(opts.answers),
            "--base-url", stub.base_url, "--model", "judge", "--no-progress", "--concurrency", "1",
            "--out", str(tmp_path / "j2.jsonl")]  # fmt: skip
    assert main(argv) == 0
    assert "the server rejected 1 judge requests (1 http_400)" in capsys.readouterr().err


def test_rerunning_a_finished_judge_whose_leftovers_are_rejected_again_keeps_exit_0(stub, tmp_path):
    """A judge prompt past a small server's context window is rejected every time. The run that
    met it exited 0; re-running the finished command failed: "rejected all 1 judge requests"."""
    from llavamed.errors import LlavamedError

    opts = _one_at_a_time(make_opts(stub, tmp_path))
    stub.plan(["400"])
    report, rc = run_judge(opts)
    assert rc == 0 and report["rejected_this_run"] == {"http_400": 1}
    for _ in range(2):
        stub.plan(["400"])
        report, rc = run_judge(opts)
        assert rc == 0 and report["rejected_this_run"] == {"http_400": 1}
    # New judgements (--swap), every one rejected: still a failure.
    opts = dataclasses.replace(opts, swap=True)
    stub.default = "400"
    with pytest.raises(LlavamedError, match=r"rejected all 6 judge requests"):
        run_judge(opts)


def test_a_thinking_judge_is_scored_on_its_answer_not_its_reasoning(stub, tmp_path):
    """A reasoning model (no reasoning parser on the server) starts its content with
    ``<think>``: every judgement was invalid, or scored from numbers in the reasoning."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "thinking").mkdir()
    plain, _ = run_judge(make_opts(stub, tmp_path / "plain"))
    stub.responder = lambda req: (
        "<think>\nAssistant 1: 3 findings. Assistant 2: 2 findings. Scores 1 2?\n</think>\n\n"
        + judge_responder(req)
    )
    thinking, rc = run_judge(make_opts(stub, tmp_path / "thinking"))
    assert rc == 0 and thinking["relative_score"] == plain["relative_score"]
