"""Learnability probe: a tiny CNN trained on N MedSynth images of one domain at 128 px (pad to
square), per-attribute held-out accuracy.  .venv/bin/python benchmarks/synth_probe.py chest_xray 1000
"""

import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from llavamed.data.synth import attrs_to_dict, render, sample_attributes

torch.manual_seed(0)
domain = sys.argv[1]
N = int(sys.argv[2])


def pad(img):
    img = img.convert("L") if domain in ("chest_xray", "ct_scan", "mri") else img.convert("RGB")
    s = max(img.size)
    sq = Image.new(img.mode, (s, s))
    sq.paste(img, ((s - img.width) // 2, (s - img.height) // 2))
    a = np.asarray(sq.resize((128, 128), Image.BICUBIC), dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


X, Y = [], []
t = time.time()
for i in range(N):
    rng = np.random.default_rng(i)
    a = sample_attributes(domain, rng)
    X.append(pad(render(domain, a, rng, 256)))
    d = attrs_to_dict(a)
    Y.append(
        {k: v for k, v in d.items() if isinstance(v, bool)}
        | ({"high": d["cellularity"] == "high"} if domain == "histology" else {})
        | ({"T2": d["weighting"] == "T2"} if domain == "mri" else {})
        | (
            {
                "ruler": d["scale"] == "ruler",
                "large": d["size_cm"] > 3,
                "red": d["lesion_color"] == "red",
            }
            if domain == "gross"
            else {}
        )
    )
keys = [k for k in Y[0] if all(k in y for y in Y) and k != "ring_enhancement"]
X = torch.tensor(np.stack(X))
Yt = torch.tensor([[float(y[k]) for k in keys] for y in Y])
print("render", time.time() - t, keys)
C = X.shape[1]
net = nn.Sequential(
    nn.Conv2d(C, 16, 5, 2, 2),
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
ntr = int(N * 0.8)
for _ep in range(15):
    perm = torch.randperm(ntr)
    for b in range(0, ntr, 32):
        idx = perm[b : b + 32]
        loss = nn.functional.binary_cross_entropy_with_logits(net(X[idx]), Yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
with torch.no_grad():
    p = (net(X[ntr:]) > 0).float()
acc = (p == Yt[ntr:]).float().mean(0)
print(
    domain,
    {k: round(float(a), 2) for k, a in zip(keys, acc, strict=True)},
    f"{time.time() - t:.0f}s",
)
