"""Checkpoint folders found damaged or incomplete: one-line errors naming the file."""

from __future__ import annotations

import re
import shutil

import pytest

from llavamed.errors import InputError


@pytest.mark.parametrize("text", ['{"format": "llavamed-native-llava/1", "templ', "[]"])
def test_damaged_checkpoint_metadata_names_the_file(tiny_llava_dir, tmp_path, text):
    """A cut llavamed.json raised a raw JSONDecodeError (a list: AttributeError on .get)."""
    from llavamed.model import checkpoint_template, read_meta

    ck = tmp_path / "ck"
    shutil.copytree(tiny_llava_dir, ck)
    assert read_meta(ck)["template"] == "chatml"
    (ck / "llavamed.json").write_text(text)
    error = rf"^{re.escape(str(ck / 'llavamed.json'))}: damaged checkpoint metadata \(.+\)$"
    with pytest.raises(InputError, match=error):
        checkpoint_template(ck)
    (ck / "llavamed.json").unlink()
    assert read_meta(ck) == {}  # anyone else's checkpoint


def test_an_unconverted_llava_med_folder_is_refused_before_loading(tiny_llava_dir, tmp_path):
    """An original LLaVA-Med folder (model_type llava_mistral, flat LM fields) given where a
    native checkpoint belongs (eval, chat, train's model.from) made transformers build its
    default Llama-7B-sized llava: 24 GB before the weights were found not to fit (OOM-killed
    on this machine). It is refused from config.json, with what to do."""
    import json

    from llavamed.model.checkpoint import load_llava

    ck = tmp_path / "llava-med-v1.5"
    shutil.copytree(tiny_llava_dir, ck)
    native = json.loads((ck / "config.json").read_text())
    flat = native["text_config"] | {
        "model_type": "llava_mistral",
        "architectures": ["LlavaMistralForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
    }
    (ck / "config.json").write_text(json.dumps(flat))
    with pytest.raises(
        InputError,
        match=rf"^{re.escape(str(ck))}: not a llava checkpoint \(model_type='llava_mistral' .*"
        r"convert it first with 'llavamed convert llava-med SRC DST'",
    ):
        load_llava(ck)
    (ck / "config.json").write_text("[]")
    with pytest.raises(InputError, match=r"config\.json: unreadable model config \(not a JSON"):
        load_llava(ck)


def test_a_run_whose_final_checkpoint_lacks_its_config_names_that_folder(tmp_path):
    from llavamed.model.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-final" / "model.safetensors").write_bytes(b"")
    final = re.escape(str(run / "checkpoint-final"))
    with pytest.raises(InputError, match=rf"^{final}: not a checkpoint folder \(config\.json miss"):
        resolve_checkpoint(run)
    (run / "checkpoint-final" / "config.json").write_text("{}")
    assert resolve_checkpoint(run) == run / "checkpoint-final"
    with pytest.raises(InputError, match="no checkpoint-final/ inside"):
        resolve_checkpoint(tmp_path)


def test_same_weights_under_another_template_have_another_fingerprint(tmp_path, tiny_llava_dir):
    """Eval resumes answers only for the same checkpoint fingerprint, which hashed config.json
    and the weights alone: a checkpoint rebuilt with another chat template (same seed, same
    weights) had the same fingerprint, so the answers written under the old prompts were
    resumed and reported as the new checkpoint's."""
    from llavamed.model.checkpoint import checkpoint_fingerprint
    from llavamed.model.compose import ModelSpec, init_checkpoint

    vicuna = init_checkpoint(
        tmp_path / "vicuna", ModelSpec(lm="tiny", vision="tiny", template="vicuna_v1")
    )
    same_weights = (vicuna / "model.safetensors").read_bytes() == (
        tiny_llava_dir / "model.safetensors"
    ).read_bytes()
    assert same_weights  # chatml and vicuna_v1, seed 0: only the prompts differ
    assert checkpoint_fingerprint(vicuna) != checkpoint_fingerprint(tiny_llava_dir)
    shutil.copytree(vicuna, tmp_path / "run" / "checkpoint-final")
    assert checkpoint_fingerprint(tmp_path / "run") == checkpoint_fingerprint(vicuna)
