"""Checks of train and eval inputs: what must be refused, and refused before the slow part (the
model loading, the data tokenizing) instead of after it."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from PIL import Image
from transformers import AutoProcessor

from llavamed.cli import main
from llavamed.errors import ConfigError
from train_helpers import make_bright_dark, tiny_config

# Shared 2-core machine: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- a finished run and the model.from it started from -------------------------------------


def _retrain_projector_in_place(ckpt) -> None:
    """What training stage 1 again into the same folder does to its checkpoint: the projector's
    weights change, every other tensor (the frozen LM and tower) stays as it was."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(f)
    for k in sd:
        if "multi_modal_projector" in k:
            sd[k] = sd[k] + 0.05
    save_file(sd, f, metadata={"format": "pt"})


def test_a_finished_run_refuses_when_its_model_from_weights_changed(
    tiny_llava_dir, tmp_path, capsys
):
    """A finished run returned at once even after the checkpoint at its model.from had been
    trained again in place (same config, same path): the user got the old stage's model back as
    if trained on the new one. The run records its model.from's weights id, and a re-run on
    changed weights is refused naming the way on; unchanged weights still return at once."""
    from llavamed.model.checkpoint import read_meta
    from llavamed.train import run_training

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_llava_dir, stage1 / "checkpoint-final")
    cfg = tiny_config(make_bright_dark(tmp_path / "data", 8), tmp_path / "out", max_steps=1)
    cfg["model"] = {"from": str(stage1)}
    first = run_training(cfg, progress=False)
    assert isinstance(read_meta(first.final_checkpoint)["train"]["from_weights"], str)
    weights = first.final_checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()

    again = run_training(cfg, progress=False)
    assert again.wall_time_s == 0.0 and weights.stat().st_mtime_ns == before
    assert "its model.from weights are unchanged" in capsys.readouterr().err

    _retrain_projector_in_place(stage1 / "checkpoint-final")
    with pytest.raises(
        ConfigError,
        match=r"starting weights changed since this run finished.*another output\.dir.*delete",
    ):
        run_training(cfg, progress=False)
    assert weights.stat().st_mtime_ns == before  # refused, not retrained over
    # The command: one line, exit 1, as for a changed config.
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(conf), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the starting weights changed since this run finished" in err[0]
    # Spelled as the checkpoint itself, model.from is the same checkpoint: refused too.
    cfg["model"] = {"from": str(stage1 / "checkpoint-final")}
    with pytest.raises(ConfigError, match="starting weights changed"):
        run_training(cfg, progress=False)


def test_a_finished_run_from_before_the_record_is_still_finished(tiny_llava_dir, tmp_path, capsys):
    """Runs finished before their model.from's id was kept have none to compare: they are
    returned as finished, as before, with the note that model.from was not read again."""
    from llavamed.train import run_training

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_llava_dir, stage1)
    cfg = tiny_config(make_bright_dark(tmp_path / "data", 8), tmp_path / "out", max_steps=1)
    cfg["model"] = {"from": str(stage1)}
    first = run_training(cfg, progress=False)
    meta_path = first.final_checkpoint / "llavamed.json"
    meta = json.loads(meta_path.read_text())
    del meta["train"]["from_weights"]
    meta_path.write_text(json.dumps(meta))
    _retrain_projector_in_place(stage1)
    capsys.readouterr()
    again = run_training(cfg, progress=False)
    assert again.wall_time_s == 0.0
    assert "nor its model.from checkpoint were read again" in capsys.readouterr().err


def test_files_fingerprint_follows_the_weights_not_the_files(tiny_llava_dir, tmp_path):
    """The id a finished run keeps of its model.from: a copy keeps it, the same weights saved
    again (another file, byte for byte) keep it, a changed tensor changes it, and a weights file
    cut short is a one-line error naming it."""
    from safetensors.torch import load_file, save_file

    from llavamed.errors import InputError
    from llavamed.train.checkpointing import files_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_llava_dir, a)
    shutil.copytree(tiny_llava_dir, b)
    key = files_fingerprint(a)
    assert files_fingerprint(b) == key
    sd = load_file(b / "model.safetensors")
    save_file(sd, b / "model.safetensors", metadata={"format": "pt", "saved": "again"})
    assert files_fingerprint(b) == key
    _retrain_projector_in_place(b)
    assert files_fingerprint(b) != key
    f = b / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(InputError, match=r"model\.safetensors: unreadable weights file"):
        files_fingerprint(b)


# --- data.max_length and the image ------------------------------------------------------------


def _image_end(proc, template: str, messages) -> int:
    """Where the image tokens end in the encoded sample: the ground truth the check must match."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import IMAGE_PLACEHOLDER

    enc = encode_training_sample(messages, proc, template, num_images=1)
    image = proc.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return max(i for i, t in enumerate(enc.input_ids) if t == image) + 1


def _vicuna_load(tmp_path, proc, recs, max_length):
    from llavamed.config import DataConfig, DataSource
    from llavamed.train.data import load_samples

    Image.new("RGB", (20, 16), (90, 40, 10)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_length=max_length)
    return load_samples(cfg, proc, "vicuna_v1", quiet=True)


def test_max_length_check_counts_the_templates_own_system_message(tmp_path, tiny_llava_dir):
    """The floor was measured with an empty system message: vicuna puts its ~40-token default in
    front of every sample that has none, so a max_length between the two passed the check, then
    skipped every sample as "truncation inside image tokens" and ended in "no training samples
    left" (the data blamed for a setting). The floor is now where the image really ends."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import Message
    from llavamed.train.data import vqa_messages

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    sample = vqa_messages("Is it bright?", "yes", "closed", False)
    real = _image_end(proc, "vicuna_v1", sample)
    empty = _image_end(proc, "vicuna_v1", [Message("system", ""), *sample])
    assert real > empty + 20  # the default system message's tokens
    recs = [
        {
            "id": f"img{i}",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs it bright?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for i in range(3)
    ]
    for max_length in (empty + 5, real):
        with pytest.raises(
            ConfigError,
            match=rf"data\.max_length={max_length} cannot hold an image: the vicuna_v1 prompt .*"
            rf"system message included\) is already {real} tokens",
        ):
            _vicuna_load(tmp_path, proc, recs, max_length)
    # Exact: one token more holds the image, and the answer's tokens decide the rest.
    with pytest.raises(Exception, match="no supervised tokens after truncation"):
        encode_training_sample(sample, proc, "vicuna_v1", num_images=1, max_length=real + 1)
    whole = len(encode_training_sample(sample, proc, "vicuna_v1", num_images=1).input_ids)
    samples, rep = _vicuna_load(tmp_path, proc, recs, whole)
    assert len(samples) == 3 and not rep.skipped and not rep.truncated


def test_a_record_with_its_own_system_turn_is_measured_as_it_is(tmp_path, tiny_llava_dir):
    """A record that brings a short system turn of its own does not get the template's default:
    a max_length below the default's floor still trains it (the check is exact, not a bound
    taken from another prompt), and one too short for any system message is still refused."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import Message
    from llavamed.train.data import vqa_messages

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    sample = vqa_messages("Is it bright?", "yes", "closed", False)
    default = _image_end(proc, "vicuna_v1", sample)
    own = [Message("system", "Be brief."), *sample]
    whole = len(encode_training_sample(own, proc, "vicuna_v1", num_images=1).input_ids)
    empty = _image_end(proc, "vicuna_v1", [Message("system", ""), *sample])
    assert whole < default  # the whole sample fits below the default's floor
    recs = [
        {
            "id": "own-system",
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nIs it bright?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
    ]
    samples, rep = _vicuna_load(tmp_path, proc, recs, whole)
    assert len(samples) == 1 and not rep.skipped and not rep.truncated
    with pytest.raises(ConfigError, match=f"is already {empty} tokens"):
        _vicuna_load(tmp_path, proc, recs, empty)


# --- eval vqa / eval answer: inputs checked before the model loads ---------------------------


def _refuse_model_loads(monkeypatch) -> None:
    """From here on, loading a checkpoint fails the test: the error under test must come first."""
    from llavamed.eval import vqa_runner

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was found")

    monkeypatch.setattr(vqa_runner, "_load_model", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    _refuse_model_loads(monkeypatch)


def _rad(tmp_path, n=4):
    root = tmp_path / "vqa_rad"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.new("RGB", (24, 24), (60, 20, 200)).save(root / "VQA_RAD Image Folder" / "i0.jpg")
    recs = [
        {"qid": i, "image_name": "i0.jpg", "question": f"Question {i}?", "answer": "yes",
         "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "test_freeform"}
        for i in range(n)
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    return root


def _vqa(model, data, out, *extra):
    return main(
        ["eval", "vqa", "--model", str(model), "--dataset", "vqa-rad", "--data", str(data),
         "--out", str(out), "--bootstrap", "10", "--no-progress", *extra]
    )  # fmt: skip


def test_eval_vqa_refuses_unresumable_answers_before_loading_the_model(
    tiny_llava_dir, tmp_path, capsys, monkeypatch
):
    """Re-running into an --out whose answers were written with other settings (another length
    limit, dtype) or for other questions was refused only after the model had loaded (minutes
    for a 7B on CPU): everything it needs is known without the model."""
    data = _rad(tmp_path)
    out = tmp_path / "run"
    assert _vqa(tiny_llava_dir, data, out, "--max-new-tokens", "2", "--limit", "2") == 0
    _refuse_model_loads(monkeypatch)
    capsys.readouterr()
    for extra, why in (
        (["--max-new-tokens", "3"], "max_new_tokens=2 there, 3 now"),
        (["--max-new-tokens", "2", "--dtype", "bf16"], "dtype='float32' there, 'bfloat16' now"),
    ):
        assert _vqa(tiny_llava_dir, data, out, *extra) == 1
        err = capsys.readouterr().err
        assert f"answers written with different settings ({why}; use another --out)" in err
    # Another dataset numbering its questions alike, into the same --out.
    other = _rad(tmp_path / "other")
    recs = json.loads((other / "VQA_RAD Dataset Public.json").read_text())
    recs[0]["question"] = "Is there a fracture?"
    (other / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    assert _vqa(tiny_llava_dir, other, out, "--max-new-tokens", "2") == 1
    assert "answers written for other questions (question_id 0)" in capsys.readouterr().err


def test_eval_vqa_finds_an_unwritable_out_before_loading_the_model(
    tiny_llava_dir, tmp_path, readonly_disk, capsys, no_model_load
):
    """An --out folder on a read-only mount (or without write permission) was found out at the
    first answer's write, after the model had loaded and answered it."""
    assert _vqa(tiny_llava_dir, _rad(tmp_path), readonly_disk) == 1
    assert f"{readonly_disk}: Read-only file system" in capsys.readouterr().err


def test_eval_vqa_names_a_wrong_dataset_before_a_wrong_model(tmp_path, capsys):
    """Both wrong: the dataset is read first (the model path is only resolved after it), so the
    error a user fixes first is not followed by another after a model load."""
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _vqa(tmp_path / "no-model", empty, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "no VQA-RAD JSON" in err and "no-model" not in err


def _answer(model, questions, images, out):
    return main(
        ["eval", "answer", "--model", str(model), "--questions", str(questions), "--images",
         str(images), "--out", str(out), "--max-new-tokens", "2", "--no-progress"]
    )  # fmt: skip


def _questions(tmp_path, *images):
    q = tmp_path / "qa50.jsonl"
    q.write_text(
        "".join(
            json.dumps({"question_id": i, "image": im, "text": f"Q{i}?\n<image>"}) + "\n"
            for i, im in enumerate(images)
        )
    )
    return q


def test_eval_answer_checks_the_questions_file_first(tmp_path, capsys):
    """A missing questions file behind a mistyped --model was reported as the model's error
    (fix it, run again, then learn of the file); an empty file or one with no usable record
    'answered 0 of 0 questions' and exited 0, as a finished run."""
    no_model = tmp_path / "no-model"
    assert _answer(no_model, tmp_path / "missing.jsonl", tmp_path, tmp_path / "a.jsonl") == 1
    err = capsys.readouterr().err
    assert "missing.jsonl: file not found" in err and "no-model" not in err
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "vqa.jsonl").write_text('{"qid": 1, "question": "Q?"}\nnot json\n')
    for name, why in (
        ("empty.jsonl", "no records; expected qa50-shaped JSONL"),
        ("vqa.jsonl", "1 invalid JSON line, 1 missing field question_id"),
    ):
        assert _answer(no_model, tmp_path / name, tmp_path, tmp_path / "a.jsonl") == 1
        assert f"{name}: no usable questions ({why})" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_eval_answer_finds_missing_images_before_loading_the_model(
    tiny_llava_dir, tmp_path, capsys, no_model_load
):
    """A wrong --images folder (every image missing) loaded the model, then skipped every
    question: 'no question could be answered (N file not found)'. Said before the load now."""
    q = _questions(tmp_path, "a.jpg", "b.jpg")
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    assert _answer(tiny_llava_dir, q, wrong, tmp_path / "a.jsonl") == 1
    assert "no question could be answered (2 file not found)" in capsys.readouterr().err


def test_eval_answer_skips_missing_images_as_before(tiny_llava_dir, tmp_path, capsys):
    """Some images missing: those questions are skipped and counted as they were, the others
    answered."""
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (20, 20), (120, 30, 30)).save(img / "a.jpg")
    q = _questions(tmp_path, "a.jpg", "gone.jpg")
    assert _answer(tiny_llava_dir, q, img, tmp_path / "a.jsonl") == 0
    assert "1 answered, 0 already done, of 2 questions; skipped: 1 file not found" in (
        capsys.readouterr().err
    )


def test_eval_answer_finds_an_unwritable_out_before_loading_the_model(
    tiny_llava_dir, tmp_path, readonly_disk, capsys, no_model_load
):
    """An --out on a read-only mount was found out at the first answer's write, after the model
    had loaded and answered it."""
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (20, 20), (120, 30, 30)).save(img / "a.jpg")
    q = _questions(tmp_path, "a.jpg")
    assert _answer(tiny_llava_dir, q, img, readonly_disk / "a.jsonl") == 1
    err = capsys.readouterr().err
    assert (
        f"{readonly_disk / 'a.jsonl'}: --out cannot be written: cannot write in {readonly_disk}: "
        "Read-only file system"
    ) in err
