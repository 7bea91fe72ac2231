"""Stage 0b (``stage: vision_vqa``): the tower learns a VQA train split's yes/no questions
directly; the saved tower composes into a LLaVA; bad images are counted; re-runs return at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavamed.errors import ConfigError
from vqa_fixtures import make_vqa_rad, stage0b_cfg

# Shared 2-core machine: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_tower_learns_the_questions_and_composes(tmp_path):
    from llavamed.model.compose import ModelSpec, build
    from llavamed.train.vision_vqa import run_from_config

    data = make_vqa_rad(tmp_path / "rad", 160)
    res = run_from_config(stage0b_cfg(data, tmp_path / "out"), progress=False)
    rep = res.report
    print("stage 0b held-out accuracy", rep["val_accuracy"], rep["val_per_question"])
    # Both questions need the image (each is 50/50 yes); a side question needs local evidence.
    assert rep["val_accuracy"] >= 0.85
    for q in ("Is the square on the left?", "Is the image bright?"):
        assert rep["val_per_question"][q]["accuracy"] >= 0.75, q
    assert rep["skipped"] == {"corrupt image": 1}
    assert rep["data"]["images"] == 128  # 160 images, 32 of them test; broken.png skipped
    assert (res.output_dir / "vision_vqa_report.md").read_text().startswith("# Stage 0b")

    # The tower is a plain vision folder that `model init --vision DIR` composes.
    model, _ = build(ModelSpec(lm="tiny", vision=str(res.tower_dir)))
    from transformers import CLIPVisionModel

    saved = CLIPVisionModel.from_pretrained(res.tower_dir).state_dict()
    inner = model.model.vision_tower.state_dict()
    assert all(torch.equal(inner[k], v) for k, v in saved.items())

    # A finished run with the same recipe returns at once; an override is a new recipe.
    again = run_from_config(stage0b_cfg(data, tmp_path / "out"), progress=False)
    assert again.wall_time_s == 0.0


def test_untrained_baseline_is_chance_and_bad_configs_are_refused(tmp_path):
    from llavamed.train.vision_vqa import make_config, run_from_config

    data = make_vqa_rad(tmp_path / "rad", 80)
    res = run_from_config(stage0b_cfg(data, tmp_path / "out", steps=1, lr=1e-6), progress=False)
    # The side question needs learned local evidence: untrained, it is near chance (so the
    # learning test above is not a given). Brightness shifts every feature, so a random readout
    # can get it right by luck; it is not checked here.
    side = res.report["val_per_question"]["Is the square on the left?"]["accuracy"]
    assert side <= 0.7
    with pytest.raises(ConfigError, match="readout"):
        make_config(stage0b_cfg(data, tmp_path / "o", readout="max"))
    with pytest.raises(ConfigError):
        make_config(stage0b_cfg(data, tmp_path / "o", nonsense=1))
    empty = tmp_path / "empty"
    (empty / "VQA_RAD Image Folder").mkdir(parents=True)
    (empty / "VQA_RAD Dataset Public.json").write_text("[]")
    with pytest.raises(ConfigError, match="no closed yes/no"):
        run_from_config(
            stage0b_cfg(
                data, tmp_path / "o2", sources=[{"dataset": "vqa-rad", "path": str(empty)}]
            ),
            progress=False,
        )


def test_an_image_stored_as_bytes_is_one_image_whatever_its_questions(tmp_path):
    # Parquet exports (PathVQA, VQA-RAD) carry each question with its own copy of the image
    # bytes. Keyed per question, an image's copies landed on both sides of the held-out split.
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llavamed.model.compose import ModelSpec, build
    from llavamed.train.vision_vqa import load_yes_no, make_config

    rows = {"image": [], "question": [], "answer": []}
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(buf, format="PNG")
        for q in ("Is it bright?", "Is it red?"):
            rows["image"].append({"bytes": buf.getvalue(), "path": None})
            rows["question"].append(q)
            rows["answer"].append("yes" if i % 2 else "no")
    (tmp_path / "pvqa").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "pvqa" / "train-00000-of-00001.parquet")
    cfg = make_config(
        stage0b_cfg(
            tmp_path,
            tmp_path / "o",
            sources=[{"dataset": "pathvqa", "path": str(tmp_path / "pvqa")}],
        )
    )
    _, processor = build(ModelSpec(lm="tiny", vision="tiny"))
    table, info = load_yes_no(cfg, processor.image_processor)
    assert info["images"] == 6 and all(len(qa) == 2 for qa in table.labels)


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_the_tower_sees_the_composed_llavas_geometry(tmp_path, aspect):
    # Stage 0b once squashed every image to a square while stage 0 and the composed LLaVA pad:
    # the tower trained on one geometry and was shown another. A wide image tells them apart.
    import numpy as np

    from llavamed.model.compose import ModelSpec, build
    from llavamed.model.vision_tower import load_tower, pad_to_square_uint8
    from llavamed.train.vision_vqa import image_processor, make_config

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 61, 3), dtype=np.uint8))
    cfg = make_config(stage0b_cfg(tmp_path, tmp_path / "o", aspect=aspect))
    tower = load_tower(cfg.vision)
    ours = image_processor(cfg, tower)(images=[img], return_tensors="pt")["pixel_values"][0]
    _, processor = build(ModelSpec(lm="tiny", vision="tiny", aspect=aspect))
    llava = processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(ours, llava)
    if aspect == "pad":  # stage 0's own pad-then-resize, up to its uint8 rounding
        s0 = pad_to_square_uint8(img, tower.image_size, tower.mean).float() / 255
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (tower.mean, tower.std))
        assert torch.allclose(ours, (s0 - mean) / std, atol=2 / 255 / min(tower.std))
    with pytest.raises(ConfigError, match="aspect"):
        make_config(stage0b_cfg(tmp_path, tmp_path / "o", aspect="squash"))


def test_a_run_the_time_budget_stopped_goes_on_with_a_larger_budget(tmp_path, capsys):
    """The budget's stop deleted the resume state, so a larger budget started again from step
    0, against the documented "the budget counts training time over every attempt"."""
    from transformers import CLIPVisionModel

    from llavamed.train.vision_vqa import STATE_FILE, run_from_config

    data = make_vqa_rad(tmp_path / "rad", 48)
    kw = dict(steps=6, batch_size=8, save_every=100, log_every=1)
    whole = run_from_config(stage0b_cfg(data, tmp_path / "whole", **kw), progress=False)
    out = tmp_path / "budget"
    cut = run_from_config(stage0b_cfg(data, out, **kw, time_budget_min=1e-9), progress=False)
    assert cut.report["steps"] == 1 and (out / STATE_FILE).exists()
    more = run_from_config(stage0b_cfg(data, out, **kw, time_budget_min=60), progress=False)
    assert f"stage 0b: resuming {out} at step 1/6" in capsys.readouterr().err
    assert [r["loss"] for r in more.report["log"]] == [r["loss"] for r in whole.report["log"]]
    a = CLIPVisionModel.from_pretrained(whole.tower_dir).state_dict()
    b = CLIPVisionModel.from_pretrained(more.tower_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / STATE_FILE).exists()


def test_a_killed_run_resumes_from_its_last_state_to_the_same_tower(tmp_path, monkeypatch, capsys):
    from transformers import CLIPVisionModel

    from llavamed.train.vision_vqa import STATE_FILE, run_from_config

    data = make_vqa_rad(tmp_path / "rad", 48)
    kw = dict(steps=12, batch_size=8, save_every=5, log_every=2)
    whole = run_from_config(stage0b_cfg(data, tmp_path / "whole", **kw), progress=False)

    # Killed during step 8: the state of step 5 is on disk, nothing after it.
    real_clip, calls = torch.nn.utils.clip_grad_norm_, [0]

    def dies_at_step_8(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_at_step_8)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_from_config(stage0b_cfg(data, out, **kw), progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert torch.load(out / STATE_FILE, weights_only=False)["step"] == 5
    assert not (out / "vision_tower").exists()

    # A resume that may change only the logging and the budget goes on from step 5.
    resumed = run_from_config(stage0b_cfg(data, out, **kw, time_budget_min=60), progress=False)
    assert f"stage 0b: resuming {out} at step 5/12" in capsys.readouterr().err
    assert resumed.report["steps"] == 12
    assert [r["step"] for r in resumed.report["log"]] == [r["step"] for r in whole.report["log"]]
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]
    a = CLIPVisionModel.from_pretrained(whole.tower_dir).state_dict()
    b = CLIPVisionModel.from_pretrained(resumed.tower_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / STATE_FILE).exists()  # finished: the report stands for the run
    # Finished: a setting that changes nothing computed (logging) does not retrain it.
    again = run_from_config(
        stage0b_cfg(data, out, **kw | {"log_every": 3, "time_budget_min": 60}), progress=False
    )
    assert again.wall_time_s == 0.0

    # Killed again, then restarted with another recipe: the old state is not used.
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_at_step_8)
    calls[0] = 0
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        run_from_config(stage0b_cfg(data, other, **kw), progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    capsys.readouterr()
    fresh = run_from_config(stage0b_cfg(data, other, **kw | {"lr": 1e-3}), progress=False)
    assert "other settings (lr)" in capsys.readouterr().err
    assert fresh.report["steps"] == 12

    # Killed, then the VQA file changes under the same path: the state belongs to other data.
    data2 = make_vqa_rad(tmp_path / "rad2", 48)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", dies_at_step_8)
    calls[0] = 0
    with pytest.raises(KeyboardInterrupt):
        run_from_config(stage0b_cfg(data2, tmp_path / "o3", **kw), progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    questions = data2 / "VQA_RAD Dataset Public.json"
    questions.write_text(json.dumps(json.loads(questions.read_text())[:-12]))
    capsys.readouterr()
    run_from_config(stage0b_cfg(data2, tmp_path / "o3", **kw), progress=False)
    assert "other settings (the VQA data)" in capsys.readouterr().err


def test_a_finished_run_stays_done_under_another_budget_but_not_under_other_inputs(
    tmp_path, capsys
):
    """A finished run (resume state deleted) given only another time budget was trained again
    from step 0 and its tower overwritten; changed VQA files or new weights behind the starting
    tower's path returned the old tower without a word."""
    import shutil

    from transformers import CLIPVisionModel

    from llavamed.train.vision_vqa import run_from_config

    data = make_vqa_rad(tmp_path / "rad", 48)
    kw = dict(steps=6, batch_size=8, log_every=1)
    out = tmp_path / "out"
    done = run_from_config(stage0b_cfg(data, out, **kw), progress=False)
    start = tmp_path / "start"  # a starting tower for the last check
    shutil.copytree(done.tower_dir, start)
    budget = run_from_config(stage0b_cfg(data, out, **kw, time_budget_min=1e-9), progress=False)
    assert budget.wall_time_s == 0.0 and budget.report["steps"] == 6
    assert json.loads((out / "vision_vqa_report.json").read_text())["steps"] == 6

    # The VQA file is rewritten in place: another run.
    recs = json.loads((data / "VQA_RAD Dataset Public.json").read_text())
    for r in recs:
        r["answer"] = {"yes": "no", "no": "yes"}.get(r["answer"], r["answer"])
    (data / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    capsys.readouterr()
    flipped = run_from_config(stage0b_cfg(data, out, **kw), progress=False)
    assert flipped.wall_time_s > 0 and flipped.report["data_key"] != done.report["data_key"]
    # ... and says why it trains again (it did so without a word).
    assert "finished run with other settings (the VQA data)" in capsys.readouterr().err

    # New weights behind the same starting-tower path: another run.
    first = run_from_config(
        stage0b_cfg(data, tmp_path / "from", **kw, vision=str(start)), progress=False
    )
    CLIPVisionModel.from_pretrained(flipped.tower_dir).save_pretrained(start)
    second = run_from_config(
        stage0b_cfg(data, tmp_path / "from", **kw, vision=str(start)), progress=False
    )
    assert second.wall_time_s > 0
    assert second.report["start_tower"] != first.report["start_tower"]


def test_bad_stage0b_inputs_are_clear_errors_before_training(tmp_path):
    from llavamed.errors import InputError
    from llavamed.train.vision_vqa import run_from_config

    # Every yes/no question's image is unreadable: was torch's "stack expects a non-empty
    # TensorList".
    root = tmp_path / "broken"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    (root / "VQA_RAD Image Folder" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rec = {"qid": 0, "image_name": "a.png", "question": "Is it bright?", "answer": "yes",
           "answer_type": "CLOSED", "phrase_type": "freeform"}  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec]))
    with pytest.raises(InputError, match="no usable image.*1 corrupt image"):
        run_from_config(stage0b_cfg(root, tmp_path / "o1", steps=2), progress=False)

    data = make_vqa_rad(tmp_path / "rad", 24)
    # A hold-out fraction that rounds to every image leaves one to train on (was torch's
    # "random_ expects 'from' to be less than 'to'").
    res = run_from_config(
        stage0b_cfg(data, tmp_path / "o2", steps=2, batch_size=4, val_fraction=0.99), progress=False
    )
    assert res.report["steps"] == 2 and res.report["data"]["images"] == 19
    # A feature layer the tower does not have: a ConfigError naming this stage's key and the
    # range (was an IndexError deep in the forward pass, after every image had loaded; then
    # an error naming vision_feature_layer and a --vision-feature-layer flag stage 0b lacks).
    with pytest.raises(ConfigError, match=r"^feature_layer=-9: the tower has 2 layers"):
        run_from_config(
            stage0b_cfg(data, tmp_path / "o3", steps=2, feature_layer=-9), progress=False
        )


def test_the_same_run_spelled_with_other_paths_or_moved_is_not_trained_again(tmp_path, monkeypatch):
    """The quickstart runs stage 0b with absolute paths, configs/cpu/stage0b_vision_vqa.yaml
    spells them relative: the finished run was matched by its config's strings, so running the
    shipped config over the quickstart's folder trained stage 0b again from step 0 and overwrote
    the tower stage 1 was built on. So did a run folder moved elsewhere, and `output_dir=~/x`
    wrote into a folder named '~'."""
    import shutil

    from llavamed.train.vision_vqa import make_config, run_from_config

    monkeypatch.chdir(tmp_path)
    data = make_vqa_rad(tmp_path / "rad", 24)
    kw = dict(steps=3, batch_size=4, log_every=1)
    done = run_from_config(stage0b_cfg(data, tmp_path / "out", **kw), progress=False)
    assert done.wall_time_s > 0
    relative = run_from_config(stage0b_cfg(Path("rad"), Path("out"), **kw), progress=False)
    assert relative.wall_time_s == 0.0  # returned the finished run
    assert relative.report["data_key"] == done.report["data_key"]

    shutil.move(tmp_path / "out", tmp_path / "moved")
    moved = run_from_config(stage0b_cfg(data, tmp_path / "moved", **kw), progress=False)
    assert moved.wall_time_s == 0.0 and moved.tower_dir == tmp_path / "moved" / "vision_tower"

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf = make_config(stage0b_cfg(data, Path("x"), **kw), ["output_dir=~/runs/b", "vision=tiny"])
    assert conf.output_dir == str(tmp_path / "home" / "runs" / "b")
    assert conf.vision == "tiny" and conf.sources[0].path == str(data)


def test_a_text_encoder_with_other_files_is_another_run(tmp_path):
    """The finished run (and the resume state) were matched by the text encoder's name only: a
    local encoder folder with other files behind the same path returned the tower whose readout
    had learnt the old encoder's question embeddings (stage 0 keys its runs by the files)."""
    import shutil

    from llavamed.train.text_encoder import embedded_text_encoder_dir
    from llavamed.train.vision_vqa import run_from_config

    enc = tmp_path / "encoder"
    shutil.copytree(embedded_text_encoder_dir(), enc)
    data = make_vqa_rad(tmp_path / "rad", 24)
    kw = dict(steps=3, batch_size=4, log_every=1, text_encoder=str(enc))
    first = run_from_config(stage0b_cfg(data, tmp_path / "out", **kw), progress=False)
    assert (
        run_from_config(stage0b_cfg(data, tmp_path / "out", **kw), progress=False).wall_time_s == 0
    )
    conf = json.loads((enc / "config.json").read_text())
    conf["hidden_dropout_prob"] = 0.25  # the same name, another encoder
    (enc / "config.json").write_text(json.dumps(conf))
    second = run_from_config(stage0b_cfg(data, tmp_path / "out", **kw), progress=False)
    assert second.wall_time_s > 0
    assert second.report["text_encoder"] != first.report["text_encoder"]


def test_an_unreadable_report_is_not_a_finished_run(tmp_path, capsys):
    """vision_vqa_report.json empty or cut short (a machine crash before the file system wrote
    it out) was a JSONDecodeError traceback on every re-run; the run is trained again."""
    from llavamed.train.vision_vqa import REPORT, run_from_config

    data = make_vqa_rad(tmp_path / "rad", 24)
    kw = dict(steps=2, batch_size=4, log_every=1)
    out = tmp_path / "out"
    done = run_from_config(stage0b_cfg(data, out, **kw), progress=False)
    (out / REPORT).write_text(json.dumps(done.report)[:40])
    again = run_from_config(stage0b_cfg(data, out, **kw), progress=False)
    assert again.wall_time_s > 0 and again.report["steps"] == 2
    assert "unreadable" in capsys.readouterr().err
    assert json.loads((out / REPORT).read_text())["steps"] == 2


def test_unreadable_images_are_named_in_the_report(tmp_path):
    """They were counted in the report and named on stderr only, gone with the terminal."""
    from llavamed.train.vision_vqa import run_from_config

    data = make_vqa_rad(tmp_path / "rad", 10)  # + broken.png
    res = run_from_config(
        stage0b_cfg(data, tmp_path / "out", steps=1, batch_size=4), progress=False
    )
    broken = str(data / "VQA_RAD Image Folder" / "broken.png")
    assert res.report["skipped_images"] == {broken: "corrupt image"}
    md = (res.output_dir / "vision_vqa_report.md").read_text()
    assert f"unreadable image {broken}: corrupt image" in md


def test_a_run_killed_before_its_markdown_report_writes_it_on_the_re_run(tmp_path, monkeypatch):
    """The JSON report (the mark of a finished run) was written before report.md: a run killed
    between the two was found finished on the re-run and never wrote report.md."""
    import llavamed.train.vision_vqa as vv

    data = make_vqa_rad(tmp_path / "rad", 10)
    cfg = stage0b_cfg(data, tmp_path / "out", steps=2, batch_size=4)
    real = vv.atomic_write_text

    def killed(path, *a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(vv, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        vv.run_from_config(cfg, progress=False)
    monkeypatch.setattr(vv, "atomic_write_text", real)
    res = vv.run_from_config(cfg, progress=False)
    assert res.report["steps"] == 2
    assert (tmp_path / "out" / "vision_vqa_report.md").exists()


def test_a_preset_beside_a_folder_of_its_name_is_keyed_by_the_name(tmp_path, monkeypatch, capsys):
    """Stage 0b keyed its starting tower by the files of any folder of that name, which the
    preset ``tiny`` never reads: an edit to a ``tiny/`` folder beside the run retrained the
    finished run from step 0. Presets are keyed by name, as stage 0 keys them."""
    from llavamed.train.vision_vqa import run_from_config

    data = make_vqa_rad(tmp_path / "rad", 24)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text('{"model_type": "clip_vision_model"}')
    cfg = stage0b_cfg(data, tmp_path / "o", steps=2, batch_size=8)
    first = run_from_config(cfg, progress=False)
    assert first.report["start_tower"] == "tiny"
    (tmp_path / "tiny" / "config.json").write_text('{"model_type": "siglip_vision_model"}')
    again = run_from_config(cfg, progress=False)
    assert "other settings" not in capsys.readouterr().err
    assert again.wall_time_s == 0.0 and again.report == first.report
