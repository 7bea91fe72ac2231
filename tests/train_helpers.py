"""Shared helpers for the training tests: a synthetic task where only the image carries the
answer, and small config builders."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Is the image bright?"


def make_bright_dark(
    out: Path, n: int, *, seed: int = 0, size: int = 32, pad_words: int = 12
) -> Path:
    """``n`` samples: a grey image that is bright (answer yes) or dark (no); the question is the
    same for every sample (padded with a random number of filler words so lengths vary), so the
    answer is only in the image."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        bright = i % 2 == 0
        v = rng.randint(180, 255) if bright else rng.randint(0, 75)
        Image.new("RGB", (size, size), (v, v, v)).save(out / "images" / f"{i}.png")
        q = QUESTION + " Look carefully" * rng.randint(0, pad_words)
        recs.append(
            {
                "id": f"s{i}",
                "image": f"images/{i}.png",
                "answer": "yes" if bright else "no",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": "yes" if bright else "no"},
                ],
            }
        )
    path = out / "train.json"
    path.write_text(json.dumps(recs))
    return path


def tiny_config(data: Path, out: Path, **train) -> dict:
    t = {
        "trainable": ["projector", "lm", "vision"],
        "max_steps": 6,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "lr": 3e-3,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "precision": "fp32",
    }
    t.update(train)
    return {
        "stage": "instruct",
        "model": {"init": {"lm": "tiny", "vision": "tiny", "template": "chatml"}},
        "data": {"format": "llava_json", "path": str(data), "max_length": 256},
        "train": t,
        "output": {"dir": str(out), "save_every": 0},
    }


def single_thread_env() -> dict:
    # 2 cores shared with other jobs: one intra-op thread per process avoids OMP spin-waits.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llavamed", *args],
        env=single_thread_env(),
        capture_output=True,
        text=True,
        **kw,
    )


def run_interrupted(cfg: dict, monkeypatch, at_step: int) -> None:
    """Run training until the optimizer step ``at_step`` raises KeyboardInterrupt (a Ctrl-C
    mid-run: resume checkpoints written before it stay, the step itself is lost)."""
    import pytest

    from llavamed.train import run_training
    from llavamed.train import trainer as T

    real_step, calls = T.Engine.step, {"n": 0}

    def interrupted_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(T.Engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, progress=False)
    monkeypatch.setattr(T.Engine, "step", real_step)


def resumed_losses(cfg: dict, monkeypatch, overrides: list[str]) -> list[float]:
    """The losses of a 4-step run cut by a Ctrl-C at step 3 (resume checkpoints every 2 steps)
    and resumed with ``overrides``: for a setting a run may switch when it resumes. Checks that
    the resumed run logged each step once."""
    from llavamed.train import run_training

    cfg["output"]["save_every"] = 2
    run_interrupted(cfg, monkeypatch, at_step=3)
    resumed = run_training(cfg, overrides, progress=False).metrics
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    return [m["loss"] for m in resumed]
