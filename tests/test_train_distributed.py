"""Two gloo CPU processes per engine (torchrun): the loss curve and the exported weights match
one process on the same global batch. Each run takes ~40 s here (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from train_helpers import ROOT, make_bright_dark, single_thread_env, tiny_config

pytestmark = pytest.mark.slow


def _run(cmd):
    r = subprocess.run(
        cmd, env=single_thread_env(), cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint-final" / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = make_bright_dark(tmp / "data", 32)
    cfg = tiny_config(data, tmp / "single", max_steps=4, global_batch_size=8, micro_batch_size=2)
    cfg["output"]["save_every"] = 2  # exercise the collective checkpoint path too
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run([sys.executable, "-m", "llavamed", "train", str(path), "--no-progress"])
    return tmp, path


@pytest.mark.parametrize(
    "engine, extra",
    [
        ("ddp", []),
        ("fsdp", []),
        ("deepspeed", ["distributed.deepspeed_config=configs/deepspeed/zero2.json"]),
        ("deepspeed", ["distributed.deepspeed_config=configs/deepspeed/zero3.json"]),
    ],
    ids=["ddp", "fsdp2", "zero2", "zero3"],
)
def test_two_processes_match_one(setup, engine, extra):
    if engine == "deepspeed" and not _has_deepspeed():
        pytest.skip("deepspeed not installed (pip install llavamed[deepspeed])")
    tmp, path = setup
    out = tmp / f"{engine}-{len(extra) and extra[0][-10:-5]}"
    r = _run(
        [
            *_torchrun_2(),
            "-m",
            "llavamed",
            "train",
            str(path),
            f"output.dir={out}",
            f"distributed.engine={engine}",
            *extra,
            "--no-progress",
        ]
    )
    assert "2 process(es) x 2 accumulation x 2 = global batch 8" in r.stderr
    single = tmp / "single"
    assert _losses(out) == pytest.approx(_losses(single), rel=1e-4, abs=1e-5)
    a, b = _weights(out), _weights(single)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


def _torchrun_2() -> list[str]:
    """torchrun with 2 local processes on a free rendezvous port; the program follows."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_micro_batch_whose_images_all_fail_does_not_stall_the_others(tmp_path, engine):
    """One image per micro-batch and corrupt images: on some steps a process has nothing to
    train on. It must still take part in the step's collectives, or the other waits until the
    timeout (the run then failed, and failed again on every resume: the schedule is fixed)."""
    data = make_bright_dark(tmp_path / "data", 8)
    for i in range(6):  # 6 of the 8: each process meets several
        (data.parent / "images" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # Two epochs: an image one process met in epoch 1 the other may meet in epoch 2.
    cfg = tiny_config(data, tmp_path / "out", max_steps=8, global_batch_size=2, micro_batch_size=1)
    cfg["distributed"] = {"engine": engine, "timeout_minutes": 1.0}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run([*_torchrun_2(), "-m", "llavamed", "train", str(path)])
    losses = _losses(tmp_path / "out")
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    # every process's skips are in the report, not rank 0's alone, each image once
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["skipped_while_training"] == {"corrupt image": 6}
    assert report["skipped_while_training_visits"] == 12


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_text_only_micro_batch_beside_an_image_one_does_not_stall(tmp_path, engine):
    """A conversation mix with text-only records: on a step where one process holds only text,
    it must still run the vision tower, or (FSDP2) the other process waits for the tower's weight
    gathers until the timeout. The trained tower's gradients must be those of one process."""
    data = make_bright_dark(tmp_path / "data", 5)
    recs = json.loads(data.read_text())
    recs += [  # 3 text-only + 5 image records: one global batch of 2 holds one of each
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": "Say yes." + " Please" * i},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for i in range(3)
    ]
    data.write_text(json.dumps(recs))
    runs = {}
    for name, extra in (("single", {}), (engine, {"engine": engine, "timeout_minutes": 1.0})):
        cfg = tiny_config(
            data, tmp_path / name, max_steps=4, global_batch_size=2, micro_batch_size=1
        )
        if extra:
            cfg["distributed"] = extra
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        if name == "single":
            _run([sys.executable, "-m", "llavamed", "train", str(path), "--no-progress"])
        else:
            _run([*_torchrun_2(), "-m", "llavamed", "train", str(path), "--no-progress"])
        runs[name] = tmp_path / name
    assert _losses(runs[engine]) == pytest.approx(_losses(runs["single"]), rel=1e-4, abs=1e-5)
    a, b = _weights(runs[engine]), _weights(runs["single"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


_SKEWED_CLOCK_CHILD = """
import os, sys, time, yaml
from llavamed.train import trainer
if os.environ["RANK"] == "0":  # this process's clock runs 90 s ahead at every read
    class Clock:
        reads = 0
        def time(self):
            Clock.reads += 1
            return time.time() + 90 * Clock.reads
    trainer.time = Clock()
from llavamed.train import run_training
run_training(yaml.safe_load(open(sys.argv[1]).read()), progress=False)
"""


def test_timed_saves_are_decided_once_for_every_process(tmp_path):
    """Each process decided from its own clock whether save_every_minutes had passed: one
    entered the save's barrier while the other waited in the next step's all-reduce, and the
    run hung until the collective timeout."""
    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "out", max_steps=4, global_batch_size=8, micro_batch_size=2)
    cfg["output"].update(save_every=0, save_every_minutes=1.0)
    cfg["distributed"] = {"timeout_minutes": 0.5}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    child = tmp_path / "child.py"
    child.write_text(_SKEWED_CLOCK_CHILD)
    _run([*_torchrun_2(), str(child), str(path)])
    # The main process's clock said a save was due after every step: the run saved, and ended.
    assert (tmp_path / "out" / "checkpoint-final" / "model.safetensors").exists()
    assert any((tmp_path / "out" / "checkpoints").glob("step-*"))
