"""Learnability probe: can a tiny CNN read MedSynth's findings off its images?

    .venv/bin/python benchmarks/synth_probe.py chest_xray --images 1000

Renders N images of one domain (padded to square, 128 px), trains a 4-layer CNN on 80% of them
for 15 epochs and prints each binary attribute's held-out accuracy. An attribute near its majority
rate here is one no vision tower can learn from the pixels: a bug in the renderer, not the model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from llavamed.data.synth import DOMAINS, attrs_to_dict, render, sample_attributes

GREY_DOMAINS = ("chest_xray", "ct_scan", "mri")


def pad_to_square(img: Image.Image, domain: str) -> np.ndarray:
    img = img.convert("L") if domain in GREY_DOMAINS else img.convert("RGB")
    s = max(img.size)
    sq = Image.new(img.mode, (s, s))
    sq.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
    a = np.asarray(sq.resize((128, 128), Image.BICUBIC), dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def binary_labels(domain: str, d: dict) -> dict[str, bool]:
    """The attributes a probe predicts: every boolean one, plus a yes/no reading of the domain's
    main categorical finding."""
    extra: dict[str, bool] = {}
    if domain == "histology":
        extra = {"high": d["cellularity"] == "high"}
    elif domain == "mri":
        extra = {"T2": d["weighting"] == "T2"}
    elif domain == "gross":
        extra = {
            "ruler": d["scale"] == "ruler",
            "large": d["size_cm"] > 3,
            "red": d["lesion_color"] == "red",
        }
    return {k: v for k, v in d.items() if isinstance(v, bool)} | extra


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("domain", choices=DOMAINS)
    ap.add_argument("--images", type=int, default=1000, help="images to render (80%% train)")
    args = ap.parse_args()
    if args.images < 10:
        ap.error("--images must be at least 10")
    torch.manual_seed(0)
    xs, ys = [], []
    t = time.time()
    for i in range(args.images):
        rng = np.random.default_rng(i)
        a = sample_attributes(args.domain, rng)
        xs.append(pad_to_square(render(args.domain, a, rng, 256), args.domain))
        ys.append(binary_labels(args.domain, attrs_to_dict(a)))
    keys = [k for k in ys[0] if all(k in y for y in ys) and k != "ring_enhancement"]
    X = torch.tensor(np.stack(xs))
    Y = torch.tensor([[float(y[k]) for k in keys] for y in ys])
    print(f"rendered {args.images} images in {time.time() - t:.0f}s; attributes: {keys}")
    net = nn.Sequential(
        nn.Conv2d(X.shape[1], 16, 5, 2, 2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, len(keys)),
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    ntr = int(args.images * 0.8)
    for _ in range(15):
        perm = torch.randperm(ntr)
        for b in range(0, ntr, 32):
            idx = perm[b : b + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (net(X[ntr:]) > 0).float()
    acc = (pred == Y[ntr:]).float().mean(0)
    majority = torch.maximum(Y[ntr:].mean(0), 1 - Y[ntr:].mean(0))
    print(f"{'attribute':<24} {'held-out acc':>12} {'majority':>9}")
    for k, a, m in zip(keys, acc, majority, strict=True):
        print(f"{k:<24} {float(a):>12.2f} {float(m):>9.2f}")
    print(f"{args.domain}: {time.time() - t:.0f}s in all")


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "synth_probe")
