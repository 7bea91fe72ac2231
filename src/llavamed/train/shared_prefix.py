"""Several questions about one image in one training sample, each seeing only the image.

Why: a VQA image carries several questions, and computing its image tokens once per question
makes a CPU epoch several times dearer than it needs to be. Asking them as one multi-turn
conversation is cheap but wrong: MedSynth (and real sets) ask "Where is the nodule?" next to
"Is there a nodule?", so a later answer can be read off an earlier one, and the model learns to
answer from the conversation instead of the image, in a prompt shape the evaluator never uses.

Here each question's single-turn encoding (exactly what ``eval vqa`` prompts) is split into the
part every question shares (chat header, image tokens) and its own tail. A sample is the shared
prefix followed by several tails; ``segment_ids`` mark the prefix (0) and the tails (1, 2, ...).
In training, a tail attends to the prefix and to itself only, and its positions restart where
the prefix ends, so each question's logits are those of its own single-turn sample (a test pins
this against separate forward passes).
"""

from __future__ import annotations

from collections.abc import Sequence

from llavamed.errors import InputError
from llavamed.model.processing import IGNORE_INDEX

PREFIX = 0
"""Segment id of the shared prefix; tails are numbered from 1. Padding is -1."""
PAD = -1


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every sequence shares."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def pack_shared_prefix(
    encodings: Sequence[tuple[list[int], list[int]]],
    *,
    max_length: int,
    source: str,
    min_prefix: int = 1,
) -> list[tuple[list[int], list[int], list[int]]]:
    """Pack single-turn ``(input_ids, labels)`` encodings of one image into as few samples of at
    most ``max_length`` tokens as possible: ``(input_ids, labels, segment_ids)`` each.

    ``min_prefix`` is how many leading tokens must be shared (the image tokens): a group whose
    encodings diverge earlier cannot share its image and raises ``InputError``. Every tail
    starts with an unsupervised token (its question's last token at least), so each answer is
    predicted from its own question, as in its single-turn sample."""
    if not encodings:
        return []
    if len(encodings) == 1:  # nothing to share: a plain causal sample
        ids, labels = encodings[0]
        return [(list(ids), list(labels), [PREFIX] * len(ids))]
    # The prefix ends one token before the first supervised token of any question at the
    # latest. A tail's first token is predicted from the token before it in the packed sample,
    # the previous tail's last one, so it must never be supervised: two identical questions
    # would otherwise share the whole question, and the second answer would be learnt as a
    # continuation of the first.
    first_supervised = min(
        next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        for _, labels in encodings
    )
    p = min(common_prefix_length([ids for ids, _ in encodings]), first_supervised - 1)
    if p < min_prefix:
        raise InputError(
            source, "questions do not share the image prefix", f"{p} < {min_prefix} tokens"
        )
    prefix_ids, prefix_labels = encodings[0][0][:p], encodings[0][1][:p]
    tails = []
    for ids, labels in encodings:
        t_ids, t_labels = ids[p:], labels[p:]
        if p + len(t_ids) > max_length:
            raise InputError(
                source, "question longer than max_length", f"{p + len(t_ids)} > {max_length}"
            )
        tails.append((t_ids, t_labels))
    out: list[tuple[list[int], list[int], list[int]]] = []
    ids, labels, segs = [], [], []
    for t_ids, t_labels in tails:
        if segs and p + len(ids) + len(t_ids) > max_length:
            out.append(_assemble(prefix_ids, prefix_labels, ids, labels, segs))
            ids, labels, segs = [], [], []
        seg = (segs[-1] if segs else 0) + 1
        ids += t_ids
        labels += t_labels
        segs += [seg] * len(t_ids)
    out.append(_assemble(prefix_ids, prefix_labels, ids, labels, segs))
    return out


def _assemble(prefix_ids, prefix_labels, ids, labels, segs):
    return (
        list(prefix_ids) + ids,
        list(prefix_labels) + labels,
        [PREFIX] * len(prefix_ids) + segs,
    )


def position_ids(segment_ids: Sequence[int]) -> list[int]:
    """Positions of one packed sample: the prefix counts from 0, every tail restarts where the
    prefix ends (as if it followed the prefix alone)."""
    p = sum(1 for s in segment_ids if s == PREFIX)
    out, seen, last = [], 0, None
    for s in segment_ids:
        if s == PREFIX:
            out.append(len(out))
            continue
        if s != last:
            seen, last = 0, s
        out.append(p + seen)
        seen += 1
    return out


def attention_mask_4d(segment_ids):
    """Boolean ``(B, 1, L, L)`` mask from padded ``(B, L)`` segment ids (-1 = padding): a token
    sees earlier tokens of the prefix and of its own segment, never padding. Every row also sees
    itself, so no softmax row is empty (an empty row gives NaN that would leak through the
    values); what padding rows see does not matter, as nothing reads them."""
    import torch

    seg = segment_ids
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
    key_ok = seg[:, None, :] != PAD
    same = (seg[:, None, :] == PREFIX) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal[None] & key_ok & same
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)[None]
    return allowed[:, None]
