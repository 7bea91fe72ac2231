"""Load native llava checkpoints (ours or anyone's) and read the llavamed metadata we save."""

from __future__ import annotations

import json
from pathlib import Path

from llavamed.errors import InputError
from llavamed.model.compose import CHECKPOINT_META


def read_meta(path: str | Path) -> dict:
    p = Path(path) / CHECKPOINT_META
    return json.loads(p.read_text()) if p.exists() else {}


def checkpoint_template(path: str | Path, default: str | None = None) -> str:
    """The conversation template a checkpoint was built with (from ``llavamed.json``)."""
    name = read_meta(path).get("template") or default
    if name is None:
        raise InputError(
            path,
            "unknown conversation template",
            "not a llavamed checkpoint; pass the template name explicitly",
        )
    return name


def load_llava(path: str | Path, *, dtype=None, device: str = "cpu"):
    """``(LlavaForConditionalGeneration, processor)`` from a native checkpoint folder."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(path, "not a checkpoint folder", "config.json missing")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor
