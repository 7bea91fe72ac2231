"""Quickstart audit (2): a moved output folder's report, advice for a lost or damaged state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llavamed.quickstart import Pipeline, QuickstartOptions, Stage, build_report


def test_a_moved_output_folder_reports_its_own_paths_not_the_old_folders(tmp_path):
    """Stage info (stage 0's tower, each checkpoint) was kept with absolute paths: after
    `mv quickstart_out elsewhere` the skipped stages' lines in report.md and report.json named
    the old folder's checkpoints, gone once it was deleted."""

    def stages(out):
        def a():
            (out / "a").mkdir(exist_ok=True)
            (out / "a" / "tower.bin").write_bytes(b"w")
            return {"tower": str(out / "a" / "tower.bin"), "outside": "/elsewhere/x"}

        return [("stage0_vision", "a", a, {})]

    first = tmp_path / "first run"
    first.mkdir()
    opts = QuickstartOptions(out=first, size="tiny", progress=False)
    res = Pipeline(opts, stages(first)).run()
    assert res[0].info["tower"] == str(first / "a" / "tower.bin")
    moved = tmp_path / "moved"
    first.rename(moved)
    opts = QuickstartOptions(out=moved, size="tiny", progress=False)
    res = Pipeline(opts, stages(moved)).run()
    assert res[0].skipped
    assert res[0].info == {"tower": str(moved / "a" / "tower.bin"), "outside": "/elsewhere/x"}
    build_report(opts, res, 1.0)
    report = json.loads((moved / "report.json").read_text())
    assert report["stages"]["stage0_vision"]["tower"] == str(moved / "a" / "tower.bin")
    md = (moved / "report.md").read_text()
    assert str(moved / "a" / "tower.bin") in md and "first run" not in md


@pytest.mark.parametrize("damage", ["wrong shape", "cut short", "deleted"])
def test_a_lost_or_damaged_state_file_gives_advice_that_works(tmp_path, damage):
    """A damaged state said 'delete it to start over'; with it deleted, the next run refused the
    folder as 'no quickstart output, give a new or empty folder'. Every message now says to
    delete the folder, and doing so starts over."""
    import shutil

    from llavamed.errors import ConfigError
    from llavamed.quickstart import STATE_FILE, run_quickstart

    out = tmp_path / "out"
    out.mkdir()

    def a():
        (out / "a").mkdir(exist_ok=True)
        return {}

    Pipeline(QuickstartOptions(out=out, progress=False), [("a", "a", a, {})]).run()
    state = out / STATE_FILE
    if damage == "wrong shape":
        state.write_text("[]")
    elif damage == "cut short":
        state.write_text('{"stages": {')
    else:
        state.unlink()
    opts = QuickstartOptions(out=out, size="tiny", progress=False)
    with pytest.raises(ConfigError) as err:
        run_quickstart(opts)
    assert f"delete the output folder {out}" in str(err.value) or (
        "delete the folder to start over" in str(err.value)
    ), err.value
    assert (out / "a").is_dir()  # nothing was deleted
    state.unlink(missing_ok=True)  # what the old message said to do: refused, and now says so
    with pytest.raises(ConfigError, match="delete the folder to start over"):
        run_quickstart(opts)
    shutil.rmtree(out)  # what the messages say: a fresh start
    out.mkdir()
    Pipeline(QuickstartOptions(out=out, progress=False), [("a", "a", a, {})]).run()
    assert (out / STATE_FILE).exists()


def test_a_stage_interrupted_before_the_folder_moved_starts_over_instead_of_failing(
    tmp_path, capsys
):
    """`llavamed train` keeps its config (absolute paths under --out) beside its checkpoints and
    refuses to resume under another: killed in fine-tuning, then `mv quickstart_out elsewhere`,
    the next run failed with 'finetune: holds a run with a different config (data.sources.0.path,
    ..., model.from)'. The interrupted stage now starts over; finished stages stay finished."""
    from llavamed.errors import InputError

    calls: list[str] = []

    def stages(out, kill=False):
        def a():
            calls.append("a")
            (out / "a").mkdir(exist_ok=True)
            (out / "a" / "x").write_text("x")
            return {}

        def train():  # as the trainer: resumes only under the config it started with
            calls.append("train")
            cfg = {"data": str(out / "a" / "x"), "output_dir": str(out / "t")}
            saved = out / "t" / "config.json"
            if saved.exists() and json.loads(saved.read_text()) != cfg:
                raise InputError(out / "t", "holds a run with a different config")
            (out / "t").mkdir(exist_ok=True)
            saved.write_text(json.dumps(cfg))
            if kill:
                raise KeyboardInterrupt
            (out / "t" / "checkpoint-final").write_text("w")
            return {}

        return [("a", "a", a, {}), ("train", "t", train, {"data": str(out / "a" / "x")})]

    first = tmp_path / "first"
    first.mkdir()
    with pytest.raises(KeyboardInterrupt):
        Pipeline(QuickstartOptions(out=first, progress=False), stages(first, kill=True)).run()
    assert calls == ["a", "train"]
    moved = tmp_path / "moved"
    first.rename(moved)
    calls.clear()
    capsys.readouterr()
    res = Pipeline(QuickstartOptions(out=moved, progress=False), stages(moved)).run()
    assert calls == ["train"] and res[0].skipped and not res[1].skipped
    assert "the output folder moved since the stage was interrupted" in capsys.readouterr().err
    assert (moved / "t" / "checkpoint-final").exists()
    calls.clear()
    assert all(r.skipped for r in Pipeline(QuickstartOptions(out=moved), stages(moved)).run())
    assert calls == []


def test_a_tilde_in_out_and_vision_is_the_home_folder(tmp_path, monkeypatch):
    """No shell expands the ~ of `--out=~/qs` or `--vision=~/tower`: --vision was refused as
    'not a vision tower folder' and --out made a folder named ~ in the current one."""
    import shutil

    from llavamed.errors import ConfigError
    from llavamed.quickstart import run_quickstart

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "tower").mkdir(parents=True)
    (home / "tower" / "config.json").write_text("{}")
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    opts = QuickstartOptions(out=Path("~/qs"), size="tiny", vision=Path("~/tower"))
    assert opts.check_vision() == home / "tower"
    # The home folder's qs/ is the one used: its (deliberately damaged) state is what is read.
    (home / "qs").mkdir()
    (home / "qs" / "quickstart_state.json").write_text("[]")
    # A folder literally named ~ here, damaged too, so that a wrong pick fails fast.
    (cwd / "~" / "qs").mkdir(parents=True)
    (cwd / "~" / "qs" / "quickstart_state.json").write_text("[]")
    shutil.rmtree(home / "tower")
    with pytest.raises(ConfigError, match="not a quickstart state file") as err:
        run_quickstart(QuickstartOptions(out=Path("~/qs"), size="tiny", progress=False))
    assert str(home / "qs" / "quickstart_state.json") in str(err.value), err.value


def test_a_vision_folder_that_is_no_tower_is_refused_before_any_stage_runs(tmp_path):
    """A LLaVA checkpoint (config.json, model_type llava) passed the --vision check and failed at
    stage 0b, after synth, ingestion and self-instruct, saying to delete stage0b/."""
    from llavamed.errors import ConfigError
    from llavamed.quickstart import run_quickstart

    ckpt = tmp_path / "checkpoint-final"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    out = tmp_path / "out"
    opts = QuickstartOptions(out=out, size="tiny", progress=False, vision=ckpt)
    with pytest.raises(ConfigError, match=r"--vision .*unsupported vision tower"):
        run_quickstart(opts)
    assert not out.exists()


def test_a_model_answer_with_a_line_break_stays_in_its_table_row():
    from llavamed.quickstart import render_markdown

    q = {"question": "Is there a mass?", "answer": "yes", "model_answer": "yes\nIt is | big"}
    report = {
        "size": "tiny",
        "seed": 0,
        "metrics": {},
        "stages": {},
        "wall_time_s_all_stages": 0,
        "data": {},
        "try_it": {"commands": {}, "questions": [q]},
    }
    md = render_markdown(report)
    assert "| Is there a mass? | yes | yes It is \\| big |\n" in md


def test_a_resumed_runs_eta_is_scaled_by_the_stages_earlier_runs_timed(tmp_path, capsys):
    """Only stages this run ran measured the machine: killed in fine-tuning on a machine twice
    as slow as the reference, the resumed run estimated fine-tuning at the reference time,
    though its state held every earlier stage's time on this machine."""
    import shutil

    calls: list[str] = []

    def stages():
        def stage(name):
            def run():
                calls.append(name)
                (tmp_path / name).mkdir(exist_ok=True)
                return {}

            return run

        return [(n, n, stage(n), {}) for n in ("a", "b", "c")]

    opts = QuickstartOptions(out=tmp_path, progress=False)
    expected = {"a": 100, "b": 200, "c": 1000}
    Pipeline(opts, stages(), expected_s=expected).run()
    state_path = tmp_path / "quickstart_state.json"
    state = json.loads(state_path.read_text())
    state["stages"]["a"]["wall_s"] = 200.0  # this machine: twice the reference time
    state["stages"]["b"]["wall_s"] = 400.0
    state_path.write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "c")
    capsys.readouterr()
    Pipeline(opts, stages(), expected_s=expected).run()
    assert "[quickstart] c (3/3): about 33 min left in total" in capsys.readouterr().err


def test_a_moved_output_folder_reports_its_own_self_instruct_files(tmp_path):
    """report.json's data.instruct is self-instruct's own report, which names the instruct.json
    it wrote: after `mv`, the report still named the old folder's file."""
    first = tmp_path / "first run"
    (first / "corpus" / "instruct").mkdir(parents=True)
    tool_report = {
        "out": str(first / "corpus" / "instruct" / "instruct.json"),
        "input": str(first / "corpus" / "figures.jsonl"),
        "prompts": "/elsewhere/system_prompt.txt",
        "totals": {"kept": 3},
    }
    (first / "corpus" / "instruct" / "instruct_report.json").write_text(json.dumps(tool_report))
    moved = tmp_path / "moved"
    first.rename(moved)
    build_report(QuickstartOptions(out=moved, size="tiny", progress=False), [], 1.0)
    data = json.loads((moved / "report.json").read_text())["data"]["instruct"]
    assert data == tool_report | {
        "out": str(moved / "corpus" / "instruct" / "instruct.json"),
        "input": str(moved / "corpus" / "figures.jsonl"),
    }


def test_a_stage0_cut_by_its_safety_cap_is_said_in_the_report(tmp_path):
    """On a machine far busier than expected, stage 0's 30-minute cap stopped it at 859 of 900
    steps (seen on a CPU shared with a test suite and six agents): the tower, and every score
    after it, then differ from the documented run, and nothing said so."""
    from llavamed.quickstart import stage0_cap_note

    note = stage0_cap_note(859, {"time_budget_min": 30.0, "max_steps": 900})
    assert "30-minute safety cap after 859 of 900 steps" in note

    def stages(out):
        def stage0():
            (out / "stage0").mkdir(exist_ok=True)
            return {"tower": str(out / "stage0"), "stopped_early": note}

        return [("stage0_vision", "stage0", stage0, {})]

    opts = QuickstartOptions(out=tmp_path / "q", size="tiny", progress=False)
    (tmp_path / "q").mkdir()
    build_report(opts, Pipeline(opts, stages(tmp_path / "q")).run(), 1.0)
    md = (tmp_path / "q" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| stage0_vision |"))
    assert "safety cap after 859 of 900 steps" in row and "idle machine" in row


def test_a_retry_that_changes_nothing_its_readers_read_keeps_them_finished(tmp_path):
    """A self-instruct whose local server keeps failing the same figures is incomplete on every
    run, so every run retries it; when the conversations file comes out unchanged, stage 2 and
    everything after it (35 minutes of `small`) used to run again all the same."""
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    instruct_run = {"incomplete": True, "conversations": "c1", "kill": False}

    def stage(name):
        def run():
            calls.append(name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "out.txt").write_text(name)
            return {}

        return run

    def instruct():
        calls.append("instruct")
        folder = tmp_path / "instruct"
        folder.mkdir(exist_ok=True)
        # its report changes on every run, as self-instruct's (this run's failures, timings)
        (folder / "report.json").write_text(json.dumps({"run": len(calls)}))
        if instruct_run["kill"]:
            raise KeyboardInterrupt
        (folder / "instruct.json").write_text(instruct_run["conversations"])
        return {"incomplete": instruct_run["incomplete"]}

    stages = [
        ("world", "world", stage("world"), {}),
        Stage("instruct", "instruct", instruct, {}, ("world",), product="instruct/instruct.json"),
        ("tower", "tower", stage("tower"), {}, ("world",)),
        ("lm", "lm", stage("lm"), {}, ("instruct", "tower")),
        ("ev", "ev", stage("ev"), {}, ("lm",)),
    ]

    def run():
        calls.clear()
        return Pipeline(opts, stages).run()

    run()
    assert calls == ["world", "instruct", "tower", "lm", "ev"]
    results = run()  # retried, failed again: the conversations are what lm trained on
    assert calls == ["instruct"]
    assert [r.name for r in results if not r.skipped] == ["instruct"]
    state = json.loads((tmp_path / "quickstart_state.json").read_text())
    assert {"lm", "ev"} <= set(state["stages"])
    run()  # and the kept records vouch for the next run too
    assert calls == ["instruct"]

    (tmp_path / "lm" / "out.txt").write_text("edited")  # a kept reader is still checked
    run()
    assert calls == ["instruct", "lm", "ev"]

    instruct_run["kill"] = True  # killed mid-retry: its readers cannot be vouched for
    with pytest.raises(KeyboardInterrupt):
        run()
    instruct_run["kill"] = False
    run()
    assert calls == ["instruct", "lm", "ev"]

    instruct_run.update(incomplete=False, conversations="c2")  # a retried figure got through
    run()
    assert calls == ["instruct", "lm", "ev"]
    run()
    assert calls == []
