"""BiomedCLIP's vision tower (open_clip, timm ``VisionTransformer`` ViT-B/16 under
``visual.trunk.*``) to a transformers ``ViTModel`` folder usable as ``model init --vision DIR``.

Needs neither open_clip nor timm (neither imports beside the CPU torch here). timm's ViT is
pre-norm with a fused ``qkv`` projection, GELU and LayerNorm eps 1e-6; transformers' ViT computes
the same function with separate query/key/value, so the mapping is a split plus renames.
The CLIP head (``visual.head.*``) and the text tower are not part of the vision tower and are
dropped by name; any other unmapped ``visual.*`` key is an error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llavamed.errors import InputError
from llavamed.model.convert.state_dict_io import load_state_dict

TRUNK = "visual.trunk."
# transformers 5 ViTModel names (it maps older ``encoder.layer.*`` checkpoints on load).
BLOCK_MAP = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
DROPPED_PREFIXES = (
    "visual.head.",
    # The text tower: BiomedCLIP's (an HF BERT under text.*) or open_clip's built-in one.
    "text.",
    "transformer.",
    "token_embedding.",
    "positional_embedding",
    "ln_final.",
    "text_projection",
    "attn_mask",
    # CLIP's temperature, and the bias a SigLIP-loss fine-tune (open_clip --siglip) adds.
    "logit_scale",
    "logit_bias",
)


def map_biomedclip_state_dict(sd: dict, num_heads: int | None = None, source: str = "<state dict>"):
    """Return ``(ViTConfig, vit_state_dict)`` for an open_clip BiomedCLIP state dict; ``source``
    (the file or folder it came from) names it in errors."""
    from transformers import ViTConfig

    if sd and all(k.startswith("module.") for k in sd):
        # open_clip's trainer saves a distributed run's model with DDP's "module." prefix
        # (its own loader strips it); such an epoch_N.pt was "not an open_clip checkpoint".
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if not any(k.startswith(TRUNK) for k in sd):
        raise InputError(source, "not an open_clip timm-trunk checkpoint", "no visual.trunk.* keys")
    if num_heads is not None and (isinstance(num_heads, bool) or num_heads < 1):
        # 0 fell back to the default unannounced; a negative count built a broken model.
        raise InputError("--num-heads", "must be a positive number", f"got {num_heads!r}")
    out: dict = {}
    used = set()
    blocks = set()
    for k, v in sd.items():
        if not k.startswith(TRUNK):
            if k.startswith(DROPPED_PREFIXES):
                used.add(k)
            continue
        rest = k[len(TRUNK) :]
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
        if m:
            i, name, kind = int(m.group(1)), m.group(2), m.group(3)
            blocks.add(i)
            prefix = f"layers.{i}."
            if name == "attn.qkv":
                q, kk, vv = v.chunk(3, dim=0)
                for part, t in zip(("q_proj", "k_proj", "v_proj"), (q, kk, vv), strict=True):
                    out[f"{prefix}attention.{part}.{kind}"] = t.clone()
            elif name in BLOCK_MAP:
                out[f"{prefix}{BLOCK_MAP[name]}.{kind}"] = v
            else:
                continue
        elif rest == "cls_token":
            out["embeddings.cls_token"] = v
        elif rest == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif rest.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + rest.rsplit(".", 1)[1]] = v
        elif rest.startswith("norm."):
            out["layernorm." + rest.rsplit(".", 1)[1]] = v
        else:
            continue
        used.add(k)
    unused = sorted(k for k in sd if k not in used)
    if unused:
        raise InputError(source, "unmapped source keys", ", ".join(unused[:10]))
    # Without these the shapes below cannot be read (a KeyError traceback named a native key).
    needed = ("embeddings.cls_token", "embeddings.position_embeddings")
    needed += ("embeddings.patch_embeddings.projection.weight", "layers.0.mlp.fc1.weight")
    absent = [_source_key(k) for k in needed if k not in out]
    if absent:
        raise InputError(source, "missing source keys", ", ".join(absent))
    if sorted(blocks) != list(range(len(blocks))):
        raise InputError(
            source, "blocks are not numbered 0..N-1", f"visual.trunk.blocks.{sorted(blocks)}"
        )
    hidden = out["embeddings.cls_token"].shape[-1]
    if num_heads is not None and hidden % num_heads:
        raise InputError(
            "--num-heads", f"{num_heads} heads do not divide the width", f"hidden size {hidden}"
        )
    patch = out["embeddings.patch_embeddings.projection.weight"].shape[-1]
    n_pos = out["embeddings.position_embeddings"].shape[1] - 1
    grid = int(round(n_pos**0.5))
    if grid * grid != n_pos:
        raise InputError(source, "non-square position grid", f"{n_pos} positions")
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=len(blocks),
        num_attention_heads=num_heads or max(1, hidden // 64),
        intermediate_size=out["layers.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=out["embeddings.patch_embeddings.projection.weight"].shape[1],
        qkv_bias="layers.0.attention.q_proj.bias" in out,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    _check_fits(config, out, source)
    return config, out


def _source_key(native: str) -> str:
    """The open_clip key a ViT key is read from, for errors that name what the file lacks."""
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    if native in fixed:
        return TRUNK + fixed[native]
    m = re.match(r"layers\.(\d+)\.(.+)\.(weight|bias)$", native)
    if m:
        i, name, kind = m.groups()
        if name.startswith("attention.") and name.endswith(("q_proj", "k_proj", "v_proj")):
            return f"{TRUNK}blocks.{i}.attn.qkv.{kind}"
        timm = {v: k for k, v in BLOCK_MAP.items()}.get(name)
        if timm is not None:
            return f"{TRUNK}blocks.{i}.{timm}.{kind}"
    return native


def _check_fits(config, vit_sd: dict, source: str) -> None:
    """Every ViT weight present with its shape, or an InputError naming the open_clip keys: a
    checkpoint missing a norm or a bias (or with a qkv of another width) ended in torch's
    multi-line RuntimeError from load_state_dict."""
    import torch
    from transformers import ViTModel

    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in ViTModel(config, add_pooling_layer=False).state_dict().items()
        }
    missing = sorted({_source_key(k) for k in shapes if k not in vit_sd})
    if missing:
        raise InputError(source, "missing source keys", ", ".join(missing[:10]))
    extra = sorted({_source_key(k) for k in vit_sd if k not in shapes})
    if extra:
        raise InputError(source, "source keys do not fit a ViT", ", ".join(extra[:10]))
    wrong = sorted(
        {
            f"{_source_key(k)} {tuple(v.shape)}"
            for k, v in vit_sd.items()
            if tuple(v.shape) != shapes[k]
        }
    )
    if wrong:
        raise InputError(source, "tensor shapes do not fit a ViT", "; ".join(wrong[:5]))


CONVERTED_FROM = "open_clip BiomedCLIP visual.trunk"


def is_converted_tower(path: Path) -> bool:
    """A folder an earlier ``convert biomedclip`` wrote (so a new conversion may replace it)."""
    try:
        pre = json.loads((Path(path) / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(pre, dict) and pre.get("converted_from") == CONVERTED_FROM


def convert_biomedclip(src: str | Path, dst: str | Path, *, num_heads: int | None = None) -> Path:
    """``src``: a weights file (``open_clip_pytorch_model.bin``/safetensors) or its folder
    (``open_clip_config.json`` beside it supplies the image mean/std)."""
    import torch
    from transformers import ViTModel

    from llavamed.utils.io import check_output_dir

    src = Path(src)
    check_output_dir(dst, ours=is_converted_tower, keep=(src,))
    sd = load_state_dict(src)
    config, vit_sd = map_biomedclip_state_dict(sd, num_heads=num_heads, source=str(src))
    model = ViTModel(config, add_pooling_layer=True)
    # The pooler is unused by llava; keep deterministic weights so the folder is reproducible.
    torch.nn.init.zeros_(model.pooler.dense.weight)
    torch.nn.init.zeros_(model.pooler.dense.bias)
    vit_sd = {
        **vit_sd,
        "pooler.dense.weight": model.pooler.dense.weight.detach().clone(),
        "pooler.dense.bias": model.pooler.dense.bias.detach().clone(),
    }
    model.load_state_dict(vit_sd, strict=True)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    oc_cfg = (src if src.is_dir() else src.parent) / "open_clip_config.json"
    if oc_cfg.exists():
        from llavamed.model.processing import image_stats

        mean, std = image_stats(oc_cfg, "preprocess_cfg", mean, std, config.num_channels)
    from llavamed.utils.io import atomic_dir

    dst = Path(dst)
    with atomic_dir(dst, ours=is_converted_tower, keep=(src,)) as tmp:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "image_mean": mean,
                    "image_std": std,
                    "image_size": config.image_size,
                    "converted_from": CONVERTED_FROM,
                },
                indent=2,
            )
            + "\n"
        )
    return dst
