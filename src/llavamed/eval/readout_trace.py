"""Where does a finding get lost between the image and the answer? A probe at every hand-off.

For one yes/no question, a fine-tuned LLaVA is traced on questions whose answers are known:

* ``tower`` -- a patch probe (:func:`llavamed.eval.probes.fit_probe`) on the tower's
  ``vision_feature_layer`` tokens, the projector's input;
* ``projector`` -- the same probe on the projector's output, the LM's image tokens;
* ``lm_layers`` -- logistic regression on the LM's hidden state at the prompt's last position
  (where the answer is produced), after the embeddings (index 0) and after every layer;
* ``model_train`` / ``model_test`` -- the model's own verdict, ``logit(yes) > logit(no)``, as
  :mod:`llavamed.eval.closed_logits` scores it.

Probes train on ``train`` questions and score ``test`` questions. A finding the tower carries
but the projector loses, or one the last hidden state carries but the logit ignores (even on the
training questions), tells you which part to fix: measured on the ``small`` quickstart, local
devices reach the LM's last hidden state at 81-97% while its own answer is near chance
(docs/stage0.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llavamed.data.vqa import VQASample
from llavamed.eval.closed_logits import (
    ClosedSet,
    prefers_yes,
    prepare_closed,
    prompt_batches,
    yes_no_ids,
)


@dataclass
class ReadoutTrace:
    question: str
    n_train: int
    n_test: int
    tower: float
    projector: float
    lm_layers: list[float]
    model_train: float
    model_test: float


@dataclass
class _Features:
    tower: object  # (N, K, H_vision)
    projector: object  # (N, K, H_lm)
    last: object  # (N, layers + 1, H_lm)
    says_yes: object  # (N,) bool
    is_yes: object  # (N,) int


def _features(model, processor, data: ClosedSet, batch_size: int) -> _Features:
    import numpy as np
    import torch

    ids = yes_no_ids(processor)
    parts: dict[str, list] = {"tower": [], "projector": [], "last": [], "yes": []}
    dtype = next(model.parameters()).dtype

    def capture(_module, args, output):
        # The projector's input is exactly the tower features llava selected (layer, CLS
        # dropped or not), so one forward pass yields all three hand-offs.
        parts["tower"].append(args[0].float())
        parts["projector"].append(output.float())

    hook = model.model.multi_modal_projector.register_forward_hook(capture)
    try:
        with torch.no_grad():
            for enc in prompt_batches(processor, data, batch_size):
                out = model(
                    input_ids=enc["input_ids"],
                    attention_mask=enc["attention_mask"],
                    pixel_values=enc["pixel_values"].to(dtype),
                    output_hidden_states=True,
                )
                last = torch.stack([h[:, -1] for h in out.hidden_states], 1)
                parts["last"].append(last.float())
                logits = out.logits[:, -1]
                parts["yes"].append(prefers_yes(logits, ids))
    finally:
        hook.remove()
    return _Features(
        torch.cat(parts["tower"]),
        torch.cat(parts["projector"]),
        torch.cat(parts["last"]),
        torch.cat(parts["yes"]).numpy(),
        np.array(data.is_yes, dtype=int),
    )


def trace_question(
    model,
    processor,
    train: Sequence[VQASample],
    test: Sequence[VQASample],
    *,
    batch_size: int = 32,
) -> ReadoutTrace:
    """Probe every hand-off for one question. ``train`` and ``test`` hold yes/no samples of that
    question; both answers must occur in ``train``."""
    from llavamed.eval.probes import fit_probe

    was_training = model.training
    model.eval()
    try:
        a = _features(model, processor, prepare_closed(train, processor), batch_size)
        b = _features(model, processor, prepare_closed(test, processor), batch_size)
    finally:
        model.train(was_training)
    if len(set(a.is_yes.tolist())) < 2:
        raise ValueError(f"{train[0].question!r}: the training questions have a single answer")

    def probe(x_train, x_test, kind: str) -> float:
        return fit_probe(x_train, a.is_yes, x_test, b.is_yes, 2, kind)

    return ReadoutTrace(
        question=train[0].question,
        n_train=len(a.is_yes),
        n_test=len(b.is_yes),
        tower=probe(a.tower, b.tower, "patch"),
        projector=probe(a.projector, b.projector, "patch"),
        lm_layers=[probe(a.last[:, k], b.last[:, k], "pooled") for k in range(a.last.shape[1])],
        model_train=float((a.says_yes == a.is_yes.astype(bool)).mean()),
        model_test=float((b.says_yes == b.is_yes.astype(bool)).mean()),
    )


def trace_table_md(traces: Sequence[ReadoutTrace]) -> str:
    """One row per question: probe accuracy at each hand-off, then the model's own."""
    rows = [
        "| question | n train/test | tower | projector | LM last position, by layer | "
        "model (train) | model (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in traces:
        layers = " ".join(f"{v:.2f}" for v in t.lm_layers)
        rows.append(
            f"| {t.question} | {t.n_train}/{t.n_test} | {t.tower:.2f} | {t.projector:.2f} | "
            f"{layers} | {t.model_train:.2f} | {t.model_test:.2f} |"
        )
    return "\n".join(rows)
