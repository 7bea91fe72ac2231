"""Stage-0 test helpers shared by the stage-0 test files: a figure-caption set whose two kinds
differ only locally, seconds-long configs, a run killed at a given step, tower comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image


def write_pairs(root, n=24):
    """Two kinds of figures that differ only locally: a bright dot on the left or on the right."""
    (root / "images").mkdir(parents=True)
    recs = []
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = (rng.random((40, 32)) * 60).astype(np.uint8)
        side = "left" if i % 2 == 0 else "right"
        c = 6 if side == "left" else 24
        arr[16:22, c : c + 4] = 250
        Image.fromarray(arr).save(root / "images" / f"{i}.png")
        recs.append(
            {
                "pair_id": f"p{i}",
                "fig_caption": f"Radiograph showing a bright nodule on the {side}.",
                "image": f"images/{i}.png",
            }
        )
    recs.append({"pair_id": "bad", "fig_caption": "broken", "image": "images/missing.png"})
    recs.append({"pair_id": "nocap", "fig_caption": "", "image": "images/0.png"})
    (root / "figures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root / "figures.jsonl"


def tiny_run(data, out, **kw) -> dict:
    """A seconds-long stage-0 config: the tiny tower, 8 pairs a step, a 20% held-out split."""
    return {
        "data": str(data),
        "output_dir": str(out),
        "vision": "tiny",
        "batch_size": 8,
        "probe_images_per_domain": 0,
        "val_fraction": 0.2,
        "precision": "fp32",
        **kw,
    }


def killed_at_step(n: int, cfg: dict, monkeypatch) -> None:
    """Run stage 0 until step ``n``'s loss raises KeyboardInterrupt (a Ctrl-C mid-run)."""
    import llavamed.train.contrastive as contrastive
    from llavamed.train.vision_pretrain import run_from_config

    real, calls = contrastive.clip_loss, {"n": 0}

    def dies(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(contrastive, "clip_loss", dies)
    with pytest.raises(KeyboardInterrupt):
        run_from_config(cfg, progress=False)
    monkeypatch.setattr(contrastive, "clip_loss", real)


def streaming_cfg(data, out, **kw) -> dict:
    """A two-step stage-0 run that decodes images per step (``preload: false``)."""
    return {
        "data": str(data),
        "output_dir": str(out),
        "vision": "tiny",
        "batch_size": 6,
        "max_steps": 2,
        "probe_images_per_domain": 0,
        "preload": False,
        "precision": "fp32",
    } | kw


def same_tower(a, b) -> bool:
    from safetensors.torch import load_file

    want, got = (
        load_file(a.tower_dir / "model.safetensors"),
        load_file(b.tower_dir / "model.safetensors"),
    )
    return all(torch.equal(got[k], want[k]) for k in want)
