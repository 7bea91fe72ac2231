"""Loaders for VQA-RAD, SLAKE, parquet exports and LLaVA-Med's test.json, with bad records."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llavamed.data.vqa import load_vqa
from llavamed.errors import InputError


def _png(path=None) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _vqa_rad(tmp_path):
    root = tmp_path / "vqa_rad"
    img_dir = root / "VQA_RAD Image Folder"
    _png(img_dir / "a.jpg")
    recs = [
        {
            "qid": 1,
            "image_name": "a.jpg",
            "question": "Is there effusion?",
            "answer": "No",
            "answer_type": "CLOSED",
            "question_type": "PRES",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 2,
            "image_name": "a.jpg",
            "question": "Which organ?",
            "answer": "Liver",
            "answer_type": "OPEN",
            "question_type": "ORGAN",
            "phrase_type": "test_para",
        },
        {
            "qid": 3,
            "image_name": "a.jpg",
            "question": "How many?",
            "answer": 2,
            "answer_type": "OPEN ",
            "question_type": "COUNT",
            "phrase_type": "freeform",
        },
        {
            "qid": 4,
            "image_name": "a.jpg",
            "question": "Is it normal?",
            "answer": "yes",
            "question_type": "ABN",
            "phrase_type": "test_freeform",
        },  # no answer_type -> inferred
        {
            "qid": 5,
            "image_name": "missing.jpg",
            "question": "Q?",
            "answer": "yes",
            "answer_type": "CLOSED",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 6,
            "image_name": "a.jpg",
            "answer": "yes",
            "answer_type": "CLOSED",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 7,
            "image_name": "a.jpg",
            "question": "Q?",
            "answer": ["yes"],
            "answer_type": "CLOSED",
            "phrase_type": "test_freeform",
        },
        {
            "qid": 8,
            "image_name": "a.jpg",
            "question": "Q?",
            "answer": "yes",
            "answer_type": "MAYBE",
            "phrase_type": "test_freeform",
        },
        "not a record",
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    return root


def test_vqa_rad_folder_split_and_bad_records(tmp_path):
    root = _vqa_rad(tmp_path)
    samples, rep = load_vqa("vqa-rad", root, split="test")
    assert [s.qid for s in samples] == ["1", "2", "4"]
    assert [s.answer_type for s in samples] == ["closed", "open", "closed"]
    assert samples[0].question_type == "PRES" and samples[0].split == "test"
    assert rep.n_records == 9 and rep.n_loaded == 3 and rep.n_other_split == 1
    assert rep.n_answer_type_inferred == 1  # qid 4
    assert rep.bad == {
        "missing image": 1,
        "missing field question": 1,
        "wrong type for answer": 1,
        "unknown answer_type": 1,
        "record is not an object": 1,
    }
    train, _ = load_vqa("vqa-rad", root, split="train")
    assert [(s.qid, s.answer, s.answer_type) for s in train] == [("3", "2", "open")]
    # the JSON file itself works too
    again, _ = load_vqa("vqa-rad", root / "VQA_RAD Dataset Public.json")
    assert len(again) == 3
    # VQA-RAD has no validation split: "val" loaded nothing without a word (a training source
    # that added nothing, an evaluation of no questions).
    for split in ("val", "validate", "Test"):
        with pytest.raises(InputError, match=f"unknown VQA-RAD split.*'{split}'"):
            load_vqa("vqa-rad", root, split=split)


def _slake(tmp_path):
    root = tmp_path / "slake"
    _png(root / "imgs" / "xmlab1" / "source.jpg")
    recs = [
        {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "Is this a CT?",
            "answer": "Yes",
            "q_lang": "en",
            "answer_type": "CLOSED",
            "content_type": "Modality",
            "modality": "CT",
            "location": "Abdomen",
            "qid": 10,
        },
        {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "这是CT吗?",
            "answer": "是",
            "q_lang": "zh",
            "answer_type": "CLOSED",
            "content_type": "Modality",
            "qid": 11,
        },
        {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "Where?",
            "answer": "Abdomen",
            "q_lang": "en",
            "answer_type": "OPEN",
            "content_type": "Position",
            "qid": 12,
        },
        {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "Q",
            "q_lang": "en",
            "answer_type": "OPEN",
            "qid": 13,
        },
    ]
    (root / "test.json").write_text(json.dumps(recs, ensure_ascii=False))
    (root / "train.json").write_text(json.dumps(recs[:1]))
    return root


def test_slake_lang_and_splits(tmp_path):
    root = _slake(tmp_path)
    en, rep = load_vqa("slake", root)
    assert [s.qid for s in en] == ["10", "12"]
    assert en[0].question_type == "Modality" and en[0].extra["modality"] == "CT"
    assert rep.bad == {"missing field answer": 1} and rep.n_other_split == 1
    zh, _ = load_vqa("slake", root, lang="zh")
    assert [s.qid for s in zh] == ["11"] and zh[0].lang == "zh"
    tr, _ = load_vqa("slake", root, split="train")
    assert len(tr) == 1 and tr[0].split == "train"
    with pytest.raises(InputError, match="file not found"):
        load_vqa("slake", root, split="validate")
    # 'all' reads every split file of the folder, each sample keeping its split
    # (this fixture's train.json repeats test's qid 10: answers are keyed by qid, so the second
    # is counted as a duplicate, not scored against the first one's answer)
    every, rep_all = load_vqa("slake", root, split="all")
    assert [(s.qid, s.split) for s in every] == [("10", "train"), ("12", "test")]
    assert rep_all.bad["duplicate question id"] == 1 and rep_all.n_loaded == 2
    with pytest.raises(InputError, match="no 'all' split"):
        load_vqa("llava-med", tmp_path, split="all")


def test_parquet_pathvqa_and_vqa_rad(tmp_path):
    img = _png()
    table = pa.table(
        {
            "image": [
                {"bytes": img, "path": "a.png"},
                {"bytes": img, "path": None},
                {"bytes": None, "path": None},
                {"bytes": img, "path": None},
            ],
            "question": ["Is this benign?", "What stain?", "Q?", None],
            "answer": ["no", "H&E", "yes", "yes"],
        }
    )
    folder = tmp_path / "pvqa" / "data"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "test-00000-of-00001.parquet")
    pq.write_table(table.slice(0, 1), folder / "train-00000-of-00001.parquet")
    samples, rep = load_vqa("pathvqa", tmp_path / "pvqa")
    assert [s.answer_type for s in samples] == ["closed", "open"]
    assert isinstance(samples[0].image, bytes) and samples[0].image == img
    assert samples[0].qid == "test-00000-of-00001:0"
    assert rep.bad == {"missing image": 1, "missing field question": 1}
    assert rep.to_dict()["n_answer_type_inferred"] == 2  # no answer_type column
    # VQA-RAD parquet export through the vqa-rad dataset name
    rad, _ = load_vqa("vqa-rad", folder / "test-00000-of-00001.parquet")
    assert len(rad) == 2
    with pytest.raises(InputError, match="no parquet files"):
        load_vqa("pathvqa", tmp_path / "pvqa", split="validation")


def test_parquet_missing_columns(tmp_path):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "test.parquet")
    with pytest.raises(InputError, match="missing columns"):
        load_vqa("pathvqa", tmp_path / "test.parquet")


def test_llava_med_test_json(tmp_path):
    _png(tmp_path / "images" / "synpic1.jpg")
    recs = [
        {
            "id": "q1",
            "image": "synpic1.jpg",
            "answer_type": "CLOSED",
            "conversations": [
                {"from": "human", "value": "Is there a mass?\n<image>"},
                {"from": "gpt", "value": "yes"},
            ],
        },
        {
            "id": "q2",
            "image": "synpic1.jpg",
            "answer_type": "OPEN",
            "conversatons": [
                {"from": "human", "value": "<image>\nWhat organ?"},
                {"from": "gpt", "value": "brain"},
            ],
        },
        {
            "id": "q3",
            "image": "synpic1.jpg",
            "answer_type": "OPEN",
            "conversations": [{"from": "human", "value": "Only one turn"}],
        },
        {"id": "q4", "image": "synpic1.jpg"},
    ]
    (tmp_path / "test.json").write_text(json.dumps(recs))
    samples, rep = load_vqa("llava-med", tmp_path / "test.json")
    assert [(s.qid, s.question, s.answer, s.answer_type) for s in samples] == [
        ("q1", "Is there a mass?", "yes", "closed"),
        ("q2", "What organ?", "brain", "open"),
    ]
    assert rep.bad == {"wrong type for conversations": 1, "missing field conversations": 1}
    assert "2 samples loaded of 4 records" in rep.summary()


def test_unknown_dataset_and_missing_path(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_vqa("vqa-rad", tmp_path / "nope")
    with pytest.raises(InputError, match="unknown dataset"):
        load_vqa("mimic", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        load_vqa("vqa-rad", tmp_path / "bad.json")


def test_a_duplicate_question_id_is_counted_and_skipped(tmp_path):
    # Answers are keyed by question id: a second question with the same id would be scored
    # against the first one's answer (or the reverse after a resume), so it never loads.
    root = _vqa_rad(tmp_path)
    path = root / "VQA_RAD Dataset Public.json"
    recs = json.loads(path.read_text())
    twin = {**recs[0], "question": "How many lesions?", "answer": "2", "answer_type": "OPEN"}
    path.write_text(json.dumps([*recs, twin]))
    samples, rep = load_vqa("vqa-rad", root)
    assert [s.qid for s in samples] == ["1", "2", "4"]
    assert samples[0].answer == "No"  # the first record with the id wins
    assert rep.bad["duplicate question id"] == 1
    assert "duplicate question id" in rep.summary() and rep.examples[-1].endswith(
        "Public.json[9]: duplicate question id (id 1 is already used by an earlier record)"
    )


def test_a_split_file_given_directly_must_be_the_requested_split(tmp_path):
    # A train shard passed as --data with the default --split test was scored and reported as
    # the test split; a split file's own name now decides, and a mismatch is an error.
    img = _png()
    table = pa.table(
        {"image": [{"bytes": img, "path": None}], "question": ["Is it?"], "answer": ["yes"]}
    )
    folder = tmp_path / "pvqa"
    folder.mkdir()
    for name in ("train-00000-of-00001", "validation-00000-of-00001", "test"):
        pq.write_table(table, folder / f"{name}.parquet")
    with pytest.raises(InputError, match="file holds another split.*'train'.*'test'"):
        load_vqa("pathvqa", folder / "train-00000-of-00001.parquet")
    tr, _ = load_vqa("pathvqa", folder / "train-00000-of-00001.parquet", split="train")
    assert [s.split for s in tr] == ["train"]
    # PathVQA's dev shards are "validation-*": SLAKE's split aliases apply.
    val, _ = load_vqa("pathvqa", folder, split="val")
    assert [s.split for s in val] == ["validate"]
    every, _ = load_vqa("pathvqa", folder, split="all")
    assert sorted(s.split for s in every) == ["test", "train", "validate"]  # not "test.parquet"
    # SLAKE and LLaVA-Med files: the same rule.
    root = _slake(tmp_path)
    with pytest.raises(InputError, match="file holds another split"):
        load_vqa("slake", root / "train.json", split="test")
    assert all(s.split == "train" for s in load_vqa("slake", root / "train.json", split="train")[0])
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(InputError, match="file holds another split"):
        load_vqa("llava-med", tmp_path / "train.json")
