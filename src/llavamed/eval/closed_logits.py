"""Closed-question accuracy from next-token logits: a cheap learning-curve metric.

For a yes/no question the model is prompted exactly as the VQA evaluator prompts it (the
checkpoint's template, the image placeholder before the question) and scored by one forward pass:
the prediction is "yes" when the first tokens of "yes" (any casing) outweigh those of "no". No
generation, no answer parsing, deterministic -- so it can run every few training steps to draw
accuracy-versus-CPU-time curves. It is *not* the reported metric: a model that would generate
neither word still gets a yes/no verdict here. Reports use :mod:`llavamed.eval.vqa_runner`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from llavamed.data.vqa import VQASample
from llavamed.model.processing import generation_prompt, question_messages


@dataclass
class ClosedSet:
    """Closed questions with their images decoded once."""

    prompts: list[str]
    images: list  # PIL images
    is_yes: list[bool]
    questions: list[str]
    image_keys: list[str]
    """Which image each question is about: questions on one image rise and fall together, so a
    confidence interval resamples images whole (``metrics.bootstrap_ci(clusters=...)``)."""


def prepare_closed(samples: Sequence[VQASample], processor, limit: int | None = None) -> ClosedSet:
    """English yes/no samples only (answer "yes" or "no"); others are left out."""
    from llavamed.images import load_image

    keep = [s for s in samples if s.answer.strip().lower() in ("yes", "no")][:limit]
    if not keep:
        raise ValueError("no yes/no questions to score")
    prompts = [generation_prompt(processor, question_messages(s.question)) for s in keep]
    return ClosedSet(
        prompts,
        [load_image(s.image, name=s.qid) for s in keep],
        [s.answer.strip().lower() == "yes" for s in keep],
        [s.question for s in keep],
        [s.image_key for s in keep],
    )


ANSWER_SPELLINGS = {"yes": ("yes", "Yes", "YES"), "no": ("no", "No", "NO")}
"""How a fine-tuned model may begin its answer: training keeps the dataset's casing (real SLAKE
answers are "Yes"/"No", MedSynth's "yes"/"no"), and "Yes" is another token than "yes"."""


def yes_no_ids(processor) -> tuple[list[int], list[int]]:
    """Distinct ids of the token each spelling of "yes" and of "no" starts with *as an answer in
    the checkpoint's template*: the first token after the generation prompt when the assistant
    turn holds that word. Templates differ in what comes before the answer ("ASSISTANT:" then
    " Yes" in vicuna_v1, a newline in chatml), and a BPE tokenizer gives " Yes" another token
    than "Yes"; encoding the bare words scored tokens the model never learned to emit."""
    tok = processor.tokenizer
    question = question_messages("Is there an abnormality?")
    prompt = generation_prompt(processor, question)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]

    def first_ids(words) -> list[int]:
        ids = []
        for w in words:
            turn = {"role": "assistant", "content": [{"type": "text", "text": w}]}
            full = processor.apply_chat_template([*question, turn], tokenize=False)
            full_ids = tok(full, add_special_tokens=False)["input_ids"]
            if not full.startswith(prompt) or full_ids[: len(prompt_ids)] != prompt_ids:
                raise ValueError(
                    f"the chat template's answer {w!r} does not continue its generation prompt "
                    "token for token, so no next-token logit stands for it"
                )
            ids.append(full_ids[len(prompt_ids)])
        return list(dict.fromkeys(ids))

    yes, no = first_ids(ANSWER_SPELLINGS["yes"]), first_ids(ANSWER_SPELLINGS["no"])
    if set(yes) & set(no):
        raise ValueError("the tokenizer starts a spelling of yes and one of no with the same token")
    return yes, no


def prefers_yes(logits, ids: tuple[list[int], list[int]]):
    """(N,) bool from last-position logits (N, vocab): the yes spellings' total probability
    beats the no spellings' (log-sum-exp of their logits)."""
    yes, no = ids
    return logits[:, yes].logsumexp(-1) > logits[:, no].logsumexp(-1)


def prompt_batches(processor, data: ClosedSet, batch_size: int) -> Iterator[dict]:
    """The processor's tensors for consecutive batches of ``data``, left-padded so that the last
    position is the prompt's end in every row. The processor expands <image> to the tower's patch
    count -- the same expansion training and generation use. The tokenizer's padding side is
    restored when the iteration ends."""
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(data.prompts), batch_size):
            yield processor(
                text=data.prompts[i : i + batch_size],
                images=data.images[i : i + batch_size],
                return_tensors="pt",
                padding=True,
            )
    finally:
        tok.padding_side = side


def yes_no_predictions(
    model, processor, data: ClosedSet, *, batch_size: int = 32, blank: bool = False
) -> list[bool]:
    """True where the model prefers "yes". ``blank`` replaces every image by zeros (the mean
    colour after normalisation), the image-reliance control."""
    import torch

    ids = yes_no_ids(processor)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    out: list[bool] = []
    try:
        with torch.no_grad():
            for enc in prompt_batches(processor, data, batch_size):
                pv = enc["pixel_values"]
                pv = torch.zeros_like(pv) if blank else pv
                logits = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=pv.to(dtype),
                ).logits[:, -1]
                out += prefers_yes(logits, ids).tolist()
    finally:
        model.train(was_training)
    return out


def closed_accuracy(model, processor, data: ClosedSet, **kw) -> float:
    pred = yes_no_predictions(model, processor, data, **kw)
    return sum(p == y for p, y in zip(pred, data.is_yes, strict=True)) / len(pred)
