"""Shared fixtures: tiny random LLaVA checkpoints (2 layers, hidden 32) with the embedded
SmolLM2 tokenizer, built once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; fail fast instead of hanging on a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A native llava checkpoint: tiny random CLIP ViT (32 px, patch 8 -> 16 image tokens),
    2-layer hidden-32 LM, chatml template."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    return init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", template="chatml"))


@pytest.fixture(scope="session")
def tiny_llava_mistral_dir(tmp_path_factory):
    from llavamed.model.compose import ModelSpec, init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-llava-mistral"
    return init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", template="mistral_instruct"))
