"""The readout trace on a tiny model: the probes see what the images carry, and the model's own
verdict matches the closed-logit scorer, an independent code path."""

from __future__ import annotations

import pytest

from train_helpers import QUESTION, make_bright_dark

pytestmark = pytest.mark.usefixtures("one_thread")


def _samples(folder, n, seed):
    import json

    from llavamed.data.vqa import VQASample

    data = make_bright_dark(folder, n, seed=seed)
    return [
        VQASample(r["id"], str(folder / r["image"]), QUESTION, r["answer"], "closed")
        for r in json.loads(data.read_text())
    ]


def test_trace_probes_every_hand_off(tmp_path, wide_llava_dir):
    from llavamed.eval.closed_logits import closed_accuracy, prepare_closed
    from llavamed.eval.readout_trace import trace_question, trace_table_md
    from llavamed.model.checkpoint import load_llava

    model, processor = load_llava(wide_llava_dir)
    train = _samples(tmp_path / "train", 24, seed=0)
    test = _samples(tmp_path / "test", 12, seed=1)
    t = trace_question(model, processor, train, test, batch_size=8)

    assert (t.question, t.n_train, t.n_test) == (QUESTION, 24, 12)
    # Bright against dark grey is in every patch token: a linear probe cannot miss it.
    assert t.tower == 1.0 and t.projector == 1.0
    assert len(t.lm_layers) == model.config.text_config.num_hidden_layers + 1
    assert all(0.0 <= v <= 1.0 for v in t.lm_layers)
    assert t.model_test == pytest.approx(
        closed_accuracy(model, processor, prepare_closed(test, processor))
    )
    assert t.model_train == pytest.approx(
        closed_accuracy(model, processor, prepare_closed(train, processor))
    )
    table = trace_table_md([t])
    assert QUESTION in table and "24/12" in table


def test_trace_needs_both_answers(tmp_path, wide_llava_dir):
    from llavamed.eval.readout_trace import trace_question
    from llavamed.model.checkpoint import load_llava

    model, processor = load_llava(wide_llava_dir)
    only_yes = [s for s in _samples(tmp_path / "train", 8, seed=0) if s.answer == "yes"]
    with pytest.raises(ValueError, match="single answer"):
        trace_question(model, processor, only_yes, only_yes)


def test_the_closed_logit_verdict_counts_every_casing_of_yes_and_no(tiny_llava_dir):
    """Only the lowercase tokens were compared, while training keeps the dataset's casing: a
    model fine-tuned on real SLAKE ("Yes"/"No") was scored on tokens it never learned to emit."""
    import torch
    from transformers import AutoProcessor

    from llavamed.eval.closed_logits import prefers_yes, yes_no_ids

    tok = AutoProcessor.from_pretrained(tiny_llava_dir).tokenizer
    yes, no = yes_no_ids(AutoProcessor.from_pretrained(tiny_llava_dir))
    first = {w: tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes", "no", "No")}
    assert {first["yes"], first["Yes"]} <= set(yes) and {first["no"], first["No"]} <= set(no)
    logits = torch.zeros(2, len(tok))
    # row 0: "Yes" far ahead of "no", lowercase "yes" behind it -> yes
    logits[0, first["Yes"]], logits[0, first["no"]], logits[0, first["yes"]] = 9.0, 5.0, 1.0
    # row 1: "No" far ahead, lowercase "yes" slightly ahead of lowercase "no" -> no
    logits[1, first["No"]], logits[1, first["yes"]], logits[1, first["no"]] = 9.0, 3.0, 2.0
    assert prefers_yes(logits, (yes, no)).tolist() == [True, False]


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1", "mistral_instruct"])
def test_the_yes_no_ids_are_the_tokens_training_supervises_first(tmp_path, template):
    """vicuna_v1 and mistral_instruct put a space before the answer ("ASSISTANT: Yes"), and a
    BPE tokenizer gives " Yes" another token than "Yes": the bare words' tokens were compared
    while training taught the spaced ones. The ids must be what training's own encoding
    (templates.py, not the checkpoint's Jinja template) supervises first."""
    from transformers import AutoProcessor

    from llavamed.eval.closed_logits import ANSWER_SPELLINGS, yes_no_ids
    from llavamed.model.compose import ModelSpec, init_checkpoint
    from llavamed.model.processing import IGNORE_INDEX, encode_training_sample
    from llavamed.model.templates import IMAGE_PLACEHOLDER, Message

    ckpt = init_checkpoint(
        tmp_path / template, ModelSpec(lm="tiny", vision="tiny", template=template)
    )
    processor = AutoProcessor.from_pretrained(ckpt)
    yes, no = yes_no_ids(processor)
    for word_ids, words in ((yes, ANSWER_SPELLINGS["yes"]), (no, ANSWER_SPELLINGS["no"])):
        supervised_first = []
        for w in words:
            messages = [
                Message("user", f"{IMAGE_PLACEHOLDER}\nIs there an abnormality?"),
                Message("assistant", w),
            ]
            enc = encode_training_sample(messages, processor, template, num_images=1)
            supervised_first.append(next(t for t in enc.labels if t != IGNORE_INDEX))
        assert word_ids == list(dict.fromkeys(supervised_first)), template
