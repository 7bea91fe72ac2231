"""Composed checkpoints load in plain transformers (no llavamed import), run forward and generate,
and keep the parts we put in them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from llavamed.errors import ConfigError, InputError
from llavamed.model import ModelSpec, build, init_checkpoint, load_llava, read_meta
from model_helpers import tiny_llama

PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    d = sys.argv[1]
    proc = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a tube?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[Image.new("RGB", (61, 37), (200, 10, 10))], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    print(json.dumps({
        "prompt": prompt,
        "n_tokens": inputs["input_ids"].shape[1],
        "logits_finite": bool(torch.isfinite(logits).all()),
        "new_tokens": gen.shape[1] - inputs["input_ids"].shape[1],
        "class": type(model).__name__,
        "llavamed_imported": any(m.startswith("llavamed") for m in sys.modules),
    }))
    """
)


def _plain_load(path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiny_checkpoint_loads_without_llavamed(tiny_llava_dir):
    res = _plain_load(tiny_llava_dir)
    assert res["class"] == "LlavaForConditionalGeneration"
    assert not res["llavamed_imported"]
    assert (
        res["prompt"]
        == "<|im_start|>user\n<image>\nIs there a tube?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert res["logits_finite"] and res["new_tokens"] >= 1
    assert res["n_tokens"] == 16 + 15  # 16 image tokens from a 32 px / patch 8 tower


def test_embedded_default_via_cli_loads_without_llavamed(tmp_path):
    out = tmp_path / "embedded"
    proc = subprocess.run(
        [sys.executable, "-m", "llavamed", "model", "init", "--out", str(out), "--lm-layers", "4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_meta(out)
    assert meta["template"] == "chatml" and meta["spec"]["lm"] == "embedded"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava"
    assert cfg["text_config"]["num_hidden_layers"] == 4
    assert "quantization_config" not in cfg["text_config"]
    assert cfg["text_config"]["rope_theta"] == 1e5  # SmolLM2's, flat for transformers 4.x readers
    res = _plain_load(out)
    assert res["n_tokens"] == 64 + 15  # 128 px / patch 16
    assert res["logits_finite"]


def test_embedded_lm_weights_survive_composition():
    """The LM inside the LLaVA equals the dequantized SmolLM2 (same logits on text)."""
    from transformers import AutoModelForCausalLM

    from llavamed.model.embedded import embedded_lm_dir

    lm = AutoModelForCausalLM.from_pretrained(embedded_lm_dir()).eval()
    model, processor = build(ModelSpec(lm="embedded", vision="tiny"))
    model.eval()
    ids = processor.tokenizer("The chest radiograph shows", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm(ids).logits
        got = model(input_ids=ids).logits[..., : ref.shape[-1]]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_generation_config_stops_at_the_templates_end_of_turn(tmp_path):
    """A chatml LM whose tokenizer eos is <|endoftext|> (Qwen2.5 base style) ends turns with
    <|im_end|>: plain transformers and vLLM stop only on generation_config.json's ids."""
    import json

    from transformers import AutoTokenizer, GenerationConfig

    from llavamed.model import ModelSpec, init_checkpoint
    from llavamed.model.embedded import embedded_lm_dir

    tok = AutoTokenizer.from_pretrained(embedded_lm_dir())
    tok.eos_token = "<|endoftext|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    lm = tiny_llama(len(tok), eos_token_id=tok.eos_token_id)
    lm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    out = init_checkpoint(
        tmp_path / "llava", ModelSpec(lm=str(tmp_path / "lm"), vision="tiny", template="chatml")
    )
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert eos == [tok.eos_token_id, im_end]

    # Composed for vicuna (turns end with the eos), then retrained with model.template=chatml:
    # the template override must bring <|im_end|> into the stop ids as composition does.
    from llavamed.model.compose import set_chat_template
    from llavamed.model.templates import get_template

    vicuna = init_checkpoint(
        tmp_path / "v", ModelSpec(lm=str(tmp_path / "lm"), vision="tiny", template="vicuna_v1")
    )
    model, proc = load_llava(vicuna)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    set_chat_template(proc, get_template("chatml"), model.generation_config)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, im_end]
    # an end-of-turn token the vocabulary lacks never becomes the unk id
    from llavamed.model.processing import known_token_id

    assert known_token_id(proc.tokenizer, "<|no_such_token|>") is None
    assert known_token_id(proc.tokenizer, "<|im_end|>") == im_end


def test_image_changes_logits(tiny_llava_dir):
    model, processor = load_llava(tiny_llava_dir)
    from PIL import Image

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
        add_generation_prompt=True,
    )
    outs = []
    for colour in ((0, 0, 0), (255, 255, 255)):
        inputs = processor(
            text=[prompt], images=[Image.new("RGB", (32, 32), colour)], return_tensors="pt"
        )
        with torch.no_grad():
            outs.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("preset, tokens", [("cpu", 64), ("cpu-p32", 16)])
def test_cpu_vision_presets_image_tokens(preset, tokens):
    """The quickstart's tower (32 px patches) gives 16 image tokens at 128 px; the processor
    expands <image> to exactly the tower's patch count, so the forward pass accepts it."""
    from PIL import Image

    from llavamed.model.processing import num_image_tokens

    model, processor = build(ModelSpec(lm="tiny", vision=preset))
    assert num_image_tokens(processor) == tokens
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(
        text=[prompt], images=[Image.new("RGB", (200, 90), (9, 99, 199))], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_pad_mode_pads_with_mean_colour(tiny_llava_dir):
    _, processor = load_llava(tiny_llava_dir)
    from PIL import Image

    wide = Image.new("RGB", (64, 16), (255, 255, 255))
    px = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert px.shape == (3, 32, 32)
    # Top rows are padding: mean colour normalises to ~0.
    assert px[:, 0, :].abs().max() < 0.05
    assert px[:, 16, :].min() > 1.0  # the white image itself


def test_spec_validation():
    with pytest.raises(ConfigError, match="mlp2x_gelu"):
        ModelSpec(projector="linear").validate()
    with pytest.raises(ConfigError, match="aspect"):
        ModelSpec(aspect="stretch").validate()
    with pytest.raises(InputError, match="not a vision preset"):
        build(ModelSpec(lm="tiny", vision="/nonexistent/tower"))


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(lm_layers="8"), "model.lm_layers: expected an integer, got '8'"),
        (dict(lm_layers=True), "model.lm_layers: expected an integer"),
        (dict(seed=1.5), "model.seed: expected an integer"),
        (dict(template=None), "model.template: may not be null"),
    ],
)
def test_spec_built_in_python_is_type_checked(fields, words):
    # The config loader types a YAML spec; one built in Python (or read back from a
    # checkpoint's llavamed.json) reached the model code untyped and failed as a TypeError.
    with pytest.raises(ConfigError, match=words):
        build(ModelSpec(lm="tiny", vision="tiny", **fields))


def test_vision_folder_round_trip(tmp_path):
    """A saved CLIP vision tower folder is accepted as --vision and its weights are kept."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llavamed.model.compose import VISION_PRESETS

    tower = CLIPVisionModel(CLIPVisionConfig(**VISION_PRESETS["tiny"]))
    tower.save_pretrained(tmp_path / "tower")
    model, _ = build(ModelSpec(lm="tiny", vision=str(tmp_path / "tower")))
    for k, v in tower.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[k], v)
    assert model.config.vision_feature_layer == -2  # pretrained towers: LLaVA's default


def test_init_is_atomic_and_overwrites(tmp_path):
    out = tmp_path / "ck"
    init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", seed=1))
    first = (out / "model.safetensors").read_bytes()
    init_checkpoint(out, ModelSpec(lm="tiny", vision="tiny", seed=2))
    assert (out / "model.safetensors").read_bytes() != first
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda sd: sd.pop("multi_modal_projector.linear_1.weight"), "missing keys"),
        (lambda sd: sd.update(extra=torch.zeros(2)), "unexpected keys: extra"),
        (
            lambda sd: sd.update(
                {"multi_modal_projector.linear_1.bias": torch.zeros(3)}  # wrong shape
            ),
            "linear_1.bias",
        ),
    ],
    ids=["missing", "unexpected", "mismatched"],
)
def test_a_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path, tiny_llava_dir, edit, words):
    """transformers fills a missing weight with random values and only prints a load report: a
    checkpoint without its projector was served, evaluated and fine-tuned with a random one."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llavamed.errors import InputError

    ckpt = shutil.copytree(tiny_llava_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    sd = load_file(weights)
    edit(sd)
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"checkpoint does not fit the model.*{words}"):
        load_llava(ckpt)
