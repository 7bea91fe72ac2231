"""What other readers need from the checkpoints we write: transformers 4.x's tokenizer loader,
vLLM's choice of towers, a ``vision_feature_layer`` the tower has; and an embedded-LM cache that
repairs itself when it is found incomplete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavamed.cli import main
from llavamed.errors import ConfigError
from llavamed.model import ModelSpec, build
from llavamed.model.compose import VISION_PRESETS
from model_helpers import tiny_llama


def _tokenizer_config(folder) -> dict:
    return json.loads((Path(folder) / "tokenizer_config.json").read_text())


# --- transformers 4.x reads the tokenizer ---------------------------------------------------


def test_model_init_writes_a_tokenizer_config_transformers_4_reads(tiny_llava_dir):
    """transformers 4.x wants ``extra_special_tokens`` as a dict (a list: AttributeError on
    ``.keys()``) and does not know the class ``TokenizersBackend`` (ValueError)."""
    cfg = _tokenizer_config(tiny_llava_dir)
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in cfg
    assert cfg["additional_special_tokens"] == ["<image>"]


def test_transformers_5_reads_the_rewritten_tokenizer_as_before(tiny_llava_dir):
    """The rewritten files give transformers 5 the same tokenizer: <image> one special token with
    the id the model config names, and the processor expands it as the unsaved processor does."""
    from transformers import AutoProcessor

    _, fresh = build(ModelSpec(lm="tiny", vision="tiny", template="chatml"))
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    tok = proc.tokenizer
    image_id = json.loads((tiny_llava_dir / "config.json").read_text())["image_token_index"]
    assert tok.convert_tokens_to_ids("<image>") == image_id
    assert fresh.tokenizer.convert_tokens_to_ids("<image>") == image_id
    assert "<image>" in tok.all_special_tokens
    assert tok("a<image>b", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert tok.decode([image_id], skip_special_tokens=True) == ""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == fresh.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.new("RGB", (40, 24), (10, 200, 30))
    got = proc(text=[prompt], images=[image], return_tensors="pt")
    want = fresh(text=[prompt], images=[image], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert (got["input_ids"] == image_id).sum() == 16
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])


def test_legacy_tokenizer_config_merges_without_duplicates(tmp_path):
    from llavamed.model.checkpoint_format import legacy_tokenizer_config

    base = {"bos_token": "<s>", "model_max_length": 4096}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            base
            | {
                "tokenizer_class": "TokenizersBackend",
                "additional_special_tokens": ["<a>", "<image>"],
                "extra_special_tokens": ["<image>", "<b>"],
            }
        )
    )
    legacy_tokenizer_config(tmp_path)
    assert _tokenizer_config(tmp_path) == base | {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<a>", "<image>", "<b>"],
    }
    # Already what 4.x reads (a named dict, a slow tokenizer's class): left as it is.
    kept = base | {"tokenizer_class": "LlamaTokenizer", "extra_special_tokens": {"x": "<x>"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(kept))
    legacy_tokenizer_config(tmp_path)
    assert _tokenizer_config(tmp_path) == kept


def test_weights_are_named_as_llava_hf_from_memory_and_from_transformers_5s_save():
    """Both writers name weights through checkpoint_format: the converters from transformers'
    in-memory names (a key outside the four parts is an error), ``model init`` renaming what
    transformers 5 saved (anything it does not know is kept as saved)."""
    from llavamed.model.checkpoint_format import disk_key, llava_hf_key

    clip, vit = "clip_vision_model", "vit"
    assert disk_key("model.vision_tower.encoder.x", clip) == "vision_tower.vision_model.encoder.x"
    assert disk_key("model.vision_tower.encoder.x", vit) == "vision_tower.encoder.x"
    assert disk_key("model.language_model.norm.weight", clip) == "language_model.model.norm.weight"
    assert disk_key("lm_head.weight", vit) == "language_model.lm_head.weight"
    assert disk_key("model.multi_modal_projector.linear_1.bias", clip) == (
        "multi_modal_projector.linear_1.bias"
    )
    with pytest.raises(KeyError):
        disk_key("model.mm_projector.0.weight", clip)
    siglip = "siglip_vision_model"
    assert llava_hf_key("vision_tower.head.x", siglip) == "vision_tower.vision_model.head.x"
    for key in ("vision_tower.vision_model.head.x", "language_model.model.x", "other.x"):
        assert llava_hf_key(key, siglip) == key
    assert llava_hf_key("vision_tower.encoder.x", vit) == "vision_tower.encoder.x"


def test_checkpoint_format_imports_nothing_from_the_model_package():
    """Every module of llavamed.model imports it at the top; an import back would be a cycle."""
    import ast

    import llavamed.model.checkpoint_format as fmt

    tree = ast.parse(Path(fmt.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("llavamed.model")}


# --- vLLM's llava builds CLIP and SigLIP towers only ----------------------------------------


def test_model_init_warns_that_vllm_cannot_serve_a_vit_tower(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    tiny = VISION_PRESETS["tiny"]
    ViTModel(ViTConfig(**tiny)).save_pretrained(tmp_path / "vit")
    args = ["model", "init", "--lm", "tiny"]
    assert main([*args, "--out", str(tmp_path / "a"), "--vision", str(tmp_path / "vit")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "model_type=vit" in err
    assert "loads in transformers; vLLM's llava supports CLIP and SigLIP towers only" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--vision", "tiny"]) == 0
    assert "vLLM" not in capsys.readouterr().err


# --- vision_feature_layer within the tower ---------------------------------------------------


@pytest.mark.parametrize("layer", [3, 7, -4])
def test_vision_feature_layer_outside_the_tower_is_refused(layer):
    # The tiny tower has 2 layers: hidden_states holds 3 entries, indices -3..2.
    with pytest.raises(ConfigError, match=r"--vision-feature-layer.*-3\.\.2"):
        build(ModelSpec(lm="tiny", vision="tiny", vision_feature_layer=layer))


def test_vision_feature_layer_at_either_end_runs(one_thread):
    image = Image.new("RGB", (32, 32), (90, 90, 90))
    for layer in (-3, 2):
        model, proc = build(ModelSpec(lm="tiny", vision="tiny", vision_feature_layer=layer))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = proc(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()


def test_model_init_refuses_a_feature_layer_the_tower_lacks(tmp_path, capsys):
    out = tmp_path / "ck"
    args = ["model", "init", "--out", str(out), "--lm", "tiny", "--vision", "tiny"]
    assert main([*args, "--vision-feature-layer", "7"]) == 1
    err = capsys.readouterr().err
    assert "--vision-feature-layer" in err and "-3..2" in err
    assert not out.exists()


# --- the embedded LM cache ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["files missing", "weights cut"])
def test_an_incomplete_embedded_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    """A cache folder holding only part of the LM (a copy cut short, a clean-up gone wrong) was
    returned as it was, every time: the rebuilt copy could not replace a non-empty folder and was
    thrown away as if another process had won the race. With every file there but the weights
    cut short, each later load failed with a raw SafetensorError. ~30 s each: the GGUF is
    dequantized again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llavamed.model import embedded

    target = tmp_path / embedded.EMBEDDED_LM_NAME
    target.mkdir()
    cached = embedded.embedded_lm_dir()
    if damage == "files missing":
        shutil.copy(cached / "tokenizer.json", target)
    else:
        for name in embedded.CACHE_FILES:
            shutil.copy(cached / name, target)
        with (target / "model.safetensors").open("r+b") as fh:
            fh.truncate(2**20)  # the header (~20 KB) stays whole
        assert not embedded.is_complete(target)
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path))
    got = embedded.embedded_lm_dir()
    assert got == target
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (got / name).is_file(), name
    assert embedded.is_complete(got)
    # Readable as the umask says (safetensors alone writes 0600): a cache may be shared.
    umask = os.umask(0)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in got.iterdir()} == {0o666 & ~umask}
    assert AutoModelForCausalLM.from_pretrained(got).num_parameters() > 100_000_000
    assert AutoTokenizer.from_pretrained(got)("hi")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [embedded.EMBEDDED_LM_NAME]


# --- transformers 4.x readers find a scaled RoPE ---------------------------------------------


def test_a_scaled_rope_is_also_written_where_transformers_4_readers_look(tmp_path, one_thread):
    """A Llama-3-style LM (``rope_type: llama3``): transformers 5 writes the scaling only in
    ``rope_parameters`` and no ``rope_scaling``, so vLLM/SGLang on transformers 4.x, which
    read the flat keys, ran the LM with unscaled rotary frequencies: other logits everywhere."""
    from transformers import (
        AutoTokenizer,
        LlavaForConditionalGeneration,
    )

    from llavamed.model.embedded import embedded_lm_dir

    tok = AutoTokenizer.from_pretrained(embedded_lm_dir())
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    torch.manual_seed(0)
    tiny_llama(
        len(tok),
        max_position_embeddings=512,
        rope_parameters=dict(rope, rope_theta=5e5),
        tie_word_embeddings=True,
    ).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out = tmp_path / "ckpt"
    assert (
        main(["model", "init", "--out", str(out), "--lm", str(tmp_path / "lm"), "--vision", "tiny"])
        == 0
    )
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert text.get("rope_scaling") == rope and text["rope_theta"] == 5e5
    # A reader of the flat keys alone builds the same model.
    flat = tmp_path / "flat"
    shutil.copytree(out, flat)
    full = json.loads((flat / "config.json").read_text())
    del full["text_config"]["rope_parameters"]
    (flat / "config.json").write_text(json.dumps(full))
    ids = torch.tensor([[1, 5, 9, 200, 7, 3000, 42, 11]])
    logits = [
        LlavaForConditionalGeneration.from_pretrained(d).eval()(input_ids=ids).logits
        for d in (out, flat)
    ]
    assert torch.allclose(logits[0], logits[1])
