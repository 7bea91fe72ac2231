"""Which parameters train: the stage's parts (projector, LM, vision tower), LoRA adapters, and
never the vision parameters that cannot receive a gradient.

LLaVA reads a hidden state of the vision tower (``vision_feature_layer``), not its output: the
layers after that one and CLIP's ``post_layernorm`` never see a gradient. Leaving them
"trainable" makes DDP fail (or need ``find_unused_parameters``) and wastes optimizer memory, so
they are frozen here whatever the config says.
"""

from __future__ import annotations

from collections.abc import Iterable

from llavamed.errors import ConfigError


def parts(model) -> dict[str, list]:
    """Parameter lists of the three parts of a ``LlavaForConditionalGeneration``."""
    inner = model.model
    return {
        "vision": list(inner.vision_tower.parameters()),
        "projector": list(inner.multi_modal_projector.parameters()),
        "lm": list(inner.language_model.parameters()) + list(model.lm_head.parameters()),
    }


def unused_vision_parameters(model) -> list:
    """Vision parameters that do not feed the projector."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    layers = list(layer) if isinstance(layer, list | tuple) else [layer]
    tower = model.model.vision_tower
    enc = getattr(tower, "vision_model", tower)
    # CLIP/SigLIP keep their blocks in encoder.layers; transformers 5's ViTModel (what
    # `convert biomedclip` writes) holds them directly as .layers.
    holder = getattr(enc, "encoder", enc)
    blocks = getattr(holder, "layers", None) or getattr(holder, "layer", None)
    unused = []
    # After the last block, never part of hidden_states: CLIP/SigLIP's post_layernorm, ViT's
    # final layernorm and pooler, SigLIP's attention-pooling head.
    for name in ("post_layernorm", "layernorm", "pooler", "head"):
        part = getattr(enc, name, None)
        if part is not None:
            unused += list(part.parameters())
    if blocks is not None:
        n = len(blocks)
        # hidden_states has n+1 entries (embeddings first); index k (or n+1+k) follows block k-1.
        deepest = max(li if li >= 0 else n + 1 + li for li in layers)
        for b in blocks[deepest:]:
            unused += list(b.parameters())
    return unused


def apply_trainable(
    model, trainable: Iterable[str], *, lora: bool = False, frozen_lm_layers: int = 0
) -> dict[str, int]:
    """Set ``requires_grad`` for the listed parts; returns trainable counts per part. With
    ``lora`` the LM's own weights stay frozen and only its adapter weights (``lora_``) train.
    ``frozen_lm_layers`` keeps the LM's input embeddings (and so a tied output head) and its
    first N decoder layers frozen."""
    trainable = set(trainable)
    groups = parts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for name, params in groups.items():
        on = name in trainable and not (lora and name == "lm")
        for p in params:
            p.requires_grad_(on)
    if lora and "lm" in trainable:
        for n, p in model.model.language_model.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
    for p in unused_vision_parameters(model):
        p.requires_grad_(False)
    if frozen_lm_layers:
        lm = model.model.language_model
        if frozen_lm_layers >= len(lm.layers):
            raise ConfigError(
                f"train.frozen_lm_layers={frozen_lm_layers}: the LM has only {len(lm.layers)} "
                "layers; leave at least one to train (or drop 'lm' from train.trainable)"
            )
        for module in (lm.embed_tokens, *lm.layers[:frozen_lm_layers]):
            for p in module.parameters():
                p.requires_grad_(False)
    seen: set[int] = set()  # tied embeddings appear in both the LM and the head
    for name, params in groups.items():
        counts[name] = sum(
            p.numel() for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))
        )
    if not any(counts.values()):
        raise ConfigError("train.trainable: nothing left to train")
    return counts
