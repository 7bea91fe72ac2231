"""Turn a generator's raw text into clean LLaVA conversation turns.

Two steps, both pure functions:

1. :func:`parse_turns` finds ``User:`` / ``Assistant:`` turns however the model wrote them: any
   case, markdown bold or headings, list numbering (``1. **User:**``), ``Q:``/``A:``, ``Human:``,
   several turns on one line, a chatty preamble, chat-template debris (``<|im_end|>``), code
   fence lines (```` ``` ````), or a hallucinated next "Figure Caption:" block. A turn ends at a
   horizontal rule line or before a closing note or remark ("Note: ...", "I hope this helps!").
   Unpaired questions or answers are dropped and counted.
2. :func:`clean_turns` applies the paper's cleaning (DESIGN.md §4): drop refusal turns ("I cannot
   see the image"), strip source phrases ("Based on the caption, ..."), drop turns that still talk
   about the caption, a description, the article, or the context or text as a source ("the
   provided context does not specify"), and report why each turn went.

Unlike the reference, a "Yes, according to the description, X" answer keeps its "Yes, ".
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from llavamed.data.figures import record_image
from llavamed.errors import InputError

USER, ASSISTANT = "user", "assistant"

_ROLE_WORDS = {
    "user": USER,
    "human": USER,
    "q": USER,
    "question": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "ai": ASSISTANT,
    "a": ASSISTANT,
    "answer": ASSISTANT,
}
_EMPH = r"(?:\*\*|__|\*|_)"
# A speaker marker at the start of a line: optional bullets/numbering/headings/quote marks,
# optional emphasis, the role word, an optional number ("Q1", "User 2"), a colon, emphasis again.
_LINE_MARKER = re.compile(
    r"^\s*(?:(?:[-*•>#]|\d+[.)]|\(\d+\))\s*)*"
    rf"{_EMPH}?\s*\[?(?P<role>user|human|assistant|gpt|ai|question|answer|q|a)\]?"
    rf"(?:\s*\d+)?\s*{_EMPH}?\s*[:：]\s*{_EMPH}?\s*",
    re.IGNORECASE,
)
# Speaker names may also start mid-line ("... image? Assistant: It shows ..."): capitalised ones
# anywhere, lower-case ones only after sentence punctuation, so prose like "the user: x" stays.
_INLINE_MARKER = re.compile(
    rf"(?<=\S)[ \t]+(?={_EMPH}?(?:User|Assistant|Human)\s*{_EMPH}?:)"
    rf"|(?<=[.?!\"')\]])[ \t]+(?={_EMPH}?(?i:user|assistant|human)\s*{_EMPH}?:)"
)
# One "#" per repetition: "#+" inside the starred group matched a run of n "#" in 2**n ways, and a
# line of 30 "#" (a small model's degenerate output) took minutes to fail, blocking the event loop.
_PREFIX_ONLY = re.compile(r"^\s*(?:(?:[-*•>#]|\d+[.)]|\(\d+\))\s*)*$")
_STOP_LINE = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?figure (?:caption|context)\s*(?:\*\*)?\s*:", re.I)
# A horizontal rule ("---", "***", "___", spaced or longer) ends the turn it follows: what comes
# after it up to the next speaker is a separator's aftermath ("Note: generated from the caption").
_RULE_LINE = re.compile(r"^\s*(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$")
# A code fence ("```", "```text", "~~~") around the conversation or a turn is markup, not words:
# it ended up as the last line of a training answer.
_FENCE_LINE = re.compile(r"^\s*(?:`{3,}|~{3,})\s*[\w.+-]*\s*$")
# A paragraph (after a blank line) that is a note or a closing remark, not part of the answer:
# "Note: ...", "(End of conversation)", "I hope this helps!", "Let me know if ...". "Note that
# the arrow ..." is content, "Note: ..." is not.
_CLOSING_BLOCK = re.compile(
    r"^\s*(?:[*_(\[]\s*)*(?:"
    r"(?:please\s+)?note\s*[:：]|please\s+note\b|disclaimer\s*[:：]"
    r"|end\s+of\s+(?:the\s+)?(?:conversation|dialogue|chat|example|transcript|output)\b"
    r"|(?<=[(\[])\s*end\b"
    r"|(?:i\s+)?hope\s+(?:this|that|it)\s+helps|let\s+me\s+know\s+if|feel\s+free\s+to"
    r"|if\s+you\s+have\s+any\s+(?:other|more|further|additional)\s+questions"
    r"|(?:this|the\s+above)\s+(?:conversation|dialogue)\b"
    r")",
    re.IGNORECASE,
)
_DEBRIS = re.compile(r"<\|[^|>]{1,40}\|>|</s>|<s>|\[/?INST\]|<image>|<end_of_turn>|<eos>")

# Answers where the model admits it has no image are never training data. Detection is by
# pattern, not a fixed phrase list: "I am not able to see the image", "I'm not able to view images
# directly", "Since I don't have the image in front of me", "The image isn't available to me", "As a
# language model, ...". A refusal is about the assistant's own access to *the image*: "We cannot
# see the left kidney on this slice", "the duct cannot be visualised in this image", "we do not
# have prior images for comparison" and "the image is not shown at full resolution" are answers.
# Likewise "access" and "sorry" only count when tied to the image: "patients who have access to
# care" and "a sorry, neglected wound" are answers.
REFUSAL_PHRASES = (
    "unable to provide specific details",
    "not provided in the figure caption",
    "not mentioned in the caption",
    "not mentioned in the figure caption",
    "not specified in the caption",
    "not specified in the image caption",
    "can't actually see",
    "cannot actually see",
    "i'm sorry",
    "i am sorry",
)
_Q = "['’]"
# The image as the thing seen or held: "the image", "images", "the actual picture", "visual
# content". Only these adjectives may stand between, so "prior images" or "this slice" never match.
_IMG_OBJ = (
    r"(?:(?:the|this|that|these|those|an?|any|your|its|such)\s+)?"
    r"(?:(?:actual|original|real|provided|attached|uploaded|given|specific|full|medical"
    r"|referenced|accompanying|corresponding|associated|relevant|underlying)\s+){0,2}"
    r"(?:images?|pictures?|photos?|photographs?|figures?|visuals?"
    r"|visual\s+(?:content|data|input|information|material))\b"
)
_SUBJ = (
    rf"\b(?:i|we)(?:\s+|(?={_Q}))(?:(?:really|actually|currently|unfortunately|simply|just)\s+)?"
)
_CANT = (
    rf"(?:can(?:not|{_Q}t|\s+not)|could(?:\s+not|n{_Q}t)"
    rf"|(?:am|{_Q}m|are|{_Q}re)\s+(?:not\s+able|unable|incapable)\s+to"
    rf"|(?:am|{_Q}m|are|{_Q}re)\s+not\s+capable\s+of"
    rf"|(?:do|did)(?:\s+not|n{_Q}t)\s+have\s+(?:the\s+)?(?:ability|capability|capacity|means)\s+to"
    r"|lack\s+the\s+(?:ability|capability|capacity)\s+to|have\s+no\s+way\s+(?:to|of)"
    rf"|(?:won{_Q}t|will\s+not)\s+be\s+able\s+to)"
)
_LOOK = (
    r"(?:see(?:ing)?|view(?:ing)?|look(?:ing)?\s+at|access(?:ing)?|interpret(?:ing)?"
    r"|analy[sz](?:e|ing)|examin(?:e|ing)|inspect(?:ing)?|process(?:ing)?|perceiv(?:e|ing)"
    r"|visuali[sz](?:e|ing)|open(?:ing)?)"
)
_REFUSAL = re.compile(
    # "I am not able to see the image", "I can't look at the picture", "we cannot directly view
    # images", "I don't have the capability to view images"
    rf"{_SUBJ}{_CANT}\s+(?:\w+\s+){{0,2}}?{_LOOK}\s+{_IMG_OBJ}"
    # "I don't have the image in front of me", "I do not have visual access", "I haven't seen
    # the image"
    rf"|{_SUBJ}(?:(?:do|did)(?:\s+not|n{_Q}t)\s+have|have\s+no|lack"
    rf"|(?:have|{_Q}ve)(?:\s+not|n{_Q}t)\s+(?:actually\s+)?(?:seen|viewed|looked\s+at|received"
    r"|been\s+(?:shown|given|provided)(?:\s+with)?))\s+"
    rf"(?:{_IMG_OBJ}|(?:any\s+)?(?:visual\s+(?:access|capabilit\w*|abilit\w*)|eyes|vision|sight)\b)"
    # "Without being able to see the image", "without seeing the actual picture"
    rf"|\bwithout\s+(?:(?:being\s+able|the\s+ability|a\s+way)\s+to\s+)?{_LOOK}\s+{_IMG_OBJ}"
    rf"|\bwithout\s+(?:the|an?)\s+(?:actual|original)\s+{_IMG_OBJ}"
    # "As a language model, ...", "As a text-based AI, ...", "I am an AI"
    r"|\bas\s+an?\s+(?:(?:text|language)[-\s]based\s+|large\s+)?(?:ai\b(?:\s+(?:language\s+)?"
    r"(?:model|assistant|system))?\s*,|artificial\s+intelligence\b|(?:ai\s+)?language\s+model\b"
    r"|chatbot\b)"
    rf"|\bi\s*(?:am|{_Q}m)\s+(?:just\s+|only\s+|merely\s+)?an?\s+(?:(?:text|language)[-\s]based\s+)?"
    r"(?:ai\b|artificial\s+intelligence|(?:ai\s+)?language\s+model|chatbot)"
    # "The image isn't available to me", "the actual image itself is not provided, but ..."
    rf"|\b(?:the|this|that|these|your)\s+{_IMG_OBJ}\s+(?:itself\s+)?(?:is|are|was|were|has|have)"
    rf"(?:\s+not|n{_Q}t)\s+(?:been\s+)?(?:\w+\s+)?(?:available|provided|shown|included|attached"
    r"|accessible|given|shared|uploaded)\b(?=\s+(?:to\s+(?:me|us)|here)\b|\s*(?:[,.;:!?]|$))"
    rf"|\b(?:is|are|was|were)(?:\s+not|n{_Q}t)\s+(?:\w+\s+)?(?:available|accessible|visible|shown"
    r"|provided)\s+to\s+(?:me|us)\b"
    # "access to the image" (not "access to care"), "Sorry, I cannot ..." (not "a sorry state")
    r"|\baccess\s+to\s+(?:(?:the|this|that|these|an?|any)\s+)?(?:(?:actual|original|real)\s+)?"
    r"(?:images?|figures?|pictures?|photos?|photographs?|visuals|visual\s+(?:content|data|input))\b"
    rf"|\bsorry[,.!]?\s+(?:but\s+)?(?:i|we)\s+(?:cannot|can{_Q}t|can\s+not|am\s+unable|am\s+not\s+able"
    rf"|do\s+not|don{_Q}t|have\s+no)\b",
    re.IGNORECASE,
)


def is_refusal(answer: str) -> bool:
    """True when ``answer`` is the model saying it cannot see or has no image (or no source)."""
    low = answer.lower().replace("’", "'")
    return any(p in low for p in REFUSAL_PHRASES) or bool(_REFUSAL.search(answer))


_SRC = (  # "legend" only as "figure/image legend": "the legend shows" may be a chart's own
    r"(?:(?:figure|image)\s+legend|(?:(?:figure|image|provided|given|additional)\s+)?"
    r"(?:caption|description|context|information|text|article|paper))"
    r"(?:\s+(?:provided|given))?"
)
# "Based on the caption, X" / "Yes, according to the provided context, X" / "While I cannot see
# the image, based on the description, X" -> "X" (keeping a leading yes/no).
_LEAD_CLAUSE = re.compile(
    r"^(?P<yn>(?:yes|no)\s*,\s*)?"
    r"(?:(?:while|although)\s+i\s+(?:cannot|can't|am unable to)\s+see\s+the\s+(?:actual\s+)?image\s*,\s*(?:but\s+)?)?"
    r"(?:i\s+cannot\s+see\s+the\s+image\s*,\s*but\s+)?"
    r"(?:according\s+(?:to|on)|based\s+on|judging\s+(?:by|from)|in|from|given|considering"
    r"|as\s+(?:mentioned|described|indicated|stated|noted|shown)\s+(?:in|by))\s+"
    r"the\s+(?:image\s+and\s+(?:the\s+)?)?" + _SRC + r"\s*,\s*",
    re.IGNORECASE,
)
# "The figure caption mentions that X" -> "X".
_LEAD_VERB = re.compile(
    r"^(?P<yn>(?:yes|no)\s*,\s*)?the\s+" + _SRC + r"\s+"
    r"(?:mentions|describes|suggests|indicates|states|notes|shows|reveals)(?:\s+that)?\s+",
    re.IGNORECASE,
)
# ", as mentioned in the caption" / " based on the context provided" inside a sentence - only
# as a standalone aside, i.e. followed by punctuation or the end: "given the context of HIV
# infection" is content, and cutting its head off left "The lesion of HIV infection".
# An aside between two commas takes its closing comma along ("X, as described in the text, Y").
_INFIX = re.compile(
    r"(?P<open>,)?\s*(?:(?:as|which\s+is)\s+)?(?:(?:mentioned|described|indicated|stated|noted"
    r"|suggested)\s+(?:in|by)|according\s+to|based\s+on|given|considering)\s+the\s+" + _SRC + r"\b"
    r"(?:(?P<close>\s*,)|(?=\s*(?:[.;:!?]|$)))",
    re.IGNORECASE,
)


def _drop_aside(m: re.Match) -> str:
    return "," if m.group("close") and not m.group("open") else ""


# What an answer must not say once the phrases above are stripped: the caption, a description,
# the article, or the context/text (the prompt labels the mentions "Figure Context") as the one
# who says or where a fact was read. "In the context of pneumonia", "the context of the lesion",
# "depending on the context", "a text-book appearance" and "the text in the corner" are content.
_TEXT = r"(?:context|text)"
_SOURCE_WORDS = re.compile(
    r"\b(?:captions?|descriptions?|articles?)\b|\bthe\s+(?:paper\b(?!-)|authors?\b)"
    # "the provided context", "the text given", "the figure context"
    rf"|\b(?:provided|given|accompanying|figure)\s+{_TEXT}\b(?!-)|\b{_TEXT}\s+(?:provided|given)\b"
    # the text as the one who says: "the text does not mention", "the context indicates"
    rf"|\bthe\s+{_TEXT}\s+(?:do|did|only|also|clearly|explicitly|mention|state|specif|note"
    r"|indicate|describe|suggest|report|provide|say|said|refer|lack)"
    # the text as where a fact was read: "mentioned in the context", "... in the provided text."
    rf"|\b(?:in|from|within|by)\s+the\s+{_TEXT}(?=\s*(?:[.,;:!?)]|$))"
    r"|\b(?:mentioned|described|noted|stated|reported|specified|given|provided|discussed|listed"
    rf"|cited)\s+(?:in|by)\s+the\s+{_TEXT}\b(?!-|\s+of\b)",
    re.IGNORECASE,
)
_QUESTION_SOURCE = re.compile(
    r"\b(?:captions?|figure\s+context|provided\s+context|context\s+provided|mentioned\s+in\s+the)\b",
    re.IGNORECASE,
)


@dataclass
class CleanResult:
    turns: list[tuple[str, str]]
    dropped: Counter = field(default_factory=Counter)
    """Reasons turns were dropped (parse and cleaning), one count per turn or fragment."""


def _tidy(text: str) -> str:
    text = _DEBRIS.sub("", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    text = text.strip()
    # Emphasis left dangling by a marker such as "**User:** text**"
    text = re.sub(r"^(?:\*\*|__)\s*", "", text)
    text = re.sub(r"\s*(?:\*\*|__)$", "", text)
    # A whole answer in quotes loses them; '"Ground-glass" opacities ... "left lung"' keeps its own.
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" and text[0] not in text[1:-1]:
        text = text[1:-1].strip()
    return text


# A run of blanks (spaces, tabs, NBSP...: a small model's degenerate reply holds thousands) made
# the patterns that start with whitespace (speaker markers, source asides) quadratic: 8,000 spaces
# took 15 s, blocking the job's event loop. One blank does for any run; the cleaned answers
# squeezed such runs anyway.
_BLANK_RUN = re.compile(r"[^\S\n]{2,}")


def _squeeze(raw: str) -> str:
    return _BLANK_RUN.sub(" ", raw.replace("\r\n", "\n"))


def _split_inline(line: str) -> str:
    """Break "Q? Assistant: A. User: Q2?" into lines, but not "1. User:" or "### User:"."""
    out, last = [], 0
    for m in _INLINE_MARKER.finditer(line):
        if _PREFIX_ONLY.match(line[: m.start()]):
            continue
        out.append(line[last : m.start()])
        last = m.end()
    out.append(line[last:])
    return "\n".join(out)


def _cut_closing_blocks(lines: list[str]) -> tuple[list[str], bool]:
    """Drop a turn's paragraphs from the first one (never the first paragraph) that is a note or
    a closing remark (:data:`_CLOSING_BLOCK`); returns the kept lines and whether any went."""
    for i in range(1, len(lines)):
        if not lines[i - 1].strip() and _CLOSING_BLOCK.match(lines[i]):
            if any(x.strip() for x in lines[:i]):
                return lines[:i], True
    return lines, False


def parse_turns(raw: str) -> CleanResult:
    """Split raw generator output into (question, answer) pairs.

    A turn ends at the next speaker, at a horizontal rule line, or before a paragraph that is a
    note or closing remark ("Note: ...", "I hope this helps!"); text cut that way is counted as
    ``trailing_text``."""
    dropped: Counter = Counter()
    text = "\n".join(_split_inline(line) for line in _squeeze(raw).split("\n"))
    segments: list[list] = []  # [role, [lines]]
    preamble = False
    # A rule line ended the last segment: text until the next speaker is dropped.
    closed = counted = False
    for line in text.split("\n"):
        if _FENCE_LINE.match(line):
            continue
        if _STOP_LINE.match(line):
            if segments:
                dropped["trailing_new_example"] += 1
                break
            continue
        m = _LINE_MARKER.match(line)
        if m:
            closed = False
            word = m.group("role").lower()
            role = _ROLE_WORDS[word]
            rest = line[m.end() :]
            if segments and segments[-1][0] == role:
                # "User: ... User: ..." -> one question; but a one-letter marker inside the same
                # speaker's text is content ("Two panels:\nA: axial CT\nB: coronal").
                segments[-1][1].append(line if word in ("a", "q") else rest)
            else:
                segments.append([role, [rest]])
        elif _RULE_LINE.match(line):
            closed, counted = bool(segments), False
        elif closed:
            if line.strip() and not counted:
                dropped["trailing_text"] += 1  # once per cut
                counted = True
        elif segments:
            segments[-1][1].append(line)
        elif line.strip():
            preamble = True
    if preamble:
        dropped["preamble"] += 1
    turns: list[tuple[str, str]] = []
    i = 0
    for seg in segments:
        seg[1], cut = _cut_closing_blocks(seg[1])
        if cut:
            dropped["trailing_text"] += 1
    while i < len(segments):
        role, lines = segments[i]
        body = _tidy("\n".join(lines))
        if role == USER and i + 1 < len(segments):
            answer = _tidy("\n".join(segments[i + 1][1]))
            if body and answer:
                turns.append((body, answer))
            else:
                dropped["empty_turn"] += 1
            i += 2
            continue
        dropped["unanswered_question" if role == USER else "orphan_answer"] += 1
        i += 1
    return CleanResult(turns, dropped)


def drop_cut_answer(parsed: CleanResult, raw: str, reason: str = "cut_by_max_tokens") -> None:
    """For a reply cut off (by max_tokens, or by a content filter): drop the last pair when its
    answer is where the text was cut ("...in the right lower lo"), not a complete turn followed
    by a cut question. The drop is counted under ``reason``."""
    if not parsed.turns:
        return
    tail = parsed.turns[-1][1][-24:]
    if _tidy(_squeeze(raw)).endswith(tail):
        parsed.turns.pop()
        parsed.dropped[reason] += 1


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def strip_source_phrases(answer: str) -> str:
    """Remove wording that reveals the answer came from text rather than the image."""
    out = answer
    for pat in (_LEAD_CLAUSE, _LEAD_VERB):
        m = pat.match(out)
        if m:
            rest = out[m.end() :]
            yn = m.group("yn")
            out = (_capitalise(yn.strip().rstrip(",")) + ", " + rest) if yn else _capitalise(rest)
            break
    out = _INFIX.sub(_drop_aside, out)
    out = re.sub(r"\s+([,.;:!?])", r"\1", out)
    out = re.sub(r"[ \t]{2,}", " ", out)
    return out.strip()


def clean_turns(turns: list[tuple[str, str]]) -> CleanResult:
    """Paper cleaning over parsed turns; returns the kept turns and per-reason drop counts."""
    kept: list[tuple[str, str]] = []
    dropped: Counter = Counter()
    for q, a in turns:
        if is_refusal(a):
            dropped["refusal"] += 1
            continue
        a2 = strip_source_phrases(a)
        if not a2:
            dropped["empty_turn"] += 1
            continue
        if _SOURCE_WORDS.search(a2):
            dropped["answer_mentions_source"] += 1
            continue
        if _QUESTION_SOURCE.search(q):
            dropped["question_mentions_source"] += 1
            continue
        kept.append((q, a2))
    return CleanResult(kept, dropped)


def sample_image(record: dict) -> str:
    """The image a sample of ``record`` names (:func:`llavamed.data.figures.record_image`); a
    record without one raises :class:`InputError` with reason ``missing_image`` rather than
    naming a file that does not exist."""
    image = record_image(record)
    if image is None:
        raise InputError(f"record {record.get('pair_id')}", "missing_image")
    return image


def to_llava_sample(
    record: dict, turns: list[tuple[str, str]], seed: int = 0, image: str | None = None
) -> dict:
    """LLaVA conversation JSON. ``<image>`` goes before or after the first question, decided by a
    per-record seeded coin so a resumed run places it exactly as an uninterrupted one would.
    ``image``: the record's image path as the output file should name it (default:
    :func:`sample_image`, which raises :class:`InputError` for a record without an image)."""
    pair_id = str(record["pair_id"])
    before = random.Random(f"{seed}:{pair_id}").random() < 0.5
    conversations = []
    for i, (q, a) in enumerate(turns):
        if i == 0:
            q = f"<image>\n{q}" if before else f"{q}\n<image>"
        conversations.append({"from": "human", "value": q})
        conversations.append({"from": "gpt", "value": a})
    sample = {
        "id": pair_id,
        "image": image or sample_image(record),
        "conversations": conversations,
    }
    if record.get("domain") is not None:
        sample["domain"] = record["domain"]
    return {k: sample[k] for k in ("id", "image", "domain", "conversations") if k in sample}
