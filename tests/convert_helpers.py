"""The tiny original LLaVA-Med v1.5 checkpoint the converter tests convert (the
``original_llava_med`` fixture in conftest.py builds it), and the Mistral shape it uses."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Where the original LLaVA-Med layout keeps the CLIP tower's weights.
TOWER = "model.vision_tower.vision_tower.vision_model."


def tiny_mistral_cfg(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=1e6,  # Mistral-7B-v0.2's: a reader falling back to 10,000 gets other logits
        sliding_window=None,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    )


def write_original_llava_med(root: Path) -> tuple[Path, Path, dict]:
    """A LLaVA-Med v1.5-layout folder under ``root``: Mistral LM + CLIP tower weights inside +
    mlp2x_gelu. Returns the folder, the separate CLIP tower folder its config names, and the
    original state dict."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        MistralConfig,
        MistralForCausalLM,
    )

    from llavamed.model.embedded import embedded_lm_dir

    src, tower_dir = root / "llava-med-v1.5-tiny", root / "clip-tiny"
    tok = AutoTokenizer.from_pretrained(embedded_lm_dir())
    torch.manual_seed(0)
    lm = MistralForCausalLM(MistralConfig(**tiny_mistral_cfg(len(tok))))
    vcfg = CLIPVisionConfig(
        image_size=28,
        patch_size=7,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        projection_dim=8,
    )
    tower = CLIPVisionModel(vcfg)
    tower.save_pretrained(tower_dir)
    sd = {}
    for k, v in lm.state_dict().items():
        sd[k] = v  # model.layers.*, model.embed_tokens, model.norm, lm_head (original names)
    for k, v in tower.state_dict().items():
        sd[TOWER + k] = v
    sd["model.mm_projector.0.weight"] = torch.randn(32, 24) * 0.2
    sd["model.mm_projector.0.bias"] = torch.randn(32) * 0.1
    sd["model.mm_projector.2.weight"] = torch.randn(32, 32) * 0.2
    sd["model.mm_projector.2.bias"] = torch.randn(32) * 0.1
    src.mkdir()
    # Sharded, as released 7B checkpoints are.
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {
        "model-00001-of-00002.safetensors": keys[:half],
        "model-00002-of-00002.safetensors": keys[half:],
    }
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, src / name)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}})
    )
    cfg = tiny_mistral_cfg(len(tok)) | {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "mm_vision_tower": str(tower_dir),
        "mm_hidden_size": 24,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    (src / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(src)
    return src, tower_dir, sd
