"""A vision tower on its own, outside a LLaVA: load it, check its layers, fingerprint its files,
run it, save it, and prepare images for it.

Stage 0 (``train/vision_pretrain.py``) and stage 0b (``train/vision_vqa.py``) train a tower in
this form, the linear probes (``eval/probes.py``) read it, and the quickstart checks a given
one. The saved folder is what ``llavamed model init --vision DIR`` composes into a LLaVA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError


@dataclass
class Tower:
    model: Any
    kind: str  # clip_vision_model | siglip_vision_model | vit
    image_size: int
    mean: list[float]
    std: list[float]
    has_cls: bool


def load_tower(vision: str, seed: int = 0) -> Tower:
    """The starting tower as a standalone transformers vision model (random preset or folder)."""
    import torch
    from transformers import CLIPVisionModel, SiglipVisionModel, ViTModel

    from llavamed.model.compose import ModelSpec, _load_vision

    torch.manual_seed(seed)
    v = _load_vision(ModelSpec(vision=vision))
    kind = v.config.model_type
    if kind == "clip_vision_model":
        model = CLIPVisionModel(v.config)
    elif kind == "siglip_vision_model":
        model = SiglipVisionModel(v.config)
    else:
        # `convert biomedclip` (and AutoModel) write ViT's pooler: build it when the weights
        # have one, so loading stays strict.
        pooled = v.state_dict is not None and any(k.startswith("pooler.") for k in v.state_dict)
        model = ViTModel(v.config, add_pooling_layer=pooled)
    if v.state_dict is not None:
        model.load_state_dict(v.state_dict, strict=True)
    return Tower(
        model, kind, int(v.config.image_size), list(v.image_mean), list(v.image_std), v.has_cls
    )


def check_tower_layer(feature_layer: int, tower: Tower) -> None:
    """Refuse a ``feature_layer`` the tower does not have, naming this key (the LLaVA check
    names ``vision_feature_layer`` and a ``model init`` flag)."""
    from llavamed.model.compose import check_feature_layer

    n_layers = int(tower.model.config.num_hidden_layers)
    try:
        check_feature_layer(feature_layer, n_layers)
    except ConfigError:
        raise ConfigError(
            f"feature_layer={feature_layer}: the tower has {n_layers} layers, so use "
            f"-{n_layers + 1}..-1 or 1..{n_layers}"
        ) from None


def tower_fingerprint(tower: Path) -> str:
    """Content hash of a tower folder's config and weights, so a resumed run notices a
    different tower behind the same path."""
    h = hashlib.sha256()
    for f in sorted(tower.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def tower_features(tower: Tower, pixel_values, feature_layer: int):
    """(pooled (B, H), patch tokens (B, K, H) at ``feature_layer``) -- patch tokens exactly as
    LLaVA's projector receives them (CLS dropped, no final layer norm)."""
    out = tower.model(pixel_values=pixel_values, output_hidden_states=True)
    hs = out.hidden_states[feature_layer]
    patches = hs[:, 1:] if tower.has_cls else hs
    if tower.kind == "vit":
        pooled = out.last_hidden_state[:, 0]
    else:
        pooled = out.pooler_output
        if pooled is None or pooled.dim() != 2:
            pooled = out.last_hidden_state.mean(1)
    return pooled, patches


def save_tower(model, tower: Tower, size: int, tower_dir: Path) -> None:
    """``save_pretrained`` + the image processor it was trained with (pad to square with the
    mean colour, as :func:`pad_to_square_uint8`), written to a temp folder then renamed. It said
    resize and centre-crop, so ``AutoImageProcessor`` cut the sides off wide figures."""
    from llavamed.model.processing import llava_image_processor
    from llavamed.utils.io import atomic_dir

    # The folder is this stage's own output: an earlier tower in it is replaced.
    with atomic_dir(tower_dir, ours=lambda _: True) as tmp:
        model.save_pretrained(tmp)
        llava_image_processor(size, tower.mean, tower.std, pad=True).save_pretrained(tmp)


def pad_to_square_uint8(img, size: int, mean: list[float]):
    """PIL image -> uint8 (3, size, size): pad to square with the mean colour, then resize.

    The geometry of LLaVA's ``pad`` aspect mode (:func:`llavamed.model.processing.
    llava_image_processor`, which every later stage and the saved tower use), so the tower is
    pretrained on what it will see in stages 1-2. Stage 0 has its own path because it caches the
    decoded images as uint8 and augments them itself. One difference is kept, so that a run
    reproduces its towers bit for bit: the padding colour is ``round(255 * mean)`` where
    transformers truncates, one level apart (``tests/test_vision_tower.py`` pins both)."""
    import numpy as np
    import torch
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = max(w, h)
    if w != h:
        bg = tuple(int(round(255 * m)) for m in mean)
        canvas = Image.new("RGB", (s, s), bg)
        canvas.paste(img, ((s - w) // 2, (s - h) // 2))
        img = canvas
    img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_pixels(x, mean, std):
    """Float images in [0, 1], (B, 3, S, S) -> the tower's input: per-channel ``(x - mean) / std``."""
    import torch

    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
