"""Self-instruct pure parts: prompt assembly, round-robin selection, parsing and cleaning."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from llavamed.data.figures import DOMAINS
from llavamed.data.instruct.clean import (
    clean_turns,
    parse_turns,
    sample_image,
    strip_source_phrases,
    to_llava_sample,
)
from llavamed.data.instruct.prompts import build_context, build_messages, load_prompts
from llavamed.data.instruct.select import round_robin
from llavamed.errors import InputError


def rec(pid, domain="chest_xray", mentions=None, caption="A chest radiograph."):
    dom = {d: d == domain for d in DOMAINS}
    return {
        "pair_id": pid,
        "fig_label": "Figure 1",
        "fig_caption": caption,
        "in_text_mention": mentions,
        "domain": dom,
        "image": f"images/{pid}.jpg",
    }


# -- prompts -----------------------------------------------------------------------------------


def test_context_matches_paper_rendering():
    r = rec("p1", mentions=[{"tokens": "As shown in  Fig. 1,\nthe lung."}, "Second one."])
    assert build_context(r, False) == "Figure Caption:\nFigure 1: A chest radiograph."
    assert build_context(r, True) == (
        "Figure Caption:\nFigure 1: A chest radiograph.\n\n"
        "Figure Context:\n\t- As shown in Fig. 1, the lung.\n\t- Second one."
    )
    # No mentions: no empty "Figure Context:" block, even with the flag.
    assert "Figure Context" not in build_context(rec("p2", mentions=None), True)


def test_default_prompts_cover_five_domains_and_assemble():
    p = load_prompts()
    assert 6 <= len(p.few_shot) <= 10
    assert set(DOMAINS) <= {ex["domain"] for ex in p.few_shot}
    for ex in p.few_shot:  # the examples must follow our own rules
        text = json.dumps(ex["conversations"]).lower()
        assert "caption" not in text and "<image>" not in text
    msgs = build_messages(rec("q"), p, inline_mentions=True)
    assert msgs[0]["role"] == "system" and "User:" in msgs[0]["content"]
    assert len(msgs) == 2 + 2 * len(p.few_shot)
    roles = [m["role"] for m in msgs[1:]]
    assert roles == ["user", "assistant"] * len(p.few_shot) + ["user"]
    assert msgs[2]["content"].startswith("User: ")
    assert "Figure Context:" in msgs[1]["content"]  # examples follow the query's variant
    assert msgs[-1]["content"] == build_context(rec("q"), True)
    assert not any("Figure Context" in m["content"] for m in build_messages(rec("q"), p, False)[1:])


def test_prompt_override_dir(tmp_path):
    (tmp_path / "system_prompt.txt").write_text("Be brief.")
    p = load_prompts(tmp_path)
    assert p.system == "Be brief." and len(p.few_shot) >= 6  # few-shot falls back to default
    (tmp_path / "few_shot.json").write_text(json.dumps([{"fig_caption": "x"}]))
    with pytest.raises(InputError):
        load_prompts(tmp_path)
    with pytest.raises(InputError, match="prompt folder not found"):
        load_prompts(tmp_path / "missing")
    # A file given for the folder was "prompt directory not found", though it is there.
    with pytest.raises(InputError, match="is a file, not a folder.*system_prompt.txt"):
        load_prompts(tmp_path / "system_prompt.txt")


def test_a_system_prompt_in_another_encoding_or_with_a_bom(tmp_path):
    """A Latin-1 system prompt was a UnicodeDecodeError traceback, a folder by that name an
    IsADirectoryError one; a UTF-8 byte-order mark went to the model as the first character."""
    sp = tmp_path / "system_prompt.txt"
    sp.write_bytes("\ufeffBe brief.\n".encode())
    assert load_prompts(tmp_path).system == "Be brief."
    sp.write_bytes("Sois bref et m\u00e9dical.".encode("latin-1"))
    with pytest.raises(InputError, match="system prompt is not UTF-8 text"):
        load_prompts(tmp_path)
    sp.unlink()
    sp.mkdir()
    with pytest.raises(InputError, match="cannot read the system prompt"):
        load_prompts(tmp_path)


GOOD_TURNS = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A CT."}]


@pytest.mark.parametrize(
    "conversations, where",
    [
        ("hello", "[1]"),  # a string, not a list of turns
        (["What?", "A CT."], "[1].conversations[0]"),
        ([{"from": "human", "value": "What?"}, {"value": "A CT."}], "[1].conversations[1]"),
        ([{"from": "gpt", "value": "A CT."}, {"from": "human", "value": "What?"}], "[1].conv"),
        ([{"from": "human", "value": "What?"}, {"from": "gpt", "value": None}], "[1].conv"),
        (GOOD_TURNS + [{"from": "human", "value": "Unanswered?"}], "[1]"),
    ],
)
def test_malformed_few_shot_file_is_an_input_error_naming_the_entry(tmp_path, conversations, where):
    fs = tmp_path / "few_shot.json"
    good = {"fig_caption": "Axial CT.", "conversations": GOOD_TURNS}
    fs.write_text(json.dumps([good, {"fig_caption": "x", "conversations": conversations}]))
    with pytest.raises(InputError) as exc:
        load_prompts(tmp_path)
    assert f"{fs}{where}" in str(exc.value)
    fs.write_text(json.dumps([good]))
    assert load_prompts(tmp_path).few_shot == (good,)


# -- selection ---------------------------------------------------------------------------------


def test_round_robin_balances_domains_and_dedups():
    recs = [rec(f"c{i}", "chest_xray") for i in range(5)]
    recs += [rec(f"m{i}", "mri") for i in range(2)]
    recs += [rec(f"h{i}", "histology") for i in range(3)]
    recs.append(rec("c0", "chest_xray"))  # LLaVA-Med files list some figures twice
    out, dups = round_robin(recs)
    assert dups == 1
    assert [r["pair_id"] for r in out] == [
        "c0", "m0", "h0", "c1", "m1", "h1", "c2", "h2", "c3", "c4",
    ]  # fmt: skip
    capped, _ = round_robin(recs, max_samples=4)
    assert [r["pair_id"] for r in capped] == ["c0", "m0", "h0", "c1"]


# -- parsing -----------------------------------------------------------------------------------

CANON = "User: What is shown?\nAssistant: A chest X-ray.\n\nUser: Any effusion?\nAssistant: No."


@pytest.mark.parametrize(
    "raw",
    [
        CANON,
        "user: What is shown?\nassistant: A chest X-ray.\nUSER: Any effusion?\nASSISTANT: No.",
        "**User:** What is shown?\n**Assistant:** A chest X-ray.\n**User:** Any effusion?\n"
        "**Assistant:** No.",
        "**User**: What is shown?\n**Assistant**: A chest X-ray.\n**User**: Any effusion?\n"
        "**Assistant**: No.",
        "1. User: What is shown?\n   Assistant: A chest X-ray.\n2. User: Any effusion?\n"
        "   Assistant: No.",
        "Q1: What is shown?\nA1: A chest X-ray.\nQ2: Any effusion?\nA2: No.",
        "Human: What is shown?\nGPT: A chest X-ray.\nHuman: Any effusion?\nGPT: No.",
        "Sure, here is a conversation:\n\nUser: What is shown? Assistant: A chest X-ray. "
        "User: Any effusion? Assistant: No.",
        "### User: What is shown?\n### Assistant: A chest X-ray.<|im_end|>\n"
        "### User: Any effusion?\n### Assistant: No.</s>",
        "- **Question:** What is shown?\n- **Answer:** A chest X-ray.\n"
        "- **Question:** Any effusion?\n- **Answer:** No.",
        # In a code fence: the closing ``` ended the last training answer.
        f"```\n{CANON}\n```",
        f"```text\n{CANON}\n```\n",
        "~~~\nUser: What is shown?\nAssistant: A chest X-ray.\n~~~\n\n"
        "```markdown\nUser: Any effusion?\nAssistant: No.\n```",
    ],
)
def test_parse_odd_formats(raw):
    r = parse_turns(raw)
    assert r.turns == [("What is shown?", "A chest X-ray."), ("Any effusion?", "No.")]


def test_parse_multiline_answers_and_debris():
    raw = (
        "User: Describe it.\nAssistant: Line one.\n- bullet a\n- bullet b\n\n"
        "User: And?\nAssistant: Done.\nUser: A trailing question without answer?"
    )
    r = parse_turns(raw)
    assert r.turns[0] == ("Describe it.", "Line one.\n- bullet a\n- bullet b")
    assert r.turns[1] == ("And?", "Done.")
    assert r.dropped == Counter({"unanswered_question": 1})


def test_quotes_inside_an_answer_are_kept():
    raw = (
        'User: What is seen?\nAssistant: "Ground-glass" opacities are seen in the "left lung"\n'
        'User: Where?\nAssistant: "In the left upper lobe."\n'
        "User: And?\nAssistant: 'The patient's left lung'"
    )
    assert parse_turns(raw).turns == [
        ("What is seen?", '"Ground-glass" opacities are seen in the "left lung"'),
        ("Where?", "In the left upper lobe."),  # a whole answer in quotes loses them
        ("And?", "'The patient's left lung'"),
    ]


def test_panel_letters_inside_an_answer_are_content_not_speakers():
    r = parse_turns("User: The panels?\nAssistant: Two panels:\nA: axial CT\nB: coronal view")
    assert r.turns == [("The panels?", "Two panels:\nA: axial CT\nB: coronal view")]
    assert parse_turns("Q: What is it?\nA: A CT.\nQ: Where?\nA: Liver.").turns == [
        ("What is it?", "A CT."),
        ("Where?", "Liver."),
    ]


def test_parse_stops_at_hallucinated_next_example():
    raw = CANON + "\n\nFigure Caption:\nFigure 2: x\n\nUser: new?\nAssistant: new."
    r = parse_turns(raw)
    assert len(r.turns) == 2 and r.dropped["trailing_new_example"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        CANON + "\n\n---\n\nNote: generated from the figure caption.",
        "User: What is shown?\nAssistant: A chest X-ray.\n\n---\n\nUser: Any effusion?\n"
        "Assistant: No.\n\n***",
        "**User:** What is shown?\n\n**Assistant:** A chest X-ray.\n\n**User:** Any effusion?\n\n"
        "**Assistant:** No.\n\nI hope this helps!",
        CANON + "\n\n(End of conversation)",
        CANON + "\n\nNote: this conversation is based on the figure caption.",
        CANON + "\n\nLet me know if you need more examples.",
        CANON + "\n\nFeel free to ask more questions.",
        CANON + "\n___\nThe conversation above was generated without the image.",
    ],
)
def test_text_after_the_last_turn_is_not_part_of_the_answer(raw):
    """A rule line ends a turn, and a closing note or remark after a blank line is not answer
    text: glued to the last answer it became training data ("No.\n\nI hope this helps!") or got
    the whole turn dropped for naming the caption."""
    r = parse_turns(raw)
    assert r.turns == [("What is shown?", "A chest X-ray."), ("Any effusion?", "No.")]
    assert clean_turns(r.turns).turns == r.turns


def test_a_run_of_hashes_or_blanks_parses_in_linear_time():
    """A small model's degenerate line of "#" (or "# # #") took 2**n steps to fail the speaker
    pattern: 24 of them 15 s, 30 several minutes, all of it blocking the job's event loop."""
    for junk in ("#" * 24, "#" * 24 + "x", "# " * 24 + "x", "#" * 5000):
        t = time.monotonic()
        r = parse_turns(f"User: What is shown?\nAssistant: A chest X-ray.\n{junk}")
        assert time.monotonic() - t < 1.0
        assert r.turns[0][0] == "What is shown?"
    # A run of blanks made the patterns starting with whitespace quadratic: 8,000 spaces 15 s.
    for blanks in (" " * 20_000, "\t" * 20_000, "\u00a0" * 20_000):
        t = time.monotonic()
        r = parse_turns(
            f"User: What?\nAssistant: A CT{blanks}scan.\n{blanks}\nUser: Q2?\nAssistant: No."
        )
        assert time.monotonic() - t < 1.0 and clean_turns(r.turns).turns[0] == (
            "What?",
            "A CT scan.",
        )
    # Headings and numbering before a speaker still mark it.
    r = parse_turns(
        "### User: What?\n## Assistant: A CT.\n#1. User: Where?\n# # Assistant: Abdomen."
    )
    assert r.turns == [("What?", "A CT."), ("Where?", "Abdomen.")]


def test_multi_paragraph_answers_are_kept_whole():
    answer = (
        "There is a well-defined hypodense lesion in segment VII of the liver.\n\n"
        "Note that its wall is thin and it does not enhance, so it is most likely a simple cyst."
        "\n\nThe spleen and both kidneys look normal."
    )
    r = parse_turns(f"User: What do you see?\nAssistant: {answer}\nUser: Ascites?\nAssistant: No.")
    assert r.turns == [("What do you see?", answer), ("Ascites?", "No.")] and not r.dropped


def test_parse_garbage():
    for raw in ["", "I like turtles.", "Assistant: hello", "User: only a question"]:
        assert parse_turns(raw).turns == []
    assert parse_turns("Assistant: hello").dropped == Counter({"orphan_answer": 1})


# -- cleaning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Based on the caption, the lesion is large.", "The lesion is large."),
        ("According to the figure caption, there is edema.", "There is edema."),
        ("Yes, according to the description, it is enhancing.", "Yes, it is enhancing."),
        ("No, based on the provided context, it is benign.", "No, it is benign."),
        ("The figure caption mentions that the mass is cystic.", "The mass is cystic."),
        (
            "While I cannot see the actual image, based on the description, it is round.",
            "It is round.",
        ),  # fmt: skip
        (
            "The nodule is calcified, as mentioned in the figure caption.",
            "The nodule is calcified.",
        ),
        ("It is in the liver, according to the context provided.", "It is in the liver."),
        ("The heart is enlarged.", "The heart is enlarged."),
    ],
)
def test_strip_source_phrases(answer, expected):
    assert strip_source_phrases(answer) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        # Content, not an aside: nothing is cut out of the middle of the sentence.
        (
            "The lesion, given the context of HIV infection, is most likely lymphoma.",
            "The lesion, given the context of HIV infection, is most likely lymphoma.",
        ),
        (
            "Given the context of HIV infection, the lesion is most likely lymphoma.",
            "Given the context of HIV infection, the lesion is most likely lymphoma.",
        ),
        (
            "This finding is important considering the context of the patient's age.",
            "This finding is important considering the context of the patient's age.",
        ),
        (
            "The mass is large, based on the information available in the scan, and well defined.",
            "The mass is large, based on the information available in the scan, and well defined.",
        ),
        # Asides go, with their commas.
        (
            "The opacity, as described in the text, is in the right lower lobe.",
            "The opacity is in the right lower lobe.",
        ),
        ("The lesion is benign, given the context", "The lesion is benign"),
        (
            "It is lymphoma, considering the information provided; no abscess.",
            "It is lymphoma; no abscess.",
        ),
    ],
)
def test_infix_source_phrase_is_stripped_only_as_an_aside(answer, expected):
    assert strip_source_phrases(answer) == expected


def test_clean_turns_reasons():
    turns = [
        ("What is it?", "Based on the caption, a CT scan."),
        ("Can you see it?", "I'm sorry, but I cannot see the image."),
        ("Which side?", "The description says the left side."),
        ("What does the caption say?", "It is a CT scan."),
        ("Where?", "In the abdomen."),
    ]
    r = clean_turns(turns)
    assert r.turns == [("What is it?", "A CT scan."), ("Where?", "In the abdomen.")]
    assert r.dropped == Counter(
        {"refusal": 1, "answer_mentions_source": 1, "question_mentions_source": 1}
    )


def _assert_cleaned(answer: str, kept: str | None, reason: str) -> None:
    """One answer through clean_turns: kept as ``kept``, or (None) dropped for ``reason``."""
    r = clean_turns([("What is seen?", answer)])
    if kept is None:
        assert r.turns == [] and r.dropped == Counter({reason: 1})
    else:
        assert r.turns == [("What is seen?", kept)] and not r.dropped


@pytest.mark.parametrize(
    "answer, kept",
    [
        # The prompt labels the mentions "Figure Context": answers that cite it, or any text,
        # as their source are dropped like those still naming the caption.
        ("The provided context does not specify the patient's age.", None),
        ("The text does not mention the size of the lesion.", None),
        ("The findings mentioned in the context indicate pneumonia.", None),
        ("There is no information about the stain in the provided text.", None),
        ("The context doesn't say which side is affected.", None),
        ("No stain is named in the text.", None),
        ("The article reports a similar case in a child.", None),
        # A leading source clause is stripped, as "Based on the caption, X" is.
        ("According to the article, the lesion is a lipoma.", "The lesion is a lipoma."),
        ("Yes, based on the paper, the margins are clear.", "Yes, the margins are clear."),
        # Content, not a source.
        ("These opacities are typical in the context of pneumonia.", True),
        ("The context of the lesion, beside the bile duct, suggests a cholangiocarcinoma.", True),
        ("The nodule has a text-book appearance of a hamartoma.", True),
        ("Depending on the context, ground-glass opacity may be infection or haemorrhage.", True),
        ("The text in the upper corner marks the patient's right side.", True),
        ("The cyst has a paper-thin wall and no solid component.", True),
        ("The heart is enlarged and both costophrenic angles are blunted.", True),
    ],
)
def test_answers_naming_a_text_source_are_dropped(answer, kept):
    _assert_cleaned(answer, answer if kept is True else kept, "answer_mentions_source")


@pytest.mark.parametrize(
    "answer, refusal",
    [
        ("I don't have access to the image, but such lesions are usually benign.", True),
        ("Without access to the figure, I can only say that this is a CT scan.", True),
        ("I do not have direct access to the actual images.", True),
        ("As I don’t have access to visual content, I cannot judge the margins.", True),
        ("Sorry, I cannot see which side is affected.", True),
        ("Sorry, but I am unable to judge its size.", True),
        ("I'm sorry, but the stain cannot be determined.", True),
        # Good answers that merely contain the words.
        ("Early treatment is reassuring for patients who have access to care.", False),
        ("Patients without access to dialysis develop these changes sooner.", False),
        ("Having access to prior films helps; this nodule was not seen before.", False),
        ("The wound is in a sorry, neglected state, with slough covering its base.", False),
        ("The vascular access site in the groin shows a small haematoma.", False),
    ],
)
def test_refusals_are_about_the_image_not_any_access_or_sorry(answer, refusal):
    _assert_cleaned(answer, None if refusal else answer, "refusal")


@pytest.mark.parametrize(
    "answer",
    [
        "I am not able to see the image, but a hypodense lesion usually suggests a cyst.",
        "I'm not able to view images directly; however, this typically represents edema.",
        "Since I don't have the image in front of me, I can only say it is likely a CT.",
        "As a language model, I cannot interpret images, but this is probably a CT scan.",
        "As a text-based AI, I don't have the capability to view images, but it may be benign.",
        "I do not have visual access, but it probably shows the liver.",
        "The image isn't available to me, but typically such lesions are benign.",
        "Without being able to see the image, it's hard to say; it may be a cyst.",
        "I can't look at the picture, but it likely shows a mass.",
        "I haven’t seen the actual image, so I can only describe typical findings.",
        "We cannot directly view the image you provided.",
        "The actual image itself is not provided, but the findings suggest oedema.",
    ],
)
def test_refusals_are_found_by_pattern_not_a_fixed_phrase_list(answer):
    """Paraphrased refusals (the model admitting it has no image) were kept as training answers:
    the old fixed phrase list caught one of these."""
    _assert_cleaned(answer, None, "refusal")


@pytest.mark.parametrize(
    "answer",
    [
        # Inability to see a structure, not the image: findings, kept.
        "We cannot see the left kidney on this slice because it was resected.",
        "The left kidney cannot be visualized, consistent with a prior nephrectomy.",
        "We cannot visualize the pancreatic duct in this image.",
        "No, we cannot see a fracture line in these images.",
        "I can't see any evidence of pneumothorax in this image.",
        "We cannot view the posterior segment from this angle.",
        "We do not have prior images for comparison, so growth cannot be assessed.",
        "The image is not shown at full resolution, yet the nodule is clear.",
        "The image is not of diagnostic quality because of motion artefact.",
        "The optic nerve is not visible in this image.",
        "The figure shows an AI-based segmentation of the tumour.",
        "Without contrast, we cannot see the vessels well.",
    ],
)
def test_answers_about_what_cannot_be_seen_in_the_image_are_not_refusals(answer):
    _assert_cleaned(answer, answer, "refusal")


def test_to_llava_sample_image_token_seeded():
    turns = [("Q1?", "A1."), ("Q2?", "A2.")]
    places = Counter()
    for i in range(40):
        s = to_llava_sample(rec(f"p{i}"), turns, seed=0)
        first = s["conversations"][0]["value"]
        assert first.count("<image>") == 1
        assert s["conversations"][2]["value"] == "Q2?"  # only the first turn gets the token
        places["before" if first.startswith("<image>\n") else "after"] += 1
        assert s == to_llava_sample(rec(f"p{i}"), turns, seed=0)  # deterministic per record
        assert list(s) == ["id", "image", "domain", "conversations"]
        assert s["image"] == f"images/p{i}.jpg"
        assert [c["from"] for c in s["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert places["before"] > 5 and places["after"] > 5
    no_image = {k: v for k, v in rec("x").items() if k != "image"}
    assert to_llava_sample(no_image, turns)["image"] == "x.jpg"  # LLaVA-Med naming


def test_figures_record_without_image_never_names_a_made_up_file():
    # `data ingest --keep-missing-images` writes "image": null; PMC1_F1.jpg does not exist.
    turns = [("Q1?", "A1."), ("Q2?", "A2.")]
    missing = {**rec("PMC1_F1"), "image": None}
    with pytest.raises(InputError) as exc:
        to_llava_sample(missing, turns)
    assert exc.value.reason == "missing_image" and "PMC1_F1" in str(exc.value)
    with pytest.raises(InputError):
        sample_image({**rec("PMC1_F1"), "image": ""})
    assert sample_image(rec("PMC1_F1")) == "images/PMC1_F1.jpg"
    llava_med = {k: v for k, v in rec("PMC1_F1").items() if k != "image"}
    assert sample_image(llava_med) == "PMC1_F1.jpg"
    assert to_llava_sample(missing, turns, image="../x.jpg")["image"] == "../x.jpg"
