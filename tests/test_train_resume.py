"""SIGKILL mid-run, re-run the same command: the loss curve matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from train_helpers import ROOT, make_bright_dark, run_interrupted, single_thread_env, tiny_config

STEPS = 14


def _losses(out):
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    }


def _write(tmp_path, name, data):
    cfg = tiny_config(
        data, tmp_path / name, max_steps=STEPS, lr=5e-3, lr_scheduler="cosine", warmup_ratio=0.1
    )
    cfg["output"]["save_every"] = 3
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _cmd(cfg):
    return [sys.executable, "-m", "llavamed", "train", str(cfg), "--no-progress"]


@pytest.mark.slow  # three real CLI processes: ~60 s on the shared 2-core machine
def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path):
    data = make_bright_dark(tmp_path / "data", 32)
    ref_cfg, cfg = _write(tmp_path, "ref", data), _write(tmp_path, "killed", data)
    env = single_thread_env()

    proc = subprocess.Popen(
        _cmd(cfg), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = tmp_path / "killed" / "checkpoints" / "step-0000006" / "state.json"
    deadline = time.time() + 240
    while not target.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    time.sleep(0.3)  # let it get a little past the checkpoint, mid-step
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "checkpoint-final").exists()
    done_before = max(_losses(tmp_path / "killed"))
    assert done_before < STEPS

    again = subprocess.run(_cmd(cfg), env=env, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from step-00000" in again.stderr
    ref = subprocess.run(_cmd(ref_cfg), env=env, cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    got, want = _losses(tmp_path / "killed"), _losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once: no gap, no duplicate
    assert [got[s] for s in sorted(got)] == pytest.approx(
        [want[s] for s in sorted(want)], rel=1e-4, abs=1e-5
    )
    assert (tmp_path / "killed" / "checkpoint-final" / "config.json").is_file()
    # only the newest resume checkpoint is kept (output.keep_last = 1)
    assert len(list((tmp_path / "killed" / "checkpoints").glob("step-*"))) == 1


def test_interrupted_in_process_run_resumes_exactly(tmp_path, monkeypatch):
    """The fast variant: an exception after step 5 (checkpoint at 3), then a re-run."""
    import torch

    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 24)
    cfg = tiny_config(
        data, tmp_path / "a", max_steps=7, lr=5e-3, lr_scheduler="cosine", warmup_ratio=0.2
    )
    cfg["output"]["save_every"] = 3
    ref = run_training(
        cfg | {"output": {"dir": str(tmp_path / "ref"), "save_every": 0}}, progress=False
    )

    run_interrupted(cfg, monkeypatch, at_step=6)
    assert max(_losses(tmp_path / "a")) == 5
    res = run_training(cfg, progress=False)
    got = [m["loss"] for m in res.metrics]
    assert [m["step"] for m in res.metrics] == list(range(1, 8))
    assert got == pytest.approx([m["loss"] for m in ref.metrics], rel=1e-4, abs=1e-5)


def test_mid_epoch_resume_is_exact_with_dropout(tmp_path, monkeypatch):
    """LoRA dropout draws from the global RNG, so a resume is exact only if nothing else draws
    from it differently than in an uninterrupted run (a DataLoader iterator used to)."""
    import torch

    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 24)  # 3 steps per epoch
    cfg = tiny_config(data, tmp_path / "a", max_steps=6, lr=5e-3, trainable=["projector", "lm"])
    cfg["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.3}
    cfg["output"]["save_every"] = 2  # step 2: mid-epoch
    ref = run_training(
        cfg | {"output": {"dir": str(tmp_path / "ref"), "save_every": 0}}, progress=False
    )
    run_interrupted(cfg, monkeypatch, at_step=4)
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == list(range(1, 7))
    assert [m["loss"] for m in res.metrics] == pytest.approx(
        [m["loss"] for m in ref.metrics], rel=1e-6, abs=1e-7
    )


def _stopped_at_step_3(tmp_path, monkeypatch):
    """A 4-step run stopped after step 3: its config and its one checkpoint (step 2)."""
    import torch

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "a", max_steps=4)
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=3)
    [ck] = (tmp_path / "a" / "checkpoints").glob("step-*")
    return cfg, ck


def test_a_resume_checkpoint_that_does_not_match_the_model_is_refused(tmp_path, monkeypatch):
    """Strict loading: a trained parameter missing from the checkpoint would silently restart
    from its initial weights, and an unknown key would be dropped."""
    import torch

    from llavamed.errors import InputError
    from llavamed.train import run_training

    cfg, ck = _stopped_at_step_3(tmp_path, monkeypatch)
    sd = torch.load(ck / "trainable.pt", weights_only=False)
    renamed = {k.replace("layers.1.", "layers.9."): v for k, v in sd.items()}
    assert renamed != sd
    torch.save(renamed, ck / "trainable.pt")
    with pytest.raises(InputError, match=r"does not match the model being trained.*layers\.1\."):
        run_training(cfg, progress=False)


def test_a_checkpoint_from_another_engine_family_is_refused_by_name(tmp_path, monkeypatch):
    """distributed.* may change on resume, but DeepSpeed's checkpoint layout is its own: a
    DeepSpeed checkpoint resumed by a torch engine failed on a missing trainable.pt."""

    from llavamed.errors import ConfigError
    from llavamed.train import run_training
    from llavamed.train.checkpointing import STATE

    cfg, ck = _stopped_at_step_3(tmp_path, monkeypatch)
    state = json.loads((ck / STATE).read_text())
    assert state["engine"] == "single"
    # What a DeepSpeed run leaves: its own folder, no trainable.pt.
    (ck / "trainable.pt").unlink()
    (ck / "deepspeed").mkdir()
    (ck / STATE).write_text(json.dumps({**state, "engine": "deepspeed"}))
    with pytest.raises(ConfigError, match="saved by the deepspeed engine and this run uses single"):
        run_training(cfg, progress=False)


def test_skips_before_a_resume_stay_in_the_data_report(tmp_path, monkeypatch):
    """A corrupt image is met once per epoch; a run resumed mid-way reports the same skips as an
    uninterrupted one (the batches before the checkpoint are not read again), and the image is
    one skipped sample, not one per epoch."""
    import torch

    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 16)
    (data.parent / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    counts = {}
    for name, interrupt in (("whole", False), ("resumed", True)):
        cfg = tiny_config(data, tmp_path / name, max_steps=4)  # 2 epochs of 2 steps
        cfg["output"]["save_every"] = 2
        if interrupt:
            run_interrupted(cfg, monkeypatch, at_step=3)
        run_training(cfg, progress=False)
        report = json.loads((tmp_path / name / "data_report.json").read_text())
        counts[name] = (report["skipped_while_training"], report["skipped_while_training_visits"])
    # One corrupt image, met once in each of the two epochs: one sample skipped, two visits.
    assert counts["whole"] == ({"corrupt image": 1}, 2)
    assert counts["resumed"] == counts["whole"]


def test_a_global_batch_that_failed_to_load_leaves_the_weights_alone(tmp_path, monkeypatch):
    """Every image of step 3's batch fails to decode: nothing is supervised, so the weights must
    not move (AdamW would still step on the momentum of steps 1-2)."""
    import torch

    import llavamed.images
    from llavamed.errors import InputError
    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 32)
    cfg = tiny_config(data, tmp_path / "a", max_steps=3, lr=5e-3)  # global batch 8
    real, calls = llavamed.images.load_image, {"n": 0}

    def failing_from_step_3(src, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 16:
            raise InputError(kw.get("name", "x"), "corrupt image")
        return real(src, *a, **kw)

    monkeypatch.setattr(llavamed.images, "load_image", failing_from_step_3)
    weights = {}

    def snapshot(step, model, processor):
        weights[step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    res = run_training(cfg, progress=False, on_step=snapshot)
    assert [m["supervised_tokens"] for m in res.metrics][2] == 0
    assert any(not torch.equal(a, b) for a, b in zip(weights[1], weights[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3], strict=True))


def test_a_checkpoint_is_not_resumed_on_other_data(tmp_path, monkeypatch):
    """The data file changed under a stopped run: its schedule (total steps, warm-up, batch
    order) was made for the old samples, so the resume is refused by name, not run on."""
    import torch

    from llavamed.errors import ConfigError
    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 24)
    cfg = tiny_config(data, tmp_path / "a", max_steps=7)
    cfg["output"]["save_every"] = 3
    run_interrupted(cfg, monkeypatch, at_step=5)
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[:-4]))
    with pytest.raises(ConfigError, match="trained on other data"):
        run_training(cfg, progress=False)
    data.write_text(json.dumps(records))  # restored: resumes
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == list(range(1, 8))


def test_a_run_whose_data_moved_says_how_to_resume(tmp_path, monkeypatch):
    """The data folder moved and the config followed it: the refusal said "a different config
    (data.sources.0.path); use another output.dir or delete the folder", throwing the run away.
    It names the move and the way on; the symlink it suggests does resume the run."""
    import copy

    import torch

    from llavamed.errors import ConfigError
    from llavamed.train import run_training

    torch.set_num_threads(1)
    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "a", max_steps=5)
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=4)
    (tmp_path / "data").rename(tmp_path / "moved")
    moved = copy.deepcopy(cfg)
    moved["data"]["path"] = str(tmp_path / "moved" / "train.json")
    with pytest.raises(ConfigError) as err:
        run_training(moved, progress=False)
    msg = str(err.value)
    assert f"data.sources.0.path: {data} -> {tmp_path / 'moved' / 'train.json'}" in msg
    assert "put the data back at the old path (a symlink to the new place will do)" in msg
    assert "delete the folder" not in msg
    (tmp_path / "data").symlink_to(tmp_path / "moved")
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == list(range(1, 6))


def test_a_run_on_a_relative_data_path_resumes_through_a_symlink_at_the_old_place(
    tmp_path, monkeypatch
):
    """The symlink the refusal above suggests did not resume a config that spells the data
    path relatively: it was made absolute with Path.resolve(), which followed the symlink to the
    new place, and the resume was refused as other data."""
    import torch

    from llavamed.errors import ConfigError
    from llavamed.train import run_training

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config("data/train.json", "a", max_steps=5)
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=4)
    (tmp_path / "data").rename(tmp_path / "moved")
    with pytest.raises(Exception, match="train.json"):  # nothing at the old place
        run_training(cfg, progress=False)
    (tmp_path / "data").symlink_to(tmp_path / "moved")
    try:
        res = run_training(cfg, progress=False)
    except ConfigError as exc:
        raise AssertionError(f"the resume was refused: {exc}") from None
    assert [m["step"] for m in res.metrics] == list(range(1, 6))


def test_a_checkpoint_is_not_resumed_on_a_replaced_model_from(tmp_path, monkeypatch):
    """model.from names the same folder, but the checkpoint in it was replaced (stage 1 trained
    again) while stage 2 was stopped: the resume loaded the old run's trained parts over the
    new checkpoint's frozen ones, a model neither run trained. Refused by name; the old
    checkpoint put back resumes."""
    import shutil

    import torch

    from llavamed.errors import ConfigError
    from llavamed.model.compose import ModelSpec, init_checkpoint
    from llavamed.train import run_training

    torch.set_num_threads(1)
    base = init_checkpoint(tmp_path / "base", ModelSpec(lm="tiny", vision="tiny", seed=0))
    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "a", max_steps=5, trainable=["projector"])
    cfg["model"] = {"from": str(base)}
    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=4)
    shutil.move(base, tmp_path / "old-base")
    init_checkpoint(base, ModelSpec(lm="tiny", vision="tiny", seed=1))
    with pytest.raises(ConfigError, match=r"step-0000002 was trained from another model\.from"):
        run_training(cfg, progress=False)
    shutil.rmtree(base)
    shutil.move(tmp_path / "old-base", base)
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == list(range(1, 6))
