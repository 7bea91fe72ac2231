"""Evaluation audit: bad input in the real dataset formats, resume edge cases and report
rendering, each found by feeding the real code and pinned here (real files, tiny models)."""

from __future__ import annotations

import json
import pickle

import pytest
from PIL import Image

from llavamed.data.vqa import load_vqa


def _png(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, format="PNG")


# A base64 image pasted where its file name belongs: longer than a file name may be, so
# Path.is_file() raises ENAMETOOLONG instead of answering False.
_LONG_NAME = "iVBORw0KGgo" + "A" * 300 + ".jpg"


@pytest.mark.parametrize("dataset", ["vqa-rad", "slake", "llava-med", "pathvqa"])
def test_an_image_name_over_the_file_system_limit_is_one_bad_record(tmp_path, dataset):
    """It crashed the whole load with 'OSError: [Errno 36] File name too long'."""
    if dataset == "vqa-rad":
        _png(tmp_path / "VQA_RAD Image Folder" / "a.jpg")
        rec = {"qid": 1, "image_name": "a.jpg", "question": "Is it?", "answer": "yes",
               "answer_type": "CLOSED", "phrase_type": "test_freeform"}  # fmt: skip
        recs = [rec, {**rec, "qid": 2, "image_name": _LONG_NAME}]
        (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
        data = tmp_path
    elif dataset == "slake":
        _png(tmp_path / "imgs" / "xmlab1" / "source.jpg")
        rec = {"qid": 1, "img_name": "xmlab1/source.jpg", "question": "Is it?", "answer": "Yes",
               "q_lang": "en", "answer_type": "CLOSED"}  # fmt: skip
        recs = [rec, {**rec, "qid": 2, "img_name": _LONG_NAME}]
        (tmp_path / "test.json").write_text(json.dumps(recs))
        data = tmp_path
    elif dataset == "llava-med":
        _png(tmp_path / "images" / "a.jpg")
        conv = [{"from": "human", "value": "Is it?\n<image>"}, {"from": "gpt", "value": "yes"}]
        rec = {"id": 1, "image": "a.jpg", "answer_type": "CLOSED", "conversations": conv}
        recs = [rec, {**rec, "id": 2, "image": _LONG_NAME}]
        (tmp_path / "test.json").write_text(json.dumps(recs))
        data = tmp_path / "test.json"
    else:
        _png(tmp_path / "pvqa" / "images" / "test" / "test_0001.jpg")
        rec = {"image": "test_0001", "question": "Is it?", "answer": "yes"}
        pkl = tmp_path / "pvqa" / "qas" / "test" / "test_qa.pkl"
        pkl.parent.mkdir(parents=True)
        pkl.write_bytes(pickle.dumps([rec, {**rec, "image": _LONG_NAME}], protocol=2))
        data = tmp_path / "pvqa"
    samples, report = load_vqa(dataset, data)
    assert len(samples) == 1
    assert report.bad == {"missing image": 1}
    assert report.examples[0].split(": ")[0].endswith("[1]")  # names the file and the record
    assert "File name too long" in report.examples[0]


def _rad_folder(tmp_path, n=4):
    """A VQA-RAD folder in the public release's shape: n test questions about 2 images."""
    from llavamed.utils.io import atomic_write_json

    root = tmp_path / "vqa_rad"
    for i in range(2):
        _png(root / "VQA_RAD Image Folder" / f"i{i}.jpg")
    recs = [
        {"qid": i, "image_name": f"i{i % 2}.jpg", "question": f"Question {i}?",
         "answer": "yes" if i % 2 == 0 else "liver", "answer_type": "CLOSED" if i % 2 == 0
         else "OPEN", "question_type": "PRES", "phrase_type": "test_freeform"}
        for i in range(n)
    ]  # fmt: skip
    atomic_write_json(root / "VQA_RAD Dataset Public.json", recs)
    return root


def test_a_resumed_run_never_scores_an_answer_its_file_loses(wide_llava_dir, tmp_path):
    """A run killed between a record's closing brace and its newline leaves a last line that
    parses. It was read as answered, then cut off the file when the resumed run appended: the
    report scored 4 answers while answers.jsonl held 3 (and the next run answered it again)."""
    from llavamed.eval.vqa_runner import run_vqa_eval
    from llavamed.utils.io import iter_jsonl

    samples, _ = load_vqa("vqa-rad", _rad_folder(tmp_path))
    kw = dict(max_new_tokens=3, n_resamples=10, progress=False)
    whole = run_vqa_eval(wide_llava_dir, samples, tmp_path / "whole", **kw)
    run_vqa_eval(wide_llava_dir, samples, tmp_path / "run", limit=3, **kw)
    answers = tmp_path / "run" / "answers.jsonl"
    answers.write_bytes(answers.read_bytes()[:-1])  # killed just before the last newline
    res = run_vqa_eval(wide_llava_dir, samples, tmp_path / "run", **kw)
    on_disk = {r["question_id"]: r["text"] for r in iter_jsonl(answers)}
    assert len(on_disk) == res["metrics"]["n_answered"] == 4
    assert res["generation"]["image"]["n_generated"] == 2  # the cut answer was answered again
    assert res["metrics"]["overall"] == whole["metrics"]["overall"]
    assert len(set(on_disk.values())) > 1  # answers differ: the comparison can fail
    assert (tmp_path / "run" / "scores.jsonl").read_bytes() == (
        tmp_path / "whole" / "scores.jsonl"
    ).read_bytes()
    again = run_vqa_eval(wide_llava_dir, samples, tmp_path / "run", **kw)
    assert again["generation"]["image"]["n_generated"] == 0


def test_answers_in_another_dtype_are_not_resumed(tiny_llava_dir, tmp_path):
    """bf16's greedy answers are not fp32's: a bf16 run resumed without --dtype mixed the two in
    one answers file and scored the mix under one name (the dtype was not even recorded)."""
    import torch

    from llavamed.errors import InputError
    from llavamed.eval.answer import answer_questions
    from llavamed.eval.vqa_runner import run_vqa_eval
    from llavamed.utils.io import iter_jsonl

    samples, _ = load_vqa("vqa-rad", _rad_folder(tmp_path))
    kw = dict(max_new_tokens=2, n_resamples=10, progress=False)
    run_vqa_eval(tiny_llava_dir, samples, tmp_path / "run", limit=2, dtype=torch.bfloat16, **kw)
    assert {r["metadata"]["dtype"] for r in iter_jsonl(tmp_path / "run" / "answers.jsonl")} == {
        "bfloat16"
    }
    with pytest.raises(InputError, match="dtype='bfloat16' there, 'float32' now"):
        run_vqa_eval(tiny_llava_dir, samples, tmp_path / "run", dtype=torch.float32, **kw)
    # the same dtype resumes
    res = run_vqa_eval(tiny_llava_dir, samples, tmp_path / "run", dtype=torch.bfloat16, **kw)
    assert res["generation"]["image"]["n_resumed"] == 2

    # eval answer: the same rule for a qa50-shaped file
    q = tmp_path / "qa50.jsonl"
    q.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "i0.jpg", "text": f"Q{i}?\n<image>"}) + "\n"
            for i in range(2)
        )
    )
    images = tmp_path / "vqa_rad" / "VQA_RAD Image Folder"
    out = tmp_path / "a.jsonl"
    answer_questions(tiny_llava_dir, q, images, out, max_new_tokens=2, limit=1,
                     dtype=torch.bfloat16, progress=False)  # fmt: skip
    assert next(iter_jsonl(out))["metadata"]["dtype"] == "bfloat16"
    with pytest.raises(InputError, match="dtype='bfloat16' there, 'float32' now"):
        answer_questions(tiny_llava_dir, q, images, out, max_new_tokens=2, progress=False)


def _slake_zh_folder(tmp_path, n=4):
    """A SLAKE folder whose test split holds n Chinese questions about 2 images."""
    from llavamed.utils.io import atomic_write_json

    root = tmp_path / "slake"
    for i in range(2):
        _png(root / "imgs" / f"xmlab{i}" / "source.jpg")
    recs = [
        {"qid": i, "img_name": f"xmlab{i % 2}/source.jpg", "question": f"这是什么器官 {i}?",
         "answer": "肝脏", "q_lang": "zh", "answer_type": "OPEN", "content_type": "Organ"}
        for i in range(n)
    ]  # fmt: skip
    atomic_write_json(root / "test.json", recs)
    return root


@pytest.mark.parametrize("shard", [None, "0/2"])
def test_a_kill_inside_a_multibyte_character_still_resumes(wide_llava_dir, tmp_path, shard):
    """A SIGKILL mid-line can stop inside a UTF-8 character (a Chinese prompt, a µm in an answer).
    Resuming then failed for good with 'answers.jsonl: not UTF-8 text', and a merge run could not
    read the killed shard's file either (it never repairs files it does not write)."""
    from llavamed.eval.vqa_runner import answers_path, parse_shard, read_answers, run_vqa_eval

    samples, _ = load_vqa("slake", _slake_zh_folder(tmp_path), lang="zh")
    kw = dict(max_new_tokens=3, n_resamples=10, progress=False)
    run_vqa_eval(wide_llava_dir, samples, tmp_path / "whole", **kw)
    run_vqa_eval(wide_llava_dir, samples, tmp_path / "run", shard=shard, **kw)
    torn = answers_path(tmp_path / "run", "image", parse_shard(shard))
    data = torn.read_bytes()
    torn.write_bytes(data[: data.rfind("器".encode()) + 1])  # 1 of the character's 3 bytes
    res = run_vqa_eval(wide_llava_dir, samples, tmp_path / "run", **kw)  # resume, or merge
    assert res["metrics"]["n_answered"] == 4
    assert res["generation"]["image"]["n_generated"] == (1 if shard is None else 3)
    assert (tmp_path / "run" / "scores.jsonl").read_bytes() == (
        tmp_path / "whole" / "scores.jsonl"
    ).read_bytes()
    assert set(read_answers(tmp_path / "run", "image")) == {"0", "1", "2", "3"}


def test_closed_logits_eval_intervals_resample_images_whole(tiny_llava_dir, tmp_path):
    """benchmarks/closed_logits_eval.py gave a Wilson interval, as if every question were an
    independent draw; questions about one image are not. Its interval is now the report's image
    bootstrap: with every question about one image, resampling images can only draw that image,
    so the interval is the accuracy itself (Wilson's was about ±30 points wide here)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from llavamed.utils.io import atomic_write_json

    root = tmp_path / "slake"
    _png(root / "imgs" / "xmlab0" / "source.jpg")
    recs = [
        {"qid": i, "img_name": "xmlab0/source.jpg", "question": f"Is there a lesion {i}?",
         "answer": "yes" if i % 2 else "no", "q_lang": "en", "answer_type": "CLOSED"}
        for i in range(8)
    ]  # fmt: skip
    atomic_write_json(root / "test.json", recs)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "closed_logits_eval.py"),
         "--test", f"slake={root}", str(tiny_llava_dir)],
        capture_output=True, text=True, timeout=300, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc, lo, hi, n = re.search(
        r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \((\d+)\) \|", proc.stdout
    ).groups()
    assert n == "8" and acc == lo == hi, proc.stdout
