"""VQA test fixtures: a VQA-RAD-shaped folder whose answers depend only on the image, and a
seconds-long stage-0b config on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image


def make_vqa_rad(root: Path, n_images: int, seed: int = 0) -> Path:
    """A VQA-RAD-shaped folder. Two questions per image, each answerable only from the image:
    "Is the square on the left?" (a bright square's side) and "Is the image bright?"."""
    rng = random.Random(seed)
    images = root / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    recs = []
    for i in range(n_images):
        left, bright = rng.random() < 0.5, rng.random() < 0.5
        base = 150 if bright else 40
        img = Image.new("RGB", (32, 32), (base, base, base))
        x0 = 2 if left else 18
        img.paste((255, 255, 255) if not bright else (0, 0, 0), (x0, 10, x0 + 12, 22))
        name = f"img{i}.png"
        img.save(images / name)
        split = "test_freeform" if i % 5 == 0 else "freeform"
        for q, yes in (("Is the square on the left?", left), ("Is the image bright?", bright)):
            recs.append(
                {
                    "qid": len(recs),
                    "image_name": name,
                    "question": q,
                    "answer": "yes" if yes else "no",
                    "answer_type": "CLOSED",
                    "phrase_type": split,
                }
            )
    # One open question and one corrupt image: neither may break the run.
    recs.append(
        {
            "qid": len(recs),
            "image_name": "img0.png",
            "question": "What colour is the square?",
            "answer": "white",
            "answer_type": "OPEN",
            "phrase_type": "freeform",
        }
    )
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    recs.append(
        {
            "qid": len(recs),
            "image_name": "broken.png",
            "question": "Is the image bright?",
            "answer": "yes",
            "answer_type": "CLOSED",
            "phrase_type": "freeform",
        }
    )
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs))
    return root


def stage0b_cfg(data: Path, out: Path, **kw) -> dict:
    cfg = {
        "stage": "vision_vqa",
        "sources": [{"dataset": "vqa-rad", "path": str(data), "split": "train"}],
        "vision": "tiny",
        "feature_layer": -1,
        "output_dir": str(out),
        "steps": 300,
        "batch_size": 32,
        "lr": 3e-3,
        "val_fraction": 0.25,
        "precision": "fp32",
        "log_every": 10,
    }
    cfg.update(kw)
    return cfg
