"""Quickstart audit: a stage's output changed on disk, time lost to a killed run, the total ETA
over stages that will be skipped, a report left over from an earlier run, the ablated column."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llavamed.quickstart import Pipeline, QuickstartOptions


def _chain(calls: list[str], out, settings: dict | None = None):
    """``a`` writes a folder of files, ``b`` reads it, ``c`` reads nothing of either."""

    def a():
        calls.append("a")
        (out / "a" / "sub").mkdir(parents=True, exist_ok=True)
        (out / "a" / "x.json").write_text('{"v": 0.5}')
        (out / "a" / "sub" / "weights.bin").write_bytes(b"\0" * 4096)
        (out / "a" / "run.lock").write_text("")
        return {}

    def b():
        calls.append("b")
        (out / "b").mkdir(exist_ok=True)
        (out / "b" / "y.txt").write_text((out / "a" / "x.json").read_text())
        return {}

    def c():
        calls.append("c")
        (out / "c").mkdir(exist_ok=True)
        return {}

    return [
        ("a", "a", a, dict(settings or {})),
        ("b", "b", b, {}, ("a",)),
        ("c", "c", c, {}, ()),
    ]


def _run(out, calls, **kw):
    calls.clear()
    return Pipeline(QuickstartOptions(out=out, progress=False), _chain(calls, out), **kw).run()


@pytest.mark.parametrize("change", ["delete", "same-size edit", "append", "delete folder"])
def test_a_changed_output_file_reruns_its_stage_in_a_clean_folder_and_its_readers(tmp_path, change):
    """Only the folder's existence was checked: with finetune/checkpoint-final deleted a rerun
    skipped every stage and printed `llavamed chat --model .../checkpoint-final` for a model
    that was gone; an edited world/ or corpus/ file was trained on as if unchanged."""
    import shutil

    calls: list[str] = []
    _run(tmp_path, calls)
    assert calls == ["a", "b", "c"]
    target = tmp_path / "a" / "x.json"
    if change == "delete":
        target.unlink()
    elif change == "same-size edit":
        time.sleep(0.01)
        target.write_text('{"v": 0.7}')
    elif change == "append":
        with open(target, "a") as fh:
            fh.write(" ")
    else:
        shutil.rmtree(tmp_path / "a" / "sub")
    (tmp_path / "a" / "left-over.txt").write_text("from the old output")
    res = _run(tmp_path, calls)
    assert calls == ["a", "b"], change
    assert [r.skipped for r in res] == [False, False, True]
    assert not (tmp_path / "a" / "left-over.txt").exists()  # started over in a clean folder
    assert target.read_text() == '{"v": 0.5}'
    _run(tmp_path, calls)
    assert calls == []


def test_unchanged_outputs_are_not_rerun_by_new_mtimes_added_files_or_lock_files(tmp_path):
    """`cp -r` (new mtimes, same bytes), a file saved beside the outputs (.DS_Store, notes) and
    a tool's lock file removed leave the finished stages finished."""
    import shutil

    calls: list[str] = []
    first = tmp_path / "first"
    first.mkdir()
    _run(first, calls)
    time.sleep(0.01)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, copy_function=shutil.copyfile)  # new mtimes
    (copy / "a" / ".DS_Store").write_text("finder")
    (copy / "a" / "run.lock").unlink()
    res = _run(copy, calls)
    assert calls == [] and all(r.skipped for r in res)
    # A state written before outputs were fingerprinted: trusted, and fingerprinted now.
    state = json.loads((copy / "quickstart_state.json").read_text())
    for rec in state["stages"].values():
        rec.pop("output", None)
    (copy / "quickstart_state.json").write_text(json.dumps(state))
    (copy / ".quickstart_outputs.json").unlink()
    assert all(r.skipped for r in _run(copy, calls))
    (copy / "a" / "x.json").unlink()
    _run(copy, calls)
    assert calls == ["a", "b"]


def test_a_file_stage_output_and_a_nested_stage_folder_belong_to_their_own_stages(tmp_path):
    """corpus/ holds ingest's output, align's corpus/alignment.json and self-instruct's
    corpus/instruct/: a change in one reruns its own stage, not the folder's other owners."""
    calls: list[str] = []
    corpus = tmp_path / "corpus"

    def stage(name, body):
        def run():
            calls.append(name)
            body()
            return {}

        return run

    def ingest():
        (corpus / "images").mkdir(parents=True, exist_ok=True)
        (corpus / "figures.jsonl").write_text("{}\n")

    def align():
        (corpus / "alignment.json").write_text("[]")

    def instruct():
        (corpus / "instruct").mkdir(exist_ok=True)
        (corpus / "instruct" / "instruct.json").write_text("[]")

    stages = [
        ("ingest", "corpus", stage("ingest", ingest), {}),
        ("align", "corpus/alignment.json", stage("align", align), {}),
        ("instruct", "corpus/instruct", stage("instruct", instruct), {}, ("ingest",)),
    ]
    opts = QuickstartOptions(out=tmp_path, progress=False)
    Pipeline(opts, stages).run()
    assert calls == ["ingest", "align", "instruct"]
    calls.clear()
    Pipeline(opts, stages).run()
    assert calls == []
    (corpus / "alignment.json").unlink()
    Pipeline(opts, stages).run()
    assert calls == ["align"]
    calls.clear()
    (corpus / "instruct" / "instruct.json").write_text("[1]")
    Pipeline(opts, stages).run()
    assert calls == ["instruct"]
    calls.clear()
    (corpus / "figures.jsonl").write_text("")
    Pipeline(opts, stages).run()
    assert calls == ["ingest", "align", "instruct"]


KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from llavamed.quickstart import Pipeline, QuickstartOptions

    out = Path(sys.argv[1])

    def slow():
        (out / "s").mkdir(exist_ok=True)
        print("running", flush=True)
        time.sleep(float(sys.argv[2]))
        return {}

    Pipeline(QuickstartOptions(out=out, progress=False), [("s", "s", slow, {})]).run()
    """
)


def test_time_spent_before_a_sigkill_counts_in_the_stage_wall_time(tmp_path):
    """Only an exception (Ctrl-C) recorded an interrupted attempt's seconds; after kill -9 (or
    the default SIGTERM of `kill` / `timeout`) the report showed the resumed attempt alone."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path), "60"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rec = json.loads((tmp_path / "quickstart_state.json").read_text())["stages"]["s"]
    assert 5 <= rec.get("resumed_after_s", 0) <= 20, rec
    assert rec["wall_s"] >= rec["resumed_after_s"]


def test_the_total_eta_leaves_out_stages_that_will_be_skipped(tmp_path, capsys):
    """With b's folder deleted, only b runs again (c reads nothing of it); the estimate added
    c's reference time anyway (for the small size: finetune's 35 min for a 30 s re-evaluation)."""
    import shutil

    calls: list[str] = []
    # a's reference is under 5 s: its 0 s here says nothing of the machine's speed.
    expected = {"a": 1, "b": 10, "c": 3000}
    _run(tmp_path, calls, expected_s=expected)
    capsys.readouterr()
    shutil.rmtree(tmp_path / "b")
    _run(tmp_path, calls, expected_s=expected)
    assert calls == ["b"]
    err = capsys.readouterr().err
    assert "[quickstart] b (2/3): about 10 s left in total" in err, err


def test_a_rerun_that_redoes_stages_removes_the_old_report_first(tmp_path):
    """A rerun killed after it emptied finetune/ left report.md presenting the old numbers and
    a `llavamed chat --model .../finetune/checkpoint-final` for a model no longer there."""
    calls: list[str] = []
    _run(tmp_path, calls)
    for name in ("report.md", "report.json", "loss.png"):
        (tmp_path / name).write_text("from the finished run")

    def killed():
        raise KeyboardInterrupt

    stages = _chain(calls, tmp_path, {"k": 2})
    stages[1] = ("b", "b", killed, {}, ("a",))
    with pytest.raises(KeyboardInterrupt):
        Pipeline(QuickstartOptions(out=tmp_path, progress=False), stages).run()
    assert not any((tmp_path / n).exists() for n in ("report.md", "report.json", "loss.png"))
    # Nothing to redo: the report stays.
    _run(tmp_path, calls)
    (tmp_path / "report.md").write_text("fresh")
    _run(tmp_path, calls)
    assert (tmp_path / "report.md").read_text() == "fresh"


def test_the_blank_image_column_shows_the_open_metrics_the_ablation_measured():
    from llavamed.quickstart.report import _headline, render_markdown

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


def test_a_reader_of_a_stage_redone_by_a_killed_run_is_not_skipped_on_its_old_record(tmp_path):
    """a's output changed, so a run redid a (its key unchanged) and was killed in b; c reads a
    too but had not started. The next run skipped a (finished) and so skipped c on its record
    from a's old output: a report mixing models trained on two different inputs."""

    def stages(calls, out, kill_b=False):
        chain = _chain(calls, out)

        def b():
            calls.append("b")
            (out / "b").mkdir(exist_ok=True)
            raise KeyboardInterrupt

        if kill_b:
            chain[1] = ("b", "b", b, {}, ("a",))
        chain[2] = ("c", "c", chain[2][2], {}, ("a",))
        return chain

    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    Pipeline(opts, stages(calls, tmp_path)).run()
    (tmp_path / "a" / "x.json").write_text('{"v": 0.9}')
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        Pipeline(opts, stages(calls, tmp_path, kill_b=True)).run()
    assert calls == ["a", "b"]
    (tmp_path / "c" / "old.txt").write_text("made from a's old output")
    calls.clear()
    res = Pipeline(opts, stages(calls, tmp_path)).run()
    assert calls == ["b", "c"] and res[0].skipped
    assert not (tmp_path / "c" / "old.txt").exists()


def test_the_eta_of_a_resumed_stage_counts_the_seconds_already_spent_on_it():
    from llavamed.quickstart import remaining_seconds

    ref = {"finetune": 2000, "eval": 30}
    # Killed after 1,800 s of fine-tuning: about 200 s of it are left, not 2,000.
    assert remaining_seconds(ref, [], ["finetune", "eval"], {"finetune": 1800}) == 230
    # A slower machine than the reference: never below a tenth of the stage, never negative.
    assert remaining_seconds(ref, [], ["finetune"], {"finetune": 5000}) == 200


@pytest.mark.parametrize("kind", ["file", "name too long", "under a file"])
def test_an_out_that_cannot_be_a_folder_is_a_clear_error(tmp_path, kind):
    """A name over the file system's limit ended in an OSError traceback."""
    from llavamed.errors import ConfigError
    from llavamed.quickstart import run_quickstart

    (tmp_path / "a-file").write_text("mine")
    out = {
        "file": tmp_path / "a-file",
        "name too long": tmp_path / ("a" * 300),
        "under a file": tmp_path / "a-file" / "out",
    }[kind]
    with pytest.raises(ConfigError, match="--out .*cannot use it as the output folder"):
        run_quickstart(QuickstartOptions(out=out, size="tiny", progress=False))
    assert (tmp_path / "a-file").read_text() == "mine"


def test_the_eta_credits_seconds_spent_on_a_resumed_stage_but_not_on_a_stale_one(tmp_path, capsys):
    calls: list[str] = []
    opts = QuickstartOptions(out=tmp_path, progress=False)
    expected = {"a": 1, "b": 60, "c": 1}  # a's 0 s say nothing of the speed (under 5 s)
    Pipeline(opts, _chain(calls, tmp_path), expected_s=expected).run()
    state_path = tmp_path / "quickstart_state.json"

    def interrupt_b():  # as a run killed 50 s into b leaves the state
        state = json.loads(state_path.read_text())
        state["stages"].pop("b")
        state["interrupted_s"] = {"b": 50}
        state_path.write_text(json.dumps(state))

    interrupt_b()
    capsys.readouterr()
    Pipeline(opts, _chain(calls, tmp_path), expected_s=expected).run()
    assert "[quickstart] b (2/3): about 10 s left in total" in capsys.readouterr().err
    interrupt_b()
    # a's settings changed: b starts over, and its 50 s are no head start.
    Pipeline(opts, _chain(calls, tmp_path, {"k": 2}), expected_s=expected).run()
    assert "[quickstart] a (1/3): about 61 s left in total" in capsys.readouterr().err


def test_the_evaluated_scope_is_not_a_subset_when_the_limit_exceeds_the_split():
    """The tiny world's test split has 19 English questions; its limit of 24 made the report
    claim "the first 24 English questions" of it."""
    from llavamed.quickstart.report import _eval_scope, _headline

    def scope(limit, n_loaded):
        return _eval_scope(_headline({"limit": limit, "load_report": {"n_loaded": n_loaded}}))

    assert scope(24, 19) == "the SLAKE-shaped English test split (19 questions)"
    assert (
        scope(400, 1061)
        == "the first 400 English questions (of 1061) of the SLAKE-shaped test split"
    )
    assert scope(None, 1061) == "the SLAKE-shaped English test split (1061 questions)"
    assert (
        _eval_scope({"limit": 400})
        == "the first 400 English questions of the SLAKE-shaped test split"
    )


def test_a_run_killed_before_it_reached_a_stage_leaves_that_stage_finished(tmp_path):
    """Only a stage that ran invalidates its readers: a run with other settings for c, killed
    in b before c started, must not cost c and d a redo when the old settings come back."""
    calls: list[str] = []

    def stage(name, kill=False):
        def run():
            calls.append(name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "out.txt").write_text(name)
            if kill:
                raise KeyboardInterrupt
            return {}

        return run

    def stages(c_settings, kill_b=False):
        return [
            ("a", "a", stage("a"), {}),
            ("b", "b", stage("b", kill_b), {}, ("a",)),
            ("c", "c", stage("c"), c_settings, ()),
            ("d", "d", stage("d"), {}, ("c",)),
        ]

    opts = QuickstartOptions(out=tmp_path, progress=False)
    Pipeline(opts, stages({"k": 1})).run()
    import shutil

    shutil.rmtree(tmp_path / "b")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        Pipeline(opts, stages({"k": 2}, kill_b=True)).run()
    assert calls == ["b"]
    calls.clear()
    Pipeline(opts, stages({"k": 1})).run()
    assert calls == ["b"]
