"""Audit regressions for composition and conversion: weights that do not fill the model are
refused naming the keys (never filled with random values), and damaged inputs are one-line
errors, not tracebacks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llavamed.errors import InputError
from model_helpers import sentencepiece_style_llama, tiny_llama

_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _save_tower(kind: str, out):
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**_VIT, intermediate_size=64))
    elif kind == "clip_with_projection":
        model = CLIPVisionModelWithProjection(
            CLIPVisionConfig(**_VIT, intermediate_size=64, projection_dim=8)
        )
    elif kind == "clip_full":
        text = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        model = CLIPModel(
            CLIPConfig(
                vision_config=dict(_VIT, intermediate_size=64), text_config=text, projection_dim=8
            )
        )
    elif kind == "vit_classifier":
        model = ViTForImageClassification(ViTConfig(**_VIT, intermediate_size=64, num_labels=3))
    else:
        raise AssertionError(kind)
    model.save_pretrained(out)
    return out


def test_model_init_refuses_a_vision_folder_missing_weights(tmp_path):
    """A tower folder without one layer's weights composed a checkpoint whose layer was random
    (transformers only printed a load report)."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    tower = _save_tower("clip", tmp_path / "tower")
    sd = load_file(tower / "model.safetensors")
    sd = {k: v for k, v in sd.items() if "encoder.layers.1." not in k}
    save_file(sd, tower / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"vision weights do not fit.*encoder\.layers\.1\."):
        init_checkpoint(tmp_path / "out", ModelSpec(lm="tiny", vision=str(tower)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["clip_with_projection", "clip_full", "vit_classifier"])
def test_model_init_takes_a_tower_beside_its_unused_heads(tmp_path, kind):
    """Strictness refuses missing tower weights, not the heads a CLIP or ViT classifier folder
    holds beside its tower (nor a classifier's absent pooler, which llava never reads)."""
    from transformers import AutoModel

    from llavamed.model.checkpoint import load_llava
    from llavamed.model.compose import ModelSpec, init_checkpoint

    tower = _save_tower(kind, tmp_path / "tower")
    out = init_checkpoint(tmp_path / "out", ModelSpec(lm="tiny", vision=str(tower)))
    model, _ = load_llava(out)
    ref = AutoModel.from_pretrained(tower)
    ref = ref.vision_model if kind == "clip_full" else ref
    ref_sd = ref.state_dict()
    got = model.model.vision_tower.state_dict()
    for k, v in ref_sd.items():
        if not k.startswith("pooler."):
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_model_init_refuses_an_lm_folder_missing_its_head(tmp_path):
    """An untied LM folder without lm_head.weight composed with a random head."""
    from transformers import AutoTokenizer

    from llavamed.model.compose import ModelSpec, init_checkpoint
    from llavamed.model.embedded import embedded_lm_dir

    tok = AutoTokenizer.from_pretrained(embedded_lm_dir())
    lm_dir = tmp_path / "lm"
    tiny_llama(len(tok), tie_word_embeddings=False).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    sd = load_file(lm_dir / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, lm_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"does not fit the model.*lm_head\.weight"):
        init_checkpoint(tmp_path / "out", ModelSpec(lm=str(lm_dir), vision="tiny"))
    assert not (tmp_path / "out").exists()


def test_model_init_with_a_cut_gguf_is_one_line(tmp_path, capsys):
    """A GGUF download stopped inside its header raised the gguf reader's struct.error as a
    traceback."""
    from llavamed.cli import main
    from llavamed.model.embedded import gguf_path

    cut = tmp_path / "cut.gguf"
    with gguf_path().open("rb") as fh:
        cut.write_bytes(fh.read(200_000))
    rc = main(
        ["model", "init", "--out", str(tmp_path / "out"), "--lm", str(cut), "--vision", "tiny"]
    )
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{cut}: unreadable GGUF file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _drop(*keys):
    return lambda sd: {k: v for k, v in sd.items() if k not in keys}


def _renumber(sd):
    return {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()}


def _odd_qkv(sd):
    return sd | {"visual.trunk.blocks.0.attn.qkv.weight": torch.randn(95, 32)}


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop("visual.trunk.cls_token"), r"missing source keys \(visual\.trunk\.cls_token\)"),
        (_drop("visual.trunk.pos_embed"), r"missing source keys \(visual\.trunk\.pos_embed\)"),
        (
            _drop("visual.trunk.blocks.1.norm2.weight"),
            r"missing source keys \(visual\.trunk\.blocks\.1\.norm2\.weight\)",
        ),
        (
            _drop("visual.trunk.norm.weight", "visual.trunk.norm.bias"),
            r"missing source keys \(visual\.trunk\.norm\.bias, visual\.trunk\.norm\.weight\)",
        ),
        (_renumber, r"blocks are not numbered 0\.\.N-1"),
        (_odd_qkv, r"shapes do not fit a ViT \(visual\.trunk\.blocks\.0\.attn\.qkv\.weight"),
    ],
    ids=["cls", "pos", "norm2", "final-norm", "block-gap", "qkv-width"],
)
def test_biomedclip_an_incomplete_trunk_is_refused_naming_the_key(
    biomedclip_state_dict, tmp_path, capsys, damage, message
):
    """Each of these ended in a KeyError or torch's RuntimeError traceback."""
    import re

    from llavamed.cli import main

    src = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(damage(biomedclip_state_dict), src)
    rc = main(["convert", "biomedclip", str(src), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("heads", "code", "message"),
    [
        # Known only once the weights are read: the run's one-line error.
        (
            5,
            1,
            r"^llavamed: error: .*--num-heads: 5 heads do not divide the width \(hidden size 32\)",
        ),
        # Out of range whatever the weights: a usage error as the command line is read.
        (0, 2, r"^llavamed convert biomedclip: error: argument --num-heads: 0 must be >= 1$"),
        (-2, 2, r"^llavamed convert biomedclip: error: argument --num-heads: -2 must be >= 1$"),
    ],
)
def test_biomedclip_num_heads_that_cannot_work_are_refused(
    biomedclip_state_dict, tmp_path, capsys, heads, code, message
):
    """5 heads on width 32 ended in a RuntimeError traceback; 0 silently meant the default and
    a negative count wrote a folder."""
    import re

    from llavamed.cli import main

    src = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(biomedclip_state_dict, src)
    try:
        rc = main(
            ["convert", "biomedclip", str(src), str(tmp_path / "out"), f"--num-heads={heads}"]
        )
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert re.search(message, lines[-1]), err
    if code == 2:
        assert lines[0].startswith("usage: llavamed convert biomedclip [-h]"), err
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_is_not_a_state_dict_is_named(tmp_path):
    """A .bin holding a list failed with "'int' object has no attribute 'startswith'"."""
    from llavamed.model.convert.biomedclip import convert_biomedclip
    from llavamed.model.convert.state_dict_io import load_state_dict

    src = tmp_path / "open_clip_pytorch_model.bin"
    torch.save([1, 2], src)
    with pytest.raises(InputError, match=r"not a state dict \(holds a list\)"):
        convert_biomedclip(src, tmp_path / "out")
    torch.save({"visual.trunk.cls_token": 3}, src)
    with pytest.raises(InputError, match=r"'visual\.trunk\.cls_token' is not a named tensor"):
        load_state_dict(tmp_path)


def test_model_init_refuses_chatml_on_a_tokenizer_without_its_markers(tmp_path):
    """chatml (the default template) on a Llama/Mistral-style tokenizer composed a checkpoint
    whose <|im_end|> was eleven plain tokens and no stop id: generation never ended a turn."""
    from llavamed.errors import ConfigError
    from llavamed.model.compose import ModelSpec, init_checkpoint

    lm = sentencepiece_style_llama(tmp_path / "lm")
    with pytest.raises(
        ConfigError,
        match=r"template='chatml': the tokenizer of --lm .* has no token '<\|im_start\|>'",
    ):
        init_checkpoint(tmp_path / "out", ModelSpec(lm=str(lm), vision="tiny", template="chatml"))
    assert not (tmp_path / "out").exists()
    # The LM's own format composes.
    out = init_checkpoint(
        tmp_path / "out", ModelSpec(lm=str(lm), vision="tiny", template="mistral_instruct")
    )
    assert (out / "model.safetensors").is_file()


def test_switching_a_checkpoint_to_a_template_its_tokenizer_lacks_is_refused(tmp_path):
    """``model.template`` in a training config re-templates a loaded checkpoint through
    set_chat_template: chatml on a converted LLaVA-Med (Mistral tokenizer) would train and
    serve <|im_end|> as plain text."""
    from transformers import AutoProcessor, GenerationConfig

    from llavamed.errors import ConfigError
    from llavamed.model.compose import ModelSpec, init_checkpoint, set_chat_template
    from llavamed.model.templates import get_template

    lm = sentencepiece_style_llama(tmp_path / "lm")
    ckpt = init_checkpoint(
        tmp_path / "ckpt", ModelSpec(lm=str(lm), vision="tiny", template="mistral_instruct")
    )
    processor = AutoProcessor.from_pretrained(ckpt)
    gen = GenerationConfig(eos_token_id=2)
    with pytest.raises(ConfigError, match=r"template='chatml': the tokenizer has no token"):
        set_chat_template(processor, get_template("chatml"), gen)
    assert gen.eos_token_id == 2
    set_chat_template(processor, get_template("vicuna_v1"), gen)
    assert processor.chat_template.startswith("{%- macro")


def test_a_trained_checkpoint_is_not_replaced_by_model_init_or_convert(
    tiny_llava_mistral_dir,
    original_llava_med,
    tmp_path,
    capsys,
):
    """``model init --out`` or ``convert llava-med SRC DST`` naming a run's checkpoint-final
    replaced the trained model without a word (any llavamed checkpoint counted as theirs)."""
    import json

    from llavamed.cli import main
    from llavamed.model.checkpoint import load_llava
    from llavamed.model.compose import save_checkpoint

    model, processor = load_llava(tiny_llava_mistral_dir)
    final = tmp_path / "run" / "checkpoint-final"
    save_checkpoint(model, processor, final, None, extra={"train": {"stage": 2, "steps": 900}})
    before = (final / "model.safetensors").read_bytes()
    src = original_llava_med[0]
    for args in (
        ["model", "init", "--out", str(final), "--lm", "tiny", "--vision", "tiny"],
        ["convert", "llava-med", str(src), str(final)],
    ):
        assert main(args) == 1
        assert f"{final}: exists and holds something else" in capsys.readouterr().err
        assert (final / "model.safetensors").read_bytes() == before
        assert "train" in json.loads((final / "llavamed.json").read_text())
    # An untrained checkpoint (an earlier model init) is still replaced.
    assert (
        main(["model", "init", "--out", str(tmp_path / "m"), "--lm", "tiny", "--vision", "tiny"])
        == 0
    )
    assert (
        main(["model", "init", "--out", str(tmp_path / "m"), "--lm", "tiny", "--vision", "tiny"])
        == 0
    )


def _retype(folder, path: tuple, value) -> None:
    """Set config.json's field at ``path`` to ``value`` (a hand edit gone wrong)."""
    import json

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    cfg_path.write_text(json.dumps(cfg))


def test_a_config_field_of_the_wrong_type_is_one_line_everywhere(
    tiny_llava_dir,
    tiny_lm_dir,
    original_llava_med,
    tmp_path,
    capsys,
):
    """ "hidden_size": "32" in a config.json raised transformers' validation error as a
    traceback: loading a checkpoint (serve, eval, chat), composing from a --vision or --lm
    folder, and converting a LLaVA-Med folder."""
    import shutil

    from llavamed.cli import main
    from llavamed.model.checkpoint import load_llava
    from llavamed.model.convert.llava_med import convert_llava_med

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    _retype(ckpt, ("text_config", "hidden_size"), "32")
    with pytest.raises(InputError, match=r"invalid model config .*'hidden_size' expected int"):
        load_llava(ckpt)

    tower = _save_tower("clip", tmp_path / "tower")
    _retype(tower, ("num_hidden_layers",), "2")
    lm = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir, lm)
    _retype(lm, ("num_hidden_layers",), "2")
    for flag, folder in (("--vision", tower), ("--lm", lm)):
        other = ["--lm", "tiny"] if flag == "--vision" else ["--vision", "tiny"]
        rc = main(["model", "init", "--out", str(tmp_path / "out"), flag, str(folder), *other])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err
        assert f"{folder}: invalid model config" in err and "'num_hidden_layers'" in err

    src = tmp_path / "llava-med"
    shutil.copytree(original_llava_med[0], src)
    _retype(src, ("hidden_size",), "32")
    with pytest.raises(InputError, match=r"config\.json: invalid LM config .*'hidden_size'"):
        convert_llava_med(src, tmp_path / "native")


_BAD_STATS = [
    ("{", r"invalid JSON"),
    ("[1]", r"image statistics unreadable \(the file is not a JSON object\)"),
    ('{"image_mean": "abc"}', r"invalid image_mean \('abc'; need 3 numbers\)"),
    (
        '{"image_std": [0.5, 0.5]}',
        r"invalid image_std \(\[0\.5, 0\.5\]; need 3 numbers, each > 0\)",
    ),
]


@pytest.mark.parametrize(("text", "message"), _BAD_STATS, ids=["cut", "list", "str", "short"])
def test_a_damaged_preprocessor_config_beside_a_tower_is_named(tmp_path, capsys, text, message):
    """A cut preprocessor_config.json was a JSONDecodeError traceback, a list an AttributeError,
    and "image_mean": "abc" composed a checkpoint whose processor failed on its first image."""
    import re

    from llavamed.cli import main

    tower = _save_tower("clip", tmp_path / "tower")
    (tower / "preprocessor_config.json").write_text(text)
    out = tmp_path / "out"
    rc = main(["model", "init", "--out", str(out), "--lm", "tiny", "--vision", str(tower)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"{tower / 'preprocessor_config.json'}: " in err and re.search(message, err), err
    assert not out.exists()


def test_damaged_image_statistics_are_named_by_both_converters(
    biomedclip_state_dict,
    original_llava_med,
    tmp_path,
):
    import shutil

    from llavamed.model.convert.biomedclip import convert_biomedclip
    from llavamed.model.convert.llava_med import convert_llava_med

    folder = tmp_path / "biomedclip"
    folder.mkdir()
    torch.save(biomedclip_state_dict, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text('{"preprocess_cfg": {"mean": [0.5]}}')
    with pytest.raises(InputError, match=r"open_clip_config\.json: invalid mean \(\[0\.5\]"):
        convert_biomedclip(folder, tmp_path / "vit")
    (folder / "open_clip_config.json").write_text('{"preprocess_cfg": {"mean": 0.5}}')
    vit = convert_biomedclip(folder, tmp_path / "vit")  # one value for every channel
    assert (
        '"image_mean": [\n    0.5,\n    0.5,\n    0.5\n  ]'
        in (vit / "preprocessor_config.json").read_text()
    )

    src, tower, _ = original_llava_med
    own = tmp_path / "clip"
    shutil.copytree(tower, own)
    (own / "preprocessor_config.json").write_text('{"image_mean": [1, 2, "x"]}')
    with pytest.raises(InputError, match=r"clip/preprocessor_config\.json: invalid image_mean"):
        convert_llava_med(src, tmp_path / "native", vision_tower=own)


def test_convert_shows_progress_over_the_shards_it_reads(
    original_llava_med,
    tmp_path,
    capsys,
):
    """A 7B conversion reads and writes ~15 GB in minutes; it printed nothing until the end
    (DESIGN: every command shows a progress bar on long work)."""
    from llavamed.cli import main

    src = original_llava_med[0]
    assert main(["convert", "llava-med", str(src), str(tmp_path / "native")]) == 0
    err = capsys.readouterr().err
    assert f"reading {src.name}: " in err and "/2 [" in err


def test_model_init_refuses_an_lm_whose_tokenizer_is_larger_than_its_embeddings(tmp_path):
    """A 1000-row LM beside a 49152-token tokenizer composed into a 49153-row model whose extra
    rows were all the mean embedding."""
    from transformers import AutoTokenizer

    from llavamed.model.compose import ModelSpec, init_checkpoint
    from llavamed.model.embedded import embedded_lm_dir

    lm = tmp_path / "lm"
    tiny_llama(1000).save_pretrained(lm)
    AutoTokenizer.from_pretrained(embedded_lm_dir()).save_pretrained(lm)
    with pytest.raises(InputError, match=r"lm: tokenizer does not fit the model \(the embeddings"):
        init_checkpoint(tmp_path / "out", ModelSpec(lm=str(lm), vision="tiny"))
    assert not (tmp_path / "out").exists()


def test_a_full_clip_folder_is_judged_by_its_vision_half(tmp_path):
    """Only vision_model.* of a full CLIP folder is composed: its text half may be absent, but
    a missing vision weight is refused."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    tower = _save_tower("clip_full", tmp_path / "clip")
    sd = load_file(tower / "model.safetensors")
    vision_only = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    save_file(vision_only, tower / "model.safetensors", metadata={"format": "pt"})
    out = init_checkpoint(tmp_path / "out", ModelSpec(lm="tiny", vision=str(tower)))
    assert (out / "model.safetensors").is_file()
    damaged = {k: v for k, v in vision_only.items() if "post_layernorm" not in k}
    save_file(damaged, tower / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"missing keys: vision_model\.post_layernorm\.bias"):
        init_checkpoint(tmp_path / "out2", ModelSpec(lm="tiny", vision=str(tower)))
