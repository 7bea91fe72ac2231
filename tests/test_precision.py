"""``precision: auto``: bf16 only where the CPU computes it, checked against a measurement."""

from __future__ import annotations

import time

import pytest
import torch

from llavamed.errors import ConfigError
from llavamed.train import vision_vqa
from llavamed.utils.precision import (
    check_precision,
    cpu_has_fast_bf16,
    model_dtype,
    resolve_precision,
    torch_dtype,
)


def test_explicit_choices_pass_through_and_unknown_ones_name_the_key():
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in ("bf16", "fp32")
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("fp32") is torch.float32
    with pytest.raises(ConfigError, match=r"train\.precision='fp16'.*auto, bf16, fp32"):
        check_precision("fp16", "train.precision")
    with pytest.raises(ConfigError, match="precision='half'"):
        vision_vqa.VisionVQAConfig(
            sources=[vision_vqa.VQASourceSpec("slake", "x")], precision="half"
        ).validate()


def _median_matmul_s(dtype: torch.dtype) -> float:
    a = torch.randn(384, 384).to(dtype)
    a @ a  # warm-up
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return sorted(times)[2]


def test_auto_agrees_with_what_this_cpu_measures():
    """Independent of the CPU-flag probe: where bf16 matmuls are several times slower than fp32
    (emulated bf16, AVX2-only CPUs: ~60x), ``auto`` must not pick bf16; where they are faster
    (AVX512-BF16 / AMX), it must. The margins are wide, so a noisy machine cannot flip this."""
    ratio = _median_matmul_s(torch.bfloat16) / _median_matmul_s(torch.float32)
    picked = resolve_precision("auto", "cpu")
    if ratio > 4:
        assert picked == "fp32" and not cpu_has_fast_bf16(), ratio
    elif ratio < 0.9:
        assert picked == "bf16" and cpu_has_fast_bf16(), ratio


def test_inference_dtype_auto_follows_the_same_rule():
    assert model_dtype("auto") is torch_dtype(resolve_precision("auto"))
    assert model_dtype(None) is torch.float32
    # The long torch names are spellings of the short ones.
    assert model_dtype("bfloat16") is model_dtype("bf16") is torch.bfloat16
    assert model_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match="--dtype 'fp8'"):
        model_dtype("fp8")


@pytest.mark.parametrize(
    "command", [["serve"], ["chat"], ["web"], ["eval", "vqa"], ["eval", "answer"]]
)
def test_every_inference_command_reads_one_dtype_vocabulary(command):
    from llavamed.cli import build_parser

    parser = build_parser()
    required = {
        "serve": ["--model", "m"],
        "chat": ["--model", "m"],
        "web": ["--model", "m"],
        "vqa": ["--model", "m", "--dataset", "slake", "--data", "d"],
        "answer": ["--model", "m", "--questions", "q", "--images", "i", "--out", "o"],
    }[command[-1]]
    for given, want in (("bf16", "bf16"), ("bfloat16", "bf16"), ("auto", "auto"), (None, "fp32")):
        extra = ["--dtype", given] if given else []
        assert parser.parse_args([*command, *required, *extra]).dtype == want


def test_a_run_saves_the_resolved_precision_and_reruns_as_the_same_run(tmp_path):
    """The run's identity (config.yaml, compared on resume) holds what ``auto`` became here, so
    a rerun with ``auto`` is recognised as finished rather than refused or repeated."""
    from llavamed.config import load_config
    from llavamed.train import run_training
    from train_helpers import make_bright_dark, tiny_config

    data = make_bright_dark(tmp_path / "data", 8)
    cfg = tiny_config(data, tmp_path / "out", max_steps=2, global_batch_size=4, micro_batch_size=4)
    cfg["train"]["precision"] = "auto"
    run_training(cfg, progress=False)
    saved = load_config(tmp_path / "out" / "config.yaml")
    assert saved.train.precision == resolve_precision("auto") != "auto"
    again = run_training(cfg, progress=False)
    assert again.wall_time_s < 5
