"""The self-instruct job end to end over HTTP: messy small-model output, faults, resume after
a real SIGKILL, dry-run, and LLaVA-Med's caption JSON as input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from llavamed.data.figures import DOMAINS
from llavamed.data.instruct.runner import InstructOptions, run_instruct
from llavamed.errors import LlavamedError
from llavamed.llm.client import ClientOptions
from openai_stub_server import StubServer

ROOT = Path(__file__).resolve().parents[1]

# What a 135M model does to the format, plus what a big model does with forbidden phrasing.
FORMATS = [
    "User: What is shown in {p}?\nAssistant: A scan of the region.\n\n"
    "User: Is anything abnormal?\nAssistant: There is a bright area on one side.",
    "Sure! Here is a conversation.\n**User:** What is shown in {p}?\n**Assistant:** An image.\n"
    "**User:** Where?\n**Assistant:** Based on the caption, in the centre.<|im_end|>",
    "1. Q: What is shown in {p}?\n   A: A section of tissue.\n2. Q: Stain?\n   A: Pink and purple.",
    "I am a helpful assistant. The image is nice.",  # no turns at all
    "User: What is shown in {p}?\nAssistant: I'm sorry, I cannot see the image.\n"
    "User: Anything else?\nAssistant: It looks normal.",  # one turn left after cleaning
    "user: What is shown in {p}? assistant: hmm User: Really? Assistant: Yes, according to the "
    "description, it is an X-ray.\nFigure Caption:\nFigure 3: hallucinated next example",
]


def messy_responder(body: dict) -> str:
    query = body["messages"][-1]["content"]
    pid = query.split("[")[1].split("]")[0]
    return FORMATS[zlib.crc32(pid.encode()) % len(FORMATS)].format(p=pid)


def write_figures(path: Path, n: int) -> list[str]:
    ids = []
    with open(path, "w") as fh:
        for i in range(n):
            dom = DOMAINS[i % len(DOMAINS)]
            pid = f"PMC{i:05d}_F{i % 3}"
            ids.append(pid)
            rec = {
                "pair_id": pid,
                "fig_label": f"Figure {i % 3 + 1}",
                "fig_caption": f"[{pid}] A {dom.replace('_', ' ')} figure.",
                "in_text_mention": [{"tokens": f"As Fig. {i % 3 + 1} shows, {dom}."}],
                "domain": {d: d == dom for d in DOMAINS},
                "image": f"images/{pid}.jpg",
            }
            fh.write(json.dumps(rec) + "\n")
        fh.write(json.dumps({"pair_id": "bad1", "fig_caption": "  "}) + "\n")
    return ids


@pytest.fixture
def stub():
    with StubServer(responder=messy_responder) as srv:
        yield srv


def make_opts(srv, tmp_path, n=30, **kw) -> InstructOptions:
    fig = tmp_path / "figures.jsonl"
    if not fig.exists():
        write_figures(fig, n)
    client = ClientOptions(
        base_url=srv.base_url,
        model="smollm2-135m",
        concurrency=4,
        backoff_base=0.01,
        backoff_max=0.05,
        cache_path=str(tmp_path / "cache.sqlite"),
    )
    base = dict(figures=fig, out=tmp_path / "instruct.json", client=client, progress=False)
    base.update(kw)
    return InstructOptions(**base)


def expected_kept(ids):
    return {p for p in ids if zlib.crc32(p.encode()) % len(FORMATS) in (0, 1, 2, 5)}


def test_run_messy_outputs_report_and_rerun_is_free(stub, tmp_path):
    opts = make_opts(stub, tmp_path, inline_mentions=True)
    ids = write_figures(opts.figures, 30)
    report, rc = run_instruct(opts)
    assert rc == 0 and report["complete"]
    out = json.loads(opts.out.read_text())
    assert {s["id"] for s in out} == expected_kept(ids)
    for s in out:
        conv = s["conversations"]
        assert len(conv) >= 4 and conv[0]["value"].count("<image>") == 1
        text = json.dumps(conv).lower()
        assert "caption" not in text and "description" not in text and "<|im_end|>" not in text
        assert s["image"] == f"images/{s['id']}.jpg" and sum(s["domain"].values()) == 1
    t = report["totals"]
    assert t["kept"] == len(out) and t["kept"] + t["dropped"] == 30
    assert t["dropped_by_reason"]["unparseable"] > 0 and t["dropped_by_reason"]["too_few_turns"] > 0
    assert t["turns_dropped_by_reason"]["refusal"] > 0
    assert 0 < t["kept_share"] < 1
    assert report["input_errors"] == {"missing_caption": 1}
    assert report["this_run"]["http_requests"] == 30 and stub.count == 30
    assert "Figure Context:" in stub.requests[0]["messages"][-1]["content"]
    on_disk = json.loads((tmp_path / "instruct_report.json").read_text())
    assert on_disk["totals"] == t
    # Re-run: everything is in the log; no request at all, identical output.
    before = opts.out.read_bytes()
    report2, rc2 = run_instruct(opts)
    assert rc2 == 0 and stub.count == 30 and opts.out.read_bytes() == before
    # Lost log but kept cache: re-run costs nothing either.
    opts.partial_path.unlink()
    report3, _ = run_instruct(opts)
    assert stub.count == 30 and report3["this_run"]["cache_hits"] == 30
    assert opts.out.read_bytes() == before


def test_a_figure_whose_caption_or_labels_changed_is_asked_again(stub, tmp_path):
    """Resuming matched the log by pair_id only: after captions or domain labels changed in
    place (``data domains --out`` over its input), OUT kept the old conversation and domain."""
    opts = make_opts(stub, tmp_path, n=6)
    run_instruct(opts)
    assert stub.count == 6
    recs = [json.loads(line) for line in opts.figures.read_text().splitlines()]
    recs[0]["fig_caption"] += " Arrowheads mark the lesion."  # a re-ingest with a fuller caption
    recs[1]["domain"] = {d: d == "histology" for d in DOMAINS}  # relabelled
    opts.figures.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report, rc = run_instruct(opts)
    # Those two only: the new caption is a new request; the relabelled figure's prompt is
    # unchanged, so the response cache answers it and its sample takes the new domain.
    assert rc == 0 and stub.count == 7 and report["this_run"]["cache_hits"] == 1
    asked = [r["messages"][-1]["content"] for r in stub.requests[6:]]
    assert any("Arrowheads mark the lesion." in q for q in asked)
    by_id = {s["id"]: s for s in json.loads(opts.out.read_text())}
    if recs[1]["pair_id"] in by_id:  # kept by the messy responder's format for it
        assert by_id[recs[1]["pair_id"]]["domain"]["histology"]
    assert report["totals"]["kept"] + report["totals"]["dropped"] == 6
    report, _ = run_instruct(opts)
    assert stub.count == 7 and report["this_run"]["cache_hits"] == 0  # now they are done


def test_round_robin_cap_and_changed_settings_refused(stub, tmp_path):
    opts = make_opts(stub, tmp_path, max_samples=10)
    report, _ = run_instruct(opts)
    assert report["selected"] == 10 and stub.count == 10
    doms = report["totals"]["by_domain"]
    assert set(doms) == set(DOMAINS) and all(sum(v.values()) == 2 for v in doms.values())
    # Extending the cap resumes: only the 10 new figures are asked.
    run_instruct(make_opts(stub, tmp_path, max_samples=20))
    assert stub.count == 20
    with pytest.raises(LlavamedError, match="different settings"):
        run_instruct(make_opts(stub, tmp_path, max_samples=20, temperature=0.1))
    # The message named "model, prompts, sampling or --inline-mentions": a changed --min-turns
    # or --few-shot, also part of the fingerprint, was not among them.
    for kw, flag in (({"min_turns": 3}, "--min-turns"), ({"few_shot": 2}, "--few-shot")):
        with pytest.raises(LlavamedError, match=f"different settings .*{flag}"):
            run_instruct(make_opts(stub, tmp_path, max_samples=20, **kw))


def test_few_shot_limit_shortens_prompt(stub, tmp_path):
    run_instruct(make_opts(stub, tmp_path, n=3, few_shot=1))
    assert [m["role"] for m in stub.requests[0]["messages"]] == [
        "system", "user", "assistant", "user",
    ]  # fmt: skip
    with pytest.raises(LlavamedError, match="different settings"):  # part of the fingerprint
        run_instruct(make_opts(stub, tmp_path, n=3, few_shot=2))


def test_transient_failures_exit_3_then_resume(stub, tmp_path):
    opts = make_opts(stub, tmp_path, n=10)
    opts.client.max_retries = 1
    stub.plan(["500"])
    stub.default = "503"
    report, rc = run_instruct(opts)
    assert rc == 3 and report["pending_after_failures"] == 10 and not report["complete"]
    assert report["failed_this_run"] == {"http_503": 10}  # the last error of each record
    assert report["this_run"]["retry_reasons"] == {"http_500": 1, "http_503": 9}
    assert stub.count == 20
    assert not opts.out.exists() and report["out"] is None  # nothing finished: no empty OUT
    stub.default = "ok"
    report, rc = run_instruct(opts)
    assert rc == 0 and report["totals"]["kept"] + report["totals"]["dropped"] == 10


def test_rate_limits_past_the_last_retry_are_postponed_not_dropped(stub, tmp_path):
    """A 429 is a 4xx, but 'not now' rather than 'never': the record is asked again next run."""
    opts = make_opts(stub, tmp_path, n=5)
    opts.client.max_retries = 0
    stub.default = "429"
    report, rc = run_instruct(opts)
    assert rc == 3 and report["failed_this_run"] == {"http_429": 5}
    assert not report.get("totals", {}).get("dropped_by_reason")
    stub.default = "ok"
    report, rc = run_instruct(opts)
    assert rc == 0 and report["totals"]["kept"] + report["totals"]["dropped"] == 5
    assert "request_rejected" not in report["totals"]["dropped_by_reason"]


def test_a_record_without_an_image_is_counted_before_any_call(stub, tmp_path):
    """``data ingest --keep-missing-images`` writes ``image: null``: no sample can name it."""
    opts = make_opts(stub, tmp_path, n=5)
    recs = [json.loads(line) for line in opts.figures.read_text().splitlines()]
    recs[2]["image"] = None
    opts.figures.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report, rc = run_instruct(opts)
    assert rc == 0 and report["input_errors"]["missing_image"] == 1
    sent = " ".join(r["messages"][-1]["content"] for r in stub.requests)
    assert f"[{recs[2]['pair_id']}]" not in sent  # its caption was never sent
    out = json.loads(opts.out.read_text())
    assert recs[2]["pair_id"] not in {s["id"] for s in out}


def test_fatal_auth_error_stops_run(stub, tmp_path):
    stub.default = "401"
    with pytest.raises(LlavamedError, match="http_401"):
        run_instruct(make_opts(stub, tmp_path, n=5))


def test_a_rejected_request_is_logged_then_asked_again_by_the_next_run(stub, tmp_path):
    """A 4xx may be the server's fault (a proxy's 400, a 422 for an unsupported parameter): the
    figure is counted as dropped this run but not done for good, unlike a model's refusal."""
    opts = make_opts(stub, tmp_path, n=5)
    opts.client.concurrency = 1
    stub.plan(["400"])
    report, rc = run_instruct(opts)
    assert rc == 0 and report["totals"]["dropped_by_reason"]["request_rejected"] == 1
    assert report["rejected_this_run"] == {"http_400": 1}
    rejected = stub.requests[0]["messages"][-1]["content"]
    report, rc = run_instruct(opts)
    assert rc == 0 and stub.count == 6  # only the rejected figure is asked again
    assert stub.requests[5]["messages"][-1]["content"] == rejected
    assert "request_rejected" not in report["totals"]["dropped_by_reason"]
    assert report["totals"]["kept"] + report["totals"]["dropped"] == 5
    run_instruct(opts)
    assert stub.count == 6  # now it is done


def test_rerunning_a_finished_job_whose_leftovers_are_rejected_again_keeps_exit_0(tmp_path):
    """A prompt past a small server's context window is rejected every time. The run that met
    it exited 0; re-running the same finished command then failed with exit 1, "the server
    rejected all 1 requests of this run". A server that rejects everything still fails."""
    with StubServer(responder=messy_responder) as srv:
        opts = make_opts(srv, tmp_path, n=5)
        opts.client.concurrency = 1
        srv.plan(["400"])
        report, rc = run_instruct(opts)
        assert rc == 0 and report["rejected_this_run"] == {"http_400": 1}
        for _ in range(2):  # the same figure, rejected again: the same outcome, the same exit
            srv.plan(["400"])
            report, rc = run_instruct(opts)
            assert rc == 0 and report["rejected_this_run"] == {"http_400": 1}
            assert report["totals"]["dropped_by_reason"]["request_rejected"] == 1
        # New figures, every one of them rejected (another server, options it does not take):
        # still a failure, even though earlier runs finished figures.
        with open(opts.figures, "a") as fh:
            for i in range(2):
                pid = f"PMC9999{i}_F1"
                rec = {"pair_id": pid, "fig_caption": f"[{pid}] A CT.", "image": f"i/{pid}.jpg"}
                fh.write(json.dumps(rec) + "\n")
        srv.default = "400"
        with pytest.raises(LlavamedError, match="rejected all 3 requests of this run"):
            run_instruct(opts)
    # A fresh job whose every request is rejected fails, and writes no OUT.
    (tmp_path / "fresh").mkdir()
    with StubServer(default="400") as srv:
        fresh = make_opts(srv, tmp_path / "fresh", n=3)
        with pytest.raises(LlavamedError, match="rejected all 3 requests of this run"):
            run_instruct(fresh)
        with pytest.raises(LlavamedError, match="rejected all 3 requests of this run"):
            run_instruct(fresh)  # and again: nothing was ever finished
        assert not fresh.out.exists()


def test_a_rejected_figure_that_then_fails_transiently_is_pending_not_done(stub, tmp_path):
    """The next run asks a rejected figure again; when that ask failed (5xx past the last
    retry), the old rejection still counted the figure as finished: exit 0, "complete"."""
    opts = make_opts(stub, tmp_path, n=5)
    opts.client.concurrency = 1
    opts.client.max_retries = 1
    stub.plan(["400"])
    report, rc = run_instruct(opts)
    assert rc == 0 and report["rejected_this_run"] == {"http_400": 1}
    stub.plan(["500", "500"])  # the one figure asked again, and its retry
    report, rc = run_instruct(opts)
    assert rc == 3 and not report["complete"] and report["pending_after_failures"] == 1
    assert report["failed_this_run"] == {"http_500": 1}
    t = report["totals"]
    assert "request_rejected" not in t["dropped_by_reason"] and t["kept"] + t["dropped"] == 4
    assert len(json.loads(opts.out.read_text())) == t["kept"]
    report, rc = run_instruct(opts)  # the server answers now
    assert (
        rc == 0
        and report["complete"]
        and report["totals"]["kept"] + report["totals"]["dropped"] == 5
    )


def test_a_server_that_dies_mid_run_stops_the_job_and_keeps_what_finished(tmp_path):
    """Connection refused on every retry of every figure used to cost the whole selection
    times (retries + 1) attempts before exit 3; ten in a row now stop the job."""
    served: list[str] = []  # the pair_ids the server answered

    def dies_after_three(body: dict) -> str:
        served.append(body["messages"][-1]["content"].split("[")[1].split("]")[0])
        if len(served) == 3:
            srv.stop()  # this answer still goes out; every later connection is refused
        return messy_responder(body)

    with StubServer(responder=dies_after_three) as srv:
        opts = make_opts(srv, tmp_path, n=30)
        opts.client.concurrency = 1
        opts.client.stream = True  # a streamed reply closes its connection: none is reused
        opts.client.unreachable_after_s = 0.0  # no waiting for the server to come back
        with pytest.raises(
            LlavamedError, match="unreachable at .*: 10 requests in a row failed to connect"
        ):
            run_instruct(opts)
    logged = [json.loads(line)["pair_id"] for line in opts.partial_path.read_text().splitlines()]
    assert sorted(logged) == sorted(served) and len(served) == 3
    with srv:  # back up, on a new port: the next run asks only the other 27
        opts.client.base_url = srv.base_url
        report, rc = run_instruct(opts)
    t = report["totals"]
    assert rc == 0 and len(served) == 30 and t["kept"] + t["dropped"] == 30


def test_dry_run_calls_nothing(stub, tmp_path):
    opts = make_opts(stub, tmp_path, n=20, dry_run=True)
    opts.client.model = "gpt-4o"
    report, rc = run_instruct(opts)
    assert stub.count == 0 and not opts.out.exists()
    assert report["requests_needed"] == 20
    assert report["estimated_prompt_tokens"] > 20 * 1000  # 8 few-shot examples per request
    assert report["estimated_cost_usd"] > 0 and "heuristic" in report["estimate_method"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.jsonl"]  # wrote nothing
    # After a real run, the dry run sees the finished work.
    opts.dry_run = False
    opts.max_samples = 10
    run_instruct(opts)
    opts.dry_run, opts.max_samples = True, None
    report = run_instruct(opts)[0]
    assert report["already_done"] == 10 and report["requests_needed"] == 10


# A value out of range is a usage error (exit 2, the usage line, "argument --flag: V must be
# ..."), refused as the command line is read; an empty --cache is refused by the run (exit 1).
USAGE = "llavamed data instruct: error: argument "


@pytest.mark.parametrize(
    "flags, code, message",
    [
        # the dry run estimated < 0 tokens
        (["--max-tokens", "-500"], 2, USAGE + "--max-tokens: -500 must be >= 1"),
        (["--max-tokens", "0"], 2, USAGE + "--max-tokens: 0 must be >= 1"),
        (["--temperature", "-1"], 2, USAGE + "--temperature: -1 must be a finite number >= 0"),
        # inf passed ">= 0" and httpx refused to encode it: a ValueError traceback
        (["--temperature", "inf"], 2, USAGE + "--temperature: inf must be a finite number >= 0"),
        # "Infinity" in JSON
        (["--price-in", "inf"], 2, USAGE + "--price-in: inf must be a finite number >= 0"),
        (["--max-retries", "-1"], 2, USAGE + "--max-retries: -1 must be >= 0"),
        # --cache "$UNSET" turned the cache off without a word
        (
            ["--cache", ""],
            1,
            "llavamed: error: --cache: empty path; give a file, or 'none' to run without a cache",
        ),
    ],
)
def test_bad_sampling_flags_are_refused_before_anything_is_written(tmp_path, capsys, flags, code, message):  # fmt: skip
    from llavamed.cli import main

    write_figures(tmp_path / "figures.jsonl", 3)
    base = ["--figures", str(tmp_path / "figures.jsonl"), "--out", str(tmp_path / "o.json"),
            "--base-url", "http://127.0.0.1:9/v1", "--model", "gpt-4o", "--no-progress"]  # fmt: skip
    for cmd in (["data", "instruct", *base, "--dry-run"], ["data", "instruct", *base]):
        try:
            rc = main([*cmd, *flags])
        except SystemExit as exc:
            rc = exc.code
        assert rc == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines[-1] == message, err
        if code == 2:
            assert lines[0].startswith("usage: llavamed data instruct [-h]"), err
        else:
            assert len(lines) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.jsonl"]


def test_a_missing_figures_file_is_a_one_line_error(tmp_path, capsys):
    """docs/instruct.md: a bad input is a one-line error naming the file; a typo in --figures
    ended in a FileNotFoundError traceback (data align and data domains said "file not found")."""
    from llavamed.cli import main

    missing = tmp_path / "no_such_figures.jsonl"
    base = ["data", "instruct", "--figures", str(missing), "--out", str(tmp_path / "o.json"),
            "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"]  # fmt: skip
    for argv in (base, [*base, "--dry-run"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err == f"llavamed: error: {missing}: file not found\n"
    assert list(tmp_path.iterdir()) == []


def test_skipped_and_dropped_figures_are_counted_and_named(stub, tmp_path, capsys):
    """The terminal said "kept 20 / 28" and nothing of the records never asked about; neither
    it nor the report named a skipped or dropped figure."""
    from llavamed.cli import main

    ids = write_figures(tmp_path / "figures.jsonl", 12)
    with open(tmp_path / "figures.jsonl", "a") as fh:
        fh.write(json.dumps({"fig_caption": "no id", "image": "images/x.jpg"}) + "\n")
        # A list where text belongs was sent as its repr ("['Panel A.', 'Panel B.']") or
        # became the sample's id, as data align refuses it.
        fh.write(json.dumps({"pair_id": "L1", "fig_caption": ["Panel A.", "Panel B."],
                             "image": "images/x.jpg"}) + "\n")  # fmt: skip
        fh.write(
            json.dumps({"pair_id": ["L2"], "fig_caption": "x", "image": "images/x.jpg"}) + "\n"
        )
    argv = ["data", "instruct", "--figures", str(tmp_path / "figures.jsonl"), "--out",
            str(tmp_path / "o.json"), "--base-url", stub.base_url, "--model", "m", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "skipped records of" in cap.err
    assert "1 missing_caption (bad1)" in cap.err and "1 missing_pair_id (record 13)" in cap.err
    report = json.loads((tmp_path / "o_report.json").read_text())
    assert report["input_error_examples"] == {
        "missing_caption": ["bad1"],
        "missing_pair_id": ["record 13"],
        "malformed_caption": ["L1"],
        "malformed_pair_id": ["record 15"],
    }
    sent = " ".join(r["messages"][-1]["content"] for r in stub.requests)
    assert "Panel A." not in sent and report["selected"] == 12
    unparseable = report["totals"]["dropped_examples"]["unparseable"]
    assert unparseable and set(unparseable) <= set(ids)
    assert f"unparseable ({unparseable[0]}" in cap.out


def test_llava_med_caption_json_input(stub, tmp_path):
    data = {
        d: [
            {
                "pair_id": f"{d}_{i}",
                "fig_label": "Fig 1",
                "fig_caption": f"[{d}_{i}] caption",
                "in_text_mention": None,
            }
            for i in range(3)
        ]
        for d in DOMAINS
    }
    data["mri"].append(data["chest_xray"][0])  # a figure filed under two domains
    fig = tmp_path / "llava_med_instruct_fig_captions.json"
    fig.write_text(json.dumps(data))
    opts = make_opts(stub, tmp_path, figures=fig, max_samples=7)
    report, _ = run_instruct(opts)
    assert report["selected"] == 7 and report["duplicate_pair_ids"] == 1
    asked = [r["messages"][-1]["content"].split("[")[1].split("]")[0] for r in stub.requests]
    assert {a.split("_")[0] for a in asked} >= {"chest", "mri", "histology", "gross", "ct"}


def _cli(fig: Path, out: Path, base_url: str) -> list[str]:
    return [
        sys.executable, "-m", "llavamed", "data", "instruct", "--figures", str(fig),
        "--out", str(out), "--base-url", base_url, "--model", "stub", "--concurrency", "4",
        "--no-progress", "--api-key-env", "LLAVAMED_TEST_NO_KEY",
    ]  # fmt: skip


def _log_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_resume_exactly_once(tmp_path):
    """Kill the real CLI with SIGKILL at several points; the final output must equal an
    uninterrupted run's, each pair_id exactly once, and no log line may be corrupt."""
    n = 40
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with StubServer(latency=0.03, responder=messy_responder) as srv:
        fig = tmp_path / "figures.jsonl"
        ids = write_figures(fig, n)
        ref = tmp_path / "ref" / "instruct.json"
        ref.parent.mkdir()
        subprocess.run(_cli(fig, ref, srv.base_url), env=env, check=True, timeout=120)
        ref_samples = json.loads(ref.read_text())

        out = tmp_path / "run" / "instruct.json"
        out.parent.mkdir()
        # Separate cache so the killed runs really talk to the server.
        cmd = _cli(fig, out, srv.base_url) + ["--cache", str(tmp_path / "run" / "c.sqlite")]
        partial = out.with_name(out.name + ".partial.jsonl")
        kills = 0
        for threshold in (5, 15, 28):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while _log_lines(partial) < threshold and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
            assert not out.exists() or kills == 0  # never finalised by a killed run
        assert kills >= 2
        subprocess.run(cmd, env=env, check=True, timeout=120)

    entries = [json.loads(line) for line in partial.read_text().splitlines()]  # no torn line
    logged = [e["pair_id"] for e in entries]
    assert sorted(logged) == sorted(ids)  # each figure exactly once in the log
    samples = json.loads(out.read_text())
    assert len({s["id"] for s in samples}) == len(samples)
    assert samples == ref_samples
    assert {s["id"] for s in samples} == expected_kept(ids)


def test_a_cut_answer_and_a_refusal_never_become_training_data(tmp_path):
    two_turns = (
        "User: What is shown?\nAssistant: A chest radiograph.\n\n"
        "User: Where is the opacity?\nAssistant: In the right lower lobe, near the border."
    )
    with StubServer(responder=lambda body: two_turns) as srv:
        opts = make_opts(srv, tmp_path, n=3, min_turns=1)
        opts.client.concurrency = 1
        srv.plan(["length", "refusal", "ok"])
        report, rc = run_instruct(opts)
        assert rc == 0 and srv.count == 3  # the refusal is not asked again
        out = json.loads(opts.out.read_text())
        # The cut reply keeps its first, complete pair only ("...near the bor" is gone).
        assert sorted(len(s["conversations"]) // 2 for s in out) == [1, 2]
        assert not any("near the bor" in t["value"] and not t["value"].endswith("border.")
                       for s in out for t in s["conversations"])  # fmt: skip
        t = report["totals"]
        assert t["dropped_by_reason"] == {"model_refusal": 1}
        assert t["turns_dropped_by_reason"]["cut_by_max_tokens"] == 1
        run_instruct(opts)
        assert srv.count == 3  # the refusal was recorded: a re-run does not pay for it again


def test_a_reply_without_text_is_dropped_by_name_once_not_retried(tmp_path):
    """content null with finish_reason length (a reasoning model that spent max_tokens thinking)
    or tool_calls was retried as malformed, paid for each time, and asked again every run."""
    two_turns = "User: What is shown?\nAssistant: A chest radiograph."
    with StubServer(responder=lambda body: two_turns) as srv:
        opts = make_opts(srv, tmp_path, n=3, min_turns=1)
        opts.client.concurrency = 1
        srv.plan(["nulllength", "toolcall", "ok"])
        report, rc = run_instruct(opts)
        assert rc == 0 and srv.count == 3
        t = report["totals"]
        assert t["dropped_by_reason"] == {"cut_by_max_tokens": 1, "empty_reply": 1}
        log = [json.loads(x) for x in opts.partial_path.read_text().splitlines()]
        assert {e.get("finish_reason") for e in log if e.get("reason") == "empty_reply"} == {
            "tool_calls"
        }
        run_instruct(opts)
        assert srv.count == 3


def test_image_paths_are_relative_to_the_output_folder(stub, tmp_path):
    opts = make_opts(stub, tmp_path, n=10, out=tmp_path / "sub" / "instruct.json")
    run_instruct(opts)
    out = json.loads(opts.out.read_text())
    assert out and all(s["image"].startswith("../images/") for s in out)


def test_an_output_that_would_replace_the_figures_is_refused(stub, tmp_path):
    """--out figures.jsonl replaced the figures with the conversations made from them (and
    --report figures.jsonl with the report)."""
    opts = make_opts(stub, tmp_path, n=3)
    before = opts.figures.read_text()
    for kw in ({"out": opts.figures}, {"report_path": opts.figures}):
        bad = dataclasses.replace(opts, **kw)
        with pytest.raises(LlavamedError, match="would overwrite --figures"):
            run_instruct(bad)
    bad = dataclasses.replace(opts, client=dataclasses.replace(opts.client, cache_path=str(opts.figures)))  # fmt: skip
    with pytest.raises(LlavamedError, match="--cache would overwrite --figures"):
        run_instruct(bad)
    assert opts.figures.read_text() == before and stub.count == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.jsonl"]


def test_two_outputs_on_one_path_are_refused(stub, tmp_path):
    """--report naming the --out file replaced the conversations with the report that counted
    them; the cache on the output, the output's own log."""
    opts = make_opts(stub, tmp_path, n=3)
    cache_on_out = dataclasses.replace(opts.client, cache_path=str(opts.out))
    for bad, names in (
        (dataclasses.replace(opts, report_path=opts.out), "--out and --report"),
        (dataclasses.replace(opts, client=cache_on_out), "--out and --cache"),
        (dataclasses.replace(opts, report_path=opts.partial_path), "its log and --report"),
    ):
        with pytest.raises(LlavamedError, match=f"{names} are the same file"):
            run_instruct(bad)
    assert stub.count == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["figures.jsonl"]


def test_a_cache_damaged_past_its_first_page_is_a_one_line_error(stub, tmp_path, capsys):
    """A cache whose header opens but whose data pages are damaged (a copy cut short, a disk
    error) raised a sqlite3.DatabaseError traceback from the middle of the job."""
    import sqlite3

    from llavamed.cli import main

    opts = make_opts(stub, tmp_path, n=60)
    run_instruct(opts)
    cache = Path(opts.client.cache_path)
    db = sqlite3.connect(cache)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    assert db.execute("PRAGMA page_count").fetchone()[0] > 4
    db.close()
    blob = bytearray(cache.read_bytes())
    blob[3 * page + 50 : 4 * page - 50] = b"Z" * (page - 100)  # a data page, not the header
    cache.write_bytes(bytes(blob))
    opts.partial_path.unlink()
    cmd = ["data", "instruct", "--figures", str(opts.figures), "--out", str(opts.out)]
    cmd += ["--base-url", stub.base_url, "--model", "smollm2-135m", "--no-progress"]
    cmd += ["--cache", str(cache)]
    capsys.readouterr()
    assert main(cmd) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{cache}: response cache failed" in err and "--cache none" in err


def test_an_output_that_is_a_folder_is_refused_before_any_request(stub, tmp_path):
    """--out or --report naming a folder: every request was made and paid for, then writing the
    output or the report there failed (the output written, the report not), exit 1."""
    opts = make_opts(stub, tmp_path, n=3)
    (tmp_path / "dir").mkdir()
    for kw, flag in (({"out": tmp_path / "dir"}, "--out"), ({"report_path": tmp_path / "dir"}, "--report")):  # fmt: skip
        with pytest.raises(LlavamedError, match=f"{flag} is a folder"):
            run_instruct(dataclasses.replace(opts, **kw))
    # A file where a folder of the path should be: "figures.jsonl: File exists" at the end.
    under_file = opts.figures / "sub" / "report.json"
    with pytest.raises(
        LlavamedError, match=f"--report cannot be written: {opts.figures} is a file"
    ):
        run_instruct(dataclasses.replace(opts, report_path=under_file))
    assert stub.count == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "figures.jsonl"]


@pytest.mark.parametrize("given", [{"price_out": 1000.0}, {"price_in": 1000.0}])
def test_the_report_names_the_prices_its_costs_were_computed_with(stub, tmp_path, given):
    """With only --price-out, the report named gpt-4o's table prices ([2.5, 10.0]) beside a cost
    computed at (0, 1000); with only --price-in, an output price of null. A price not given is
    the table's (it was 0: --price-in alone made every output token free)."""
    opts = make_opts(stub, tmp_path, n=2)
    client = dataclasses.replace(opts.client, model="gpt-4o", **given)
    report, _ = run_instruct(dataclasses.replace(opts, client=client))
    pin, pout = given.get("price_in", 2.5), given.get("price_out", 10.0)
    assert list(report["price_per_mtok"]) == [pin, pout]
    t = report["totals"]
    want = (t["prompt_tokens"] * pin + t["completion_tokens"] * pout) / 1e6
    assert t["cost_usd"] == pytest.approx(want, rel=1e-4) and want > 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_by_a_content_filter_loses_its_cut_answer(tmp_path, stream):
    """Azure OpenAI's output filter cuts a reply where it trips (finish_reason content_filter,
    text kept): the cut answer ("... near the bor") was kept as training data."""
    two_turns = (
        "User: What is shown?\nAssistant: A chest radiograph.\n\n"
        "User: Where is the opacity?\nAssistant: In the right lower lobe, near the border."
    )
    replies = {"PMC00000_F0": two_turns, "PMC00001_F1": two_turns.split("\n\n")[0]}

    def responder(body: dict) -> str:
        return replies[body["messages"][-1]["content"].split("[")[1].split("]")[0]]

    with StubServer(responder=responder) as srv:
        opts = make_opts(srv, tmp_path, n=2, min_turns=1)
        opts.client.stream = stream
        srv.default = "filtered"
        report, rc = run_instruct(opts)
        assert rc == 0 and srv.count == 2
        (sample,) = json.loads(opts.out.read_text())
        assert [t["value"] for t in sample["conversations"]][1] == "A chest radiograph."
        assert len(sample["conversations"]) == 2
        t = report["totals"]
        assert t["turns_dropped_by_reason"]["cut_by_content_filter"] == 2
        assert t["dropped_by_reason"] == {"cut_by_content_filter": 1}
        assert t["dropped_examples"] == {"cut_by_content_filter": ["PMC00001_F1"]}


def test_a_figures_file_with_no_usable_record_is_an_error_not_an_empty_output(stub, tmp_path):
    """Every record skipped (no image, no caption) or none at all: OUT was written as [] with
    exit 0, so a pipeline went on to train on nothing (data align fails on the same file)."""
    opts = make_opts(stub, tmp_path, n=0)
    with pytest.raises(LlavamedError, match="no figure to ask about .*missing_caption \\(bad1\\)"):
        run_instruct(opts)
    opts.figures.write_text("")
    with pytest.raises(LlavamedError, match="no figure to ask about \\(it holds no records\\)"):
        run_instruct(opts)
    assert stub.count == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["figures.jsonl"]
    report, rc = run_instruct(dataclasses.replace(opts, dry_run=True))  # reports, writes nothing
    assert rc == 0 and report["selected"] == 0
