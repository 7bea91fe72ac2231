"""train.compile: the LM's decoder layers run compiled (Inductor) and train as the eager ones do."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from llavamed.errors import ConfigError
from train_helpers import make_bright_dark, resumed_losses, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

PARTS = {"trainable": ["projector", "lm"], "max_steps": 4}


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]


def _keys(out) -> set[str]:
    with safe_open(str(out / "checkpoint-final" / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_compiled_layers_train_as_eager_ones_and_a_run_resumes_across_the_switch(
    tmp_path, monkeypatch
):
    """The same losses step by step (the same arithmetic in fused kernels), the layers really
    compiled (not a silent no-op), a checkpoint with the eager run's keys (compiled in place: no
    ``_orig_mod.`` prefix that strict loading would refuse), and an eager run resumed compiled."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 16)
    run_training(tiny_config(data, tmp_path / "eager", **PARTS), progress=False)
    expected = _losses(tmp_path / "eager")

    compiled_layers = []

    def see_layers(step, model, processor):
        compiled_layers.append(
            [layer._compiled_call_impl is not None for layer in model.model.language_model.layers]
        )

    cfg = tiny_config(data, tmp_path / "compiled", **PARTS, compile=True)
    run_training(cfg, progress=False, on_step=see_layers)
    assert compiled_layers and all(all(c) for c in compiled_layers)
    assert _losses(tmp_path / "compiled") == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert _keys(tmp_path / "compiled") == _keys(tmp_path / "eager")

    cut = tiny_config(data, tmp_path / "cut", **PARTS)
    resumed = resumed_losses(cut, monkeypatch, ["train.compile=true"])
    assert resumed == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_compile_is_refused_before_the_model_loads_where_it_cannot_run(tmp_path, monkeypatch):
    """Each refusal names the setting and the way out, before minutes of loading and
    tokenizing: gradient checkpointing (the config), an engine that shards the layers itself,
    and a machine without the C++ compiler Inductor's CPU code needs."""
    from llavamed.config import load_config
    from llavamed.train import compile_layers, run_training

    data = make_bright_dark(tmp_path / "data", 4)
    cfg = tiny_config(data, tmp_path / "out", **PARTS, compile=True)
    with pytest.raises(ConfigError, match="train.compile and train.gradient_checkpointing"):
        load_config(cfg, ["train.gradient_checkpointing=true"])
    for engine in ("fsdp", "deepspeed"):
        with pytest.raises(ConfigError, match=f"single and ddp engines, not {engine}"):
            compile_layers.check_can_compile(engine, "cpu")
    compile_layers.check_can_compile("ddp", "cpu")

    monkeypatch.setattr(compile_layers.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"no C\+\+ compiler \(g\+\+, c\+\+ or clang\+\+\)"):
        run_training(cfg, progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not (tmp_path / "out" / "data_report.json").exists()  # stopped before the data
