"""Sentence splitting for scientific prose, and expansion of figure citations such as
"Figs. 2–4" or "Fig. 3, 4, 5" into the figures they cite.

The splitter is rule based on purpose: it runs on every paragraph of millions of articles, and the
only sentence ends that matter here are the ones around figure citations, where abbreviations
("Fig.", "et al.", "e.g.") are dense and a statistical splitter trained on news breaks often.
"""

from __future__ import annotations

import re

# Lower-cased tokens that end with a period without ending a sentence. Matching is on the word
# right before the period, so "Fig" covers "Fig." and "Figs" covers "Figs.".
ABBREVIATIONS = frozenset(
    """
    fig figs figure suppl supp tab tabs eq eqs eqn ref refs no nos vol vols pp p ch chap sect
    al e.g i.e eg ie vs v cf ca approx etc resp viz incl excl esp
    dr mr mrs ms prof st jr sr inc ltd co corp dept univ
    jan feb mar apr jun jul aug sep sept oct nov dec
    sp spp var ssp subsp gen nov sq mol wt conc
    """.split()
)

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) when whitespace and
# then something that can start a sentence follow: a capital or digit, a Greek letter (α-SMA), or
# a gene/molecule name that starts lower-case but has a capital or digit in it (mRNA, p53, miR-21).
_BOUNDARY = re.compile(
    r"[.!?][\"'\u201d\u2019)\]]*"
    r"(?=\s+[\"'\u201c\u2018(\[]?(?:[A-Z0-9\u0391-\u03c9]|[a-z]+[A-Z0-9]))"
)
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")
# Panel letters after a figure number, ending at the letter before a period: "1B", "1A–C",
# "1A, B", "1A,B", "2A and C", "1A/B"; with a space only after a figure word ("Figure 1 B").
_PANEL_SEP = r"\s*(?:[-\u2010-\u2015\u2212,&/]|and)\s*"
_PANELS_BEFORE = re.compile(
    rf"(?:\d[A-Za-z]?(?:{_PANEL_SEP}[A-Za-z])*"
    rf"|(?<![A-Za-z])[Ff][Ii][Gg](?:[Uu][Rr][Ee])?[Ss]?\.?\s*\d{{1,3}}[A-Za-z]?"
    rf"(?:(?:{_PANEL_SEP}|\s+)[A-Za-z])+)$"
)


# A capital letter that ends a sentence, not an initial: after "&" ("stained with H&E."), or
# named by the word before it ("hepatitis B.", "vitamin D.", "grade A.", "panels A and B.").
_LETTER_NAMED_BY = re.compile(
    r"(?:&|\b(?:panels?|types?|subtypes?|groups?|hepatitis|vitamins?|grades?|stages?|class|"
    r"zones?|lanes?|phases?|serotypes?|serogroups?|genotypes?|proteins?|factors?|cohorts?|"
    r"arms?|categor(?:y|ies)|segments?|regions?|sites?|levels?)\s+"
    r"(?:[A-Z]\s*(?:,|and|or|&|[-\u2010-\u2015])\s*)*)$",
    re.I,
)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Return ``(start, end)`` character spans of the sentences in ``text`` (spans exclude the
    whitespace between sentences)."""
    spans: list[tuple[int, int]] = []
    start = 0
    n = len(text)
    while start < n and text[start].isspace():
        start += 1
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if text[m.start()] == "." and _is_abbreviation(text, m.start()):
            continue
        if end > start:
            spans.append((start, end))
        start = end
        while start < n and text[start].isspace():
            start += 1
    stop = n
    while stop > start and text[stop - 1].isspace():
        stop -= 1
    if stop > start:
        spans.append((start, stop))
    return spans


def _is_abbreviation(text: str, dot: int) -> bool:
    m = _WORD_BEFORE.search(text, max(0, dot - 30), dot)
    if not m:
        return False
    word = m.group(1)
    if len(word) == 1 and word.isupper():
        # An initial ("J. Smith", "(A. fumigatus)"), unless it is a panel letter after a
        # figure number: "... in Figure 1B. The kidneys ..." and "... in Figure 1A–C. The
        # kidneys ..." end there; so do "H&E." and "hepatitis B.".
        if _LETTER_NAMED_BY.search(text, max(0, m.start(1) - 40), m.start(1)):
            return False
        return not _PANELS_BEFORE.search(text, max(0, dot - 40), dot)
    if "." in word:  # "e.g", "i.e", "U.S" (the word runs up to the final period)
        return word.lower() in ABBREVIATIONS or all(len(p) <= 1 for p in word.split("."))
    return word.lower() in ABBREVIATIONS


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in split_sentences(text)]


# --- figure citation expansion ---------------------------------------------------------------

_DASH = r"(?:[\u2010-\u2015\u2212-]|to|through|thru)"
_NUM = r"(?<![A-Za-z])(\d{1,3})[A-Za-z]?(?:\s*\([A-Za-z](?:[,\u2013-][A-Za-z])*\))?"
_NUMBER = re.compile(_NUM)
# A range written inside one citation's text: "2–4", "Figures 2 to 4", "2A–4C".
_RANGE_IN = re.compile(rf"{_NUM}\s*{_DASH}\s*(?:Fig(?:ure)?s?\.?\s*)?{_NUM}")
# A number that counts or measures something is not a figure: "Fig. 1, 3 of the 10 patients",
# ", 12%", ", 5mg/kg" (a unit glued on: letters after the panel letter).
_COUNTED = (
    r"(?![A-Za-z])"
    r"(?!\d|\s*(?:%|(?:of|out|patients?|cases?|subjects?|participants?|samples?|mice|rats?|"
    r"animals?|cells?|lesions?|times|fold|days?|weeks?|months?|years?|hours?|h|min|mg|ml|mm|"
    r"cm)\b))"
)
# Text right after a citation that continues it: "–4", ", 4, 5", " and 6", "-5".
_TRAILING = re.compile(
    rf"^(?:\s*(?:,|;|&|and|{_DASH})\s*(?:Fig(?:ure)?s?\.?\s*)?{_NUM}(?![\d.,]\d){_COUNTED})+"
)
_BETWEEN_RANGE = re.compile(rf"^\s*{_DASH}\s*$")


# After these words a citation's numbers count something else: "Figure 4—figure supplement 1",
# "Figure 2—source data 1", "Figure 3—video 2".
_NOT_FIGURE_NUMBERS = re.compile(r"supplement|source\s+data|video|movie", re.I)


def numbers_in_citation(text: str) -> list[int]:
    """Figure numbers a citation's own text names, ranges expanded: "Figs. 2–4" -> [2, 3, 4];
    "Fig. 3, 4, 5" -> [3, 4, 5]; "Figure 2A–C" -> [2] (panel letters are not figures);
    "Figure 4—figure supplement 1" -> [4]."""
    cut = _NOT_FIGURE_NUMBERS.search(text)
    if cut:
        text = text[: cut.start()]
    out: list[int] = []
    pos = 0
    for m in _RANGE_IN.finditer(text):
        out.extend(_numbers(text[pos : m.start()]))
        a, b = int(m.group(1)), int(m.group(2))
        out.extend(range(a, b + 1) if 0 < b - a <= 50 else (a, b))
        pos = m.end()
    out.extend(_numbers(text[pos:]))
    return _unique(out)


def trailing_numbers(after: str) -> list[int]:
    """Figure numbers in text that directly continues a citation ("–4", ", 4, 5 and 6"); a leading
    dash makes a range from the citation's last number, which the caller supplies."""
    m = _TRAILING.match(after)
    if not m:
        return []
    return numbers_in_citation(m.group(0))


def trailing_is_range(after: str) -> bool:
    return bool(re.match(rf"^\s*{_DASH}\s*(?:Fig(?:ure)?s?\.?\s*)?\d", after))


def is_range_gap(between: str) -> bool:
    """True if the text between two citations makes them a range: "Figs. 2–4" tagged as two
    xrefs, 2 and 4, with an en dash between them."""
    return bool(_BETWEEN_RANGE.match(between))


def _numbers(text: str) -> list[int]:
    return [int(m.group(1)) for m in _NUMBER.finditer(text)]


def _unique(items: list[int]) -> list[int]:
    seen: set[int] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


# A label of the main figure series: "Figure 3", "Fig. 3.", "FIG 3A", "Figs. 2", "Figura 1", "3."
_MAIN_LABEL = re.compile(r"^\W*(?:fig(?:ure|ura)?s?(?![A-Za-z])\.?)?\s*(\d{1,3})(?![\d.,]\d)", re.I)


def label_number(label: str | None) -> int | None:
    """The figure number in a label of the main figure series, such as "Figure 3", "Fig. 3.",
    "FIG 3A". None for another series, whose numbers are not the main figures' ("Figure S2",
    "Scheme 1", "Box 2", eLife's "Figure 2—figure supplement 1." and "Figure 3—source data 1"),
    and for a label without a number."""
    if not label:
        return None
    m = _MAIN_LABEL.match(label)
    if not m or _NOT_FIGURE_NUMBERS.search(label, m.end()):
        return None
    return int(m.group(1))
