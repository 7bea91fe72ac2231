"""``eval answer`` on a qa50-shaped file, and the ``eval vqa`` command end to end, with the tiny
random checkpoint."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eval_fixtures import qa50, vqa_rad
from llavamed.cli import main
from llavamed.errors import InputError
from llavamed.eval.answer import answer_questions, load_questions
from llavamed.utils.io import iter_jsonl


def test_load_questions_counts_bad_records(tmp_path):
    q, _ = qa50(tmp_path)
    good, bad = load_questions(q)
    assert [g["question_id"] for g in good] == [1, 2, 3]
    assert good[0]["question"] == "What is shown?"
    assert bad == {
        "duplicate question_id": 1,
        "missing field question_id": 1,
        "missing field text": 1,
    }


def test_answer_questions_resumes(tiny_llava_dir, tmp_path):
    q, img = qa50(tmp_path)
    out = tmp_path / "answers.jsonl"
    r = answer_questions(tiny_llava_dir, q, img, out, max_new_tokens=4, progress=False)
    assert r["n_generated"] == 2 and r["skipped"] == {"file not found": 1}
    recs = list(iter_jsonl(out))
    assert sorted(x["question_id"] for x in recs) == [1, 2]  # ids keep their JSON type
    assert set(recs[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    r2 = answer_questions(tiny_llava_dir, q, img, out, max_new_tokens=4, progress=False)
    assert r2["n_generated"] == 0 and r2["n_resumed"] == 2
    assert len(list(iter_jsonl(out))) == 2
    # Another length limit (or another model) must not count the old answers as its own.
    with pytest.raises(InputError, match="answers written with different settings"):
        answer_questions(tiny_llava_dir, q, img, out, max_new_tokens=8, progress=False)
    # A wrong image folder answers nothing: an error, not an empty file and exit code 0.
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(InputError, match="no question could be answered.*file not found"):
        answer_questions(
            tiny_llava_dir, q, tmp_path / "elsewhere", tmp_path / "b.jsonl", progress=False
        )


def test_answer_backends_agree_and_cli_flag(wide_llava_dir, tmp_path, capsys):
    """The engine (continuous batching, image prefix shared by questions 1 and 2) writes the same
    answers as static HF generate batches; the CLI passes --backend through."""
    from llavamed.cli import main

    q, img = qa50(tmp_path)
    texts = {}
    for backend in ("engine", "generate"):
        out = tmp_path / f"{backend}.jsonl"
        argv = ["eval", "answer", "--model", str(wide_llava_dir), "--questions", str(q)]
        argv += ["--images", str(img), "--out", str(out), "--max-new-tokens", "5"]
        assert main(argv + ["--backend", backend, "--batch-size", "2"]) == 0
        texts[backend] = {r["question_id"]: r["text"] for r in iter_jsonl(out)}
    assert texts["engine"] == texts["generate"] and len(texts["engine"]) == 2
    assert len(set(texts["engine"].values())) == 2  # different questions, different answers
    assert capsys.readouterr().err.count("skipped: 1 file not found") == 2


def test_eval_vqa_cli_end_to_end(tiny_llava_dir, tmp_path, capsys):
    data = vqa_rad(tmp_path)
    out = tmp_path / "run"
    argv = [
        "eval",
        "vqa",
        "--model",
        str(tiny_llava_dir),
        "--dataset",
        "vqa-rad",
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--batch-size",
        "4",
        "--bootstrap",
        "50",
        "--ablate",
        "noise",
        "--closed-suffix",
    ]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["n_samples"] == 6 and rep["metrics"]["n_answered"] == 6
    assert rep["load_report"]["bad"] == {"missing image": 1}
    assert "noise" in rep["ablations"]
    assert len(list(iter_jsonl(out / "answers.jsonl"))) == 6
    assert (out / "report.png").exists() and "LLaVA-Med metric" in (out / "report.md").read_text()
    err = capsys.readouterr()
    assert "6 samples loaded" in err.err and "report:" in err.out
    # shard runs write their own files; a bad shard spec is a clean error
    assert (
        main(
            [
                "eval",
                "vqa",
                "--model",
                str(tiny_llava_dir),
                "--dataset",
                "vqa-rad",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "s"),
                "--shard",
                "5/2",
            ]
        )
        == 1
    )


@pytest.mark.parametrize("argv_tail", [["--dataset", "slake"], ["--dataset", "pathvqa"]])
def test_eval_vqa_cli_bad_data(tmp_path, argv_tail, capsys):
    assert (
        main(
            ["eval", "vqa", "--model", str(tmp_path), "--data", str(tmp_path / "none"), *argv_tail]
        )
        == 1
    )
    assert "file not found" in capsys.readouterr().err


def test_answers_to_another_questions_file_are_not_resumed(tiny_llava_dir, tmp_path):
    """A second qa50-shaped file numbers its questions alike: answering it into the same --out
    resumed every id with the first file's answers ('0 answered, 2 already done'), and
    ``eval judge`` then judged them as answers to the new questions."""
    q, img = qa50(tmp_path)
    out = tmp_path / "answers.jsonl"
    answer_questions(tiny_llava_dir, q, img, out, max_new_tokens=4, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(
        json.dumps({"question_id": 1, "image": "a.jpg", "text": "Where is the lesion?"}) + "\n"
    )
    with pytest.raises(InputError, match=r"other questions \(question_id 1\).*question"):
        answer_questions(tiny_llava_dir, other, img, out, max_new_tokens=4, progress=False)
    # Same question text about another image (qa50's generic 'Describe it.') is refused too.
    Image.new("RGB", (20, 20), (10, 90, 30)).save(img / "b.jpg")
    moved = tmp_path / "moved.jsonl"
    moved.write_text(
        json.dumps({"question_id": 2, "image": "b.jpg", "text": "Describe it."}) + "\n"
    )
    with pytest.raises(InputError, match=r"other questions \(question_id 2\).*image 'a.jpg'"):
        answer_questions(tiny_llava_dir, moved, img, out, max_new_tokens=4, progress=False)
    # The same file resumes as before, and the file is untouched by the refusals.
    before = out.read_bytes()
    r = answer_questions(tiny_llava_dir, q, img, out, max_new_tokens=4, progress=False)
    assert r["n_generated"] == 0 and r["n_resumed"] == 2 and out.read_bytes() == before
