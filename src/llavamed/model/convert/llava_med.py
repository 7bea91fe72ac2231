"""Original LLaVA-Med v1.5 (``LlavaMistralForCausalLM``, ``model_type: llava_mistral``) to
transformers' native ``LlavaForConditionalGeneration``.

Source layout (DESIGN.md §4): LM under ``model.layers.*``, ``model.embed_tokens``, ``model.norm``,
``lm_head``; projector ``model.mm_projector.{0,2}``; vision tower either inside the checkpoint
under ``model.vision_tower.vision_tower.vision_model.*`` or only named by ``mm_vision_tower``
(a hub id, or a local CLIP folder). The original inserted image features at a sentinel id (-200)
rather than through a vocabulary token; the native format adds an ``<image>`` token, whose new
embedding row is never read (image positions are overwritten by projected features).
"""

from __future__ import annotations

import re
from pathlib import Path

from llavamed.errors import InputError, first_line
from llavamed.model.checkpoint_format import (
    config_error_reason,
    is_untrained_checkpoint,
    model_files,
)
from llavamed.model.convert.state_dict_io import check_all_used, load_state_dict
from llavamed.utils.io import read_json

LLAVA_KEYS = {
    "mm_vision_tower",
    "mm_hidden_size",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_projector_type",
    "image_aspect_ratio",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_patch_merge_type",
    "mm_projector_lr",
    "mm_vision_tower_lr",
    "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
}
TOWER_PREFIX = "model.vision_tower.vision_tower."


def _vision_config_and_weights(src_cfg: dict, sd: dict, vision_tower: str | Path | None, src: Path):
    """The CLIP vision config and (prefix-stripped) weights, from the checkpoint or a folder."""
    from transformers import AutoConfig, CLIPVisionConfig

    in_ckpt = {k[len(TOWER_PREFIX) :]: v for k, v in sd.items() if k.startswith(TOWER_PREFIX)}
    folder = Path(vision_tower) if vision_tower else None
    if folder is not None and not folder.is_dir():
        # transformers would read the path as a hub id: "Repo id must be in the form ...".
        raise InputError(folder, "vision tower folder not found", "--vision-tower names no folder")
    named = src_cfg.get("mm_vision_tower")
    if folder is None and named and Path(named).exists():
        folder = Path(named)
    if folder is None:
        raise InputError(
            src,
            "vision tower config not found",
            f"mm_vision_tower={named!r} is not a local folder; pass --vision-tower DIR "
            "(a CLIP folder such as clip-vit-large-patch14-336)",
        )
    with model_files(folder):
        cfg = AutoConfig.from_pretrained(folder)
    if isinstance(cfg, CLIPVisionConfig):
        vcfg = cfg
    elif getattr(cfg, "vision_config", None) is not None:
        vcfg = cfg.vision_config
    else:
        raise InputError(folder, "not a CLIP folder", f"model_type={cfg.model_type}")
    # Each weight's key in its file, so that errors name a key the user can find there.
    names: dict[str, str] = {}
    if in_ckpt:
        # transformers 5's CLIPVisionModel has no ``vision_model`` level; ``position_ids`` is a
        # buffer older checkpoints stored and transformers now rebuilds.
        weights = {}
        for k, v in in_ckpt.items():
            if not k.endswith("position_ids"):
                native = re.sub(r"^vision_model\.", "", k)
                weights[native], names[native] = v, TOWER_PREFIX + k
        used_from_ckpt = [TOWER_PREFIX + k for k in in_ckpt]
    else:
        tower_sd = load_state_dict(folder)
        weights = {}
        for k, v in tower_sd.items():
            if k.startswith("vision_model."):
                weights[k[len("vision_model.") :]] = v
                names[k[len("vision_model.") :]] = f"{folder}: {k}"
            elif k.startswith(
                ("text_model.", "visual_projection", "text_projection", "logit_scale")
            ):
                continue  # the text half of a full CLIP folder is not part of the tower
            elif k.startswith("position_ids") or k.endswith("position_ids"):
                continue
            else:
                weights[k], names[k] = v, f"{folder}: {k}"
        weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
        used_from_ckpt = []
    mean = std = None
    pp = folder / "preprocessor_config.json"
    if pp.exists():
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        from llavamed.model.processing import image_stats

        channels = int(getattr(vcfg, "num_channels", 3) or 3)
        mean, std = image_stats(pp, None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, channels)
    return vcfg, weights, names, used_from_ckpt, mean, std


def _load_tokenizer(src: Path):
    """The source's tokenizer, or an InputError saying what the folder lacks. Released LLaVA-Med
    folders may hold only a SentencePiece ``tokenizer.model``, which transformers reads (and
    converts to a fast tokenizer) only with the ``sentencepiece`` and ``protobuf`` packages."""
    from transformers import AutoTokenizer, MistralConfig

    try:
        # The LM's config, not the folder's: AutoTokenizer read config.json's llava_mistral and
        # warned on every conversion that the model type "is not supported and can yield
        # errors"; Mistral's also names the tokenizer class if tokenizer_config.json does not.
        return AutoTokenizer.from_pretrained(src, config=MistralConfig())
    except (ImportError, ValueError, OSError, RuntimeError) as exc:
        if (src / "tokenizer.json").exists():
            raise InputError(src, "unreadable tokenizer", first_line(exc)) from exc
        if (src / "tokenizer.model").exists():
            if _missing_sentencepiece():
                raise InputError(
                    src,
                    "cannot read the SentencePiece tokenizer.model",
                    "pip install sentencepiece protobuf, or put the LM's tokenizer.json in the "
                    "folder",
                ) from exc
            raise InputError(
                src / "tokenizer.model", "unreadable tokenizer", first_line(exc)
            ) from exc
        raise InputError(
            src,
            "no tokenizer",
            "neither tokenizer.json nor tokenizer.model; copy the source LM's tokenizer files "
            "(tokenizer.json, tokenizer_config.json) into the folder",
        ) from exc


def _missing_sentencepiece() -> bool:
    import importlib.util

    try:
        return any(
            importlib.util.find_spec(m) is None for m in ("sentencepiece", "google.protobuf")
        )
    except ModuleNotFoundError:  # no ``google`` package at all
        return True


def _feature_layer(src_cfg: dict, cfg_path: Path, n_layers: int) -> int:
    """``mm_vision_select_layer`` as native llava's ``vision_feature_layer``, refused when the
    tower has no such hidden state: the folder would convert and then fail in every forward
    pass with an IndexError deep inside transformers."""
    from llavamed.errors import ConfigError
    from llavamed.model.compose import check_feature_layer, native_feature_layer

    layer = src_cfg.get("mm_vision_select_layer", -2)
    try:
        check_feature_layer(layer, n_layers)
    except ConfigError:
        raise InputError(
            cfg_path,
            "unsupported option",
            f"mm_vision_select_layer={layer!r}: the vision tower has {n_layers} layers, so its "
            f"hidden states are indexed {-(n_layers + 1)}..{n_layers}",
        ) from None
    return native_feature_layer(layer, n_layers)


def _check_source_config(src_cfg, cfg_path: Path) -> str:
    """Refuse a source config native llava cannot reproduce; return its
    ``vision_feature_select_strategy``."""
    if not isinstance(src_cfg, dict):
        raise InputError(cfg_path, "config.json is not a JSON object")
    if src_cfg.get("model_type") == "llava" and (
        "text_config" in src_cfg or "vision_config" in src_cfg
    ):
        # transformers' own llava (a converted or composed checkpoint) was called "a
        # Llama/Vicuna LLaVA", whatever its LM; the flat-config "llava" below is LLaVA v0/v1's.
        raise InputError(
            cfg_path,
            "already a native llava checkpoint",
            "nothing to convert: transformers, vLLM and llavamed load it as it is",
        )
    if src_cfg.get("model_type") in ("llava_llama", "llava"):
        # A Llama/Vicuna LLaVA (LLaVA-Med v1.0, LLaVA-1.5) would pass every other check and come
        # out as a Mistral model prompted with [INST]: the wrong architecture and template.
        raise InputError(
            cfg_path,
            "not LLaVA-Med v1.5",
            f"model_type={src_cfg.get('model_type')!r} is a Llama/Vicuna LLaVA; this converter "
            "writes LLaVA-Med v1.5 (llava_mistral, Mistral-7B, mistral_instruct prompts) only",
        )
    if src_cfg.get("model_type") != "llava_mistral":
        raise InputError(
            cfg_path, "not a LLaVA-Med checkpoint", f"model_type={src_cfg.get('model_type')!r}"
        )
    if src_cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise InputError(
            cfg_path,
            "unsupported projector",
            f"{src_cfg.get('mm_projector_type')!r}; native llava has Linear-GELU-Linear only",
        )
    if src_cfg.get("mm_use_im_start_end"):
        raise InputError(cfg_path, "unsupported option", "mm_use_im_start_end=true")
    # Options LLaVA reads that native llava cannot reproduce: converting anyway would give a
    # model that sees other image tokens than it was trained on.
    select = src_cfg.get("mm_vision_select_feature") or "patch"
    if select not in ("patch", "cls_patch"):
        raise InputError(
            cfg_path,
            "unsupported option",
            f"mm_vision_select_feature={select!r} (LLaVA: patch, cls_patch)",
        )
    aspect = src_cfg.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise InputError(
            cfg_path,
            "unsupported option",
            f"image_aspect_ratio={aspect!r} (LLaVA-NeXT tiling; native llava takes one square image)",
        )
    merge = src_cfg.get("mm_patch_merge_type") or "flat"
    if merge != "flat":
        raise InputError(cfg_path, "unsupported option", f"mm_patch_merge_type={merge!r}")
    return "default" if select == "patch" else "full"


def _text_config(src_cfg: dict, cfg_path: Path):
    """The LM's ``MistralConfig``: the source's flat fields without LLaVA's own."""
    from transformers import MistralConfig

    text_cfg = {k: v for k, v in src_cfg.items() if k not in LLAVA_KEYS}
    for k in ("architectures", "model_type", "_name_or_path", "transformers_version", "auto_map"):
        text_cfg.pop(k, None)
    # LLaVA's train.py saves use_cache=false (a training setting, as gradient checkpointing
    # needs): kept, every forward pass of the converted model returned no KV cache unless the
    # caller asked for one, so a plain decoding loop recomputed the whole prompt each token.
    text_cfg.pop("use_cache", None)
    try:
        return MistralConfig(**text_cfg)
    except Exception as exc:  # noqa: BLE001 - any invalid field; transformers raises several kinds
        # ("hidden_size": "32" raised a validation error, 0 attention heads a ZeroDivisionError)
        raise InputError(cfg_path, "invalid LM config", config_error_reason(exc)) from exc


def _map_llava_keys(sd: dict, vision_weights: dict, vision_names: dict, vision_used, src: Path):
    """``(target, source_of)``: the source tensors under native llava's in-memory names, and for
    each the key it had in the source (so that errors name a key the user can find). Every
    source key must be mapped or known to be dropped."""
    target = {}
    source_of: dict[str, str] = {}
    used = list(vision_used)
    for k, v in sd.items():
        if k.startswith(TOWER_PREFIX):
            continue
        if k.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints stored; rebuilt
            used.append(k)
            continue
        if k.startswith("model.mm_projector."):
            # A linear projector's ``model.mm_projector.weight`` has no index: unmapped below.
            idx, _, rest = k[len("model.mm_projector.") :].partition(".")
            name = {"0": "linear_1", "2": "linear_2"}.get(idx)
            if name is None or not rest:
                continue  # reported as unmapped below
            native = f"model.multi_modal_projector.{name}.{rest}"
        elif k.startswith("model."):
            native = "model.language_model." + k[len("model.") :]
        elif k.startswith("lm_head."):
            native = k
        else:
            continue
        target[native], source_of[native] = v, k
        used.append(k)
    check_all_used(list(sd), used, str(src))
    for k, v in vision_weights.items():
        target["model.vision_tower." + k] = v
        source_of["model.vision_tower." + k] = vision_names[k]
    return target, source_of


def _grow_vocab(target: dict, source_of: dict, old_vocab: int, vocab: int, cfg_path: Path):
    """Grow the embedding (and untied head) by the ``<image>`` row(s); their values are never
    read for image positions, so the mean embedding is a safe, deterministic fill."""
    import torch

    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in target and target[key].shape[0] != old_vocab:
            # Grown anyway, the tensor would be reported with rows it does not have.
            raise InputError(
                cfg_path,
                "vocab_size does not fit the weights",
                f"vocab_size={old_vocab} but {source_of[key]} has {target[key].shape[0]} rows",
            )
        if key in target and target[key].shape[0] < vocab:
            w = target[key]
            extra = w.mean(dim=0, keepdim=True).expand(vocab - old_vocab, -1)
            target[key] = torch.cat([w, extra], dim=0)


def _drop_tied_head(target: dict, src: Path) -> None:
    """torch.save of a tied model stores the shared tensor under both names: drop the copy, but
    only when it is one (an lm_head that differs would be lost by tying)."""
    import torch

    head = target.pop("lm_head.weight", None)
    embed = target.get("model.language_model.embed_tokens.weight")
    if head is not None and not (embed is not None and torch.equal(head, embed)):
        raise InputError(
            src,
            "tie_word_embeddings is set but lm_head.weight differs from embed_tokens.weight",
        )


def _check_layout(target: dict, shapes: dict, source_of: dict, src: Path) -> None:
    """Refuse tensors that do not fill native llava's state dict ``shapes`` exactly."""
    missing, unexpected = set(shapes) - set(target), set(target) - set(shapes)
    if missing or unexpected:
        raise InputError(
            src,
            "checkpoint does not fit the native layout",
            f"missing={sorted(missing)[:8]} "
            f"unexpected={sorted(source_of.get(k, k) for k in unexpected)[:8]}",
        )
    # Names alone are not enough: a tensor of the wrong shape (or a --vision-tower folder for
    # another resolution) would convert "successfully" into a folder no loader can read.
    wrong = sorted(
        f"{source_of.get(k, k)} {tuple(v.shape)} != {shapes[k]}"
        for k, v in target.items()
        if tuple(v.shape) != shapes[k]
    )
    if wrong:
        raise InputError(src, "tensor shapes do not fit the config", "; ".join(wrong[:5]))


def convert_llava_med(
    src: str | Path, dst: str | Path, *, vision_tower: str | Path | None = None
) -> Path:
    """Write the original LLaVA-Med v1.5 checkpoint ``src`` as a native llava checkpoint ``dst``
    (the tower from ``vision_tower`` when ``src`` holds none and names no local folder)."""
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from llavamed.model.compose import (
        add_image_token,
        check_tokenizer_fits,
        llava_config,
        llava_processor,
    )
    from llavamed.model.convert.native_writer import write_native_checkpoint
    from llavamed.model.processing import llava_image_processor
    from llavamed.model.templates import get_template
    from llavamed.utils.io import check_output_dir

    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.exists():
        raise InputError(src, "not a checkpoint folder", "config.json missing")
    check_output_dir(dst, ours=is_untrained_checkpoint, keep=(src,))  # before minutes of loading
    src_cfg = read_json(cfg_path)
    select = _check_source_config(src_cfg, cfg_path)
    tok = _load_tokenizer(src)  # before the weights: minutes for a 7B checkpoint
    sd = load_state_dict(src)
    vcfg, vision_weights, vision_names, vision_used, mean, std = _vision_config_and_weights(
        src_cfg, sd, vision_tower, src
    )
    feature_layer = _feature_layer(src_cfg, cfg_path, int(vcfg.num_hidden_layers))
    text_config = _text_config(src_cfg, cfg_path)

    # LLaVA's train.py pads with unk (Mistral's and Llama's tokenizers have one).
    image_token_id = add_image_token(tok, pad=tok.unk_token or tok.eos_token)
    vocab = max(len(tok), text_config.vocab_size)
    old_vocab = text_config.vocab_size
    text_config.vocab_size = vocab

    image_size, patch = int(vcfg.image_size), int(vcfg.patch_size)
    config = llava_config(
        # LLaVA-Med v1.5 is CLIP ViT-L/14-336 + Mistral-7B; compose writes what it loaded.
        vcfg.to_dict() | {"model_type": "clip_vision_model"},
        text_config.to_dict() | {"model_type": "mistral"},
        image_token_id=image_token_id,
        select=select,
        feature_layer=feature_layer,
        image_size=image_size,
        patch=patch,
        # CLIP's CLS token: "full" (LLaVA's cls_patch) keeps it as one more image token.
        has_cls=True,
        tie=bool(src_cfg.get("tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    target, source_of = _map_llava_keys(sd, vision_weights, vision_names, vision_used, src)
    _grow_vocab(target, source_of, old_vocab, vocab, cfg_path)
    check_tokenizer_fits(tok, old_vocab, src)  # the rows are the weights' now
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
        _drop_tied_head(target, src)
    _check_layout(target, shapes, source_of, src)
    gen = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    # LLaVA's process_images pads only for image_aspect_ratio == "pad"; absent means resize+crop.
    pad = src_cfg.get("image_aspect_ratio") == "pad"
    image_processor = llava_image_processor(
        image_size, mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD, pad=pad
    )
    # The released tokenizer is kept as it is, unlike compose's set_chat_template: it adds BOS
    # as mistral_instruct wants, and its eos, which ends mistral_instruct turns, is the stop id.
    processor = llava_processor(
        image_processor,
        tok,
        get_template("mistral_instruct"),
        patch=patch,
        select=select,
        has_cls=True,
    )
    return write_native_checkpoint(
        dst,
        config,
        target,
        processor,
        gen,
        meta={
            "template": "mistral_instruct",
            "converted_from": {"format": "llava-med-v1.5", "path": str(src)},
        },
        src=src,
    )
