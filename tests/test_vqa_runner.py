"""VQA runner: pure scoring, ablation images, sharding/resume of answers files, and a real run
with the tiny random LLaVA checkpoint."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from llavamed.data.vqa import VQASample
from llavamed.errors import InputError
from llavamed.eval import vqa_runner as R
from llavamed.eval.report import write_report
from llavamed.utils.io import iter_jsonl


def _img(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def _samples(n=6):
    out = []
    for i in range(n):
        closed = i % 2 == 0
        out.append(
            VQASample(
                qid=f"q{i}",
                image=_img((40 * i, 10, 10)),
                question=f"Question {i}?",
                answer=("yes" if i % 4 == 0 else "no") if closed else f"organ{i}",
                answer_type="closed" if closed else "open",
                question_type="PRES" if closed else "ORGAN",
            )
        )
    return out


def test_evaluate_answers_hand_computed():
    s = _samples(4)  # q0 closed yes, q1 open organ1, q2 closed no, q3 open organ3
    preds = {"q0": "Yes, it is.", "q1": "organ1 left", "q2": "The lung is normal"}
    ev = R.evaluate_answers(s, preds, n_resamples=100)
    assert ev["n_missing"] == 1 and ev["n_answered"] == 3
    ov = ev["overall"]
    assert ov["llava_med_closed_acc"]["mean"] == 1.0  # "no" found inside "normal"
    assert ov["strict_closed_acc"]["mean"] == 0.5  # strict parse rejects it
    assert ov["closed_unparsed"]["mean"] == 0.5
    assert ov["llava_med_open_recall"]["mean"] == 1.0 and ov["llava_med_open_recall"]["n"] == 1
    assert ov["open_exact_match"]["mean"] == 0.0
    assert set(ev["by_question_type"]) == {"PRES", "ORGAN"}
    # answers records work as well as a dict
    recs = [{"question_id": k, "text": v} for k, v in preds.items()]
    assert R.evaluate_answers(s, recs, n_resamples=100)["overall"] == ov
    # a record without text is a missing answer, not an empty (wrong) one
    ev2 = R.evaluate_answers(s, [*recs, {"question_id": "q3"}], n_resamples=100)
    assert ev2["n_missing"] == 1 and ev2["overall"] == ov


def test_ablation_drop_is_paired():
    s = _samples(4)
    clean = R.evaluate_answers(s, {"q0": "yes", "q1": "organ1", "q2": "no", "q3": "organ3"})
    abl = R.evaluate_answers(s, {"q0": "no", "q1": "liver", "q2": "no", "q3": "organ3"})
    drop = R.ablation_drop(clean, abl, n_resamples=200)
    assert drop["llava_med_closed_acc"]["mean"] == 0.5
    assert drop["open_exact_match"]["mean"] == 0.5


def test_ablation_images_and_shuffle_map():
    img = Image.new("RGB", (5, 3), (9, 9, 9))
    b = R.blank_image(img)
    assert b.size == (5, 3) and b.getextrema() == ((0, 0), (0, 0), (0, 0))
    n1, n2 = R.noise_image(img, 1), R.noise_image(img, 1)
    assert n1.tobytes() == n2.tobytes() and n1.tobytes() != R.noise_image(img, 2).tobytes()
    s = _samples(6)
    s.append(VQASample("q6", s[0].image, "again?", "yes", "closed"))  # shares q0's image
    mp = R.shuffle_map(s, seed=0)
    assert len(mp) == 6
    for x in s:
        assert mp[x.image_key] != x.image  # a derangement: never the same image
    assert sorted(mp.values()) == sorted({x.image_key: x.image for x in s}.values())
    assert mp == R.shuffle_map(s, seed=0)


def test_select_and_shard_parse():
    s = _samples(6)
    assert [x.qid for x in R.select(s, limit=4, shard=(1, 2))] == ["q1", "q3"]
    assert R.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(InputError, match="bad --shard"):
            R.parse_shard(bad)


class FakeGen:
    """Stands in for the model in resume/shard bookkeeping tests: answers from the image colour."""

    max_new_tokens = 8
    model_id = "fake"
    model_fingerprint = "0123"

    def __init__(self):
        self.calls = 0

    def generate(self, images, questions):
        self.calls += 1
        return [f"red{im.getpixel((0, 0))[0]} {q}" for im, q in zip(images, questions, strict=True)]


def test_generate_answers_resume_shards_and_settings(tmp_path):
    s = _samples(6)
    opts = R.RunOptions(batch_size=2)
    g = FakeGen()
    r0 = R.generate_answers(
        g, R.select(s, shard=(0, 2)), tmp_path, options=opts, shard=(0, 2), progress=False
    )
    assert r0["n_generated"] == 3 and (tmp_path / "answers.shard0-of-2.jsonl").exists()
    # unsharded run picks the shard's answers up and generates only the rest
    r = R.generate_answers(g, s, tmp_path, options=opts, progress=False)
    assert r["n_resumed"] == 3 and r["n_generated"] == 3 and len(r["answers"]) == 6
    again = R.generate_answers(g, s, tmp_path, options=opts, progress=False)
    assert again["n_generated"] == 0
    lines = list(iter_jsonl(tmp_path / "answers.jsonl"))
    assert len(lines) == 3
    rec = lines[0]
    assert set(rec) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    # a torn final line (SIGKILL mid-write) is cut and the question re-answered
    with open(tmp_path / "answers.jsonl", "a") as fh:
        fh.write('{"question_id": "zz", "te')
    R.generate_answers(g, s, tmp_path, options=opts, progress=False)
    assert len(list(iter_jsonl(tmp_path / "answers.jsonl"))) == 3
    # closed suffix changes prompts -> refuse to mix with old answers
    with pytest.raises(InputError, match="different settings"):
        R.generate_answers(g, s, tmp_path, options=R.RunOptions(closed_suffix=True), progress=False)


def test_answers_of_another_model_or_seed_are_never_resumed(tmp_path):
    s = _samples(4)
    g = FakeGen()
    R.generate_answers(g, s, tmp_path, progress=False)
    other = FakeGen()
    other.model_fingerprint = "4567"  # another checkpoint-final, same name
    with pytest.raises(InputError, match="model='0123' there, '4567' now"):
        R.generate_answers(other, s + _samples(6)[4:], tmp_path, progress=False)
    # Shard files are separate runs: a later record's settings are checked too.
    shard = tmp_path / "answers.shard1-of-2.jsonl"
    rec = next(iter_jsonl(tmp_path / "answers.jsonl"))
    rec = rec | {"question_id": "q9", "metadata": rec["metadata"] | {"closed_suffix": True}}
    shard.write_text(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match="closed_suffix=True there"):
        R.generate_answers(g, s, tmp_path, progress=False)
    shard.unlink()
    # Noise images depend on the seed.
    R.generate_answers(g, s, tmp_path, "noise", options=R.RunOptions(seed=1), progress=False)
    with pytest.raises(InputError, match="seed=1 there, 2 now"):
        R.generate_answers(
            g, _samples(6), tmp_path, "noise", options=R.RunOptions(seed=2), progress=False
        )


def test_answers_to_other_questions_under_the_same_ids_are_refused(tmp_path):
    """Datasets number questions from 0 or 1: a second dataset in the same --out was scored with
    the first one's answers, matched by question_id alone."""
    g = FakeGen()
    rad = [VQASample("1", _img("red"), "Is there a fracture?", "yes", "closed")]
    slake = [VQASample("1", _img("red"), "What organ is shown?", "liver", "open")]
    R.generate_answers(g, rad, tmp_path, progress=False)
    with pytest.raises(InputError, match=r"other questions \(question_id 1\).*use another --out"):
        R.generate_answers(g, slake, tmp_path, progress=False)


def test_answers_about_another_image_under_the_same_id_and_question_are_refused(tmp_path):
    """The same question under the same id in two datasets ("Is there a fracture?" is question
    1 of more than one): the second was scored with answers about the first one's images."""
    g = FakeGen()
    for name, color in (("rad_0001.png", "red"), ("slake_0001.png", "blue")):
        (tmp_path / name).write_bytes(_img(color))
    q = "Is there a fracture?"
    rad = [VQASample("1", str(tmp_path / "rad_0001.png"), q, "yes", "closed")]
    slake = [VQASample("1", str(tmp_path / "slake_0001.png"), q, "no", "closed")]
    out = tmp_path / "eval"
    R.generate_answers(g, rad, out, progress=False)
    with pytest.raises(InputError, match=r"another image \(question_id 1\).*'rad_0001.png' there"):
        R.generate_answers(g, slake, out, progress=False)
    # The same dataset, moved: its answers are kept (the file's name is what is recorded).
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "rad_0001.png").rename(moved / "rad_0001.png")
    rad_moved = [VQASample("1", str(moved / "rad_0001.png"), q, "yes", "closed")]
    assert R.generate_answers(g, rad_moved, out, progress=False)["n_resumed"] == 1
    # Embedded images are recorded by the hash of their bytes.
    emb = tmp_path / "emb"
    R.generate_answers(g, [VQASample("1", _img("red"), q, "yes", "closed")], emb, progress=False)
    with pytest.raises(InputError, match="another image"):
        R.generate_answers(
            g, [VQASample("1", _img("blue"), q, "no", "closed")], emb, progress=False
        )


def test_a_null_answer_is_missing_not_the_word_none(tmp_path):
    s = [VQASample("1", _img("red"), "How many nodules?", "0", "open")]
    for answers in ({"1": None}, [{"question_id": "1", "text": None}]):
        ev = R.evaluate_answers(s, answers, n_resamples=10)
        assert ev["n_answered"] == 0, answers
    # ... and a null text in an answers file is answered again on resume.
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": "1", "text": None}) + "\n")
    assert R.generate_answers(FakeGen(), s, tmp_path, progress=False)["n_generated"] == 1


def test_checkpoint_fingerprint_follows_the_weights_not_the_name(tmp_path, tiny_llava_dir):
    import shutil

    from llavamed.model.checkpoint import checkpoint_fingerprint
    from llavamed.model.compose import ModelSpec, init_checkpoint

    copy = shutil.copytree(tiny_llava_dir, tmp_path / "a" / "checkpoint-final")
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(tiny_llava_dir)
    other = init_checkpoint(
        tmp_path / "b" / "checkpoint-final",
        ModelSpec(lm="tiny", vision="tiny", template="chatml", seed=1),
    )
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(copy)


def test_closed_suffix_and_bad_images(tmp_path):
    s = _samples(4)
    s.append(VQASample("bad", b"not an image", "Q?", "yes", "closed"))
    g = FakeGen()
    r = R.generate_answers(g, s, tmp_path, options=R.RunOptions(closed_suffix=True), progress=False)
    assert len(r["answers"]) == 4 and sum(r["skipped"].values()) == 1
    assert r["answers"]["q0"]["prompt"].endswith(R.CLOSED_SUFFIX)
    assert r["answers"]["q1"]["prompt"] == "Question 1?"  # open: no suffix
    # blank ablation: every image is black
    rb = R.generate_answers(g, s[:4], tmp_path, "blank", progress=False)
    assert all(a["text"].startswith("red0 ") for a in rb["answers"].values())
    assert (tmp_path / "answers.blank.jsonl").exists()


def test_consecutive_questions_about_one_image_decode_it_once(tmp_path, monkeypatch):
    import llavamed.images as images

    calls = []
    real = images.load_image

    def counting(src, **kw):
        calls.append(src)
        return real(src, **kw)

    monkeypatch.setattr(images, "load_image", counting)
    a, b = _img((200, 0, 0)), _img((40, 0, 0))
    srcs = [a, a, a, b, b, a, b"broken", b"broken"]
    s = [VQASample(f"q{i}", x, f"Q{i}?", "yes", "closed") for i, x in enumerate(srcs)]
    r = R.generate_answers(FakeGen(), s, tmp_path, progress=False)
    assert len(calls) == 5  # a, b, a again, and each broken question retried (and counted)
    assert sum(r["skipped"].values()) == 2
    assert [r["answers"][f"q{i}"]["text"].split()[0] for i in range(6)] == (
        ["red200"] * 3 + ["red40"] * 2 + ["red200"]
    )


@pytest.fixture
def tiny_llava(request):
    try:
        return request.getfixturevalue("tiny_llava_dir")
    except pytest.FixtureLookupError:
        pytest.skip("tiny_llava_dir fixture not available")


def test_run_vqa_eval_real_model_with_ablation_and_report(tiny_llava, tmp_path):
    s = _samples(6)
    res = R.run_vqa_eval(
        tiny_llava,
        s,
        tmp_path,
        batch_size=4,
        ablate=["blank", "shuffle"],
        max_new_tokens=4,
        n_resamples=50,
        progress=False,
    )
    assert res["metrics"]["n_answered"] == 6
    assert res["generation"]["image"]["n_generated"] == 6
    assert set(res["ablations"]) == {"blank", "shuffle"}
    assert "llava_med_closed_acc" in res["ablations"]["blank"]["drop"]
    paths = write_report(res, tmp_path, "vqa-rad")
    md = paths["md"].read_text()
    assert "reported in Li et al. 2023" in md and "Image reliance" in md
    assert json.loads(paths["json"].read_text())["metrics"]["n_answered"] == 6
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # rerun resumes: nothing new generated, same answers
    res2 = R.run_vqa_eval(
        tiny_llava, s, tmp_path, batch_size=4, max_new_tokens=4, n_resamples=50, progress=False
    )
    assert res2["generation"]["image"]["n_generated"] == 0
    assert res2["metrics"]["overall"] == res["metrics"]["overall"]
    assert "Partial run" not in md
    # A --limit that covers the whole split left nothing out: not a partial run (the quickstart's
    # tiny report said "Partial run: limit=24" of a 19-question split); a smaller one is.
    res3 = R.run_vqa_eval(
        tiny_llava, s, tmp_path, limit=24, max_new_tokens=4, n_resamples=50, progress=False
    )
    assert res3["n_available"] == 6
    assert "Partial run" not in write_report(res3, tmp_path, "vqa-rad")["md"].read_text()
    res4 = R.run_vqa_eval(
        tiny_llava, s, tmp_path, limit=3, max_new_tokens=4, n_resamples=50, progress=False
    )
    md4 = write_report(res4, tmp_path, "vqa-rad")["md"].read_text()
    assert "Partial run: limit=3, shard=None (6 questions in all)" in md4


def test_batched_equals_single_greedy(tiny_llava, tmp_path):
    import torch

    s = _samples(4)
    gen = R.VQAGenerator(tiny_llava, max_new_tokens=5, dtype=torch.float32)
    imgs = [Image.open(io.BytesIO(x.image)).convert("RGB") for x in s]
    qs = [x.question + " more words" * i for i, x in enumerate(s)]  # different lengths -> padding
    batched = gen.generate(imgs, qs)
    single = [gen.generate([im], [q])[0] for im, q in zip(imgs, qs, strict=True)]
    assert batched == single


def test_report_without_model(tmp_path):
    s = _samples(4)
    clean = R.evaluate_answers(
        s, {"q0": "yes", "q1": "organ1", "q2": "no", "q3": "x"}, n_resamples=50
    )
    abl = R.evaluate_answers(s, {"q0": "no", "q1": "liver", "q2": "no", "q3": "x"}, n_resamples=50)
    res = {
        "model_id": "m",
        "options": {"max_new_tokens": 8, "closed_suffix": False},
        "limit": 4,
        "shard": None,
        "generation": {
            "image": {
                "n_generated": 4,
                "n_resumed": 0,
                "seconds": 1.0,
                "answers_per_s": 4.0,
                "skipped": {},
            }
        },
        "metrics": {k: v for k, v in clean.items() if k != "scores"},
        "ablations": {
            "noise": {
                "metrics": {k: v for k, v in abl.items() if k != "scores"},
                "drop": R.ablation_drop(clean, abl, n_resamples=50),
            }
        },
    }
    paths = write_report(
        res,
        tmp_path,
        "slake",
        {"source": "x", "n_records": 5, "n_loaded": 4, "bad": {"missing image": 1}},
    )
    md = paths["md"].read_text()
    assert "| LLaVA-Med metric: closed accuracy (substring) | 100.00 |" in md
    assert "87.11" in md and "86.78" in md  # paper reference row for SLAKE
    assert "1 missing image" in md and "Partial run" in md
    assert (
        "| noise | LLaVA-Med metric: closed accuracy (substring) | 100.00 | 50.00 | 50.00 |" in md
    )
    data = json.loads(paths["json"].read_text())
    assert data["reference_rows"][0]["source"].startswith("reported in Li et al. 2023")
    assert paths["png"].stat().st_size > 1000


def test_engine_stream_equals_one_at_a_time_greedy(wide_llava_dir):
    """Continuous batching (rows join and leave a running batch) answers exactly as the
    reference loop: HF generate, one question at a time."""
    import torch

    s = _samples(7)
    imgs = [Image.open(io.BytesIO(x.image)).convert("RGB") for x in s]
    qs = [x.question + " more words" * (i % 3) for i, x in enumerate(s)]
    gen = R.VQAGenerator(wide_llava_dir, max_new_tokens=6, dtype=torch.float32, batch_size=3)
    try:
        single = [gen.generate([im], [q])[0] for im, q in zip(imgs, qs, strict=True)]
        got = dict(gen.answer_stream(zip(range(len(s)), imgs, qs, strict=True)))
        stats = gen.engine().stats
    finally:
        gen.close()
    assert [got[i] for i in range(len(s))] == single
    assert stats["completed"] == len(s) and stats["max_batch"] == 3
    # 7 questions through 3 slots: later questions were prefilled while others were decoding
    assert stats["prefills"] >= 3
    assert len(set(single)) == len(s)  # every answer differs: the comparison can fail


def test_engine_and_generate_backends_write_the_same_answers(wide_llava_dir, tmp_path):
    s = _samples(5)
    runs = {}
    for backend in R.BACKENDS:
        res = R.run_vqa_eval(
            wide_llava_dir,
            s,
            tmp_path / backend,
            batch_size=2,
            max_new_tokens=4,
            n_resamples=20,
            progress=False,
            backend=backend,
        )
        assert res["options"]["backend"] == backend
        runs[backend] = {
            r["question_id"]: r["text"] for r in iter_jsonl(tmp_path / backend / "answers.jsonl")
        }
    assert runs["engine"] == runs["generate"] and len(set(runs["engine"].values())) == 5
    with pytest.raises(InputError, match="unknown backend"):
        R.run_vqa_eval(wide_llava_dir, s, tmp_path / "x", backend="vllm", progress=False)


def test_report_notes_another_closed_open_split_than_the_papers():
    # VQA-RAD's test split is 451 questions, 179 open / 272 closed. A parquet export without
    # answer_type has the same 451, but only yes/no answers count as closed there.
    from llavamed.eval.report import render_markdown

    samples = [
        VQASample(
            qid=str(i),
            image=b"",
            question="q?",
            answer="yes" if i < 250 else "liver",
            answer_type="closed" if i < 250 else "open",
        )
        for i in range(451)
    ]
    ev = R.evaluate_answers(samples, {s.qid: s.answer for s in samples}, n_resamples=10)
    res = {"model_id": "m", "options": {"max_new_tokens": 8, "closed_suffix": False}}
    load = {"source": "x", "n_records": 451, "n_loaded": 451, "n_answer_type_inferred": 451}
    md = render_markdown({**res, "metrics": ev}, "vqa-rad", load)
    assert "this run has 451 (201 open / 250 closed)" in md
    assert "451 questions carry no answer_type" in md
    same = [VQASample(**{**vars(s), "answer_type": "closed" if i < 272 else "open"})
            for i, s in enumerate(samples)]  # fmt: skip
    ev = R.evaluate_answers(same, {s.qid: s.answer for s in same}, n_resamples=10)
    md = render_markdown({**res, "metrics": ev}, "vqa-rad", {**load, "n_answer_type_inferred": 0})
    assert "Note: the paper's" not in md and "answer_type" not in md


def test_a_chinese_slake_run_names_its_language_and_drops_the_papers_rows(tmp_path):
    # The paper's SLAKE rows are English-only; Chinese is scored per Han character, which the
    # paper's whitespace split never did, so no row of a zh/all run compares with it.
    samples = [
        VQASample(
            qid=str(i), image=b"", question="q?", answer="是", answer_type="closed", lang="zh"
        )
        for i in range(3)
    ]
    ev = R.evaluate_answers(samples, {s.qid: "是" for s in samples}, n_resamples=10)
    res = {
        "model_id": "m",
        "options": {"max_new_tokens": 8, "closed_suffix": False},
        "generation": {},
        "ablations": {},
    }
    for languages, comparable in ((["zh"], False), (["en", "zh"], False), (["en"], True)):
        run = {**res, "metrics": ev, "languages": languages}
        paths = write_report(run, tmp_path / "-".join(languages), "slake")
        md = paths["md"].read_text()
        assert ("87.11" in md) is comparable  # the paper's SLAKE row
        assert ("Question languages" in md) is not comparable
        assert ("only ones comparable to the paper" in md) is comparable
        assert bool(json.loads(paths["json"].read_text())["reference_rows"]) is comparable


def test_ablation_rows_compare_the_questions_answered_in_both_conditions(tmp_path):
    """A replacement image that fails to load leaves its question unanswered in that condition
    only. The drop is paired over the questions answered in both, and the row's two means must
    be over those too: it showed 'with image 75.00 | replaced 0.00 | drop 50.00'."""
    s = [VQASample(f"q{i}", _img((30 * i, 0, 0)), "Is it?", "yes", "closed") for i in range(4)]
    clean = R.evaluate_answers(s, {"q0": "yes", "q1": "yes", "q2": "yes", "q3": "no"})
    shuffled = R.evaluate_answers(s, {"q0": "no", "q3": "no"})  # q1, q2 not answered
    drop = R.ablation_drop(clean, shuffled, n_resamples=50)
    d = drop["strict_closed_acc"]
    assert (d["mean_a"], d["mean_b"], d["mean"], d["n"]) == (0.5, 0.0, 0.5, 2)
    res = {
        "model_id": "m",
        "options": {"max_new_tokens": 8, "closed_suffix": False},
        "metrics": {k: v for k, v in clean.items() if k != "scores"},
        "ablations": {
            "shuffle": {
                "metrics": {k: v for k, v in shuffled.items() if k != "scores"},
                "drop": drop,
            }
        },
    }
    md = write_report(res, tmp_path, "vqa-rad")["md"].read_text()
    row = "| shuffle | strict: closed accuracy (yes/no parse) | 50.00 | 0.00 | 50.00 |"
    assert row in md and "| 2 |" in md.split(row)[1].splitlines()[0]
