"""Training labels: built per message, identical tokenization to the inference processor, and
loud failures instead of silently masked samples."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoProcessor

from llavamed.errors import InputError
from llavamed.model.processing import (
    IGNORE_INDEX,
    encode_training_sample,
    num_image_tokens,
)
from llavamed.model.templates import conversation_to_messages, get_template
from model_helpers import sentencepiece_style_llama

CONV = [
    {"from": "human", "value": "<image>\nWhat modality is shown?"},
    {"from": "gpt", "value": "A frontal chest radiograph."},
    {"from": "human", "value": "Is there an endotracheal tube?"},
    {"from": "gpt", "value": "Yes, its tip projects above the carina."},
    {"from": "human", "value": "Which side is the effusion on?"},
    {"from": "gpt", "value": "Left."},
]


@pytest.fixture(scope="module", params=["chatml", "mistral"])
def ckpt(request, tiny_llava_dir, tiny_llava_mistral_dir):
    d = tiny_llava_dir if request.param == "chatml" else tiny_llava_mistral_dir
    from llavamed.model import checkpoint_template

    return AutoProcessor.from_pretrained(d), checkpoint_template(d)


def _supervised_runs(enc, tok):
    runs, cur = [], []
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_supervised_tokens_are_exactly_the_assistant_turns(ckpt):
    processor, template = ckpt
    enc = encode_training_sample(conversation_to_messages(CONV), processor, template, num_images=1)
    runs = _supervised_runs(enc, processor.tokenizer)
    answers = [t["value"] for t in CONV if t["from"] == "gpt"]
    end = "<|im_end|>" if template == "chatml" else processor.tokenizer.eos_token
    assert [r.strip() for r in runs] == [
        f"{a}{end}" if template == "chatml" else f"{a} {end}" for a in answers
    ]


def test_training_ids_equal_inference_processor_ids(ckpt):
    processor, template = ckpt
    msgs = conversation_to_messages(CONV)
    enc = encode_training_sample(msgs, processor, template, num_images=1)
    t = get_template(template)
    eos = "<|im_end|>" if template == "chatml" else processor.tokenizer.eos_token
    text = t.render(msgs, eos=eos).text
    ref = processor(text=[text], images=[Image.new("RGB", (50, 20))], return_tensors="pt")
    assert enc.input_ids == ref["input_ids"][0].tolist()
    n = num_image_tokens(processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == n == 16


@pytest.mark.parametrize("answer", ["  A CT.", "\n\nA CT.", "\n A CT."])
def test_an_answers_leading_whitespace_does_not_merge_into_the_prompt(ckpt, answer):
    """chatml ends its prompt with "\n"; an answer opening with more whitespace tokenized with
    it as one BPE token, so training's prompt ids were not the ones evaluation feeds and the
    first supervised token held prompt text."""
    processor, template = ckpt
    msgs = conversation_to_messages(
        [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": answer}]
    )
    enc = encode_training_sample(msgs, processor, template, num_images=1)
    prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}],
            }
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = processor(text=prompt, images=[Image.new("RGB", (32, 32))])["input_ids"][0]
    n = len(ids)
    assert enc.input_ids[:n] == list(ids)
    assert enc.labels[:n] == [IGNORE_INDEX] * n and enc.labels[n] != IGNORE_INDEX


def test_image_count_mismatch_raises(ckpt):
    processor, template = ckpt
    msgs = conversation_to_messages(CONV)
    with pytest.raises(InputError, match="image token count mismatch"):
        encode_training_sample(msgs, processor, template, num_images=0, source="rec-7")
    no_image = conversation_to_messages(
        [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    )
    with pytest.raises(InputError, match="rec-8: image token count mismatch"):
        encode_training_sample(no_image, processor, template, num_images=1, source="rec-8")


def test_truncation_inside_image_tokens_raises(ckpt):
    processor, template = ckpt
    msgs = conversation_to_messages(CONV)
    with pytest.raises(InputError, match="truncation inside image tokens"):
        encode_training_sample(msgs, processor, template, num_images=1, max_length=10)


def test_truncation_after_image_keeps_prefix(ckpt):
    processor, template = ckpt
    msgs = conversation_to_messages(CONV)
    full = encode_training_sample(msgs, processor, template, num_images=1)
    cut = encode_training_sample(
        msgs, processor, template, num_images=1, max_length=len(full.input_ids) - 5
    )
    assert cut.input_ids == full.input_ids[:-5]
    assert cut.labels == full.labels[:-5]


def test_nothing_supervised_raises(ckpt):
    processor, template = ckpt
    msgs = conversation_to_messages(CONV)
    with pytest.raises(InputError, match="no supervised tokens"):
        encode_training_sample(msgs, processor, template, num_images=1, max_length=26)


def test_an_empty_answer_is_refused_not_trained_as_a_bare_end_of_turn(ckpt):
    processor, template = ckpt
    conv = [
        {"from": "human", "value": "<image>\nWhat is shown?"},
        {"from": "gpt", "value": "  \n"},
    ]
    with pytest.raises(InputError, match="empty answer"):
        encode_training_sample(
            conversation_to_messages(conv), processor, template, num_images=1, source="rec7"
        )


def test_the_image_moves_to_the_front_of_its_turn_as_llava_does(ckpt):
    """Alignment prompts put <image> after the instruction for half the samples (and LLaVA-Med's
    released files do too); kept there, those trained in a prompt shape that evaluation and
    serving never use. LLaVA's preprocess_multimodal moves it to the front."""
    processor, template = ckpt
    after = conversation_to_messages(
        [
            {"from": "human", "value": "Describe the image concisely.\n<image>"},
            {"from": "gpt", "value": "CT of the chest."},
        ]
    )
    before = conversation_to_messages(
        [
            {"from": "human", "value": "<image>\nDescribe the image concisely."},
            {"from": "gpt", "value": "CT of the chest."},
        ]
    )
    assert after == before and after[0].content == "<image>\nDescribe the image concisely."
    a = encode_training_sample(after, processor, template, num_images=1)
    b = encode_training_sample(before, processor, template, num_images=1)
    assert a.input_ids == b.input_ids


def test_an_image_outside_the_first_question_is_refused(ckpt):
    """Only the total count was checked: an answer holding <image> trained with 16 image
    features spliced into its text."""
    processor, template = ckpt
    for conv, turn in (
        (
            [
                {"from": "human", "value": "What is shown?"},
                {"from": "gpt", "value": "<image>\nA CT."},
            ],
            1,
        ),
        (CONV[:2] + [{"from": "human", "value": "<image>\nAnd now?"}, CONV[3]], 2),
    ):
        with pytest.raises(
            InputError, match=f"rec-3: image placeholder outside the first user turn \\(turn {turn}"
        ):
            n = sum(t["value"].count("<image>") for t in conv)
            encode_training_sample(
                conversation_to_messages(conv), processor, template, num_images=n, source="rec-3"
            )


def test_mistral_template_with_a_sentencepiece_tokenizer_bos_once_and_eos_supervised(tmp_path):
    from llavamed.model.compose import ModelSpec, init_checkpoint

    lm = sentencepiece_style_llama(tmp_path / "lm")
    ckpt = init_checkpoint(
        tmp_path / "ckpt", ModelSpec(lm=str(lm), vision="tiny", template="mistral_instruct")
    )
    processor = AutoProcessor.from_pretrained(ckpt)
    tok = processor.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    conv = [
        {"from": "human", "value": "<image>\nIs it bright?"},
        {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "Why?"},
        {"from": "gpt", "value": "High signal."},
    ]
    enc = encode_training_sample(
        conversation_to_messages(conv), processor, "mistral_instruct", num_images=1
    )
    # One BOS, first; the rendered "</s>" is the EOS token (not the characters "<", "/", ...),
    # and it is supervised: the model learns to stop.
    assert enc.input_ids[0] == bos and enc.input_ids.count(bos) == 1
    assert enc.input_ids.count(eos) == 2
    runs = _supervised_runs(enc, tok)
    assert runs == ["Yes. </s>", "High signal. </s>"]
    # The generation prompt the processor builds: also exactly one BOS.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "[INST] <image>\nIs it? [/INST]"  # DESIGN.md §4
    ids = processor(text=prompt, images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    ids = ids["input_ids"][0].tolist()
    assert ids[0] == bos and ids.count(bos) == 1


@pytest.mark.parametrize("template", ["mistral_instruct", "vicuna_v1", "chatml"])
def test_golden_labels_for_every_template_multi_turn_unicode_whitespace(tmp_path, template):
    """Every template, on a sentencepiece-style tokenizer (byte fallback for é, ü, 中, 🫁): the
    ids decode back to the rendered conversation, and the supervised tokens decode to exactly
    each answer (leading whitespace dropped, as the prompt's shape requires) and its end marker,
    nothing of the prompt."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    lm = sentencepiece_style_llama(tmp_path / "lm", chatml=template == "chatml")
    ckpt = init_checkpoint(
        tmp_path / "ckpt", ModelSpec(lm=str(lm), vision="tiny", template=template)
    )
    processor = AutoProcessor.from_pretrained(ckpt)
    tok = processor.tokenizer
    conv = [
        {"from": "human", "value": "What is this? 中文\n<image>"},
        {"from": "gpt", "value": "\n  A CT, über-clear. é"},
        {"from": "human", "value": "  Next?  "},
        {"from": "gpt", "value": "(1) left; [2] right 🫁.\n"},
        {"from": "human", "value": "Why?"},
        {"from": "gpt", "value": "...because"},
    ]
    enc = encode_training_sample(conversation_to_messages(conv), processor, template, num_images=1)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == num_image_tokens(processor)
    end = {"mistral_instruct": " </s>", "vicuna_v1": "</s>", "chatml": "<|im_end|>"}[template]
    answers = ["A CT, über-clear. é", "(1) left; [2] right 🫁.\n", "...because"]
    assert _supervised_runs(enc, tok) == [a + end for a in answers]
    text = tok.decode([t for t in enc.input_ids if t != image_id], skip_special_tokens=False)
    assert "What is this? 中文" in text and "über-clear. é" in text and "🫁" in text


@pytest.mark.parametrize("template", ["mistral_instruct", "vicuna_v1", "chatml"])
def test_labels_for_odd_conversations(tiny_llava_dir, template):
    """A leading system message is prompt, never supervised; a trailing question without an
    answer is prompt too; two turns of the same speaker in a row and a later system message
    are refused by name (LLaVA's preprocess masked such samples silently)."""
    from llavamed.model.compose import set_chat_template

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    set_chat_template(processor, get_template(template))
    tok = processor.tokenizer
    end = {"mistral_instruct": " <|im_end|>", "vicuna_v1": "<|im_end|>", "chatml": "<|im_end|>"}
    conv = [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A CT."},
        {"from": "human", "value": "And the phase?"},
    ]
    enc = encode_training_sample(
        conversation_to_messages(conv), processor, template, num_images=1, source="rec-9"
    )
    assert _supervised_runs(enc, tok) == [
        ("A CT." if template == "chatml" else " A CT.") + end[template]
    ]
    text = tok.decode(enc.input_ids)
    assert "Answer briefly." in text and text.rstrip().endswith(
        {"mistral_instruct": "And the phase? [/INST]", "vicuna_v1": "And the phase? ",
         "chatml": "And the phase?<|im_end|>\n"}[template].rstrip()
    )  # fmt: skip
    for bad, turn in (
        (conv[:3] + [{"from": "gpt", "value": "More."}], "turn 2 is 'assistant'"),
        (conv[:2] + [conv[1] | {"value": "Again?"}, conv[2]], "turn 1 is 'user'"),
        (conv[:3] + [{"from": "system", "value": "Now verbose."}, conv[3], conv[2]], "turn 2"),
    ):
        with pytest.raises(InputError, match=rf"^rec-9: turns out of order \({turn}"):
            encode_training_sample(
                conversation_to_messages(bad), processor, template, num_images=1, source="rec-9"
            )
