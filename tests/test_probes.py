"""Linear probes: the patch readout finds a signal carried by one patch at a random place, where a
pooled readout is diluted; probe sets carry MedSynth ground truth; the report has both readouts."""

from __future__ import annotations

import numpy as np
import torch

from llavamed.eval.probes import LABELS, fit_probe, make_probe_set, probe_report, probe_table_md


def _local_signal(n: int, k: int = 64, h: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, h, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, k, (n,), generator=g)
    direction = torch.zeros(h)
    direction[0] = 1.0
    # Positives have one patch (anywhere) pushed along one channel: 1/64 of it survives the mean.
    x[torch.arange(n), where] += y[:, None] * 6.0 * direction
    return x, y.numpy()


def test_patch_probe_beats_pooled_on_a_local_signal():
    x, y = _local_signal(400)
    patch = fit_probe(x[:300], y[:300], x[300:], y[300:], 2, "patch")
    pooled = fit_probe(x[:300].mean(1), y[:300], x[300:].mean(1), y[300:], 2, "pooled")
    assert patch > 0.9 and patch > pooled + 0.1, (patch, pooled)


def test_probe_set_labels_follow_ground_truth():
    ps = make_probe_set("chest_xray", 12, 32, [0.5, 0.5, 0.5], seed=3)
    assert ps.images.shape == (12, 3, 32, 32) and ps.images.dtype == torch.uint8
    assert set(ps.labels) == set(LABELS["chest_xray"])
    assert set(ps.labels["central_line"]) <= {"none", "left", "right"}
    # Deterministic for a seed (probe tables are comparable across towers and runs).
    again = make_probe_set("chest_xray", 12, 32, [0.5, 0.5, 0.5], seed=3)
    assert torch.equal(ps.images, again.images) and ps.labels == again.labels


def test_probe_report_shape():
    from llavamed.model.vision_tower import load_tower

    tower = load_tower("tiny")
    rep = probe_report({"random": tower}, -1, ["mri"], 24, seed=0, progress=False)
    assert {r["attribute"] for r in rep["rows"]} == set(LABELS["mri"])
    row = rep["rows"][0]
    assert 0 <= row["random_patch"] <= 1 and 0 <= row["random_pooled"] <= 1
    assert "random_patch_local" in rep["summary"]
    md = probe_table_md(rep)
    assert "random patch" in md and "| mri |" in md
    assert np.isfinite(rep["summary"]["random_pooled_global"])
