"""Stage 0 audit: the held-out retrieval metric on hand cases, bad images in the pairs file,
config values that mean nothing, and the text-encoder cache's key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavamed.train.vision_pretrain import recall_at_k


def _reference_recall(img, txt, keys, k):
    """Loops over queries: a hit when fewer than k wrong candidates score above the best right
    one (a tie with a wrong one counting half), as a user would count it by hand."""
    sims = img @ txt.T
    n = len(keys)
    hits = {"i2t": 0.0, "t2i": 0.0}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        for q in range(n):
            right = [j for j in range(n) if keys[j] == keys[q]]
            best = max(float(s[q, j]) for j in right)
            wrong = [float(s[q, j]) for j in range(n) if keys[j] != keys[q]]
            rank = sum(w > best for w in wrong) + 0.5 * sum(w == best for w in wrong)
            hits[name] += rank < k
    return {name: v / n for name, v in hits.items()}


def test_held_out_recall_counts_a_repeated_caption_as_a_right_answer():
    """Three held-out figures carry the same normal-study caption (the frozen text encoder
    embeds them identically). Each image retrieves that caption first, but tied with its two
    copies it was ranked 1.0 and counted a miss at R@1: a perfect tower scored 0.25."""
    a = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    b = F.normalize(torch.tensor([0.0, 1.0, 0.0]), dim=0)
    txt = torch.stack([a, a, a, b])
    img = F.normalize(
        torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.2], [1.0, 0.1, 0.1], [0.1, 1.0, 0.0]]), dim=1
    )
    keys = ["no focal lesion.", "no focal lesion.", "no focal lesion.", "a nodule."]
    r = recall_at_k(img, txt, keys=keys)
    assert r["i2t_r@1"] == 1.0 and r["t2i_r@1"] == 1.0
    assert r == recall_at_k(img, txt, keys=keys)  # deterministic
    # Without keys every row is its own caption (the old metric, kept for callers without).
    assert recall_at_k(img, txt)["i2t_r@1"] == 0.25


def test_held_out_recall_matches_a_hand_count():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(9, 4, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(9, 4, generator=g), dim=1)
    txt[4] = txt[1]  # a repeated caption
    keys = ["c0", "c1", "c2", "c3", "c1", "c5", "c6", "c7", "c8"]
    for k in (1, 5):
        want = _reference_recall(img, txt, keys, k)
        got = recall_at_k(img, txt, ks=(k,), keys=keys)
        assert got[f"i2t_r@{k}"] == pytest.approx(want["i2t"])
        assert got[f"t2i_r@{k}"] == pytest.approx(want["t2i"])
    # A hand-made case: image 0 ranks caption 1 above its own, the rest are right.
    eye = torch.eye(3)
    img = torch.tensor([[0.5, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(img, eye, ks=(1, 2), keys=["x", "y", "z"])
    assert r["i2t_r@1"] == pytest.approx(2 / 3) and r["i2t_r@2"] == 1.0
    # text 1 sees images 0 and 1 tie at 1.0: half a miss, still under rank 1
    assert r["t2i_r@1"] == 1.0
    collapsed = torch.ones(4, 3)
    assert recall_at_k(collapsed, collapsed, keys=list("abcd"))["i2t_r@1"] == 0.0
    nan = torch.full((4, 3), float("nan"))
    assert recall_at_k(nan, collapsed, keys=list("aabb"))["t2i_r@5"] == 0.0
