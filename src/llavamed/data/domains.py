"""Label the five LLaVA-Med domains (chest_xray, mri, ct_scan, histology, gross) from a figure's
caption and inline mentions.

A rule-based, multi-label text classifier. The vocabulary lives in
``resources/domains/vocabulary.json``: modality names and abbreviations ("CXR", "T2WI", "HRCT"),
stains and magnifications ("H&E", "PAS", "×400"), views and anatomy. Rules, in order:

1. Phrases that name a modality without the figure being one are blanked out first:
   "CT-guided biopsy", "histologically confirmed", "gross total resection", "X-ray crystal
   structure", "CT-based model", and "micrograph" when it is an electron, TEM/SEM, cryo-EM,
   confocal or fluorescence one, whether the microscope comes first or after it ("micrograph
   ... by scanning electron microscopy") or the caption calls it ultrastructure (in the same
   sentence, or in a title sentence "Ultrastructure of ..."); "H&E photomicrograph" stays
   histology.
2. A *strong* cue labels its domain unless a negation governs it directly ("No CT was performed",
   "MRI was not available", "MRI and CT were not performed"). Negations of findings ("no
   evidence of pneumothorax on the chest radiograph") leave the modality standing. "HPF" (high-power field) is a strong histology cue
   in capitals or after "per"/"cells/"; a lower-case "48 hpf" or "3 dpf/72 hpf" (hours post
   fertilization) is not.
3. *Weak* cues ("axial", "magnification", "stained", "resected specimen") label a domain only
   when two or more agree, no other domain has a strong cue, and none of the domain's *anti* cues
   ("immunofluorescence", "cell line") is present.
4. Chest X-ray needs an X-ray word *and* a chest word (or a direct "CXR"/"chest radiograph"); the
   pair does not count when other anatomy is named, so a knee radiograph is "other", nor when
   the X-ray word is negated ("Axial CT of the chest; no chest radiograph was obtained").
5. Mentions are used only when the caption names no modality at all: a body sentence often cites
   several figures of different kinds.
6. A caption whose first sentence names a chart, plot or diagram (``chart_figure``: "ROC curves",
   "Kaplan-Meier", "flowchart", "architecture of") before any modality labels no domain: it is a
   figure of data. A modality named first is an image panel of a compound figure ("(A) Axial CT;
   (B) box plot of volumes") and labels as usual.
   "had undergone CT" and the like name the patient's history, not the figure (``not_image``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llavamed.data.figures import DOMAINS, empty_domain, mention_sentences

VOCABULARY_PATH = (
    Path(__file__).resolve().parent.parent / "resources" / "domains" / "vocabulary.json"
)


@dataclass(frozen=True)
class _DomainRules:
    strong: tuple[re.Pattern, ...]
    combo: tuple[tuple[re.Pattern, ...], ...]
    weak: tuple[re.Pattern, ...]
    anti: tuple[re.Pattern, ...]


@dataclass(frozen=True)
class _Rules:
    not_image: tuple[re.Pattern, ...]
    chart: tuple[re.Pattern, ...]
    neg_before: re.Pattern
    neg_after: re.Pattern
    neg_after_coordinated: re.Pattern
    domains: dict[str, _DomainRules]


@lru_cache(maxsize=1)
def _rules() -> _Rules:
    raw = json.loads(VOCABULARY_PATH.read_text(encoding="utf-8"))

    def ci(patterns: Iterable[str]) -> tuple[re.Pattern, ...]:
        return tuple(re.compile(p, re.I) for p in patterns)

    def cs(patterns: Iterable[str]) -> tuple[re.Pattern, ...]:
        return tuple(re.compile(p) for p in patterns)

    domains = {}
    for name in DOMAINS:
        d = raw["domains"][name]
        domains[name] = _DomainRules(
            strong=ci(d.get("strong", [])) + cs(d.get("strong_cs", [])),
            combo=tuple(ci(group) for group in d.get("combo", [])),
            weak=ci(d.get("weak", [])),
            anti=ci(d.get("anti", [])),
        )
    return _Rules(
        not_image=ci(raw["not_image"]),
        chart=ci(raw["chart_figure"]),
        neg_before=re.compile(raw["negation"]["before"], re.I),
        neg_after=re.compile(raw["negation"]["after"], re.I),
        # The cue is one of several negated together: "MRI and CT were not performed",
        # "CT, MRI or PET was unavailable" (up to three more names of up to three words).
        neg_after_coordinated=re.compile(
            r"(?:\s*(?:,|/|\band\b|\bor\b|\bnor\b)\s*(?:[\w-]+\s+){0,2}?[\w/-]+){1,3}?"
            + raw["negation"]["after"],
            re.I,
        ),
        domains=domains,
    )


# A negation only reaches back to the start of its clause.
_CLAUSE = re.compile(r"[.;:!?()\[\]]")


def _blank(m: re.Match) -> str:
    """Spaces over the match, or only over its ``cue`` group when the pattern names one (so a
    qualifier such as "confocal" in "confocal micrograph" stays visible to the anti cues)."""
    whole = m.group(0)
    if "cue" not in m.re.groupindex or m.start("cue") < 0:
        return " " * len(whole)
    start, end = m.start("cue") - m.start(), m.end("cue") - m.start()
    return whole[:start] + " " * (end - start) + whole[end:]


def _blank_not_image(text: str, rules: _Rules) -> str:
    for pat in rules.not_image:
        text = pat.sub(_blank, text)
    return text


def _negated(text: str, start: int, end: int, rules: _Rules) -> bool:
    # Only the 60 characters before the cue are read: a search for the clause's start from the
    # text's start made every cue cost the length of the text, and a 1 MB caption (an unclosed
    # <caption> in recovered XML swallows the article) took two minutes.
    window = max(0, start - 60)
    clause_start = max((m.end() for m in _CLAUSE.finditer(text, window, start)), default=window)
    before = text[clause_start:start]
    if rules.neg_before.search(before):
        return True
    stop = min(len(text), end + 120)
    return bool(
        rules.neg_after.match(text, end, stop) or rules.neg_after_coordinated.match(text, end, stop)
    )


def _strong_hits(text: str, dom: _DomainRules, rules: _Rules) -> int:
    hits = 0
    negated_spans: list[tuple[int, int]] = []
    for pat in dom.strong:
        counted = False
        for m in pat.finditer(text):
            if _negated(text, m.start(), m.end(), rules):
                negated_spans.append(m.span())
            elif not counted:
                hits += 1
                counted = True
    if dom.combo and _combo_holds(text, dom, rules, negated_spans):
        hits += 1
    return hits


def _combo_holds(
    text: str, dom: _DomainRules, rules: _Rules, negated_spans: list[tuple[int, int]]
) -> bool:
    """Every combo group matches and no anti cue is present. The first group names the modality
    ("radiograph", "X-ray"): a match of it counts only when no negation governs it, directly
    ("chest radiograph was not performed") or through a negated strong cue that contains it
    ("no chest radiograph was obtained"). Negated findings in the other groups ("no pleural
    effusion") still count, as they do for strong cues."""
    if any(p.search(text) for p in dom.anti):
        return False
    modality, *others = dom.combo

    def free(m: re.Match) -> bool:
        if _negated(text, m.start(), m.end(), rules):
            return False
        return not any(s <= m.start() and m.end() <= e for s, e in negated_spans)

    if not any(free(m) for p in modality for m in p.finditer(text)):
        return False
    return all(any(p.search(text) for p in group) for group in others)


# "CT" right after a hyphen is no cue (gene and marker names), so CT spelled with a prefix and a
# hyphen got no label: "PET-CT" and "SPECT-CT" (the commonest spellings of "PET/CT"), "3D-CT",
# "4D-CT", "MS-CT" (multislice), "MD-CT", "HR-CT", "DE-CT" (dual-energy), "CE-CT" (contrast-
# enhanced), "NC-CT"/"NE-CT" (non-contrast). Those prefixes are read with a space instead.
_HYPHENATED_CT = re.compile(
    r"(?<![A-Za-z0-9])(PET|SPECT|[34]-?D|MS|MD|HR|DE|CE|NC|NE)\s*[-\u2010\u2011]\s*"
    r"(?=CTs?(?![A-Za-z0-9]))"
)


def domain_scores(text: str) -> dict[str, tuple[int, int, bool]]:
    """Per domain: (strong cues, weak cues, anti cue present) found in ``text``."""
    rules = _rules()
    text = _HYPHENATED_CT.sub(r"\1 ", text)
    text = _blank_not_image(text, rules)
    out = {}
    for name, dom in rules.domains.items():
        strong = _strong_hits(text, dom, rules)
        weak = sum(1 for p in dom.weak if p.search(text))
        anti = any(p.search(text) for p in dom.anti)
        out[name] = (strong, weak, anti)
    return out


def is_chart(caption: str) -> bool:
    """A figure of data (a ROC curve, a Kaplan-Meier plot, a flowchart, a network diagram),
    named in the caption's first sentence. Most PMC figures are such plots, and their captions
    name modalities as the data's source ("ROC curves of CT-based radiomics"): no domain."""
    first = re.split(r"(?<=[.!?])\s", caption.strip(), maxsplit=1)[0]
    starts = [m.start() for p in _rules().chart if (m := p.search(first))]
    if not starts:
        return False
    # A modality named before the chart is a panel of the figure: "(A) Axial CT image of the
    # tumour; (B) box plot of tumour volumes", "H&E-stained sections (A, B) and a bar graph of
    # the scores (C)" are compound figures with an image in them, and got no domain.
    return not any(strong for strong, _, _ in domain_scores(first[: min(starts)]).values())


def classify_text(caption: str, mentions: Iterable[str] | None = None) -> dict[str, bool]:
    """The five domain flags for a figure; all False means "other"."""
    labels = empty_domain()
    if is_chart(caption or ""):
        return labels
    scores = domain_scores(caption or "")
    any_strong = any(s for s, _, _ in scores.values())
    for name, (strong, weak, anti) in scores.items():
        if strong:
            labels[name] = True
        elif not any_strong and weak >= 2 and not anti:
            labels[name] = True
    if not any(labels.values()) and not any_strong and mentions:
        joined = " ".join(m for m in mentions if m)
        for name, (strong, _weak, _anti) in domain_scores(joined).items():
            if strong:
                labels[name] = True
    return labels


def classify_record(record: dict) -> dict[str, bool]:
    return classify_text(str(record.get("fig_caption") or ""), mention_sentences(record))


def label_record(record: dict) -> dict:
    """A copy of ``record`` with its ``domain`` replaced by the classifier's labels."""
    return {**record, "domain": classify_record(record)}


def gold_labels(record: dict) -> dict[str, bool]:
    """A record's reference labels: a ``domain`` dict of flags, or a list of domain names."""
    gold = record.get("domain")
    if isinstance(gold, dict):
        return {d: bool(gold.get(d)) for d in DOMAINS}
    if isinstance(gold, (list, tuple)):
        return {d: d in gold for d in DOMAINS}
    if isinstance(gold, str):
        return {d: d == gold for d in DOMAINS}
    return empty_domain()


def merge_duplicate_figures(records: Iterable[dict]) -> tuple[list[dict], int]:
    """One record per ``pair_id``, in first-seen order, with the ``domain`` flags of all its
    copies ORed; returns (records, number of copies merged). LLaVA-Med's ``{domain: [records]}``
    caption JSON files one figure under several domains: each copy is the same figure, so it is
    written, labelled and counted once. The first copy's other fields win; records without a
    ``pair_id`` are never merged."""
    out: list[dict] = []
    index: dict[str, int] = {}
    merged = 0
    for rec in records:
        pid = rec.get("pair_id")
        key = str(pid) if pid is not None and str(pid).strip() else None
        if key is None or key not in index:
            if key is not None:
                index[key] = len(out)
            out.append(rec)
            continue
        merged += 1
        first = out[index[key]]
        if "domain" in first or "domain" in rec:
            a, b = gold_labels(first), gold_labels(rec)
            out[index[key]] = {**first, "domain": {d: a[d] or b[d] for d in DOMAINS}}
    return out, merged


def evaluate_domains(records: Iterable[dict]) -> dict:
    """Per-domain precision, recall, F1 and support of the classifier against each record's gold
    ``domain`` (flags dict, list of names, or one name; none/"other" = no domain).

    Returns ``{"n": N, "exact_match": share, "domains": {name: {precision, recall, f1, support,
    tp, fp, fn}}}``. Precision of a domain the classifier never predicts is 1.0 when it has no
    support, else 0.0."""
    counts = {d: {"tp": 0, "fp": 0, "fn": 0} for d in DOMAINS}
    n = exact = 0
    for rec in records:
        gold = gold_labels(rec)
        pred = classify_record(rec)
        n += 1
        exact += gold == pred
        for d in DOMAINS:
            if pred[d] and gold[d]:
                counts[d]["tp"] += 1
            elif pred[d]:
                counts[d]["fp"] += 1
            elif gold[d]:
                counts[d]["fn"] += 1
    out = {}
    for d, c in counts.items():
        tp, fp, fn = c["tp"], c["fp"], c["fn"]
        precision = tp / (tp + fp) if tp + fp else (1.0 if tp + fn == 0 else 0.0)
        recall = tp / (tp + fn) if tp + fn else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[d] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": tp + fn,
            **c,
        }
    return {"n": n, "exact_match": round(exact / n, 4) if n else 0.0, "domains": out}
