"""Contrastive objectives for vision pretraining: CLIP's symmetric InfoNCE on pooled features and a
caption-grounded phrase-to-patch loss that makes *local* findings readable from patch tokens.

Both losses are exact under data parallelism: embeddings are all-gathered *with gradient*
(``torch.distributed.nn.functional.all_gather``), each process scores its own rows against the
global batch, and the mean of the per-process losses equals the single-process loss on the same
global batch. With DDP's gradient averaging the gradients match as well (tested on 2 gloo CPU
processes in ``tests/test_vision_pretrain_dist.py``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, keeping the autograd graph.

    Plain ``dist.all_gather`` returns tensors detached from the graph, so other processes' rows
    would act as constants and every process would see only its own share of the gradient. The
    autograd-aware version sums the incoming gradients back to the owning process. Every process
    must pass the same shape."""
    rank, world = dist_info()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = dist_info()
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE for this process's rows against the global batch.

    ``image_emb``/``text_emb``: (B_local, D), L2-normalised. ``logit_scale``: log of the inverse
    temperature (learnable; clamp it in the caller's update). ``caption_keys`` (B_local,) int64,
    optional: rows with equal keys carry the same caption text. Figure captions repeat ("Axial
    T2WI: no focal parenchymal lesion." dozens of times in a corpus of normal studies), and
    one-hot targets would push an image away from its own caption text because another row has
    it too; with keys, every row of the same caption is a positive and the target spreads evenly
    over them (without repeats this is exactly the one-hot loss). Returns the mean over this
    process's rows of (image->text + text->image) / 2."""
    rank, _ = dist_info()
    all_img = gather_with_grad(image_emb)
    all_txt = gather_with_grad(text_emb)
    scale = logit_scale.exp()
    b = image_emb.shape[0]
    logits_i2t = scale * image_emb @ all_txt.T
    logits_t2i = scale * text_emb @ all_img.T
    if caption_keys is None:
        target: torch.Tensor = torch.arange(b, device=image_emb.device) + rank * b
    else:
        same = caption_keys.view(-1, 1) == gather_no_grad(caption_keys).view(1, -1)
        target = same.float() / same.sum(dim=1, keepdim=True)
    return (
        F.cross_entropy(logits_i2t.float(), target) + F.cross_entropy(logits_t2i.float(), target)
    ) / 2


def pooled_patch_scores(
    patch_emb: torch.Tensor, phrase_emb: torch.Tensor, sharpness: float
) -> torch.Tensor:
    """Soft-max over patches of patch-phrase cosine similarity: (P phrases, B images).

    ``patch_emb`` (B, K, D) and ``phrase_emb`` (P, D) are L2-normalised. A smooth maximum
    ``log(mean_k exp(s * cos)) / s`` lets a finding that occupies two or three patches decide the
    score (a mean would drown it in 64 background patches) while every patch still gets some
    gradient early in training, when the argmax is arbitrary."""
    sims = torch.einsum("bkd,pd->pbk", patch_emb, phrase_emb).float()
    k = patch_emb.shape[1]
    return (
        torch.logsumexp(sharpness * sims, dim=-1) - torch.log(torch.tensor(float(k)))
    ) / sharpness


def phrase_patch_loss(
    patch_emb: torch.Tensor,
    phrase_emb: torch.Tensor,
    phrase_keys: torch.Tensor,
    image_keys: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    sharpness: float = 10.0,
) -> torch.Tensor:
    """Caption-grounded local loss: does *some patch* of image i show phrase p?

    Phrases are the positive findings cut from each caption ("a left subclavian central line",
    "a 14 mm nodule in the right upper lobe"), embedded by the frozen text encoder and projected.
    A phrase is a positive for every image whose caption contains a phrase with the same key (a
    normalised string id), so the same finding in two images is not a false negative. The score is
    a smooth max over the image's patch tokens, trained with a sigmoid (SigLIP-style) loss, which
    needs no softmax normalisation and so handles several positives per phrase.

    Distributed: phrases (small) are gathered from every process with gradient; each process
    scores all phrases against its own images; the per-process sums are divided by the global
    image count, so their sum over processes is the single-process loss (callers multiply by the
    world size before DDP's gradient averaging -- see :func:`world_scale`).

    Shapes: ``patch_emb`` (B, K, D) normalised; ``phrase_emb`` (P, D) normalised;
    ``phrase_keys`` (P,) int64; ``image_keys`` (B, M) int64 padded with -1."""
    all_phr = gather_ragged(phrase_emb, grad=True)
    all_keys = gather_ragged(phrase_keys, grad=False)
    if all_phr.shape[0] == 0:
        return patch_emb.sum() * 0.0
    # Each process removed its own repeated phrases; the same finding on two processes comes
    # back twice and would count twice. Rows with one key embed the same phrase, so keeping the
    # first of each is what one process would have computed.
    keep = _first_of_each(all_keys)
    if keep.numel() != all_keys.numel():
        all_phr, all_keys = all_phr[keep], all_keys[keep]
    scores = pooled_patch_scores(patch_emb, all_phr, sharpness)  # (P_all, B)
    logits = scale.exp() * scores + bias
    labels = (all_keys[:, None, None] == image_keys[None, :, :]).any(-1).float()  # (P_all, B)
    # SigLIP's normalisation: sum over pairs / number of images (not / number of pairs), so the
    # loss does not shrink as the batch, and with it the share of easy negatives, grows.
    n_images = _global_count(patch_emb.shape[0], patch_emb.device)
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / n_images


def _first_of_each(keys: torch.Tensor) -> torch.Tensor:
    """Indices of the first occurrence of each distinct value of ``keys``, in order."""
    _, inverse = torch.unique(keys, return_inverse=True)
    order = torch.arange(keys.numel(), device=keys.device)
    first = torch.full((int(inverse.max()) + 1,), keys.numel(), device=keys.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return first.sort().values


def _global_count(n: int, device: torch.device | str = "cpu") -> float:
    """``n`` summed over processes. ``device``: where the collective runs (NCCL takes CUDA
    tensors only; gloo CPU ones)."""
    rank, world = dist_info()
    if world == 1:
        return float(n)
    import torch.distributed as dist

    t = torch.tensor([float(n)], device=device)
    dist.all_reduce(t)
    return float(t.item())


def gather_ragged(x: torch.Tensor, *, grad: bool) -> torch.Tensor:
    """all_gather for tensors whose first dim differs between processes (phrase counts do):
    each pads to the longest, gathers, and drops the padding. With ``grad`` the gradient flows
    back to every process's own rows (torch.distributed.nn's differentiable all_gather)."""
    rank, world = dist_info()
    if world == 1:
        return x
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    n = torch.tensor([x.shape[0]], device=x.device)  # NCCL takes CUDA tensors only
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))]).contiguous()
    if grad:
        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def world_scale() -> int:
    """Factor for losses that are already normalised by a *global* count, so that DDP's gradient
    averaging (divide by world size) yields the single-process gradient."""
    return dist_info()[1]


# ---- phrases from captions ---------------------------------------------------------------------

_SPLIT = re.compile(r"[;,.]\s+|\s+and\s+|\s+with\s+|:\s+|\.$")
_NEGATION = re.compile(r"^(no|without|not|absent|negative for|normal|unremarkable|clear)\b", re.I)
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.I)
_LEAD = re.compile(
    r"^.*?\b(showing|shows|show|demonstrating|demonstrates|reveals|revealing|reveal|"
    r"with|depicting|depicts|illustrating|illustrates)\s+",
    re.I,
)


def caption_phrases(caption: str, max_phrases: int = 8) -> list[str]:
    """Positive finding phrases of a caption, for the phrase-to-patch loss.

    Heuristic and language-agnostic only in spirit: split at clause punctuation and
    coordinators, drop the lead-in before "showing/demonstrating ...", drop negated phrases
    ("no pleural effusion": nothing in the image to ground) and very short fragments. The full
    caption stays the target of the global loss, so a bad split costs little."""
    parts: list[str] = []
    # Parentheticals are abbreviations or asides ("(ETT)", "(arrow)", "(CTR > 0.5)"); panel
    # markers "(A)" become clause breaks.
    caption = re.sub(r"\(\s*[A-H]\s*\)", ". ", caption)
    caption = re.sub(r"\s*\([^()]*\)", "", caption)
    for chunk in _SPLIT.split(caption):
        if not chunk:
            continue
        chunk = _LEAD.sub("", chunk.strip()).strip(" ()[]")
        if len(chunk) < 4 or _NEGATION.match(chunk):
            continue
        parts.append(chunk)
    seen: dict[str, None] = {}
    for p in parts:
        seen.setdefault(p, None)
    return list(seen)[:max_phrases]


def phrase_key(phrase: str) -> str:
    """Identity of a phrase for positives: case, articles, digits and punctuation ignored
    ("a 14 mm nodule" and "A 21 mm nodule" are the same finding for grounding purposes)."""
    p = _ARTICLE.sub("", phrase.lower().strip())
    p = re.sub(r"\d+(\.\d+)?", "#", p)
    p = re.sub(r"[^a-z#\s-]", " ", p)
    return " ".join(p.split())
