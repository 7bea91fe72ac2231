"""Linear probes on a frozen vision tower, scored against MedSynth ground truth.

Question the probes answer: can a *linear* readout recover each attribute from the tower's
features? Two readouts per attribute:

* ``patch`` -- one linear map shared by every patch token, class scores pooled by a max-like
  log-sum-exp over patches. This is what a LLaVA projector + LM must do: find the patch that shows
  the finding, wherever it is. It succeeds only when individual patch tokens carry the finding.
* ``pooled`` -- multinomial logistic regression on the mean patch token (a global summary).

Attributes are tagged ``local`` (a small structure in one place: tube, line, nodule, opacity side,
a focal lesion and its side) or ``global`` (spread over the image: heart size, contrast phase,
weighting, stain texture, background). Probe images are rendered on the fly with
``sample_attributes`` + ``render``, so probes do not depend on ingestion.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

# Attribute name -> (label function, kind). Side-bearing findings are 3-way: none/left/right, which
# asks both "is it there?" and "on which side?" (the questions the LM stalled on).
_none = "none"


def _side(present: bool, side: str | None) -> str:
    return side if present and side else _none


LABELS = {
    "chest_xray": {
        "ett": (lambda a: str(a.ett), "local"),
        "central_line": (lambda a: _side(a.central_line, a.central_line_side), "local"),
        "nodule": (lambda a: _side(a.nodule, a.nodule_side), "local"),
        "consolidation": (lambda a: _side(a.consolidation, a.consolidation_side), "local"),
        "effusion": (lambda a: _side(a.effusion, a.effusion_side), "local"),
        "pacemaker": (lambda a: str(a.pacemaker), "local"),
        "cardiomegaly": (lambda a: str(a.cardiomegaly), "global"),
    },
    "ct_scan": {
        "lesion_site": (lambda a: f"{a.organ}-{a.side}" if a.lesion else _none, "local"),
        "contrast": (lambda a: str(a.contrast), "global"),
    },
    "mri": {
        "lesion": (lambda a: _side(a.lesion, a.hemisphere), "local"),
        "weighting": (lambda a: a.weighting, "global"),
    },
    "histology": {
        "nuclear_atypia": (lambda a: str(a.nuclear_atypia), "global"),
        "gland_formation": (lambda a: str(a.gland_formation), "global"),
        "inflammation": (lambda a: str(a.inflammation), "global"),
        "cellularity": (lambda a: a.cellularity, "global"),
    },
    "gross": {
        "lesion_color": (lambda a: a.lesion_color, "local"),
        "lesion_large": (lambda a: str(a.size_cm > 3), "local"),
        "background": (lambda a: a.background, "global"),
    },
}


@dataclass
class ProbeSet:
    domain: str
    images: object  # uint8 tensor (N, 3, S, S)
    labels: dict[str, list[str]]


def make_probe_set(domain: str, n: int, size: int, mean: list[float], seed: int = 0) -> ProbeSet:
    """Render ``n`` MedSynth images of ``domain`` with their attribute labels."""
    import torch

    from llavamed.data.synth.attributes import sample_attributes
    from llavamed.data.synth.render import render
    from llavamed.model.vision_tower import pad_to_square_uint8

    rng = np.random.default_rng(seed * 1009 + sum(map(ord, domain)))  # hash() is salted per process
    imgs = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels: dict[str, list[str]] = {k: [] for k in LABELS[domain]}
    for i in range(n):
        a = sample_attributes(domain, rng)
        # Render a little larger than the input so the resize matches real figures (downscaled).
        imgs[i] = pad_to_square_uint8(render(domain, a, rng, size=int(size * 1.25)), size, mean)
        for k, (fn, _) in LABELS[domain].items():
            labels[k].append(fn(a))
    return ProbeSet(domain, imgs, labels)


def extract(tower, images, feature_layer: int, batch: int = 64):
    """(patch tokens (N, K, H) float32, cls-free) from a frozen tower."""
    import torch

    from llavamed.model.vision_tower import normalize_pixels, tower_features
    from llavamed.utils.precision import resolve_precision

    out = []
    tower.model.eval()
    device = next(tower.model.parameters()).device
    bf16 = resolve_precision("auto", device) == "bf16"
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for s in range(0, images.shape[0], batch):
            x = normalize_pixels(images[s : s + batch].float() / 255.0, tower.mean, tower.std)
            _, patches = tower_features(tower, x.to(device), feature_layer)
            out.append(patches.float().cpu())
    return torch.cat(out)


def _encode(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in labels]), classes


def fit_probe(
    x_train,
    y_train,
    x_test,
    y_test,
    n_classes: int,
    kind: str,
    max_iter: int = 60,
    l2: float = 1e-3,
    seed: int = 0,
) -> float:
    """Train a linear probe (full batch, L-BFGS, L2-regularised) and return test accuracy.

    ``kind="patch"``: x is (N, K, H); one linear map per patch, log-sum-exp over patches.
    ``kind="pooled"``: x is (N, H); plain multinomial logistic regression. Features are
    standardised with training statistics. L-BFGS needs a few dozen full-batch steps where Adam
    needs hundreds, which matters on a busy CPU where every op waits for a core."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    dims = (0, 1) if kind == "patch" else (0,)
    mu = x_train.mean(dim=dims, keepdim=True)
    sd = x_train.std(dim=dims, keepdim=True) + 1e-5
    xt, xv = (x_train - mu) / sd, (x_test - mu) / sd
    h = xt.shape[-1]
    w = (torch.randn(h, n_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    yt = torch.as_tensor(y_train)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def logits(x):
        z = x @ w + b
        return torch.logsumexp(z, dim=1) if kind == "patch" else z

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits(xt), yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = logits(xv).argmax(-1).numpy()
    return float((pred == np.asarray(y_test)).mean())


def probe_report(
    towers: dict,
    feature_layer: int,
    domains: list[str],
    n_per_domain: int,
    seed: int = 0,
    test_frac: float = 1 / 3,
    progress: bool = True,
) -> dict:
    """Probe every tower in ``towers`` (name -> ``Tower``) on every labelled attribute.

    Returns ``{"rows": [{domain, attribute, kind, majority, n_test, <tower>_patch, <tower>_pooled}],
    "summary": {<tower>_<readout>_<kind>: mean accuracy}, "towers": [...]}``."""
    from tqdm import tqdm

    first = next(iter(towers.values()))
    size = first.image_size
    rows = []
    jobs = [(d, k) for d in domains for k in LABELS[d]]
    bar = tqdm(
        total=len(jobs) * len(towers),
        desc="probes",
        unit="probe",
        disable=not progress,
        file=sys.stderr,
    )
    for domain in domains:
        ps = make_probe_set(domain, n_per_domain, size, first.mean, seed)
        n_test = max(1, int(round(n_per_domain * test_frac)))
        feats = {name: extract(t, ps.images, feature_layer) for name, t in towers.items()}
        for attr, (_, kind) in LABELS[domain].items():
            y, classes = _encode(ps.labels[attr])
            ytr, yte = y[:-n_test], y[-n_test:]
            counts = np.bincount(ytr, minlength=len(classes))
            row = {
                "domain": domain,
                "attribute": attr,
                "kind": kind,
                "classes": len(classes),
                "n_test": n_test,
                "majority": float((yte == counts.argmax()).mean()),
            }
            for name, f in feats.items():
                row[f"{name}_patch"] = fit_probe(
                    f[:-n_test], ytr, f[-n_test:], yte, len(classes), "patch", seed=seed
                )
                pooled = f.mean(1)
                row[f"{name}_pooled"] = fit_probe(
                    pooled[:-n_test], ytr, pooled[-n_test:], yte, len(classes), "pooled", seed=seed
                )
                bar.update(1)
            rows.append(row)
    bar.close()
    summary = {}
    for name in towers:
        for readout in ("patch", "pooled"):
            for kind in ("local", "global"):
                vals = [r[f"{name}_{readout}"] for r in rows if r["kind"] == kind]
                if vals:
                    summary[f"{name}_{readout}_{kind}"] = round(float(np.mean(vals)), 4)
    return {
        "rows": rows,
        "summary": summary,
        "towers": list(towers),
        "feature_layer": feature_layer,
        "images_per_domain": n_per_domain,
    }


def probe_table_md(probes: dict) -> str:
    names = probes["towers"]
    head = (
        "| domain | attribute | kind | majority | "
        + " | ".join(f"{n} patch | {n} pooled" for n in names)
        + " |"
    )
    sep = "|" + "---|" * (4 + 2 * len(names))
    lines = [head, sep]
    for r in probes["rows"]:
        cells = " | ".join(f"{r[f'{n}_patch']:.3f} | {r[f'{n}_pooled']:.3f}" for n in names)
        lines.append(
            f"| {r['domain']} | {r['attribute']} | {r['kind']} | {r['majority']:.3f} | {cells} |"
        )
    s = probes["summary"]
    for kind in ("local", "global"):
        cells = " | ".join(
            f"{s.get(f'{n}_patch_{kind}', float('nan')):.3f} | {s.get(f'{n}_pooled_{kind}', float('nan')):.3f}"
            for n in names
        )
        lines.append(f"| **mean** | **{kind}** | | | {cells} |")
    lines.append("")
    lines.append(
        f"{probes['images_per_domain']} images per domain (last third held out); features from hidden "
        f"layer {probes['feature_layer']}; accuracy of a linear probe on frozen features."
    )
    return "\n".join(lines)
