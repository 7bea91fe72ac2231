"""Bad input, found by an audit of every command: each case gets one line naming the file and
the reason (no traceback), a non-zero exit where nothing could be done, counting and skipping
where a batch can go on, and no user file lost or empty output left behind."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from llavamed.cli import main
from llavamed.errors import InputError


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("llavamed: error: "), err
    for n in needles:
        assert n in last, last
    return last


def test_an_existing_file_is_never_replaced_by_a_checkpoint_folder(tmp_path, capsys):
    victim = tmp_path / "notes.jsonl"
    victim.write_text('{"keep": "me"}\n')
    assert main(["model", "init", "--out", str(victim), "--lm", "tiny", "--vision", "tiny"]) == 1
    _one_line_error(capsys, str(victim), "exists and is not a folder")
    assert victim.read_text() == '{"keep": "me"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.jsonl"]  # no .old, no temp


def test_a_folder_of_the_users_is_never_replaced_by_a_checkpoint(tmp_path, capsys):
    mine = tmp_path / "mydocs"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    assert main(["model", "init", "--out", str(mine), "--lm", "tiny", "--vision", "tiny"]) == 1
    _one_line_error(capsys, str(mine), "exists and holds something else")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    # An earlier checkpoint is ours to replace.
    ck = tmp_path / "ck"
    for _ in range(2):
        assert main(["model", "init", "--out", str(ck), "--lm", "tiny", "--vision", "tiny"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mydocs"]


def test_a_killed_writers_temp_folder_is_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from llavamed.utils.io import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    orphan, live = tmp_path / ".ck.orphan1", tmp_path / ".ck.live1"
    host = socket.gethostname()
    elsewhere = tmp_path / ".ck.elsewhere1"  # a writer on another machine of a shared filesystem
    for d, owner in (
        (orphan, f"{host} {dead}"),
        (live, f"{host} {os.getpid()}"),
        (elsewhere, f"other-node-{host} {dead}"),
    ):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
        (d / ".llavamed-writer-pid").write_text(owner)
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "x").write_text("1")
    assert not orphan.exists() and live.exists() and elsewhere.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["x"]
    # mkdtemp makes 0700 folders; an output folder gets what mkdir would give (shared clusters).
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate_weights", "corrupt weights file"),
        ("empty_weights", "corrupt weights file"),
        ("remove_weights", "unreadable model"),
        ("truncate_tokenizer", "unreadable model"),
        # transformers fell back to defaults without a word: the stop ids were lost
        ("truncate_generation_config", "unreadable generation config"),
    ],
)
def test_a_damaged_checkpoint_is_a_one_line_error(tiny_llava_dir, tmp_path, capsys, damage, reason):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_llava_dir, ck)
    weights, tok = ck / "model.safetensors", ck / "tokenizer.json"
    if damage == "truncate_generation_config":
        gen = ck / "generation_config.json"
        gen.write_text(gen.read_text()[:20])
    elif damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty_weights":
        weights.write_bytes(b"")
    elif damage == "remove_weights":
        weights.unlink()
    else:
        tok.write_text(tok.read_text()[:2000])
    assert main(["chat", "--model", str(ck), "--prompt", "hi"]) == 1
    _one_line_error(capsys, str(ck), reason)


def test_serve_reports_a_busy_port_before_loading_any_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The model path does not exist: the port is checked first, so the port is what fails.
        assert main(["serve", "--model", "/no/such/model", "--port", str(port)]) == 1
    _one_line_error(capsys, f"--port {port}", "cannot listen")
    # A port no socket can have is a usage error, refused as the command line is read (it was
    # found at bind time, after the same checks as a busy one).
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--model", "/no/such/model", "--port", "99999"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: llavamed serve [-h]"), err
    assert err[-1] == "llavamed serve: error: argument --port: 99999 must be in 0 .. 65535", err


def test_non_utf8_inputs_name_the_file(tmp_path, capsys):
    bad = tmp_path / "figures.jsonl"
    bad.write_bytes(b'\xff\xfe{"a": 1}\n')
    assert main(["data", "align", "--figures", str(bad), "--out", str(tmp_path / "a.json")]) == 1
    _one_line_error(capsys, str(bad), "not UTF-8 text")
    yml = tmp_path / "c.yaml"
    yml.write_bytes(b"\xff: 1\n")
    assert main(["train", str(yml)]) == 1
    _one_line_error(capsys, str(yml), "not UTF-8 text")


def test_a_path_of_the_wrong_kind_is_a_one_line_error(tmp_path, capsys):
    figs = tmp_path / "figures.jsonl"
    figs.write_text("")
    assert main(["data", "align", "--figures", str(tmp_path), "--out", str(tmp_path / "a.json")])
    _one_line_error(capsys, str(tmp_path))
    assert main(["data", "domains", "--in", str(figs), "--out", str(tmp_path)]) == 1
    _one_line_error(capsys, str(tmp_path))


def test_a_wrongly_typed_optional_field_does_not_stop_a_batch(tmp_path):
    from llavamed.data.domains import label_record
    from llavamed.data.figures import mention_sentences, primary_domain

    rec = {"pair_id": "p", "fig_caption": "Chest x-ray with a pleural effusion.", "image": "x"}
    assert mention_sentences({**rec, "in_text_mention": 5}) == []
    assert mention_sentences({**rec, "in_text_mention": [{"tokens": " a\n b "}, 3]}) == ["a b"]
    assert label_record({**rec, "in_text_mention": 5})["domain"]["chest_xray"] is True
    assert primary_domain("x") == "other"  # type: ignore[arg-type]


def test_eval_answer_counts_and_skips_bad_lines_with_their_file_line_numbers(tmp_path):
    from llavamed.eval.answer import load_questions
    from llavamed.utils.io import iter_jsonl_numbered

    q = tmp_path / "q.jsonl"
    q.write_text(
        '{"question_id": 1, "image": "a.png", "text": "What is shown?\\n<image>"}\n'
        "\n"
        "{truncated\n"
        "[1, 2]\n"
        '{"question_id": 2, "image": "a.png", "text": 123}\n'
        '{"question_id": 3, "image": "a.png", "text": "Any lesion?"}\n'
    )
    good, bad = load_questions(q)
    assert [g["question_id"] for g in good] == [1, 3]
    assert bad == {"invalid JSON line": 1, "JSON line is not an object": 1, "missing field text": 1}
    seen: list[InputError] = []
    numbered = list(iter_jsonl_numbered(q, on_bad=seen.append))
    assert [n for n, _ in numbered] == [1, 5, 6]  # the file's own line numbers
    assert [e.source for e in seen] == [f"{q}:3", f"{q}:4"]
    with pytest.raises(InputError, match=r"q\.jsonl:3: invalid JSON line"):
        list(iter_jsonl_numbered(q))


def test_the_judge_counts_and_skips_bad_records(tmp_path):
    from llavamed.eval.judge import JudgeOptions, load_pairs
    from llavamed.llm.client import ClientOptions

    qs, ans = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qs.write_text(
        '{"question_id": 1, "gpt4_answer": "A"}\n{"question_id": 2}\nnot json\n'
        '{"question_id": 3, "gpt4_answer": "C"}\n'
    )
    ans.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 3}\n')
    opts = JudgeOptions(qs, ans, tmp_path / "o.jsonl", ClientOptions("http://127.0.0.1:9/v1", "m"))
    pairs, issues = load_pairs(opts)
    assert [q["question_id"] for q, _ in pairs] == [1]
    assert issues == {"bad_question_record": 2, "bad_answer_record": 1, "missing_answer": 1}


def test_eval_rejects_a_negative_limit_and_a_missing_image_folder(tmp_path, capsys, tiny_llava_dir):
    with pytest.raises(SystemExit):
        main(["eval", "vqa", "--model", "m", "--dataset", "slake", "--data", "d", "--limit", "-1"])
    assert "--limit: -1 must be >= 1" in capsys.readouterr().err
    # numpy's generators take no negative seed: refused before any work, not after it
    for cmd in (["eval", "vqa", "--model", "m", "--dataset", "slake", "--data", "d"], ["synth"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--out", str(tmp_path / "o"), "--seed", "-1"])
        assert "--seed: -1 must be in 0 .. 2**32-1" in capsys.readouterr().err
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "image": "a.png", "text": "Q?"}\n')
    out = tmp_path / "answers.jsonl"
    args = ["eval", "answer", "--questions", str(q), "--out", str(out)]
    # The questions file and the image folder are checked before --model is resolved (a typo
    # there is not hidden behind a wrong --model); both are fine here, so the model folder that
    # is no checkpoint is what is named.
    assert main([*args, "--model", "m", "--images", str(tmp_path)]) == 1
    _one_line_error(capsys, "m", "not a checkpoint folder")
    assert main([*args, "--model", str(tiny_llava_dir), "--images", str(tmp_path / "nope")]) == 1
    _one_line_error(capsys, "nope", "image folder not found")
    assert not out.exists()  # no empty answers file that would look finished


def test_eval_vqa_fails_when_no_question_could_be_answered(tiny_llava_dir, tmp_path, capsys):
    data = tmp_path / "slake"
    (data / "imgs" / "a").mkdir(parents=True)
    (data / "imgs" / "a" / "source.jpg").write_bytes(b"not a jpeg")
    rec = {"qid": 1, "img_name": "a/source.jpg", "question": "Is it?", "answer": "yes"}
    (data / "test.json").write_text(json.dumps([{**rec, "answer_type": "CLOSED"}]))
    args = ["eval", "vqa", "--model", str(tiny_llava_dir), "--dataset", "slake"]
    assert main([*args, "--data", str(data), "--out", str(tmp_path / "ev")]) == 1
    err = capsys.readouterr().err
    assert "skipped questions: 1 not an image" in err
    assert err.strip().splitlines()[-1].startswith("llavamed: error: ")
    assert "no question could be answered" in err


def test_convert_names_a_malformed_source_config(tmp_path, capsys):
    src = tmp_path / "llava-med"
    src.mkdir()
    (src / "config.json").write_text("{cut")
    assert main(["convert", "llava-med", str(src), str(tmp_path / "out")]) == 1
    _one_line_error(capsys, str(src / "config.json"), "invalid JSON")
    assert not (tmp_path / "out").exists()


def test_convert_biomedclip_names_the_source_it_rejects(tiny_llava_dir, tmp_path, capsys):
    weights = tiny_llava_dir / "model.safetensors"  # real weights, but not an open_clip model
    assert main(["convert", "biomedclip", str(weights), str(tmp_path / "out")]) == 1
    _one_line_error(capsys, str(weights), "not an open_clip timm-trunk checkpoint")
    notes = tmp_path / "notes.bin"
    notes.write_bytes(b"plain text, not a pickle")
    assert main(["convert", "biomedclip", str(notes), str(tmp_path / "out")]) == 1
    last = _one_line_error(capsys, str(notes), "unreadable weights file")
    assert "weights_only" not in last


def test_ingest_of_a_folder_without_packages_fails(tmp_path, capsys):
    (tmp_path / "downloads" / "notes").mkdir(parents=True)
    (tmp_path / "downloads" / "notes" / "readme.txt").write_text("not an article")
    out = tmp_path / "corpus"
    assert main(["data", "ingest", str(tmp_path / "downloads"), "--out", str(out)]) == 1
    _one_line_error(capsys, str(tmp_path / "downloads"), "no PMC packages found")
    assert not out.exists()


def test_instruct_writes_no_output_when_every_request_failed(tmp_path, capsys):
    from openai_stub_server import StubServer

    figs, out = tmp_path / "figures.jsonl", tmp_path / "instruct.json"
    figs.write_text(
        json.dumps({"pair_id": "PMC1_F1", "fig_caption": "Chest x-ray.", "image": "a.jpg"}) + "\n"
    )
    argv = ["data", "instruct", "--figures", str(figs), "--out", str(out), "--model", "m"]
    with StubServer(default="503") as srv:
        argv += ["--base-url", srv.base_url, "--max-retries", "0", "--no-progress"]
        assert main(argv) == 3
        captured = capsys.readouterr()
        assert "nothing finished, so no" in captured.out and "http_503" in captured.err
        assert not out.exists()
        report = json.loads((tmp_path / "instruct_report.json").read_text())
        assert report["out"] is None and report["pending_after_failures"] == 1
        srv.default = "ok"  # the server recovers: the same command now writes OUT
        assert main(argv) == 0
        assert len(json.loads(out.read_text())) == 1


def _instruct_argv(tmp_path, n: int):
    figs, out = tmp_path / "figures.jsonl", tmp_path / "instruct.json"
    recs = [
        {"pair_id": f"PMC{i}_F1", "fig_caption": "Chest x-ray.", "image": "a.jpg"} for i in range(n)
    ]
    figs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["data", "instruct", "--figures", str(figs), "--out", str(out), "--model", "m"]
    return argv + ["--max-retries", "0", "--no-progress", "--cache", "none"], out


def test_instruct_fails_when_the_server_rejected_every_request(tmp_path, capsys):
    """A 4xx on every request (a proxy's 400, a 422 for a parameter the server does not take)
    is the server's or the command's fault, not the figures': no empty OUT and no exit 0, and
    once the server is fixed the same command asks every figure again."""
    from openai_stub_server import StubServer

    argv, out = _instruct_argv(tmp_path, 3)
    with StubServer(default="422") as srv:
        argv += ["--base-url", srv.base_url]
        assert main(argv) == 1
        _one_line_error(capsys, "all 3 requests", "http_422", "stub 422")
        assert not out.exists() and srv.count == 3
        report = json.loads((tmp_path / "instruct_report.json").read_text())
        assert report["out"] is None and report["rejected_this_run"] == {"http_422": 3}
        srv.default = "ok"
        assert main(argv) == 0 and srv.count == 6
        assert len(json.loads(out.read_text())) == 3


def test_instruct_stops_at_once_on_a_base_url_without_http(tmp_path, capsys):
    """httpx cannot send to "127.0.0.1:8000/v1": that used to be a connection error, retried
    for every figure."""
    from openai_stub_server import StubServer

    argv, out = _instruct_argv(tmp_path, 3)
    with StubServer() as srv:
        url = f"127.0.0.1:{srv.port}/v1"
        assert main([*argv, "--base-url", url]) == 1
        _one_line_error(capsys, f"{url}/chat/completions", "missing an 'http://'")
        assert srv.count == 0 and not out.exists()


def test_a_jsonl_line_torn_inside_a_multibyte_character_is_one_bad_line(tmp_path):
    """A writer killed inside a Chinese character left a last line that is not UTF-8: every
    reader of the file then failed with 'not UTF-8 text' for the whole file, on every re-run."""
    from llavamed.utils.io import JsonlAppender, iter_jsonl, iter_jsonl_numbered

    path = tmp_path / "log.jsonl"
    whole = '{"q": "肺部有异常吗？"}\n'.encode()
    path.write_bytes(whole + whole[:8])  # cut after the first byte of 肺
    assert list(iter_jsonl(path, skip_bad=True)) == [{"q": "肺部有异常吗？"}]
    bad = []
    assert [n for n, _ in iter_jsonl_numbered(path, on_bad=bad.append)] == [1]
    assert [(e.source, e.reason) for e in bad] == [(f"{path}:2", "not UTF-8 text")]
    with pytest.raises(InputError, match=r"log\.jsonl:2: not UTF-8 text"):
        list(iter_jsonl(path))
    JsonlAppender(path).append({"q": "ok"})  # the appender's repair cuts the torn line
    assert [r["q"] for r in iter_jsonl(path)] == ["肺部有异常吗？", "ok"]


def test_a_byte_order_mark_at_the_start_of_a_json_or_jsonl_file_is_read_past(tmp_path, capsys):
    """Windows tools (Notepad, PowerShell's Out-File, Excel exports) start UTF-8 files with a BOM:
    a VQA-RAD JSON or a figures.jsonl saved by one was refused as 'Unexpected UTF-8 BOM'. A BOM
    anywhere but the file's start is still a bad line."""
    from llavamed.utils.io import iter_jsonl, iter_jsonl_numbered, read_json

    bom = b"\xef\xbb\xbf"
    js = tmp_path / "vqa_rad.json"
    js.write_bytes(bom + json.dumps([{"qid": 1, "question": "Is it normal?"}]).encode())
    assert read_json(js) == [{"qid": 1, "question": "Is it normal?"}]
    jl = tmp_path / "figures.jsonl"
    jl.write_bytes(bom + b'{"pair_id": "a"}\n' + bom + b'{"pair_id": "b"}\n{"pair_id": "c"}\n')
    bad = []
    assert [r["pair_id"] for _, r in iter_jsonl_numbered(jl, on_bad=bad.append)] == ["a", "c"]
    assert [(e.source, e.reason) for e in bad] == [(f"{jl}:2", "invalid JSON line")]
    # Through a command: align reads a BOM-started figures.jsonl.
    figs = tmp_path / "f.jsonl"
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    rec = {"pair_id": "a", "fig_caption": "Axial CT.", "image": "a.jpg"}
    figs.write_bytes(bom + json.dumps(rec).encode() + b"\n")
    assert list(iter_jsonl(figs)) == [rec]
    out = tmp_path / "alignment.json"
    assert main(["data", "align", "--figures", str(figs), "--out", str(out)]) == 0
    assert len(read_json(out)) == 1


def test_quickstart_refuses_a_worker_count_below_one(tmp_path, capsys):
    """`llavamed quickstart --workers -1` started a real run (MedSynth then failed or ran in
    an unexpected mode) instead of a usage error."""
    for bad in ("-1", "0"):
        with pytest.raises(SystemExit) as exc:
            main(["quickstart", "--out", str(tmp_path / "q"), "--workers", bad])
        assert exc.value.code == 2
        assert f"--workers: {bad} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
