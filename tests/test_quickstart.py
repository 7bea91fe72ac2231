"""Quickstart: stage keys, skip-on-rerun, clean restart on changed settings, and (slow) the real
end-to-end tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from llavamed.quickstart import Pipeline, QuickstartOptions, render_markdown

ALL_STAGES = {
    "synth",
    "ingest",
    "align",
    "instruct",
    "stage0_pairs",
    "stage0_vision",
    "stage0b_vision_vqa",
    "stage1_alignment",
    "stage2_instruct",
    "eval_zero_shot",
    "finetune_vqa",
    "eval_finetuned",
}


def _stages(calls: list[str], out, settings_b: dict, fail_b: bool = False):
    def a():
        calls.append("a")
        (out / "a").mkdir(exist_ok=True)
        (out / "a" / "x.txt").write_text("a")
        return {"n": 1}

    def b():
        calls.append("b")
        (out / "b").mkdir(exist_ok=True)
        (out / "b" / "partial.txt").write_text("b")
        if fail_b:
            time.sleep(0.3)  # work the resumed run's wall time must still count
            raise KeyboardInterrupt  # a killed run
        return {"n": 2}

    return [("a", "a", a, {"k": 1}), ("b", "b", b, settings_b)]


def test_pipeline_skips_finished_and_resumes_interrupted(tmp_path):
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Pipeline(opts, _stages(calls, tmp_path, {"k": 1}, fail_b=True)).run()
    assert calls == ["a", "b"]
    state = json.loads((tmp_path / "quickstart_state.json").read_text())
    assert list(state["stages"]) == ["a"]  # b never finished

    calls.clear()
    res = Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    assert calls == ["b"]  # a skipped, b resumed in its folder (same key: partial kept)
    assert [r.skipped for r in res] == [True, False]
    # b's wall time counts the interrupted attempt too, and says so.
    assert 0.3 <= res[1].resumed_after_s <= res[1].wall_s
    again = Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    assert again[1].skipped and again[1].resumed_after_s == res[1].resumed_after_s

    calls.clear()
    res = Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    assert calls == [] and all(r.skipped for r in res)


def test_pipeline_changed_settings_rerun_downstream_in_clean_folder(tmp_path):
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    (tmp_path / "b" / "stale.txt").write_text("old")
    calls.clear()
    Pipeline(opts, _stages(calls, tmp_path, {"k": 2})).run()
    assert calls == ["b"]
    assert not (tmp_path / "b" / "stale.txt").exists()


def test_remaining_seconds_scales_reference_times_by_the_finished_stages():
    from llavamed.quickstart import remaining_seconds

    ref = {"synth": 20, "ingest": 1, "stage0": 60, "finetune": 900}
    # Nothing finished yet: the reference times as they are.
    assert remaining_seconds(ref, [], ["synth", "ingest", "stage0", "finetune"]) == 981
    # synth took 40 s against 20: this machine runs at half speed. ingest (1 s) is too short to
    # measure by and does not move the estimate.
    assert remaining_seconds(ref, [("synth", 40), ("ingest", 9)], ["stage0", "finetune"]) == 1920
    # Twice as fast over synth + stage0 together: (10 + 30) / (20 + 60) = 0.5.
    assert remaining_seconds(ref, [("synth", 10), ("stage0", 30)], ["finetune"]) == 450
    # The speed factor is clamped (a stage finishing instantly is not a 1000x machine).
    assert remaining_seconds(ref, [("synth", 0.001)], ["finetune"]) == 0.2 * 900
    # A stage without a reference time: no honest estimate.
    assert remaining_seconds(ref, [], ["finetune", "unknown"]) is None


def test_pipeline_prints_the_total_eta_before_each_stage(tmp_path, capsys):
    # --no-progress too: the stage lines are the run's log (on stderr, beside the bars).
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    Pipeline(opts, _stages(calls, tmp_path, {"k": 1}), expected_s={"a": 10, "b": 300}).run()
    err = capsys.readouterr().err
    assert "[quickstart] a (1/2): about 5 min left in total" in err
    # a finished at once: the speed factor is clamped at 0.2, so b's 300 s become ~60 s.
    assert "[quickstart] b (2/2): about 60 s left in total" in err
    assert "[quickstart] b: done in" in err
    # A rerun skips both stages and prints no estimate.
    Pipeline(opts, _stages(calls, tmp_path, {"k": 1}), expected_s={"a": 10, "b": 300}).run()
    assert "left in total" not in capsys.readouterr().err


def test_every_preset_has_a_reference_time_for_each_stage():
    from llavamed.quickstart import SIZES

    for name, preset in SIZES.items():
        assert set(preset.stage_seconds) == ALL_STAGES, name


def test_unknown_size():
    from llavamed.errors import ConfigError

    with pytest.raises(ConfigError, match="--size"):
        QuickstartOptions(size="huge").preset()


def test_a_stage_restarted_with_other_settings_is_not_vouched_for_by_its_old_record(tmp_path):
    # Run with A; start B (wipes the stage's folder) and kill it; back to A: the old "finished
    # with A" record must not skip a stage whose folder B's attempt wiped or half-rewrote.
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    Pipeline(opts, _stages(calls, tmp_path, {"k": "A"})).run()
    with pytest.raises(KeyboardInterrupt):
        Pipeline(opts, _stages(calls, tmp_path, {"k": "B"}, fail_b=True)).run()
    calls.clear()
    Pipeline(opts, _stages(calls, tmp_path, {"k": "A"})).run()
    assert calls == ["b"]


def test_a_deleted_stage_folder_reruns_the_stage_and_every_later_one(tmp_path):
    import shutil

    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    (tmp_path / "b" / "stale.txt").write_text("from the run that read a's old output")
    shutil.rmtree(tmp_path / "a")  # the user forces a redo
    calls.clear()
    res = Pipeline(opts, _stages(calls, tmp_path, {"k": 1})).run()
    # b read a's output: it starts over in a clean folder, although its own key is unchanged.
    assert calls == ["a", "b"] and [r.skipped for r in res] == [False, False]
    assert not (tmp_path / "b" / "stale.txt").exists()


def test_an_incomplete_stage_runs_again_and_a_stage_error_names_the_stage(tmp_path):
    from llavamed.errors import InputError
    from llavamed.quickstart import StageError

    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    outcome = {"incomplete": True}

    def a():
        calls.append("a")
        (tmp_path / "a").mkdir(exist_ok=True)
        return dict(outcome)

    def b():
        calls.append("b")
        raise InputError(tmp_path / "x.json", "file not found")

    stages = [("a", "a", a, {}), ("b", "b", b, {})]
    with pytest.raises(StageError) as err:
        Pipeline(opts, stages).run()
    msg = str(err.value)
    assert msg.startswith("quickstart stage b: ") and "x.json: file not found" in msg
    assert f"delete {tmp_path / 'b'}" in msg
    outcome.clear()  # e.g. self-instruct's failed requests succeed this time
    calls.clear()
    with pytest.raises(StageError):
        Pipeline(opts, stages).run()
    assert calls == ["a", "b"]  # a ran again: its last run was incomplete
    calls.clear()
    with pytest.raises(StageError):
        Pipeline(opts, stages).run()
    assert calls == ["b"]


def test_a_rerun_stage_redoes_only_the_stages_that_read_it(tmp_path):
    """Stages declare what they read. An incomplete self-instruct stage that runs again must not
    redo the vision stages listed after it, which read none of its output (they used to, on
    every invocation: the keys formed one chain in list order)."""
    opts = QuickstartOptions(out=tmp_path, progress=False)
    calls: list[str] = []
    outcome = {"incomplete": True}

    def stage(name, result=None):
        def run():
            calls.append(name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "out.txt").write_text(name)
            return dict(result or {})

        return run

    stages = [
        ("world", "world", stage("world"), {}),
        ("instruct", "instruct", stage("instruct", outcome), {}, ("world",)),
        ("tower", "tower", stage("tower"), {}, ("world",)),
        ("lm", "lm", stage("lm"), {}, ("instruct", "tower")),
    ]
    Pipeline(opts, stages).run()
    assert calls == ["world", "instruct", "tower", "lm"]
    calls.clear()
    Pipeline(opts, stages).run()  # instruct was incomplete: it and its reader run again
    assert calls == ["instruct", "lm"]
    outcome.clear()
    calls.clear()
    Pipeline(opts, stages).run()
    assert calls == ["instruct", "lm"]  # complete this time
    calls.clear()
    Pipeline(opts, stages).run()
    assert calls == []
    # a changed tower setting redoes the tower and what reads it, not self-instruct
    stages[2] = ("tower", "tower", stage("tower"), {"steps": 2}, ("world",))
    Pipeline(opts, stages).run()
    assert calls == ["tower", "lm"]
    with pytest.raises(ValueError, match="needs \\['later'\\]"):
        Pipeline(opts, [("a", "a", stage("a"), {}, ("later",)), ("later", "l", stage("l"), {})])


@pytest.mark.slow
def test_quickstart_tiny_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "qs"
    cmd = [
        sys.executable,
        "-m",
        "llavamed",
        "quickstart",
        "--size",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert first.returncode == 0, first.stderr[-4000:]
    # --no-progress silences the libraries' bars too (weight loading, GGUF conversion).
    assert "it/s]" not in first.stderr + first.stdout, first.stderr[-2000:]
    # The closing lines name the report and the commands to try the model.
    assert "report: " in first.stdout and "try one question: llavamed chat" in first.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").exists() and (out / "loss.png").exists()
    assert (out / "finetune" / "checkpoint-final" / "config.json").exists()
    ft = report["metrics"]["finetuned"]
    assert "strict_closed_acc" in ft and "ablation_blank" in ft
    assert set(report["stages"]) == ALL_STAGES
    instruct = report["stages"]["instruct"]
    assert instruct["kept"] >= 1 and instruct["failed"] == 0 and instruct["requests"] >= 1
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    report2 = json.loads((out / "report.json").read_text())
    assert all(s["skipped_this_run"] for s in report2["stages"].values())
    # A deleted output file reruns its stage and every stage that reads it, nothing else (align
    # writes one file into ingest's corpus/: it was not checked at all, and stage 1 skipped).
    (out / "corpus" / "alignment.json").unlink()
    fourth = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert fourth.returncode == 0, fourth.stderr[-4000:]
    assert "[corpus/alignment.json was deleted]" in fourth.stderr
    report4 = json.loads((out / "report.json").read_text())
    assert {n for n, s in report4["stages"].items() if not s["skipped_this_run"]} == {
        "align",
        "stage1_alignment",
        "stage2_instruct",
        "eval_zero_shot",
        "finetune_vqa",
        "eval_finetuned",
    }
    # A given tower replaces stage 0; stage 0b and the rest start from it.
    tower = out / "stage0" / "vision_tower"
    out3 = tmp_path / "qs_given"
    cmd3 = cmd[:-3] + ["--out", str(out3), "--no-progress", "--vision", str(tower)]
    third = subprocess.run(cmd3, capture_output=True, text=True, timeout=3600)
    assert third.returncode == 0, third.stderr[-4000:]
    report3 = json.loads((out3 / "report.json").read_text())
    assert "stage0_vision" not in report3["stages"] and not (out3 / "stage0").exists()
    assert "stage0_pairs" not in report3["stages"] and not (out3 / "stage0_pairs").exists()
    assert report3["vision"] == str(tower) and "stage0b_vision_vqa" in report3["stages"]
    s0b = json.loads((out3 / "stage0b" / "vision_vqa_report.json").read_text())
    assert s0b["config"]["vision"] == str(tower)
    assert "stage 0 was skipped" in (out3 / "report.md").read_text()


def test_report_flags_a_model_that_answers_closed_questions_without_yes_or_no():
    stat = lambda m: {"mean": m, "lo": m, "hi": m, "n": 10}  # noqa: E731
    report = {
        "size": "small",
        "seed": 0,
        "metrics": {
            "zero_shot": {"strict_closed_acc": stat(0.0), "closed_unparsed": stat(0.9)},
            "finetuned": {
                "strict_closed_acc": stat(0.7),
                "closed_unparsed": stat(0.0),
                "ablation_blank": {"strict_closed_acc": stat(0.5), "closed_unparsed": stat(0.1)},
                "ablation_blank_drop": {
                    "strict_closed_acc": {"mean": 0.2, "lo": 0.1, "hi": 0.3, "n": 10}
                },
                "limit": 400,
            },
        },
        "stages": {
            "align": {"wall_s": 0, "resumed_after_s": 0.0, "skipped_this_run": False, "samples": 9}
        },
        "wall_time_s_all_stages": 0,
        "data": {},
        "try_it": {},
    }
    md = render_markdown(report)
    assert (
        "| closed answers with no yes/no (counted wrong by the strict parse) | 90.0 [90.0, 90.0] | 0.0 [0.0, 0.0] | 10.0 [10.0, 10.0] |"
        in md
    )
    assert "The zero-shot model answered 90.0% of closed questions without a yes or no" in md
    assert "The fine-tuned model answered" not in md
    # The paired drop with its own interval, and the evaluated subset named as one.
    assert "paired per question: **20.0 [10.0, 30.0] points**" in md
    assert "the first 400 English questions of the SLAKE-shaped test split" in md
    assert '- align: `{"samples": 9}`' in md  # bookkeeping fields are not data


def test_vision_option_rejects_a_folder_without_a_tower(tmp_path):
    from llavamed.errors import ConfigError

    (tmp_path / "notatower").mkdir()
    with pytest.raises(ConfigError, match="notatower.*no config.json"):
        QuickstartOptions(vision=tmp_path / "notatower").check_vision()
    assert QuickstartOptions().check_vision() is None
    # A tower inside --out would be deleted with its stage folder when that stage starts over.
    from llavamed.quickstart import run_quickstart

    tower = tmp_path / "out" / "stage0b" / "vision_tower"
    tower.mkdir(parents=True)
    (tower / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="inside --out"):
        run_quickstart(QuickstartOptions(out=tmp_path / "out", vision=tower, progress=False))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stage0b"]


def test_tower_fingerprint_follows_the_weights_not_the_path(tmp_path):
    from llavamed.model.vision_tower import tower_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "clip_vision_model"}')
        (d / "model.safetensors").write_bytes(b"weights-1")
    (a / "notes.txt").write_text("ignored")
    assert tower_fingerprint(a) == tower_fingerprint(b)
    (b / "model.safetensors").write_bytes(b"weights-2")
    assert tower_fingerprint(a) != tower_fingerprint(b)


def test_try_it_picks_the_test_image_the_final_eval_asked_most_about(tmp_path):
    """The report's "Try the model" starts from a held-out image and its evaluated questions,
    shows this run's answers beside the references, and quotes paths and questions so the
    commands paste into a shell."""
    import shlex

    from PIL import Image

    from llavamed.quickstart.report import _try_it

    out = tmp_path / "quick start"  # a space the commands must quote
    slake = out / "world" / "slake"
    for name in ("a", "b"):
        (slake / "imgs" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(slake / "imgs" / name / "source.jpg")
    rows = [  # (qid, image, question, answer)
        ("1", "a", "Is there a lesion?", "yes"),
        ("2", "b", "Is this an MRI?", "no"),
        ("3", "b", 'Is the "ring" enhancing?', "no"),
        ("4", "b", "How large is the lesion?", "3 cm"),  # not asked by the eval (its --limit)
        ("5", "b", "病变在哪里？", "左"),  # another language
    ]
    (slake / "test.json").write_text(
        json.dumps(
            [
                {
                    "qid": q,
                    "img_name": f"{img}/source.jpg",
                    "question": text,
                    "answer": ans,
                    "q_lang": "zh" if q == "5" else "en",
                    "answer_type": "CLOSED" if ans in ("yes", "no") else "OPEN",
                }
                for q, img, text, ans in rows
            ]
        )
    )
    scores = out / "eval" / "finetuned" / "scores.jsonl"
    scores.parent.mkdir(parents=True)
    preds = {"1": "yes", "2": "no", "3": "yes", "5": "左"}
    scores.write_text(
        "".join(json.dumps({"qid": q, "prediction": p}) + "\n" for q, p in preds.items())
        + "{truncated\n"
    )

    got = _try_it(out)
    image = str(slake / "imgs" / "b" / "source.jpg")
    assert got["image"] == image
    assert got["questions"] == [
        {"question": "Is this an MRI?", "answer": "no", "model_answer": "no"},
        {"question": 'Is the "ring" enhancing?', "answer": "no", "model_answer": "yes"},
    ]
    one = shlex.split(got["commands"]["one question"])
    assert one[one.index("--image") + 1] == image
    assert one[one.index("--prompt") + 1] == "Is this an MRI?"
    assert one[-2:] == ["--temperature", "0"]
    assert shlex.split(got["commands"]["serve"])[3] == str(out / "finetune" / "checkpoint-final")

    report = {
        "size": "small",
        "seed": 0,
        "metrics": {},
        "stages": {},
        "wall_time_s_all_stages": 0,
        "data": {},
        "try_it": got,
    }
    md = render_markdown(report)
    assert '| Is the "ring" enhancing? | no | yes |' in md
    assert "first 8 layers of SmolLM2" in md

    # Before any evaluation (or with no world), the commands still come, without an image.
    bare = _try_it(tmp_path / "empty")
    assert bare["image"] is None and bare["questions"] == []
    assert "--image" not in bare["commands"]["chat"] and "one question" not in bare["commands"]


def test_a_second_quickstart_on_the_same_output_is_refused(tmp_path):
    from llavamed.errors import LlavamedError
    from llavamed.quickstart import run_quickstart

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from llavamed.utils.io import exclusive_lock\n"
            f"with exclusive_lock({str(out / '.quickstart.lock')!r}, 'x'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LlavamedError, match="another `llavamed quickstart` run"):
            run_quickstart(QuickstartOptions(out=out, size="tiny", progress=False))
        assert not (out / "quickstart_state.json").exists()  # nothing ran
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_of_other_files_is_refused_as_out_and_nothing_is_deleted(tmp_path):
    """A fresh run always runs synth, which made every later stage "stale" and emptied its
    folder: a user's own corpus/ in --out was deleted."""
    from llavamed.errors import ConfigError
    from llavamed.quickstart import run_quickstart

    out = tmp_path / "mine"
    (out / "corpus").mkdir(parents=True)
    (out / "corpus" / "thesis.txt").write_text("precious")
    with pytest.raises(ConfigError, match=r"not empty \(corpus\).*no quickstart output"):
        run_quickstart(QuickstartOptions(out=out, size="tiny", progress=False))
    assert (out / "corpus" / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]


def test_a_state_file_of_the_wrong_shape_is_a_clear_error(tmp_path):
    from llavamed.errors import ConfigError

    for bad in ("[]", '{"stages": []}', "{}"):
        (tmp_path / "quickstart_state.json").write_text(bad)
        with pytest.raises(ConfigError, match="not a quickstart state file"):
            Pipeline(QuickstartOptions(out=tmp_path, progress=False), [])


def test_a_moved_output_folder_keeps_its_finished_stages(tmp_path):
    # Stage settings hold paths inside --out; keyed verbatim, `mv quickstart_out elsewhere`
    # retrained everything from stage 1 (over an hour) although nothing had changed.
    def stages(out, calls):
        def a():
            calls.append("a")
            (out / "a").mkdir(exist_ok=True)
            return {}

        return [("a", "a", a, {"data": str(out / "corpus" / "alignment.json")})]

    calls: list[str] = []
    first = tmp_path / "first"
    first.mkdir()
    Pipeline(QuickstartOptions(out=first, progress=False), stages(first, calls)).run()
    moved = tmp_path / "moved"
    first.rename(moved)
    res = Pipeline(QuickstartOptions(out=moved, progress=False), stages(moved, calls)).run()
    assert calls == ["a"] and res[0].skipped
    # A path outside --out is still part of the key.
    other = [("a", "a", lambda: {}, {"data": str(tmp_path / "elsewhere.json")})]
    assert not Pipeline(QuickstartOptions(out=moved, progress=False), other).run()[0].skipped


def test_small_fine_tunes_compiled_and_eager_where_no_cpp_compiler_is_found(
    tmp_path, monkeypatch, capsys
):
    """The README's one command must run on a machine without g++: there fine-tuning runs its
    layers eager, says so, and keys the stage apart from a compiled fine-tuning. Tiny (the
    smoke size) never compiles: a cold compile would cost it more than it saves."""
    from llavamed.quickstart.presets import SIZES
    from llavamed.quickstart.run import QuickstartStages
    from llavamed.train import compile_layers

    def finetune(size):
        stages = QuickstartStages(QuickstartOptions(out=tmp_path, size=size), SIZES[size], tmp_path)
        stage = next(s for s in stages.table() if s.name == "finetune_vqa")
        return stages.cfgs["finetune"]["train"].get("compile"), stage.settings

    compiled, compiled_key = finetune("small")
    assert compiled is True and finetune("tiny")[0] is None
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(compile_layers.shutil, "which", lambda name: None)
    eager, eager_key = finetune("small")
    assert eager is False and eager_key != compiled_key
    assert "no C++ compiler (g++, c++ or clang++) on PATH" in capsys.readouterr().err


def test_deterministic_sends_self_instruct_requests_one_at_a_time_and_keys_them_apart(
    tmp_path, monkeypatch
):
    """Eight concurrent requests are batched by the local server as they arrive, and in bf16
    the sampled conversations then differ from run to run (10, 7 and 11 of 12 kept in three
    runs; two one-at-a-time runs were byte-identical). --deterministic sends them one at a
    time; its self-instruct (and so stage 2 onwards) is keyed apart from the default's, whose
    key is the one older folders hold."""
    from llavamed.data.instruct import runner
    from llavamed.quickstart.presets import SIZES
    from llavamed.quickstart.run import QuickstartStages
    from llavamed.serve import api

    sent = []

    class Server:
        base_url = "http://127.0.0.1:9/v1"

        def stop(self):
            pass

    monkeypatch.setattr(api, "serve_in_background", lambda *a, **k: Server())
    monkeypatch.setattr(
        runner,
        "run_instruct",
        lambda o: (
            sent.append(o.client.concurrency)
            or (
                {
                    "out": "x",
                    "totals": {"kept": 1, "dropped": 0},
                    "pending_after_failures": 0,
                    "this_run": {"http_requests": 1, "cache_hits": 0},
                },
                0,
            )
        ),
    )
    keys = {}
    for deterministic in (False, True):
        opts = QuickstartOptions(out=tmp_path, size="tiny", deterministic=deterministic)
        stages = QuickstartStages(opts, SIZES["tiny"], tmp_path)
        stages.instruct()
        keys[deterministic] = next(s for s in stages.table() if s.name == "instruct").settings
    assert sent == [8, 1]
    assert keys[False] == {"n": 6, "seed": 0, "image_paths": "relative"}  # the older key
    assert keys[True] == keys[False] | {"concurrency": 1}
