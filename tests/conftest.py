"""Shared fixtures: tiny random LLaVA checkpoints (2 layers, hidden 32) with the embedded
SmolLM2 tokenizer, built once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a hub; fail fast instead of hanging on a download attempt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """One intra-op thread: on the shared 2-core machine it is several times faster for tiny
    models (no OpenMP spin-waiting), and the thread count is restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A native llava checkpoint: tiny random CLIP ViT (32 px, patch 8 -> 16 image tokens),
    2-layer hidden-32 LM, chatml template."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    return init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", template="chatml"))


@pytest.fixture(scope="session")
def wide_llava_dir(tiny_llava_dir, tmp_path_factory):
    """The tiny checkpoint with wide random weights: its greedy answers differ between images and
    questions (the default init answers everything with newlines, so a comparison of answers on
    it could not fail)."""
    import shutil

    import torch

    from llavamed.model.checkpoint import load_llava

    out = tmp_path_factory.mktemp("ckpt") / "wide-llava"
    shutil.copytree(tiny_llava_dir, out)
    model, _ = load_llava(out)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_mistral_dir(tmp_path_factory):
    from llavamed.model.compose import ModelSpec, init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny-llava-mistral"
    return init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", template="mistral_instruct"))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A plain causal LM folder (no vision): random 2-layer hidden-64 Llama with the embedded
    SmolLM2 tokenizer and chat template, for text-only serving. A wide init makes greedy
    outputs vary with the prompt, so batching bugs show up as different text."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llavamed.model.embedded import embedded_lm_dir

    tok = AutoTokenizer.from_pretrained(embedded_lm_dir())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-lm"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def biomedclip_state_dict():
    """A tiny open_clip BiomedCLIP checkpoint: ViT trunk (2 blocks, width 32, 8 px patches on a
    32 px image), projection head, one text key and the logit scale."""
    import torch

    torch.manual_seed(1)
    d, blocks, patch, grid = 32, 2, 8, 4
    sd = {
        "visual.trunk.cls_token": torch.randn(1, 1, d) * 0.1,
        "visual.trunk.pos_embed": torch.randn(1, grid * grid + 1, d) * 0.1,
        "visual.trunk.patch_embed.proj.weight": torch.randn(d, 3, patch, patch) * 0.05,
        "visual.trunk.patch_embed.proj.bias": torch.randn(d) * 0.05,
        "visual.trunk.norm.weight": 1 + torch.randn(d) * 0.1,
        "visual.trunk.norm.bias": torch.randn(d) * 0.1,
        "visual.head.proj.weight": torch.randn(16, d),
        "text.transformer.embeddings.word_embeddings.weight": torch.randn(10, 8),
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(blocks):
        p = f"visual.trunk.blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + torch.randn(d) * 0.1,
            p + "norm1.bias": torch.randn(d) * 0.1,
            p + "attn.qkv.weight": torch.randn(3 * d, d) * 0.1,
            p + "attn.qkv.bias": torch.randn(3 * d) * 0.1,
            p + "attn.proj.weight": torch.randn(d, d) * 0.1,
            p + "attn.proj.bias": torch.randn(d) * 0.1,
            p + "norm2.weight": 1 + torch.randn(d) * 0.1,
            p + "norm2.bias": torch.randn(d) * 0.1,
            p + "mlp.fc1.weight": torch.randn(4 * d, d) * 0.1,
            p + "mlp.fc1.bias": torch.randn(4 * d) * 0.1,
            p + "mlp.fc2.weight": torch.randn(d, 4 * d) * 0.1,
            p + "mlp.fc2.bias": torch.randn(d) * 0.1,
        }
    return sd


@pytest.fixture(scope="module")
def original_llava_med(tmp_path_factory):
    """(folder, CLIP tower folder, state dict) of a tiny LLaVA-Med v1.5-layout checkpoint:
    sharded safetensors, tower weights inside (convert_helpers.write_original_llava_med)."""
    from convert_helpers import write_original_llava_med

    return write_original_llava_med(tmp_path_factory.mktemp("llava_med_orig"))


def _tmpfs(tmp_path, name: str, options: str):
    """Mount a real tmpfs (needs root) at ``tmp_path/name`` for the test, or skip."""
    import os
    import subprocess

    mnt = tmp_path / name
    mnt.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs; needs root), smaller than a tiny checkpoint."""
    yield from _tmpfs(tmp_path, "disk", "size=4m")


@pytest.fixture
def readonly_disk(tmp_path):
    """A real read-only filesystem (tmpfs mounted ro; needs root). chmod cannot stand in for it:
    these tests run as root, which ignores file modes."""
    yield from _tmpfs(tmp_path, "ro", "ro,size=1m")
