"""Training data as real users hand it over: LLaVA conversation JSON with out-of-order turns,
truncation at data.max_length, and what data_report.json says about them."""

from __future__ import annotations

import json

from PIL import Image
from transformers import AutoProcessor

from llavamed.config import DataConfig, DataSource
from llavamed.train.data import load_samples


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def _load(tmp_path, recs, proc, max_length=256, quiet=True):
    Image.new("RGB", (20, 16), (90, 40, 10)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_length=max_length)
    return load_samples(cfg, proc, "chatml", quiet=quiet)


def test_out_of_order_turns_name_their_record_and_count_under_one_reason(
    tmp_path, tiny_llava_dir, capsys
):
    """A gpt turn first, or two human turns in a row, was reported as "<conversation>: turn 0 is
    'assistant', expected 'user'": no file, no record id, and one reason per turn position."""
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    recs = [
        {
            "id": "gpt-first",
            "image": "a.png",
            "conversations": _turns(("gpt", "Hi"), ("human", "<image>\nQ"), ("gpt", "A")),
        },
        {
            "id": "two-humans",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("human", "And?"), ("gpt", "A")),
        },
        {
            "id": "system-inside",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("system", "x"), ("gpt", "A")),
        },
        {
            "id": "ok",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A")),
        },
    ]
    samples, rep = _load(tmp_path, recs, proc, quiet=False)
    assert len(samples) == 1
    assert dict(rep.skipped) == {"turns out of order": 3}
    train = str(tmp_path / "train.json")
    assert rep.examples == [
        f"{train}[0] id=gpt-first: turns out of order (turn 0 is 'assistant', expected 'user')",
        f"{train}[1] id=two-humans: turns out of order (turn 1 is 'user', expected 'assistant')",
        f"{train}[2] id=system-inside: turns out of order "
        "(turn 1 is 'system', expected 'assistant')",
    ]
    err = capsys.readouterr().err
    assert "<conversation>" not in err and "id=gpt-first: turns out of order" in err


def test_samples_cut_at_max_length_are_counted_and_named(tmp_path, tiny_llava_dir, capsys):
    """A sample cut at data.max_length was kept with no trace: a max_length that cut most
    answers before their end-of-turn token trained a model that never learns to stop, and
    data_report.json said nothing. Now each kept cut is counted by where it fell and named; a
    cut that leaves no answer says it was the truncation."""
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    many = " ".join(["word"] * 80)
    recs = [
        {
            "id": "fits",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A")),
        },
        {
            "id": "long-answer",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", many)),
        },
        {
            "id": "long-second-question",
            "image": "a.png",
            "conversations": _turns(
                ("human", "<image>\nQ"), ("gpt", "Yes."), ("human", many), ("gpt", "No.")
            ),
        },
        {
            "id": "long-question",
            "image": "a.png",
            "conversations": _turns(("human", f"<image>\n{many}"), ("gpt", "A")),
        },
    ]
    samples, rep = _load(tmp_path, recs, proc, max_length=60, quiet=False)
    assert [s.source.split()[-1] for s in samples] == [
        "id=fits",
        "id=long-answer",
        "id=long-second-question",
    ]
    assert all(s.length <= 60 for s in samples)
    assert dict(rep.truncated) == {
        "truncated inside an answer": 1,
        "truncated between answers": 1,
    }
    assert dict(rep.skipped) == {"no supervised tokens after truncation": 1}
    train = str(tmp_path / "train.json")
    d = rep.to_dict()
    assert d["truncated_examples"][0].startswith(
        f"{train}[1] id=long-answer: truncated inside an answer ("
    )
    assert d["truncated_examples"][1].startswith(
        f"{train}[2] id=long-second-question: truncated between answers ("
    )
    assert "> max_length 60" in d["truncated_examples"][0]
    assert d["examples"][0].startswith(
        f"{train}[3] id=long-question: no supervised tokens after truncation ("
    )
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the answer cut inside lost its end-of-turn; the one before the cut kept it
    long_answer, second = samples[1], samples[2]

    def supervised(s):
        return [t for t, lab in zip(s.input_ids, s.labels, strict=True) if lab >= 0]

    assert end not in supervised(long_answer) and supervised(second)[-1] == end
    err = capsys.readouterr().err
    assert "kept 2 sample(s) cut at data.max_length=60" in err


def test_truncation_reasons_at_each_boundary(tiny_llava_dir):
    """The cut classified against the full encoding, token by token around the first answer."""
    import pytest

    from llavamed.errors import InputError
    from llavamed.model.processing import IGNORE_INDEX, encode_training_sample
    from llavamed.model.templates import conversation_to_messages

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    msgs = conversation_to_messages(
        _turns(("human", "<image>\nQ"), ("gpt", "A CT."), ("human", "More?"), ("gpt", "No."))
    )
    full = encode_training_sample(msgs, proc, "chatml", num_images=1)
    assert full.truncated is None and full.full_length == len(full.input_ids)
    sup = [i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX]
    first = sup[0]
    end = next(i for i in sup if full.input_ids[i] == proc.tokenizer.eos_token_id)
    with pytest.raises(InputError, match="no supervised tokens after truncation"):
        encode_training_sample(msgs, proc, "chatml", num_images=1, max_length=first)
    for m in range(first + 1, end + 1):  # the first answer without its end-of-turn
        enc = encode_training_sample(msgs, proc, "chatml", num_images=1, max_length=m)
        assert enc.truncated == "truncated inside an answer", m
        assert enc.input_ids == full.input_ids[:m] and enc.labels == full.labels[:m]
    for m in (end + 1, end + 2):  # the first answer whole, the second turn cut
        enc = encode_training_sample(msgs, proc, "chatml", num_images=1, max_length=m)
        assert enc.truncated == "truncated between answers", m
    enc = encode_training_sample(msgs, proc, "chatml", num_images=1, max_length=len(full.labels))
    assert enc.truncated is None


def test_each_source_has_its_own_count_in_the_report(tmp_path, tiny_llava_dir):
    """SLAKE's train and validate splits live in one folder: a mixture of both reported a single
    per-source count (the last split's) under the folder's name, for more samples than it said."""
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    slake = tmp_path / "slake"
    (slake / "imgs" / "xmlab1").mkdir(parents=True)
    Image.new("RGB", (24, 24), (200, 10, 10)).save(slake / "imgs" / "xmlab1" / "source.jpg")

    def rec(qid, q, a):
        return {
            "img_id": 1,
            "img_name": "xmlab1/source.jpg",
            "question": q,
            "answer": a,
            "q_lang": "en",
            "answer_type": "CLOSED",
            "content_type": "Abnormality",
            "modality": "CT",
            "location": "Lung",
            "qid": qid,
        }

    (slake / "train.json").write_text(
        json.dumps([rec(1, "Is it a CT?", "Yes"), rec(2, "Is it an MRI?", "No")])
    )
    (slake / "validate.json").write_text(json.dumps([rec(3, "Is it abnormal?", "Yes")]))
    recs = [
        {
            "id": "1",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A")),
        }
    ]
    Image.new("RGB", (20, 16)).save(tmp_path / "a.png")
    (tmp_path / "train.json").write_text(json.dumps(recs))
    vqa = dict(format="vqa", dataset="slake", path=str(slake))
    sources = [
        DataSource(**vqa, split="train"),
        DataSource(**vqa, split="validate"),
        DataSource(path=str(tmp_path / "train.json")),
        DataSource(path=str(tmp_path / "train.json"), image_folder=str(tmp_path)),
    ]
    samples, rep = load_samples(DataConfig(sources=sources), proc, "chatml", quiet=True)
    assert len(samples) == rep.n_loaded == 5
    assert rep.per_source == {
        f"{slake} (split train)": 2,
        f"{slake} (split validate)": 1,
        str(tmp_path / "train.json"): 1,
        f"{tmp_path / 'train.json'} (source 4)": 1,
    }


def test_images_that_fail_while_training_are_counted_and_named_once(tmp_path, one_thread):
    """Corrupt and vanished images found while training: the run goes on, and data_report.json
    counts them by reason and names record and file, with the reason once (it read
    "x.png: empty file: empty file")."""
    from llavamed.train import run_training
    from train_helpers import make_bright_dark, tiny_config

    data = make_bright_dark(tmp_path / "d", 8)
    images = tmp_path / "d" / "images"
    (images / "0.png").write_bytes(b"")
    whole = (images / "1.png").read_bytes()
    (images / "1.png").write_bytes(whole[: len(whole) // 2])
    cfg = tiny_config(data, tmp_path / "run", max_steps=1, global_batch_size=8, micro_batch_size=8)
    run_training(cfg, progress=False)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped_while_training"] == {"empty file": 1, "corrupt image": 1}
    assert (tmp_path / "run" / "checkpoint-final" / "config.json").is_file()
    by_record = {e.split(": ")[0]: e for e in report["examples"]}
    empty = by_record[f"{data}[0] id=s0"]
    assert empty == f"{data}[0] id=s0: {images / '0.png'}: empty file"
    cut = by_record[f"{data}[1] id=s1"]
    assert cut.startswith(f"{data}[1] id=s1: {images / '1.png'} (") and cut.endswith(
        "): corrupt image"
    )
    assert cut.count("corrupt image") == 1 and empty.count("empty file") == 1


def test_a_jsonl_file_trains_one_record_per_line_and_counts_bad_lines(tmp_path, tiny_llava_dir):
    """A .jsonl conversation file (one record per line, as LLaVA-NeXT's loaders take) failed
    with 'invalid JSON (Extra data: line 2 column 1)' after the model had loaded; a JSON file
    holding such lines now says what it looks like."""
    import pytest

    from llavamed.config import load_config
    from llavamed.errors import InputError

    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    good = {
        "id": "ok",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nQ?"},
            {"from": "gpt", "value": "A."},
        ],
    }
    lines = [json.dumps(good), "", "{not json", json.dumps([1]), json.dumps(good | {"id": "b"})]
    lines.append(json.dumps(good | {"id": "gone", "image": "nope.png"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    cfg = load_config(
        {"model": {"from": str(tiny_llava_dir)}, "data": {"path": str(tmp_path / "d.jsonl")}}
    )
    samples, report = load_samples(cfg.data, proc, "chatml", quiet=True)
    assert [s.source for s in samples] == [
        f"{tmp_path / 'd.jsonl'}:1 id=ok",
        f"{tmp_path / 'd.jsonl'}:5 id=b",
    ]
    assert report.n_records == 5 and report.n_loaded == 2
    assert report.skipped == {
        "invalid JSON line": 1,
        "JSON line is not an object": 1,
        "missing image": 1,
    }
    (tmp_path / "d.json").write_text("\n".join([json.dumps(good)] * 2) + "\n")
    cfg = load_config(
        {"model": {"from": str(tiny_llava_dir)}, "data": {"path": str(tmp_path / "d.json")}}
    )
    with pytest.raises(InputError, match="name the file .jsonl"):
        load_samples(cfg.data, proc, "chatml", quiet=True)


def test_max_length_too_short_for_an_image_is_a_config_error(tmp_path, tiny_llava_dir):
    """data.max_length below the prompt through the image tokens is a setting, not bad data:
    every sample with an image was skipped as "truncation inside image tokens" and the run
    stopped with "no training samples left", sending the user to the data. A text-only sample
    shorter than it still trains, and one token more than that floor is accepted."""
    import pytest

    from llavamed.errors import ConfigError
    from llavamed.train.data import min_image_length

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    floor = min_image_length(proc, "chatml")
    assert floor == 3 + 16  # "<|im_start|>user\n" then the 16 image tokens
    recs = [
        {"id": "text", "conversations": _turns(("human", "Hi"), ("gpt", "Yes."))},
        {
            "id": "img",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A")),
        },
    ]
    with pytest.raises(
        ConfigError, match=f"data.max_length={floor} cannot hold an image.*{floor} tokens"
    ):
        _load(tmp_path, recs, proc, max_length=floor)
    samples, rep = _load(tmp_path, recs, proc, max_length=floor + 1)
    assert [s.source.split("id=")[1] for s in samples] == ["text"]
    assert dict(rep.skipped) == {"no supervised tokens after truncation": 1}


def test_no_samples_left_says_why(tmp_path, one_thread):
    """The run's last word when every sample was skipped names the reasons, not only the file."""
    import pytest

    from llavamed.errors import InputError
    from llavamed.train import run_training
    from train_helpers import make_bright_dark, tiny_config

    cfg = tiny_config(make_bright_dark(tmp_path / "d", 4), tmp_path / "out")
    cfg["data"]["max_length"] = 20  # one past the image: no room for any answer
    with pytest.raises(
        InputError,
        match=r"no training samples left \(4 record\(s\), all skipped: 4 no supervised tokens "
        r"after truncation; see data_report.json\)",
    ):
        run_training(cfg, progress=False)


def test_a_figures_file_given_as_training_data_is_named_as_figures(tmp_path, one_thread):
    """data.path=corpus/figures.jsonl (figure records, not conversations) ended in "all
    skipped: N malformed conversation", with nothing said of what to do."""
    import pytest

    from llavamed.errors import InputError
    from llavamed.train import run_training
    from train_helpers import tiny_config

    figures = tmp_path / "figures.jsonl"
    rec = {"pair_id": "PMC1_F1", "fig_caption": "Chest X-ray.", "image": "images/a.png"}
    figures.write_text("\n".join(json.dumps(rec | {"pair_id": f"P{i}"}) for i in range(3)))
    cfg = tiny_config(figures, tmp_path / "out")
    with pytest.raises(InputError, match=r"3 a figure record, not a conversation"):
        run_training(cfg, progress=False)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert "llavamed data align" in json.dumps(report)


def test_a_source_that_gives_no_samples_stops_the_run(tmp_path, one_thread):
    """A source that kept none of its records (here: every image missing) was said nothing of,
    and the run trained on the other sources alone. (The first case found, VQA-RAD's split
    val that it does not have, is now refused by the loader itself.)"""
    import shutil

    import pytest

    from llavamed.data.synth import generate_world
    from llavamed.errors import InputError
    from llavamed.train import run_training
    from train_helpers import tiny_config

    world = tmp_path / "w"
    generate_world(world, articles=1, seed=3, image_size=64, progress=False, vqa_images=22)
    rad = tmp_path / "rad"
    shutil.copytree(world / "vqa_rad", rad)
    for image in (rad / "VQA_RAD Image Folder").iterdir():
        image.unlink()
    cfg = tiny_config(world / "slake", tmp_path / "out", max_steps=1)
    slake = {"format": "vqa", "dataset": "slake", "path": str(world / "slake")}
    cfg["data"] = {
        "sources": [
            slake,
            {"format": "vqa", "dataset": "vqa-rad", "path": str(rad), "split": "val"},
        ],
        "max_length": 256,
    }
    with pytest.raises(InputError, match="unknown VQA-RAD split"):
        run_training(cfg, progress=False)
    cfg["data"]["sources"][1]["split"] = "train"
    with pytest.raises(InputError, match=r"rad \(split train\): no training samples from this"):
        run_training(cfg, progress=False)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["per_source"][f"{rad} (split train)"] == 0
    assert not (tmp_path / "out" / "checkpoint-final").exists()
