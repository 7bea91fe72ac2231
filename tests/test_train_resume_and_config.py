"""Audit regressions of the training loop: damaged resume checkpoints, config validation edges."""

from __future__ import annotations

import json
import shutil

import pytest

from llavamed.errors import ConfigError, InputError
from train_helpers import make_bright_dark, resumed_losses, run_interrupted, tiny_config

# Shared 2-core machine: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _damage(ck, how: str, name: str) -> None:
    p = ck / name
    if how == "missing":
        p.unlink()
    elif how == "cut short":
        p.write_bytes(p.read_bytes()[:100])
    else:  # empty
        p.write_bytes(b"")


def test_a_damaged_resume_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    """A checkpoint folder with a file deleted or cut short (a machine crash before the file
    system wrote it out) failed with a raw FileNotFoundError, torch's zip error or a
    JSONDecodeError; a missing RNG file resumed silently with other dropout masks. Each is now
    an InputError naming the file, and deleting the folder lets the run start over."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    base = tiny_config(data, tmp_path / "base", max_steps=4)
    base["output"]["save_every"] = 2
    run_interrupted(base, monkeypatch, at_step=3)
    for how, name in (
        ("missing", "trainable.pt"),
        ("cut short", "optimizer.pt"),
        ("missing", "rng-rank0.pt"),
        ("empty", "state.json"),
    ):
        out = tmp_path / f"{how}-{name}".replace(" ", "_")
        shutil.copytree(tmp_path / "base", out)
        saved = out / "config.yaml"
        saved.write_text(saved.read_text().replace(str(tmp_path / "base"), str(out)))
        cfg = json.loads(json.dumps(base))
        cfg["output"]["dir"] = str(out)
        [ck] = (out / "checkpoints").glob("step-*")
        _damage(ck, how, name)
        with pytest.raises(InputError, match="damaged resume checkpoint") as err:
            run_training(cfg, progress=False)
        assert str(ck / name) in str(err.value) and f"Delete {ck}" in str(err.value)
    # The way out the message gives: without the folder the run starts over, whole.
    shutil.rmtree(ck)
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == [1, 2, 3, 4]


@pytest.mark.parametrize("budget", [0, -5])
def test_stage0b_refuses_a_time_budget_that_allows_no_step(budget):
    """time_budget_min <= 0 trained no step and wrote the untrained starting tower (and a
    report of 0 steps) as the stage's result, exit code 0."""
    from llavamed.train.vision_vqa import make_config

    cfg = {"stage": "vision_vqa", "sources": [{"dataset": "vqa-rad", "path": "x"}]}
    with pytest.raises(ConfigError, match="time_budget_min=.*must be > 0"):
        make_config(cfg, [f"time_budget_min={budget}"])
    assert make_config(cfg, ["time_budget_min=0.5"]).time_budget_min == 0.5


def test_a_refused_resume_names_the_changed_setting_of_one_source(tmp_path, monkeypatch):
    """With several data sources, a resume on changed settings named only 'data.sources' (the
    whole list); it names the source and key, as an override would spell them."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "a", max_steps=4)
    cfg["data"] = {"sources": [{"path": str(data)}, {"path": str(data)}], "max_length": 256}
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=3)
    with pytest.raises(
        ConfigError, match=r"different config \(data\.sources\.1\.repeat, train\.lr\)"
    ):
        run_training(cfg, ["data.sources.1.repeat=2", "train.lr=1e-4"], progress=False)
    assert [m["step"] for m in run_training(cfg, progress=False).metrics] == [1, 2, 3, 4]


def test_a_run_resumes_with_another_micro_batch_size_and_trains_the_same(tmp_path, monkeypatch):
    """A changed train.micro_batch_size was refused on resume, so a run that ran out of memory
    could not go on with smaller micro-batches; the global batches and their loss do not
    depend on the cut."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    whole = tiny_config(data, tmp_path / "whole", max_steps=4)
    expected = [m["loss"] for m in run_training(whole, progress=False).metrics]
    cfg = tiny_config(data, tmp_path / "cut", max_steps=4)
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=3)
    resumed = run_training(cfg, ["train.micro_batch_size=2"], progress=False).metrics
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # A change to what a step trains on is still refused.
    with pytest.raises(ConfigError, match=r"different config \(train\.global_batch_size\)"):
        run_training(cfg, ["train.global_batch_size=4", "train.micro_batch_size=2"], progress=False)


def test_freeze_from_epoch_past_the_end_of_a_max_steps_run_is_refused(tmp_path):
    """The config refuses freeze_from_epoch >= train.epochs; with train.max_steps the run
    trained every part to its end without a word (the freeze never came)."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 24)  # 3 steps per epoch
    cfg = tiny_config(
        data,
        tmp_path / "a",
        max_steps=6,
        trainable=["projector", "lm"],
        frozen_lm_layers=1,
        freeze_from_epoch=2,
    )
    with pytest.raises(ConfigError, match=r"freeze_from_epoch=2: the run ends after step 6"):
        run_training(cfg, progress=False)
    cfg["train"]["max_steps"] = 7  # the freeze comes after step 6: step 7 trains the top only
    assert len(run_training(cfg, progress=False).metrics) == 7


def test_stage0b_damaged_resume_state_is_a_one_line_error(tmp_path, monkeypatch):
    """A stage0b_state.pt cut short (a machine crash before the file system wrote it out)
    failed with torch's zip-archive traceback."""
    import torch

    from llavamed.train.vision_vqa import STATE_FILE, run_from_config
    from vqa_fixtures import make_vqa_rad, stage0b_cfg

    data = make_vqa_rad(tmp_path / "vqa", 24)
    cfg = stage0b_cfg(data, tmp_path / "o", steps=8, save_every=3, batch_size=8)
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_from_config(cfg, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    state = tmp_path / "o" / STATE_FILE
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(InputError, match="stage0b_state.pt: damaged resume checkpoint.*Delete it"):
        run_from_config(cfg, progress=False)
    state.unlink()
    assert run_from_config(cfg, progress=False).report["steps"] == 8


def test_a_run_moved_to_another_folder_resumes_there(tmp_path, monkeypatch):
    """output.dir is saved absolute, so a stopped run moved (or copied) to another folder was
    refused as 'a different config (output.dir); use another output.dir': the folder is where
    the run lives, not what it trains."""
    import yaml

    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "a", max_steps=4)
    cfg["output"]["save_every"] = 2
    ref = run_training(cfg, ["output.save_every=0", f"output.dir={tmp_path / 'ref'}"])
    run_interrupted(cfg, monkeypatch, at_step=3)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "a", moved)
    res = run_training(cfg, [f"output.dir={moved}"], progress=False)
    assert [m["step"] for m in res.metrics] == [1, 2, 3, 4]
    assert [m["loss"] for m in res.metrics] == pytest.approx([m["loss"] for m in ref.metrics])
    assert yaml.safe_load((moved / "config.yaml").read_text())["output"]["dir"] == str(moved)


def test_a_kill_after_the_final_checkpoint_leaves_no_finished_run_without_its_reports(
    tmp_path, monkeypatch
):
    """checkpoint-final was written before loss.png and the final data_report.json, and a run
    with checkpoint-final returns at once: killed in between (KeyboardInterrupt here, as
    run_interrupted does), every later run of the command returned without ever drawing
    loss.png. The reports now come first, so such a kill leaves an unfinished run."""
    import llavamed.train.plots as plots
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "out", max_steps=2)
    real, calls = plots.plot_loss, []

    def killed(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, progress=False)
    monkeypatch.setattr(plots, "plot_loss", real)
    res = run_training(cfg, progress=False)
    assert calls == [1]
    assert (tmp_path / "out" / "loss.png").is_file()
    assert (res.final_checkpoint / "config.json").is_file()
    assert [m["step"] for m in res.metrics] == [1, 2]


def test_a_path_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """The shell does not expand `~` in `output.dir=~/runs/x` (not an assignment): the run
    wrote into a folder named '~' under the current directory."""
    from llavamed.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        {"model": {"init": {"lm": "tiny", "vision": "tiny"}}, "data": {"path": "~/d.json"}},
        ["output.dir=~/runs/x", "model.init.vision=~/tower"],
    )
    assert cfg.output.dir == str(tmp_path / "home" / "runs" / "x")
    assert cfg.data.sources[0].path == str(tmp_path / "home" / "d.json")
    assert cfg.model.init["vision"] == str(tmp_path / "home" / "tower")


def test_a_required_key_left_out_is_named(tmp_path):
    """A stage-0b source without its path (or dataset) was a TypeError traceback from the
    dataclass constructor; --list-keys marks those keys '(required)'."""
    from llavamed.train.vision_vqa import make_config

    with pytest.raises(ConfigError, match=r"^sources\[0\]\.path: required$"):
        make_config({"stage": "vision_vqa", "sources": [{"dataset": "slake"}]})
    with pytest.raises(ConfigError, match=r"^sources\[1\]\.dataset: required$"):
        make_config(
            {"stage": "vision_vqa", "sources": [{"dataset": "slake", "path": "s"}, {"path": "r"}]}
        )


def test_a_misspelt_stage_is_named_before_the_keys():
    """`stage: vision-vqa` (or `Instruct`) was read as a LLaVA config, which said that the
    stage-0b keys were unknown ('sources: unknown key'), not that the stage was misspelt."""
    from llavamed.config import load_config

    raw = {"stage": "vision-vqa", "sources": [{"dataset": "slake", "path": "s"}]}
    with pytest.raises(ConfigError, match=r"stage='vision-vqa': choose from .*vision_vqa"):
        load_config(raw)
    with pytest.raises(ConfigError, match="stage: vision_vqa is stage 0b"):
        load_config(raw | {"stage": "vision_vqa"})


def test_a_run_resumes_with_gradient_checkpointing_switched_and_trains_the_same(
    tmp_path, monkeypatch
):
    """Turning train.gradient_checkpointing on to get past an out-of-memory was refused on
    resume as 'a different config'; backward recomputes the same activations, so the run goes
    on to the same losses."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    kw = dict(max_steps=4, trainable=["projector", "lm"], lora=lora)  # LoRA dropout: RNG too
    expected = [
        m["loss"]
        for m in run_training(tiny_config(data, tmp_path / "w", **kw), progress=False).metrics
    ]
    cfg = tiny_config(data, tmp_path / "cut", **kw)
    resumed = resumed_losses(cfg, monkeypatch, ["train.gradient_checkpointing=true"])
    assert resumed == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_a_damaged_or_deleted_config_yaml_falls_back_to_the_checkpoints_copy(tmp_path, monkeypatch):
    """OUT/config.yaml cut short by a machine crash was a YAML traceback, or (empty) 'a
    different config (data, distributed, model, ...)', which sent the user to delete the run;
    deleted, any config resumed the checkpoints. Each resume checkpoint keeps a copy."""
    from llavamed.train import run_training
    from llavamed.train.checkpointing import latest

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "out", max_steps=4)
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=3)
    saved = tmp_path / "out" / "config.yaml"
    saved.write_text("")
    with pytest.raises(ConfigError, match=r"different config \(train\.lr\)"):
        run_training(cfg, ["train.lr=1e-3"], progress=False)
    saved.unlink()
    with pytest.raises(ConfigError, match=r"different config \(train\.lr\)"):
        run_training(cfg, ["train.lr=1e-3"], progress=False)
    copy = latest(tmp_path / "out") / "config.yaml"
    good = copy.read_text()
    saved.write_text("model: [")
    copy.write_text("model: [")
    with pytest.raises(ConfigError, match="saved config is unreadable"):
        run_training(cfg, progress=False)
    copy.write_text(good)
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == [1, 2, 3, 4]


def test_a_finished_run_says_it_returned_without_training(tmp_path, capsys):
    """A run with checkpoint-final returned at once without a word, also after its data file
    was edited (the data are not tokenized again to check them): the user took the old model
    for one trained on the new data. It now says what it returned and how to train again."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "out", max_steps=1)
    first = run_training(cfg, progress=False)
    capsys.readouterr()
    again = run_training(cfg, progress=False)
    err = capsys.readouterr().err
    assert again.final_checkpoint == first.final_checkpoint
    assert "already holds checkpoint-final" in err and "use another output.dir" in err
    # The data are not tokenized again to check them (a model.from is checked by its weights'
    # id: tests/test_train_eval_checks.py).
    assert "its data were not read again" in err


def test_a_finished_run_without_its_config_yaml_is_not_trained_again(tmp_path, capsys):
    """OUT/config.yaml deleted: the config was checked against the copy in checkpoint-final,
    and then the run trained again from scratch and replaced its final checkpoint (hours, for a
    real stage) instead of returning it."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 8)
    cfg = tiny_config(data, tmp_path / "out", max_steps=1)
    run_training(cfg, progress=False)
    weights = tmp_path / "out" / "checkpoint-final" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    (tmp_path / "out" / "config.yaml").unlink()
    capsys.readouterr()
    again = run_training(cfg, progress=False)
    assert again.wall_time_s == 0.0 and weights.stat().st_mtime_ns == before
    assert "already holds checkpoint-final" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec", [{"lm": "tiny", "bogus": 1}, "tiny", {"lm": "tiny", "lm_layers": "eight"}]
)
def test_a_damaged_model_spec_in_llavamed_json_is_one_line_naming_the_file(
    tiny_llava_dir, tmp_path, spec
):
    """Training from a checkpoint read its llavamed.json spec with ModelSpec(**spec): an unknown
    key (an edit, another version) or a spec that is not an object was a TypeError traceback."""
    from llavamed.train import run_training

    ck = tmp_path / "ck"
    shutil.copytree(tiny_llava_dir, ck)
    meta = json.loads((ck / "llavamed.json").read_text())
    (ck / "llavamed.json").write_text(json.dumps(meta | {"spec": spec}))
    cfg = tiny_config(make_bright_dark(tmp_path / "data", 8), tmp_path / "out", max_steps=1)
    cfg["model"] = {"from": str(ck)}
    with pytest.raises(InputError, match=r"llavamed\.json.*damaged checkpoint metadata.*spec"):
        run_training(cfg, progress=False)


@pytest.mark.parametrize(
    "content, match",
    [("[1, 2]", "holds a JSON list, not a DeepSpeed config object"), (b"\xff\xfe{", "cannot read")],
)
def test_a_deepspeed_config_that_is_not_an_object_is_a_config_error(tmp_path, content, match):
    """A DeepSpeed JSON holding a list was a TypeError traceback in every process (and bytes that
    are not UTF-8 a UnicodeDecodeError), after the model had loaded and the data tokenized."""
    from llavamed.train.distributed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ConfigError, match=f"distributed.deepspeed_config: .*{match}"):
        deepspeed_config(str(path), micro_batch=1, accum=1, world=2, lr_holder={})


def test_a_run_where_no_image_ever_loads_stops_instead_of_exporting_an_untrained_model(tmp_path):
    """Every image failed in the DataLoader workers (here: not image files): each step skipped,
    and the run "finished" with 0 tokens trained, wrote checkpoint-final (the untrained model,
    handed on to the next stage) and exited 0. It stops after the first epoch, naming why."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 8)
    for png in (tmp_path / "data" / "images").glob("*.png"):
        png.write_bytes(b"not a png")
    cfg = tiny_config(data, tmp_path / "out", max_steps=6)
    with pytest.raises(
        InputError, match=r"no sample loads \(every sample's image failed .*8 not an image"
    ):
        run_training(cfg, progress=False)
    assert not (tmp_path / "out" / "checkpoint-final").exists()
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["skipped_while_training"] == {"not an image": 8}


def test_lora_target_modules_that_match_nothing_are_a_config_error(tiny_llava_dir, capsys):
    """No LM layer with a listed name (a typo, or another LM family's names) was peft's
    NoMatchingPeftModuleError traceback naming a regex; one unknown name among known ones put
    fewer adapters on, unsaid."""
    from llavamed.config import load_config
    from llavamed.train.trainer import apply_lora, build_model

    def lora(targets):
        cfg = load_config(
            {
                "model": {"from": str(tiny_llava_dir)},
                "data": {"path": "x.json"},
                "train": {"lora": {"r": 4, "target_modules": targets}},
            }
        )
        model, *_ = build_model(cfg)
        return apply_lora(model, cfg)

    for targets, match in (([], "empty"), (["c_attn"], "no linear layer of the LM has these")):
        with pytest.raises(ConfigError, match=rf"train.lora.target_modules=.*{match}.*q_proj"):
            lora(targets)
    model = lora(["q_proj", "v_porj"])
    assert "no linear layer named v_porj" in capsys.readouterr().err
    assert any("q_proj.lora_A" in n for n, _ in model.named_parameters())


def test_model_from_spelled_as_the_run_or_its_checkpoint_final_is_one_run(
    tiny_llava_dir, tmp_path, capsys
):
    """The docs take `model.from=runs/stage1` or `model.from=runs/stage1/checkpoint-final`: a
    finished run re-run with the other spelling was 'a run with a different config
    (model.from)', to be deleted."""
    from llavamed.train import run_training

    stage1 = tmp_path / "stage1"
    shutil.copytree(tiny_llava_dir, stage1 / "checkpoint-final")
    cfg = tiny_config(make_bright_dark(tmp_path / "data", 8), tmp_path / "out", max_steps=1)
    cfg["model"] = {"from": str(stage1)}
    first = run_training(cfg, progress=False)
    cfg["model"] = {"from": str(stage1 / "checkpoint-final")}
    again = run_training(cfg, progress=False)
    assert again.final_checkpoint == first.final_checkpoint
    assert "already holds checkpoint-final" in capsys.readouterr().err
    # Another checkpoint is another run, as before.
    other = tmp_path / "other"
    shutil.copytree(tiny_llava_dir, other)
    cfg["model"] = {"from": str(other)}
    with pytest.raises(ConfigError, match=r"different config \(model\.from\)"):
        run_training(cfg, progress=False)
