"""Converters: tiny checkpoints in the original layouts; the converted native model must match an
independent forward pass written here from the original tensors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from convert_helpers import TOWER, tiny_mistral_cfg
from llavamed.errors import InputError


def _reference_logits(
    sd: dict, input_ids: torch.Tensor, image_token_id: int, pixel_values: torch.Tensor
):
    """LLaVA-Med's forward, written from the original tensors: CLIP layer -2 patch features ->
    Linear-GELU-Linear -> spliced over the image positions -> Mistral."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    vocab = sd["model.embed_tokens.weight"].shape[0]
    lm = MistralForCausalLM(MistralConfig(**tiny_mistral_cfg(vocab))).eval()
    lm.load_state_dict(
        {
            k: v
            for k, v in sd.items()
            if not k.startswith("model.mm_projector") and not k.startswith("model.vision_tower")
        },
        strict=True,
    )
    tower = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=28,
            patch_size=7,
            hidden_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=48,
        )
    ).eval()
    tower.load_state_dict(
        {k[len(TOWER) :]: v for k, v in sd.items() if k.startswith(TOWER)}, strict=True
    )
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = F.gelu(
            feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"]
        )
        feats = feats @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]
        ids = input_ids[0]
        pos = (ids == image_token_id).nonzero().flatten()
        text_ids = ids.clone()
        text_ids[pos] = 0
        emb = lm.model.embed_tokens(text_ids)
        emb[pos] = feats[0]
        return lm(inputs_embeds=emb[None]).logits[..., :vocab]


def test_llava_med_logits_parity(original_llava_med, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    dst = convert_llava_med(src, tmp_path / "native")
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["architectures"] == [
        "LlavaForConditionalGeneration"
    ]
    assert cfg["vision_feature_layer"] == -2
    # transformers 4.x readers (vLLM, SGLang) find rope_theta only as a flat key.
    assert cfg["text_config"]["rope_theta"] == 1e6
    assert cfg["text_config"]["rope_parameters"]["rope_theta"] == 1e6
    model, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
    model.eval()
    # Plain transformers finds every weight it needs and no other (it only prints a report).
    assert {k: v for k, v in info.items() if v} == {}
    proc = AutoProcessor.from_pretrained(dst)
    prompt = proc.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}],
            }
        ],
        add_generation_prompt=True,
    )
    assert prompt.endswith("What is shown? [/INST]") and prompt.startswith("[INST] <image>\n")
    inputs = proc(
        text=[prompt], images=[Image.new("RGB", (40, 20), (90, 160, 30))], return_tensors="pt"
    )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    with torch.no_grad():
        got = model(**inputs).logits
    ref = _reference_logits(
        sd, inputs["input_ids"], model.config.image_token_id, inputs["pixel_values"]
    )
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, rtol=1e-4, atol=1e-4)
    # On-disk names are the llava-hf layout other runtimes read.
    keys = set(load_file(dst / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)
    assert "multi_modal_projector.linear_2.bias" in keys
    # transformers 4.x reads the tokenizer: no list extra_special_tokens, no TokenizersBackend.
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in tok_cfg
    assert tok_cfg["additional_special_tokens"] == ["<image>"]


def test_llava_med_tower_from_named_folder(original_llava_med, tmp_path):
    """Checkpoints that only name the tower in mm_vision_tower get its weights from there."""
    from llavamed.model.convert.llava_med import convert_llava_med

    src, tower_dir, sd = original_llava_med
    no_tower = tmp_path / "no-tower"
    no_tower.mkdir()
    save_file(
        {k: v.contiguous() for k, v in sd.items() if not k.startswith(TOWER)},
        no_tower / "model.safetensors",
    )
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (no_tower / f.name).write_bytes(f.read_bytes())
    dst = convert_llava_med(no_tower, tmp_path / "native")
    out = load_file(dst / "model.safetensors")
    ref = load_file(tower_dir / "model.safetensors")
    k = "embeddings.patch_embedding.weight"
    torch.testing.assert_close(
        out["vision_tower.vision_model." + k], ref[k] if k in ref else ref["vision_model." + k]
    )

    cfg = json.loads((no_tower / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (no_tower / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="--vision-tower"):
        convert_llava_med(no_tower, tmp_path / "native2")
    dst = convert_llava_med(no_tower, tmp_path / "native3", vision_tower=tower_dir)
    assert (dst / "model.safetensors").exists()
    # A mistyped --vision-tower was read as a hub id ("Repo id must be in the form ...").
    missing = tmp_path / "clip-typo"
    with pytest.raises(InputError, match=rf"^{re.escape(str(missing))}: vision tower folder not"):
        convert_llava_med(no_tower, tmp_path / "native4", vision_tower=missing)


def _variant(src, sd, dst, change):
    """A copy of the original checkpoint with its tensors changed by ``change(sd) -> sd``."""
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in change(dict(sd)).items()}, dst / "model.safetensors")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda sd: sd | {"model.mm_projector.4.weight": torch.zeros(2, 2)},
         r"unmapped source keys.*mm_projector\.4"),
        # a tensor of the wrong shape, named by its key in the source file
        (lambda sd: sd | {"model.mm_projector.2.weight": sd["model.mm_projector.2.weight"][:, 1:]},
         r"tensor shapes do not fit the config \(model\.mm_projector\.2\.weight \(32, 31\)"),
        (lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k},
         r"missing=\['model\.language_model\.layers\.1\.mlp\.up_proj\.weight'\]"),
        # a linear projector's weights under an mlp2x_gelu config: a raw ValueError before
        (lambda sd: {k: v for k, v in sd.items() if "mm_projector" not in k}
         | {"model.mm_projector.weight": torch.zeros(32, 24)},
         r"unmapped source keys \(model\.mm_projector\.weight\)"),
        # tower keys are named as the file spells them, with their vision_model level
        (lambda sd: sd | {TOWER + "post_layernorm.weight": sd[TOWER + "post_layernorm.weight"][1:]},
         r"shapes do not fit the config \(model\.vision_tower\.vision_tower\.vision_model\."
         r"post_layernorm\.weight \(23,\)"),
        (lambda sd: sd | {TOWER + "extra.weight": torch.zeros(2)},
         r"unexpected=\['model\.vision_tower\.vision_tower\.vision_model\.extra\.weight'\]"),
    ],
)  # fmt: skip
def test_llava_med_a_key_or_shape_that_does_not_fit_fails_loudly(
    original_llava_med, tmp_path, change, error
):
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    bad = _variant(src, sd, tmp_path / "bad", change)
    with pytest.raises(InputError, match=error):
        convert_llava_med(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _with_config(src, sd, dst, **changes):
    """A copy of the original checkpoint with config.json keys changed (None deletes one)."""
    import json

    out = _variant(src, sd, dst, lambda d: d)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _without_tokenizer(src, sd, dst, *keep):
    """A copy of the original checkpoint without its tokenizer files, but for ``keep``."""
    out = _variant(src, sd, dst, lambda d: d)
    for f in out.iterdir():
        if (
            f.name.startswith(("tokenizer", "special_tokens", "chat_template"))
            and f.name not in keep
        ):
            f.unlink()
    return out


def test_llava_med_without_a_tokenizer_says_what_to_do(original_llava_med, tmp_path):
    from llavamed.model.convert.llava_med import _missing_sentencepiece, convert_llava_med

    src, _, sd = original_llava_med
    bare = _without_tokenizer(src, sd, tmp_path / "bare")
    with pytest.raises(
        InputError, match=rf"^{re.escape(str(bare))}: no tokenizer .*tokenizer\.json"
    ):
        convert_llava_med(bare, tmp_path / "out")
    # Only a SentencePiece model, as Mistral/Llama checkpoints ship it: reading it needs packages
    # this install may lack; a junk file stands in for it.
    sp = _without_tokenizer(src, sd, tmp_path / "sp", "tokenizer_config.json")
    (sp / "tokenizer.model").write_bytes(b"\x0a\x03abc" * 40)
    if _missing_sentencepiece():
        error = (
            rf"^{re.escape(str(sp))}: .*\(pip install sentencepiece protobuf, or .*tokenizer\.json"
        )
    else:
        error = rf"^{re.escape(str(sp / 'tokenizer.model'))}: unreadable tokenizer"
    with pytest.raises(InputError, match=error):
        convert_llava_med(sp, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_malformed_shard_index_names_the_index(original_llava_med, tmp_path):
    from llavamed.model.convert.state_dict_io import load_state_dict

    src, _, _ = original_llava_med
    copy = tmp_path / "ck"
    shutil.copytree(src, copy)
    index = copy / "model.safetensors.index.json"
    text = index.read_text()
    for bad in (text[: len(text) // 2], "[]", '{"metadata": {}}', '{"weight_map": {"a": 3}}'):
        index.write_text(bad)
        with pytest.raises(InputError, match=rf"^{re.escape(str(index))}: malformed index \(.+\)"):
            load_state_dict(copy)


def test_a_llama_llava_is_refused_not_turned_into_mistral(original_llava_med, tmp_path):
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    for kind in ("llava_llama", "llava"):
        bad = _with_config(src, sd, tmp_path / kind, model_type=kind)
        with pytest.raises(InputError, match="not LLaVA-Med v1.5.*Llama/Vicuna"):
            convert_llava_med(bad, tmp_path / f"out-{kind}")


def test_no_image_aspect_ratio_means_resize_and_crop_as_llava(original_llava_med, tmp_path):
    from transformers import AutoProcessor

    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    plain = _with_config(src, sd, tmp_path / "plain", image_aspect_ratio=None)
    dst = convert_llava_med(plain, tmp_path / "out")
    assert AutoProcessor.from_pretrained(dst).image_processor.do_pad is False


@pytest.mark.parametrize(
    "option, words",
    [
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls'"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres'"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type='spatial_unpad'"),
    ],
)
def test_source_options_native_llava_cannot_reproduce_are_refused(
    original_llava_med, tmp_path, option, words
):
    """These converted "successfully" into a model that preprocesses or selects image
    features otherwise than its source ('cls' became LLaVA's cls_patch, anyres a single
    resized square)."""
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    bad = _with_config(src, sd, tmp_path / "src", **option)
    with pytest.raises(InputError, match=f"unsupported option.*{re.escape(words)}"):
        convert_llava_med(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tied_source_that_stores_its_head_too_converts(original_llava_med, tmp_path):
    """torch.save of a tied model keeps the shared tensor under both names; the copy was
    reported as an unexpected key. A head that differs from the embedding is still refused."""
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    embed = sd["model.embed_tokens.weight"]
    tied = _with_config(
        src, sd | {"lm_head.weight": embed.clone()}, tmp_path / "tied", tie_word_embeddings=True
    )
    dst = convert_llava_med(tied, tmp_path / "out")
    assert (dst / "model.safetensors").exists()
    differs = _with_config(
        src, sd | {"lm_head.weight": embed + 1}, tmp_path / "differs", tie_word_embeddings=True
    )
    with pytest.raises(InputError, match="lm_head.weight differs from embed_tokens.weight"):
        convert_llava_med(differs, tmp_path / "out2")


def test_llava_med_buffers_older_checkpoints_stored_are_not_errors(original_llava_med, tmp_path):
    from llavamed.model.convert.llava_med import TOWER_PREFIX, convert_llava_med

    src, _, sd = original_llava_med
    assert any(k.startswith(TOWER_PREFIX) for k in sd)

    def legacy(sd):
        return sd | {
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
            TOWER_PREFIX + "vision_model.embeddings.position_ids": torch.arange(5)[None],
        }

    old = _variant(src, sd, tmp_path / "old", legacy)
    dst = convert_llava_med(old, tmp_path / "out")
    assert (dst / "model.safetensors").exists()


def test_llava_med_cli(original_llava_med, tmp_path):
    from llavamed.cli import main

    src, _, _ = original_llava_med
    before = sorted(p.name for p in src.iterdir())
    assert main(["convert", "llava-med", str(src), str(tmp_path / "n")]) == 0
    assert (
        main(["convert", "llava-med", str(tmp_path), str(tmp_path / "m")]) == 1
    )  # not a checkpoint
    # An earlier conversion may be replaced; the source, or a folder of the user's, never is.
    assert main(["convert", "llava-med", str(src), str(tmp_path / "n")]) == 0
    assert main(["convert", "llava-med", str(src), str(src)]) == 1
    assert main(["convert", "llava-med", str(src), str(src.parent)]) == 1
    assert sorted(p.name for p in src.iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["convert", "llava-med", str(src), str(mine)]) == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


# --- BiomedCLIP ---------------------------------------------------------------------------


def _timm_vit_forward(sd: dict, x: torch.Tensor, heads: int, n_blocks: int) -> list[torch.Tensor]:
    """timm VisionTransformer forward (pre-norm, fused qkv, GELU, eps 1e-6) from raw tensors;
    returns the residual stream after the embeddings and after each block."""
    t = lambda k: sd["visual.trunk." + k]  # noqa: E731
    p = F.conv2d(
        x,
        t("patch_embed.proj.weight"),
        t("patch_embed.proj.bias"),
        stride=t("patch_embed.proj.weight").shape[-1],
    )
    h = p.flatten(2).transpose(1, 2)
    h = torch.cat([t("cls_token").expand(x.shape[0], -1, -1), h], dim=1) + t("pos_embed")
    states = [h]
    d = h.shape[-1]
    for i in range(n_blocks):
        b = lambda k: t(f"blocks.{i}.{k}")  # noqa: E731,B023
        y = F.layer_norm(h, (d,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = (y @ b("attn.qkv.weight").T + b("attn.qkv.bias")).reshape(
            x.shape[0], -1, 3, heads, d // heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape[0], -1, d)
        h = h + y @ b("attn.proj.weight").T + b("attn.proj.bias")
        y = F.layer_norm(h, (d,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        y = F.gelu(y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias")) @ b("mlp.fc2.weight").T + b(
            "mlp.fc2.bias"
        )
        h = h + y
        states.append(h)
    return states


def test_biomedclip_hidden_states_parity(biomedclip_state_dict, tmp_path):
    from transformers import ViTModel

    from llavamed.model.convert.biomedclip import convert_biomedclip

    torch.save(biomedclip_state_dict, tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    )
    dst = convert_biomedclip(tmp_path, tmp_path / "vit", num_heads=4)
    vit = ViTModel.from_pretrained(dst).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = vit(x, output_hidden_states=True).hidden_states
    ref = _timm_vit_forward(biomedclip_state_dict, x, heads=4, n_blocks=2)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == [0.5, 0.5, 0.5]
    # A second conversion replaces the first; a folder of the user's is refused before loading.
    assert convert_biomedclip(tmp_path, tmp_path / "vit", num_heads=4) == dst
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("keep")
    with pytest.raises(InputError, match="exists and holds something else"):
        convert_biomedclip(tmp_path, tmp_path / "docs", num_heads=4)
    with pytest.raises(InputError, match="would replace the source"):
        convert_biomedclip(tmp_path / "open_clip_pytorch_model.bin", tmp_path, num_heads=4)


def test_biomedclip_tower_composes_into_llava(biomedclip_state_dict, tmp_path):
    from llavamed.model import ModelSpec, build
    from llavamed.model.convert.biomedclip import convert_biomedclip

    torch.save(biomedclip_state_dict, tmp_path / "w.bin")
    dst = convert_biomedclip(tmp_path / "w.bin", tmp_path / "vit", num_heads=4)
    model, proc = build(ModelSpec(lm="tiny", vision=str(dst)))
    assert model.config.vision_config.model_type == "vit"
    inputs = proc(
        text=[
            proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
                add_generation_prompt=True,
            )
        ],
        images=[Image.new("RGB", (32, 32))],
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_biomedclip_unmapped_trunk_key(biomedclip_state_dict, tmp_path):
    from llavamed.model.convert.biomedclip import map_biomedclip_state_dict

    sd = biomedclip_state_dict | {"visual.trunk.fc_norm.weight": torch.ones(32)}
    with pytest.raises(InputError, match="fc_norm"):
        map_biomedclip_state_dict(sd)


def test_a_key_in_two_shards_is_refused_not_taken_from_the_last(original_llava_med, tmp_path):
    """A stale shard holding a key the index assigns to another shard gave that key the stale
    shard's values (whichever sorted last), silently."""
    from llavamed.model.convert.state_dict_io import load_state_dict

    src, _, sd = original_llava_med
    copy = tmp_path / "ck"
    shutil.copytree(src, copy)
    weight_map = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.mm_projector.0.weight"
    first, second = sorted(set(weight_map.values()))
    assert weight_map[key] == first
    stale = load_file(copy / second) | {key: torch.zeros_like(sd[key])}
    save_file(stale, copy / second)
    with pytest.raises(
        InputError, match=rf"a key is in more than one shard \({re.escape(key)} in {first} and"
    ):
        load_state_dict(copy)


@pytest.mark.parametrize(
    ("option", "error"),
    [
        # The 3-layer tower has hidden states -4..3: this converted, then every forward pass
        # failed with an IndexError inside transformers.
        ({"mm_vision_select_layer": -30},
         r"config\.json: unsupported option \(mm_vision_select_layer=-30: .* indexed -4\.\.3\)"),
        # The weights have one row per tokenizer entry; the tensors were grown by the <image>
        # rows for a 32000-row vocabulary and reported with 66305 rows they do not have.
        ({"vocab_size": 32000},
         r"config\.json: vocab_size does not fit the weights \(vocab_size=32000 but "
         r"model\.embed_tokens\.weight has 49152 rows\)"),
    ],
)  # fmt: skip
def test_llava_med_config_that_does_not_fit_the_weights_fails_loudly(
    original_llava_med, tmp_path, option, error
):
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    bad = _with_config(src, sd, tmp_path / "src", **option)
    with pytest.raises(InputError, match=error):
        convert_llava_med(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llava_med_output_is_readable_as_the_umask_says(original_llava_med, tmp_path):
    """safetensors writes 0600 files: the converted weights were unreadable to other users of a
    shared filesystem while every other file of the folder followed the umask."""
    import os

    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, _ = original_llava_med
    dst = convert_llava_med(src, tmp_path / "native")
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in dst.iterdir()}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_llava_med_on_a_full_disk_is_one_line_and_leaves_nothing(original_llava_med, small_disk):
    """safetensors reports ENOSPC as its own SafetensorError, which reached the user as a
    traceback instead of the out-of-disk-space message other writers give."""
    from llavamed.errors import StorageError
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, _ = original_llava_med
    with pytest.raises(StorageError, match=rf"^{re.escape(str(small_disk))}: out of disk space"):
        convert_llava_med(src, small_disk / "native")
    assert list(small_disk.iterdir()) == []


def test_select_layer_0_converts_to_a_checkpoint_that_runs(original_llava_med, tmp_path):
    """mm_vision_select_layer 0 (the tower's embeddings) converted as vision_feature_layer 0,
    which transformers' llava passes as output_hidden_states=0: the tower returned no hidden
    states and every forward pass failed. It is the same hidden state as -(layers + 1)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    logits = []
    for layer in (0, -4):  # the test tower has 3 layers: hidden states -4..3
        variant = _with_config(src, sd, tmp_path / f"src{layer}", mm_vision_select_layer=layer)
        dst = convert_llava_med(variant, tmp_path / f"native{layer}")
        assert json.loads((dst / "config.json").read_text())["vision_feature_layer"] == -4
        model = LlavaForConditionalGeneration.from_pretrained(dst).eval()
        proc = AutoProcessor.from_pretrained(dst)
        inputs = proc(
            text=["[INST] <image>\nWhat is shown? [/INST]"],
            images=[Image.new("RGB", (28, 28), (90, 160, 30))],
            return_tensors="pt",
        )
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[0], logits[1])


def test_llava_meds_training_use_cache_false_is_not_carried_over(original_llava_med, tmp_path):
    """Released LLaVA-Med configs say use_cache=false (LLaVA's train.py sets it); the converted
    model then returned no KV cache from a forward pass unless asked for one."""
    from llavamed.model.checkpoint import load_llava
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    variant = _with_config(src, sd, tmp_path / "src", use_cache=False)
    dst = convert_llava_med(variant, tmp_path / "native")
    assert json.loads((dst / "config.json").read_text())["text_config"].get("use_cache", True)
    model, proc = load_llava(dst)
    with torch.no_grad():
        out = model(**proc(text=["[INST] Hi [/INST]"], return_tensors="pt"))
    assert out.past_key_values is not None


def test_a_tokenizer_larger_than_the_embeddings_is_refused(original_llava_med, tmp_path):
    """Another LM's tokenizer in the folder (here 49152 tokens beside 1000 embedding rows)
    converted into a 49153-row model whose extra rows were all the mean embedding."""
    from llavamed.model.convert.llava_med import convert_llava_med

    src, _, sd = original_llava_med
    small = {
        k: (v[:1000] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
        for k, v in sd.items()
    }
    bad = _variant(src, small, tmp_path / "src", lambda d: d)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"vocab_size": 1000}))
    with pytest.raises(
        InputError,
        match=r"tokenizer does not fit the model \(the embeddings have 1000 rows but the "
        r"tokenizer has 48152 token\(s\) beyond them",
    ):
        convert_llava_med(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
