"""Stage-1 concept-alignment set: every figure with an image becomes a one-turn LLaVA
conversation. The human turn is one of the 27 description prompts (LLaVA-Med Tables 7 and 8)
with ``<image>`` before or after it; the gpt turn is the caption, on one line.

As the paper does, a caption shorter than 30 words is asked for with a brief prompt (Table 7)
and a longer one with a detailed prompt (Table 8): a model asked to "describe the image in
detail" should not learn to answer in eight words. (LLaVA-Med, section 3: a quarter of PMC-15M's
captions are under 30 words, and 30 words is its cutoff.)"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from llavamed.data.figures import image_on_disk, rebase_image, record_image
from llavamed.utils.io import without_lone_surrogates

IMAGE_TOKEN = "<image>"
PROMPT_POLICIES = ("by-length", "uniform")
CUTOFF_WORDS = 30
"""The paper's cutoff: captions of fewer words get a brief prompt, the rest a detailed one."""
PROMPTS_PATH = Path(__file__).resolve().parent.parent / "resources" / "align_prompts.json"


@lru_cache(maxsize=1)
def alignment_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(brief, detailed): the 11 prompts of Table 7 and the 16 of Table 8."""
    raw = json.loads(PROMPTS_PATH.read_text(encoding="utf-8"))
    return tuple(raw["brief"]), tuple(raw["detailed"])


def all_prompts() -> tuple[str, ...]:
    brief, detailed = alignment_prompts()
    return brief + detailed


def prompts_for(caption: str, policy: str = "by-length", cutoff_words: int = CUTOFF_WORDS):
    """The prompts a caption's sample draws from: brief or detailed by its length in words
    (``by-length``, the paper's rule), or all 27 (``uniform``)."""
    if policy == "uniform":
        return all_prompts()
    if policy != "by-length":
        raise ValueError(f"prompt policy {policy!r}: expected one of {', '.join(PROMPT_POLICIES)}")
    brief, detailed = alignment_prompts()
    return brief if len(caption.split()) < cutoff_words else detailed


def alignment_sample(
    record: dict,
    rng: random.Random,
    image: str,
    *,
    policy: str = "by-length",
    cutoff_words: int = CUTOFF_WORDS,
) -> dict:
    caption = clean_caption(record["fig_caption"])
    prompt = rng.choice(prompts_for(caption, policy, cutoff_words))
    human = f"{IMAGE_TOKEN}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TOKEN}"
    sample = {
        "id": record["pair_id"],
        "image": image,
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": caption},
        ],
    }
    if isinstance(record.get("domain"), dict):
        sample["domain"] = record["domain"]
    return sample


def clean_caption(caption: str) -> str:
    """One line, and no literal ``<image>``: the trainer counts image tokens per sample. A lone
    surrogate (text cut inside a UTF-16 pair: a ``\\ud83d`` escape in the figures file) becomes
    U+FFFD; writing the output raised UnicodeEncodeError, a traceback after all the work."""
    caption = without_lone_surrogates(caption)
    return " ".join(caption.replace(IMAGE_TOKEN, " ").split())


def build_alignment(
    records: Iterable[dict],
    *,
    image_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    prompts: str = "by-length",
    cutoff_words: int = CUTOFF_WORDS,
) -> tuple[list[dict], dict[str, int]]:
    """Turn figure records into alignment samples; returns ``(samples, skipped_per_reason)``.

    Image paths in records are relative to ``image_root`` (the folder of figures.jsonl); in the
    samples they are made relative to ``out_dir`` (the folder of alignment.json), so the output
    trains with its own folder as the image folder. ``max_samples`` takes a seeded random subset;
    the prompt and ``<image>`` placement are seeded per record, so a record's sample is the same
    whatever the subset. ``prompts`` picks the prompt list per caption (:func:`prompts_for`)."""
    prompts_for("", prompts, cutoff_words)  # a bad policy fails before any work
    if cutoff_words < 1:
        raise ValueError(f"cutoff_words must be >= 1, got {cutoff_words}")
    skipped: dict[str, int] = {}
    kept: list[dict] = []
    seen: set[str] = set()
    for rec in records:
        reason = None
        image, caption, pair_id = record_image(rec), rec.get("fig_caption"), rec.get("pair_id")
        if image is None:
            reason = "no image" if not rec.get("image") else "malformed image field"
        elif not isinstance(caption, str) or not clean_caption(caption):
            reason = (
                "empty caption" if isinstance(caption, str) or not caption else "malformed caption"
            )
        elif not isinstance(pair_id, str | int) or isinstance(pair_id, bool) or pair_id == "":
            reason = "no pair_id" if not pair_id else "malformed pair_id"
        elif pair_id in seen:
            reason = "duplicate pair_id"
        elif image_root is not None and not os.path.isfile(image_on_disk(image, image_root)):
            reason = "image file not found"  # checked where the files are known to live
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        seen.add(rec["pair_id"])
        kept.append({**rec, "image": image})
    if max_samples is not None and len(kept) > max_samples:
        picked = sorted(random.Random(seed).sample(range(len(kept)), max_samples))
        kept = [kept[i] for i in picked]
    samples = []
    for rec in kept:
        rng = random.Random(f"{seed}:{rec['pair_id']}")
        image = rebase_image(rec["image"], image_root, out_dir)
        samples.append(alignment_sample(rec, rng, image, policy=prompts, cutoff_words=cutoff_words))
    return samples, skipped
