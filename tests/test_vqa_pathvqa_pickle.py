"""PathVQA's original release (``pvqa/qas/<split>/<split>_qa.pkl`` + ``pvqa/images/<split>/``):
split selection, closed/open inference, stable ids, bad records, and pickles read as data only."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llavamed.data.vqa import load_vqa
from llavamed.errors import InputError

RECORDS = {
    "train": [
        {"image": "train_0000", "question": "Is this normal?", "answer": "no"},
        {"image": "train_0001", "question": "What is present?", "answer": "fibrosis"},
    ],
    "val": [
        {"image": "val_0261", "question": "What have lost their nuclei?", "answer": "neutrophils"}
    ],
    "test": [
        {"image": "test_0001", "question": "Does this show necrosis?", "answer": "yes"},
        {"image": "test_0001", "question": "What does this show?", "answer": "necrosis"},
        {"image": "test_0002", "question": "Is the liver enlarged?", "answer": "No"},
    ],
}


def _jpeg(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (150, 60, 90)).save(path, format="JPEG")


def _pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _pvqa(tmp_path, records=RECORDS):
    """A tiny release: real JPEGs, real pickles (test and train at protocol 2, as an old
    release's; val at the default), plus LXMERT files in qas/ that the loader must ignore."""
    root = tmp_path / "pvqa"
    for split, recs in records.items():
        for rec in recs:
            _jpeg(root / "images" / split / f"{rec['image']}.jpg")
        _pickle(root / "qas" / split / f"{split}_qa.pkl", recs, 2 if split != "val" else None)
    _pickle(root / "qas" / "train_vqa.pkl", [{"img_id": "train_0000", "sent": "Is this normal?"}])
    _pickle(root / "qas" / "trainval_ans2label.pkl", {"no": 0, "fibrosis": 1})
    return root


def test_the_release_folder_loads_each_split_with_inferred_answer_types(tmp_path):
    root = _pvqa(tmp_path)
    test, rep = load_vqa("pathvqa", root)
    assert [(s.qid, s.question, s.answer, s.answer_type, s.split) for s in test] == [
        ("test:0", "Does this show necrosis?", "yes", "closed", "test"),
        ("test:1", "What does this show?", "necrosis", "open", "test"),
        ("test:2", "Is the liver enlarged?", "No", "closed", "test"),
    ]
    assert test[0].image == str(root / "images" / "test" / "test_0001.jpg")
    assert test[0].image_key == test[1].image_key != test[2].image_key
    assert os.path.isfile(test[2].image) and test[0].extra == {"dataset": "pathvqa"}
    assert (rep.n_records, rep.n_loaded, rep.n_answer_type_inferred) == (3, 3, 3)
    assert not rep.bad

    for alias in ("val", "validate", "validation"):
        val, _ = load_vqa("pathvqa", root, split=alias)
        assert [(s.qid, s.answer, s.answer_type, s.split) for s in val] == [
            ("validate:0", "neutrophils", "open", "validate")
        ]
        assert val[0].image == str(root / "images" / "val" / "val_0261.jpg")

    every, rep_all = load_vqa("pathvqa", root, split="all")
    assert [s.qid for s in every] == [
        "train:0",
        "train:1",
        "validate:0",
        "test:0",
        "test:1",
        "test:2",
    ]
    assert rep_all.n_loaded == 6 and rep_all.n_answer_type_inferred == 6
    # The qas folder itself is accepted too, and the ids are the same on every load.
    again, _ = load_vqa("pathvqa", root / "qas", split="all")
    assert [(s.qid, s.image) for s in again] == [(s.qid, s.image) for s in every]
    with pytest.raises(InputError, match="unknown PathVQA split"):
        load_vqa("pathvqa", root, split="dev")


def test_a_pickle_given_directly_must_hold_the_requested_split(tmp_path):
    root = _pvqa(tmp_path)
    pkl = root / "qas" / "test" / "test_qa.pkl"
    samples, rep = load_vqa("pathvqa", pkl)
    assert [s.qid for s in samples] == ["test:0", "test:1", "test:2"]
    assert samples[0].image == str(root / "images" / "test" / "test_0001.jpg")
    assert rep.source == str(pkl)
    with pytest.raises(InputError, match="file holds another split.*'test'.*'train'"):
        load_vqa("pathvqa", pkl, split="train")
    val, _ = load_vqa("pathvqa", root / "qas" / "val" / "val_qa.pkl", split="val")
    assert [s.split for s in val] == ["validate"]
    # --images: the release's images/ folder, or the split's own folder.
    moved = tmp_path / "elsewhere"
    (root / "images").rename(moved)
    with pytest.raises(InputError, match="no image folder"):
        load_vqa("pathvqa", pkl)
    for images in (moved, moved / "test"):
        samples, _ = load_vqa("pathvqa", pkl, images=images)
        assert samples[0].image == str(moved / "test" / "test_0001.jpg")


def test_python2_strings_decode_as_utf8_else_latin1(tmp_path):
    # A Python 2 pickle (protocol 2) stores str as raw bytes (SHORT_BINSTRING, opcode U).
    def py2_pickle(answer: bytes) -> bytes:
        fields = [b"image", b"test_0001", b"question", b"What is it?", b"answer", answer]
        body = b"".join(b"U" + bytes([len(f)]) + f for f in fields)
        return b"\x80\x02]q\x00(}q\x01(" + body + b"ue."

    root = _pvqa(tmp_path)
    pkl = root / "qas" / "test" / "test_qa.pkl"
    pkl.write_bytes(py2_pickle("café".encode()))
    assert [s.answer for s in load_vqa("pathvqa", root)[0]] == ["café"]
    pkl.write_bytes(py2_pickle("café".encode("latin1")))
    assert [s.answer for s in load_vqa("pathvqa", root)[0]] == ["café"]


class _Sneaky:
    """Unpickling an instance of this would run ``os.system`` and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Record:
    pass


def test_a_pickle_naming_any_global_is_refused_and_never_run(tmp_path):
    root = _pvqa(tmp_path)
    pkl = root / "qas" / "test" / "test_qa.pkl"
    marker = tmp_path / "pwned"
    for protocol in (2, pickle.DEFAULT_PROTOCOL):
        _pickle(pkl, [*RECORDS["test"], {"image": _Sneaky(marker)}], protocol)
        with pytest.raises(InputError, match=r"test_qa\.pkl: pickle holds code") as err:
            load_vqa("pathvqa", root)
        assert "refusing to load" in str(err.value) and "system from a pickle" in str(err.value)
        assert not marker.exists()
    # A plain class instance is refused the same way, naming its class.
    _pickle(pkl, [_Record()])
    with pytest.raises(InputError, match=r"refusing to load .*_Record from a pickle"):
        load_vqa("pathvqa", pkl)


def test_a_truncated_or_misshapen_pickle_is_an_error_naming_the_file(tmp_path):
    root = _pvqa(tmp_path)
    pkl = root / "qas" / "test" / "test_qa.pkl"
    whole = pkl.read_bytes()
    for cut in (len(whole) // 2, 1):
        pkl.write_bytes(whole[:cut])
        with pytest.raises(InputError, match=r"test_qa\.pkl: unreadable pickle"):
            load_vqa("pathvqa", root)
    pkl.write_bytes(b"not a pickle at all")
    with pytest.raises(InputError, match=r"test_qa\.pkl: unreadable pickle"):
        load_vqa("pathvqa", root)
    pkl.write_bytes(whole + whole)  # two pickles back to back
    with pytest.raises(InputError, match="data after the end of the pickle"):
        load_vqa("pathvqa", root)
    _pickle(pkl, {"image": "test_0001", "question": "Q?", "answer": "yes"})
    with pytest.raises(
        InputError, match=r"test_qa\.pkl: expected a pickled list of records \(got dict\)"
    ):
        load_vqa("pathvqa", root)
    _pickle(pkl, [("test_0001", "Q?", "yes")])
    with pytest.raises(InputError, match="expected a pickled list of records.*list of tuple"):
        load_vqa("pathvqa", root)
    pkl.unlink()
    with pytest.raises(InputError, match=r"test_qa\.pkl: file not found"):
        load_vqa("pathvqa", root)


def test_bad_records_are_counted_and_skipped(tmp_path):
    recs = [
        {"image": "test_0001", "question": "Is it benign?", "answer": "yes"},
        {"image": "test_0001", "question": "What is shown?"},  # no answer
        {"image": "test_0404", "question": "Is it?", "answer": "no"},  # no such image
        {"image": "test_0001", "question": ["a list"], "answer": "no"},
        "not a record",
        {"image": "test_0001", "question": "How many?", "answer": 2},
    ]
    root = _pvqa(tmp_path, {"test": recs[:1]})
    _pickle(root / "qas" / "test" / "test_qa.pkl", recs)
    samples, rep = load_vqa("pathvqa", root)
    assert [(s.qid, s.answer, s.answer_type) for s in samples] == [
        ("test:0", "yes", "closed"),
        ("test:5", "2", "open"),  # ids keep their index in the pickle
    ]
    assert rep.bad == {
        "missing field answer": 1,
        "missing image": 1,
        "wrong type for question": 1,
        "record is not an object": 1,
    }
    assert (rep.n_records, rep.n_loaded) == (6, 2)
    assert any("test_qa.pkl[2]: missing image" in e and "test_0404.jpg" in e for e in rep.examples)
    assert "2 samples loaded of 6 records" in rep.summary()


def test_load_vqa_picks_the_pickle_loader_or_parquet_by_what_the_path_holds(tmp_path):
    root = _pvqa(tmp_path)
    buf = (root / "images" / "test" / "test_0001.jpg").read_bytes()
    shards = tmp_path / "hf" / "data"
    shards.mkdir(parents=True)
    pq.write_table(
        pa.table({"image": [{"bytes": buf, "path": None}], "question": ["Q?"], "answer": ["yes"]}),
        shards / "test-00000-of-00001.parquet",
    )
    for path in (root, root / "qas", root / "qas" / "test" / "test_qa.pkl"):
        samples, _ = load_vqa("pathvqa", path)
        assert len(samples) == 3 and all(isinstance(s.image, str) for s in samples), path
    for path in (tmp_path / "hf", shards / "test-00000-of-00001.parquet"):
        samples, _ = load_vqa("pathvqa", path)
        assert [s.image for s in samples] == [buf], path
    # A folder with neither qas/ nor parquet is still the parquet loader's error.
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no parquet files"):
        load_vqa("pathvqa", tmp_path / "empty")


def test_eval_vqa_help_describes_the_release_layout():
    out = subprocess.run(
        [sys.executable, "-m", "llavamed", "eval", "vqa", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    text = " ".join(out.stdout.split())
    assert "<split>_qa.pkl" in text and "pathvqa" in text and "--images" in text


def test_training_reads_the_pickles_with_images_kept_elsewhere(tmp_path, tiny_llava_dir):
    """``format: vqa`` sources pass ``image_folder`` to the loader, as ``eval vqa --images``
    does: it was ignored, so a release whose images live apart could not be trained on."""
    from transformers import AutoProcessor

    from llavamed.config import DataConfig, DataSource
    from llavamed.train.data import load_samples

    root = _pvqa(tmp_path)
    moved = tmp_path / "disk2" / "pvqa_images"
    moved.parent.mkdir()
    (root / "images").rename(moved)
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    src = dict(format="vqa", dataset="pathvqa", path=str(root), split="train")
    with pytest.raises(InputError, match="no image folder"):
        load_samples(DataConfig(sources=[DataSource(**src)]), proc, "chatml", quiet=True)
    samples, report = load_samples(
        DataConfig(sources=[DataSource(**src, image_folder=str(moved))]),
        proc,
        "chatml",
        quiet=True,
    )
    assert len(samples) == 2 and not report.skipped


def test_the_report_calls_pathvqas_yes_no_split_the_papers(tmp_path):
    """PathVQA never carries an answer_type: its closed questions are its yes/no ones, the
    paper's division too. The report said closed accuracy was 'over another set of questions'
    than the paper's, which is true only of a VQA-RAD export without the dataset's labels."""
    from llavamed.eval.report import render_markdown
    from llavamed.eval.vqa_runner import evaluate_answers

    samples, rep = load_vqa("pathvqa", _pvqa(tmp_path))
    assert rep.n_answer_type_inferred == 3
    metrics = evaluate_answers(samples, {s.qid: "yes" for s in samples}, n_resamples=20)
    result = {
        "model_id": "m",
        "options": {"max_new_tokens": 8, "closed_suffix": False},
        "metrics": {k: v for k, v in metrics.items() if k != "scores"},
    }
    md = render_markdown(result, "pathvqa", rep.to_dict())
    assert "PathVQA's closed questions are its yes/no ones, as in the paper" in md
    assert "over another set of questions" not in md
    assert "over another set of questions" in render_markdown(result, "vqa-rad", rep.to_dict())
