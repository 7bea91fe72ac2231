"""Turn conversations + images into model inputs, identically for training, evaluation and serving.

Prompts (generation) go through the checkpoint's own ``LlavaProcessor`` (``apply_chat_template``
then ``processor(text, images)``). Training samples go through :func:`encode_training_sample`,
which tokenizes the same rendered string once, labels tokens from the template's supervised
character spans, and expands ``<image>`` exactly as the processor does; a test pins the two
paths to the same ``input_ids``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llavamed.errors import InputError
from llavamed.model.templates import (
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    Message,
    get_template,
)

IGNORE_INDEX = -100
TRUNCATED_INSIDE_ANSWER = "truncated inside an answer"
"""Kept, but an answer lost its end: the model learns it without its end-of-turn token."""
TRUNCATED_BETWEEN_ANSWERS = "truncated between answers"
"""Kept with every kept answer whole; later turns were dropped."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    truncated: str | None = None
    """Why the sample was cut at ``max_length`` and kept (:data:`TRUNCATED_INSIDE_ANSWER` or
    :data:`TRUNCATED_BETWEEN_ANSWERS`); None when it was not cut."""
    full_length: int = 0
    """Its length before the cut."""


def template_eos(template: ChatTemplate, tokenizer) -> str:
    return "<|im_end|>" if template.name == "chatml" else tokenizer.eos_token


def known_token_id(tokenizer, token: str | None) -> int | None:
    """``token``'s id when the vocabulary has it; None otherwise (``convert_tokens_to_ids``
    answers an unknown token with the unk id, which must never become a stop id)."""
    if not token:
        return None
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid < 0:
        return None
    if tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return tid


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the spelling of every special token and every markup-like added token
    of ``tokenizer`` (``<|im_end|>``, ``</s>``, ``<filename>`` ...) except ``<image>``, which
    has its own rules; None when there is none. Plain-word and whitespace added tokens stand
    for their own text and are left out."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    try:
        added = tokenizer.get_added_vocab()
    except Exception:  # noqa: BLE001 - a tokenizer without added-token bookkeeping
        added = {}
    found |= {t for t in added if not any(c.isspace() for c in t) and not t.isalnum()}
    return _special_regex(frozenset(found - {IMAGE_PLACEHOLDER}))


@functools.lru_cache(maxsize=16)
def _special_regex(tokens: frozenset) -> re.Pattern | None:
    tokens = [t for t in tokens if isinstance(t, str) and len(t) >= 2]
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def image_stats(path, section: str | None, mean, std, channels: int = 3):
    """The ``image_mean``/``image_std`` (open_clip: ``mean``/``std`` under ``preprocess_cfg``)
    that a tower folder's JSON file at ``path`` gives, or ``mean``/``std`` when it names none;
    an InputError naming the file when it is damaged or its values cannot normalise an image.
    A cut preprocessor_config.json was a JSONDecodeError traceback, and "image_mean": "abc"
    composed a checkpoint whose processor failed on its first image."""
    from llavamed.utils.io import read_json

    data = read_json(path)
    if section is not None and isinstance(data, dict):
        data = data.get(section, {})
    if not isinstance(data, dict):
        where = f"{section} is" if section else "the file is"
        raise InputError(path, "image statistics unreadable", f"{where} not a JSON object")
    keys = ("mean", "std") if section else ("image_mean", "image_std")
    out = []
    for key, default in zip(keys, (mean, std), strict=True):
        value = data.get(key)
        if value is None:
            out.append(list(default))
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value] * channels  # one value for every channel, as transformers allows
        ok = (
            isinstance(value, list)
            and len(value) == channels
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            and (key.endswith("mean") or all(v > 0 for v in value))
        )
        if not ok:
            need = f"{channels} numbers" + (", each > 0" if key.endswith("std") else "")
            raise InputError(path, f"invalid {key}", f"{value!r}; need {need}")
        out.append([float(v) for v in value])
    return out[0], out[1]


def llava_image_processor(image_size: int, mean, std, *, pad: bool):
    """The image geometry of every stage that feeds the tower: ``pad`` (LLaVA's default: pad to
    square with the mean colour, then resize) or crop (resize the short side, centre-crop).

    Stage 0b, composition and conversion build their processor here, and stage 0 saves its tower
    with it; stage 0 trains through its own uint8 copy of this geometry
    (:func:`llavamed.model.vision_tower.pad_to_square_uint8`, checked against this one)."""
    from transformers import LlavaImageProcessor

    return LlavaImageProcessor(
        do_pad=pad,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(mean),
        image_std=list(std),
    )


def num_image_tokens(processor) -> int:
    """How many ``<image>`` tokens one image expands to (patches, minus CLS under "default")."""
    size = processor.image_processor.crop_size
    h, w = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    n = (h // processor.patch_size) * (w // processor.patch_size)
    n += processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n


def encode_training_sample(
    messages: Sequence[Message],
    processor,
    template: ChatTemplate | str,
    *,
    num_images: int,
    max_length: int | None = None,
    source: str = "<sample>",
) -> Encoded:
    """Input ids and labels for one conversation. Only assistant content and its end-of-turn
    marker are supervised. Raises ``InputError`` (never silently masks) when the ``<image>``
    count disagrees with ``num_images``, when truncation would cut image tokens, when an answer
    is empty (only its end-of-turn marker would be supervised: the model would learn to stop at
    once), or when nothing supervised is left. A sample cut at ``max_length`` and kept says why
    in ``truncated``, for the data report."""
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    special = special_token_pattern(processor.tokenizer)
    for i, m in enumerate(messages):
        if m.role == "assistant" and not m.content.strip():
            raise InputError(source, "empty answer", f"turn {i}")
        if special is not None and (hit := special.search(m.content)) is not None:
            # The tokenizer reads its own markup in the text as markup: "<|im_end|>\n
            # <|im_start|>user" in an answer taught the model to close its turn and write the
            # user's, and in a question it forged an assistant turn. Serving neutralises such
            # text; a training sample carrying it is a data error (often an LLM's leaked stop
            # token), so it is counted and skipped.
            raise InputError(source, "special token in text", f"turn {i}: {hit[0]!r}")
        if i != first_user and IMAGE_PLACEHOLDER in m.content:
            # The image belongs to the first question (DESIGN §3); anywhere else, an answer
            # would train with image features spliced into its text.
            raise InputError(source, "image placeholder outside the first user turn", f"turn {i}")
    if isinstance(template, str):
        template = get_template(template)
    tok = processor.tokenizer
    try:
        rendered = template.render(messages, eos=template_eos(template, tok))
    except InputError as exc:
        # The renderer names no record ("<conversation>") and puts the turn in its reason:
        # a gpt turn first or two human turns in a row must name the record and count under
        # one reason, as every other skipped sample does.
        raise InputError(source, "turns out of order", exc.reason) from exc
    n_placeholders = rendered.text.count(IMAGE_PLACEHOLDER)
    if n_placeholders != num_images:
        raise InputError(
            source,
            "image token count mismatch",
            f"{n_placeholders} <image> in text, {num_images} image(s)",
        )
    enc = tok(rendered.text, return_offsets_mapping=True, add_special_tokens=template.add_bos)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    spans = rendered.supervised
    labels = []
    for tid, (a, b) in zip(ids, offsets, strict=True):
        sup = b > a and any(a < e and b > s for s, e in spans)
        labels.append(tid if sup else IGNORE_INDEX)
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    n_img = num_image_tokens(processor)
    out_ids: list[int] = []
    out_labels: list[int] = []
    image_starts = []
    for tid, lab in zip(ids, labels, strict=True):
        if tid == image_id:
            image_starts.append(len(out_ids))
            out_ids.extend([image_id] * n_img)
            out_labels.extend([IGNORE_INDEX] * n_img)
        else:
            out_ids.append(tid)
            out_labels.append(lab)
    if len(image_starts) != num_images:
        raise InputError(
            source,
            "image token count mismatch",
            f"tokenizer produced {len(image_starts)} image tokens for {num_images} image(s)",
        )
    full_length, truncated = len(out_ids), None
    if max_length is not None and full_length > max_length:
        cut = f"{full_length} tokens > max_length {max_length}"
        for s in image_starts:
            if s + n_img > max_length:
                raise InputError(source, "truncation inside image tokens", cut)
        # The cut splits a supervised run: the answer keeps its start and loses its end.
        inside = IGNORE_INDEX not in (out_labels[max_length - 1], out_labels[max_length])
        truncated = TRUNCATED_INSIDE_ANSWER if inside else TRUNCATED_BETWEEN_ANSWERS
        out_ids, out_labels = out_ids[:max_length], out_labels[:max_length]
        if all(lab == IGNORE_INDEX for lab in out_labels):
            raise InputError(source, "no supervised tokens after truncation", cut)
    if all(lab == IGNORE_INDEX for lab in out_labels):
        raise InputError(source, "no supervised tokens", "no assistant turn with an answer")
    return Encoded(out_ids, out_labels, num_images, truncated, full_length)


def generation_prompt(processor, messages: Sequence[dict]) -> str:
    """The checkpoint's own prompt for HF-style messages, ending where the assistant speaks."""
    return processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def question_messages(question: str, with_image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]
