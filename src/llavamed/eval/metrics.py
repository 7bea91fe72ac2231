"""VQA metrics as pure functions: LLaVA-Med's lenient metric (for comparability) and strict ones.

Two families, always reported side by side and never mixed up:

* **LLaVA-Med metric** — what ``llava/eval/run_eval_batch.py`` in microsoft/LLaVA-Med computed
  for the paper's Table 4. Both strings go through :func:`normalize_answer` (VQA-v2 style
  normalisation as LLaVA-Med's ``glossary.normalize_word`` does it); closed accuracy is
  "normalised answer is a *substring* of the normalised prediction" (so "no" matches "normal"),
  open "recall" is the token recall of ``calculate_f1score`` (with its multiplicity quirk, see
  :func:`llava_med_open_recall`).
* **Strict metrics** — closed accuracy from an explicit yes/no parse (no or ambiguous answer is
  wrong), exact match, SQuAD-style token F1 and sentence BLEU-1..4.

All scores are fractions in [0, 1]; reports multiply by 100.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

# --- LLaVA-Med's normalisation ------------------------------------------------------------------
# These tables reproduce the *behaviour* of LLaVA-Med's glossary.py (itself from the VQA-v2
# evaluation script). Only the punctuation below is touched; ':', "'", '%', '#', '*', '&' survive.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`")
_PUNCT += (",", "?", "!")
# A period not followed by a digit (so "2.5" keeps its point). LLaVA-Med passed re.UNICODE (32) as
# the *count* argument of re.sub, so at most 32 periods are removed; we keep that for parity.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_MAX = 32
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# SLAKE's Chinese questions (--lang zh): Chinese has no spaces between words, so whitespace
# tokens would make recall and F1 all-or-nothing; each Han character is a token instead (the
# usual character-level scoring for Chinese). Text without Han characters is untouched, so the
# English metrics keep exact parity with LLaVA-Med's.
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAN_TOKEN = re.compile(rf"[{_HAN}]|[^\s{_HAN}]+")
_FULLWIDTH_PUNCT = re.compile(
    r"[\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]"
)
# VQA-v2's contraction table, which LLaVA-Med's glossary.py applies word by word after
# lowercasing ("dont" -> "don't"), complete for parity: its capitalised keys can never match,
# and "somebody'd" -> "somebodyd" is the original's slip, kept because the paper's numbers have it.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def normalize_answer(text: str) -> str:
    """Normalise an answer the way LLaVA-Med's evaluation did.

    Lowercase; each listed punctuation mark is deleted when it touches a space (or the text has a
    digit-comma-digit group) and replaced by a space otherwise; periods not followed by a digit are
    dropped; number words zero..ten (and "none") become digits; articles are dropped; a few
    contractions are restored; remaining commas are removed.
    """
    text = str(text).lower()
    out = _FULLWIDTH_PUNCT.sub(" ", text)  # Chinese punctuation (none in English text)
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        # The decision looks at the *original* text, the replacement at the running result:
        # LLaVA-Med's loop does exactly this.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_MAX)
    words = []
    for w in out.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words).replace(",", "")


def _tokens(normalized: str) -> list[str]:
    """Whitespace tokens, with each Han character a token of its own."""
    return _HAN_TOKEN.findall(normalized)


# --- LLaVA-Med metric -------------------------------------------------------------------------


def llava_med_closed_hit(prediction: str, answer: str) -> float:
    """1.0 if the normalised answer is a substring of the normalised prediction, else 0.0.

    Lenient by construction: "no" is found in "normal" or "not", "yes" in "eyes"."""
    return 1.0 if normalize_answer(answer) in normalize_answer(prediction) else 0.0


def llava_med_open_hit(prediction: str, answer: str) -> float:
    """LLaVA-Med's "open accuracy" (not the paper's headline open metric): substring hit."""
    return llava_med_closed_hit(prediction, answer)


def _llava_med_prf(prediction: str, answer: str) -> tuple[float, float, float]:
    # calculate_f1score: counts are word multiplicities, but true positives are counted with the
    # *prediction's* multiplicity, so a repeated correct word inflates recall (see docs).
    pred = Counter(_tokens(normalize_answer(normalize_answer(prediction))))
    ref = Counter(_tokens(normalize_answer(normalize_answer(answer))))
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(c for w, c in pred.items() if w in ref)
    fp = sum(c for w, c in pred.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in pred)
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def llava_med_open_recall(prediction: str, answer: str) -> float:
    """The paper's open-question "recall": share of answer tokens found among prediction tokens.

    Reproduces ``calculate_f1score``'s recall exactly, including its quirk that matched tokens are
    counted with the prediction's multiplicity: answer "left lung", prediction "left left" gives
    tp=2, fn=1, recall 2/3 (a plain token recall would say 1/2)."""
    return _llava_med_prf(prediction, answer)[2]


# --- strict metrics ---------------------------------------------------------------------------

# Joined, not split: apostrophes ("don't" -> "dont", so a contraction stays one token) and a
# comma between digits ("1,000" -> "1000").
_STRICT_JOIN = re.compile(r"['\u2019]|(?<=\d),(?=\d)")
# Everything else that is not a word character is a word break; a decimal point between digits
# stays. "_" too (\w holds it): markdown's _yes_.
_STRICT_SPLIT = re.compile(r"[^\w\s.]|_|(?<!\d)\.|\.(?!\d)", re.UNICODE)


def _nfkc(text: object) -> str:
    return unicodedata.normalize("NFKC", str(text))


def normalize_strict(text: str) -> str:
    """Lowercase; every punctuation mark a word break (a decimal point between digits stays;
    apostrophes and digit-grouping commas join); number words zero..ten (and "none") become
    digits; articles dropped. Used by exact match, token F1, BLEU and the yes/no parse.

    Each mark is treated the same wherever it is. :func:`normalize_answer` (LLaVA-Med's) decides
    per mark from the whole string, so there one bullet ("- X-ray") or one "2,5" turned every
    hyphen in the text from a break into nothing ("xray", "t2weighted").

    Compatibility forms are folded first (NFKC): full-width letters and digits, which Chinese
    input methods type, are the ASCII ones ("ＣＴ" is "ct", "ｙｅｓ" is a yes), and an accent
    typed as a combining mark is the accented letter (it was a word break)."""
    text = _FULLWIDTH_PUNCT.sub(" ", _nfkc(text).lower())
    text = _STRICT_SPLIT.sub(" ", _STRICT_JOIN.sub("", text))
    words = (_NUMBER_WORDS.get(w, w) for w in text.split())
    return " ".join(w for w in words if w not in _ARTICLES)


def parse_yes_no(prediction: str) -> str | None:
    """Explicit yes/no reading of a prediction: ``"yes"``, ``"no"`` or ``None``.

    The first word decides when it is yes or no ("No, there is no effusion" -> no), unless it
    opens a hedge: "yes or no", "yes and no", "yes/no" (also "Yes, or no") are None, or a model
    answering "Yes or no" to everything would be right on every yes question. An answer word that
    punctuation, a line break, a dash standing apart or a bracket closes decides on its own: "Yes,
    no effusion is seen", "Yes\n\nNo other findings" and "Yes - no mass" are yes. Otherwise the
    prediction must contain exactly one of the two words; both or neither is ambiguous (None). A
    yes/no right after "not" ("not yes") is no answer either. Substrings never count: "normal"
    is not "no". Chinese (Han) text is read by its opening: 是/有/对 yes; 不是/否/没/未/无/不 no;
    a restated question (是否, 是不是, 有没有), a hedge (不确定, 无法, 未必, ...) or an apology
    (对不起) is None."""
    prediction = _nfkc(prediction)  # the regexes below read it too: "ｙｅｓ，ｎｏ ｍａｓｓ"
    if re.search(f"[{_HAN}]", prediction):
        return _parse_zh_yes_no(normalize_strict(prediction).replace(" ", ""))
    toks = _tokens(normalize_strict(prediction))
    if not toks:
        return None
    # "No idea" / "I have no idea" is a non-answer, not a no.
    toks = [
        t if not (t == "no" and toks[i + 1 : i + 2] == ["idea"]) else "" for i, t in enumerate(toks)
    ]
    first = toks[0]
    if first in _YES_NO:
        other = _YES_NO[first]
        if _HEDGE.match(prediction):
            return None  # "yes or no", "Yes, or no", "yes and no." (not "Yes, and no mass")
        if re.match(r"\W*(?:yes|no)\W*?[,;:.!]", prediction, re.I):
            return first  # closed by punctuation: "Yes, no effusion is seen"
        if len(toks) > 2 and _SOFT_CLOSE.match(prediction):
            return first  # "Yes\nNo other findings", "Yes - no mass", "Yes (no effusion)"
        if toks[1:2] == [other]:
            return None  # "yes/no", "No-yes"
        return first
    # "not" negates a yes/no in its own clause only: "Is it normal or not? No." answers no.
    found, negated = set(), False
    for clause in _CLAUSE_BREAK.split(prediction):
        ct = _tokens(normalize_strict(clause))
        for i, t in enumerate(ct):
            if t not in _YES_NO or (t == "no" and ct[i + 1 : i + 2] == ["idea"]):
                continue
            if i and ct[i - 1] == "not":
                negated = True
            else:
                found.add(t)
    return found.pop() if len(found) == 1 and not negated else None


_CLAUSE_BREAK = re.compile(r"[,;:!?\uff0c\uff1b\uff1a\uff01\uff1f\u3002]|\.(?!\d)")


_YES_NO = {"yes": "no", "no": "yes"}
# An answer word that a line break, a dash standing apart (" - ", an en or em dash) or an opening
# bracket separates from what follows: the answer ends there, as at a comma. Only when more words
# follow the other answer word: a bare "Yes\nno" or "Yes - no" still restates the options.
_SOFT_CLOSE = re.compile(
    r"\W*(?:yes|no)[*_`]*(?:[^\S\n]*\n|\s+-\s|\s*[\u2013\u2014]|\s*[(\[])", re.I
)
# Both answer words joined as a pair and then nothing, a clause break or a line break: the options
# restated.
_HEDGE = re.compile(r"\W*(yes|no)\W*(and|or)\W+(yes|no)(?!\w)[\s*_`]*(?:$|[,;:.!?\n])", re.I)
# SLAKE's Chinese closed answers are 是 (yes) and 否 (no); replies open with the answer word.
_ZH_ANSWER = {"是": "yes", "否": "no"}
# 没/未 open the radiology report's negatives: 没见到 ("not seen"), 未见异常 ("no abnormality seen").
_ZH_NO_OPENINGS = ("不是", "否", "没", "未", "无", "不")
_ZH_YES_OPENINGS = ("是", "有", "对")
# Openings that begin like an answer word but are no answer: a restated question ("whether",
# "is it or not", "is there or not"), a hedge ("not sure", "unclear", "don't know", "cannot",
# "unable to", "not necessarily", "possibly") or an apology ("sorry, I cannot answer").
_ZH_NO_ANSWER = (
    "是否", "是不是", "有没有", "有无", "不确定", "不清楚", "不知道", "不能", "不好说", "不一定",
    "无法", "有可能", "对不起", "未必", "没法", "没办法", "未知",
)  # fmt: skip


def _parse_zh_yes_no(text: str) -> str | None:
    if text.startswith(_ZH_NO_ANSWER):
        return None
    if text.startswith(_ZH_NO_OPENINGS):
        return "no"
    if text.startswith(_ZH_YES_OPENINGS):
        return "yes"
    return None


def is_yes_no(answer: str) -> bool:
    """An English yes/no answer (decides the closed suffix and the answer type)."""
    return normalize_strict(answer) in ("yes", "no")


def _yes_no_value(answer: str) -> str | None:
    norm = normalize_strict(answer)
    if norm in ("yes", "no"):
        return norm
    return _ZH_ANSWER.get(norm.replace(" ", ""))


def strict_closed_hit(prediction: str, answer: str) -> float:
    """Closed accuracy without leniency: yes/no answers need the parsed yes/no to match; other
    closed answers (SLAKE's "left or right?") need an exact normalised match."""
    truth = _yes_no_value(answer)
    if truth is not None:
        return 1.0 if parse_yes_no(prediction) == truth else 0.0
    return exact_match(prediction, answer)


def exact_match(prediction: str, answer: str) -> float:
    return 1.0 if normalize_strict(prediction) == normalize_strict(answer) else 0.0


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style F1 over :func:`normalize_strict` tokens (multiset overlap)."""
    pred = _tokens(normalize_strict(prediction))
    ref = _tokens(normalize_strict(answer))
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    p = overlap / len(pred)
    r = overlap / len(ref)
    return 2 * p * r / (p + r)


BLEU_SMOOTH_EPS = 0.1


def sentence_bleu(prediction: str, answer: str, n: int) -> float:
    """Cumulative sentence BLEU-``n`` (uniform weights over orders 1..n, brevity penalty).

    VQA answers are often one or two words, where plain BLEU-4 is undefined or zero. Two documented
    choices make it meaningful: the effective order is ``min(n, len(hyp), len(ref))`` (a one-word
    exact answer scores 1 at every n), and an order with no matching n-gram gets
    ``BLEU_SMOOTH_EPS / count`` instead of 0 (Chen & Cherry 2014, method 1). As in NLTK's
    method 1, no matching word at all scores 0: smoothing must not give a wrong answer credit
    that grows with n. Empty -> 0.
    """
    if n < 1:
        raise ValueError("BLEU order must be >= 1")
    hyp = _tokens(normalize_strict(prediction))
    ref = _tokens(normalize_strict(answer))
    if not hyp or not ref:
        return 0.0
    order = min(n, len(hyp), len(ref))
    log_sum = 0.0
    for k in range(1, order + 1):
        h = Counter(tuple(hyp[i : i + k]) for i in range(len(hyp) - k + 1))
        r = Counter(tuple(ref[i : i + k]) for i in range(len(ref) - k + 1))
        total = sum(h.values())
        match = sum((h & r).values())
        if k == 1 and not match:
            return 0.0
        p = match / total if match else BLEU_SMOOTH_EPS / total
        log_sum += math.log(p)
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_sum / order)


# --- per-sample scores and aggregation -------------------------------------------------------

# Metric keys, in display order, with their label and which answer type they apply to.
METRICS: dict[str, tuple[str, str]] = {
    "llava_med_closed_acc": ("LLaVA-Med metric: closed accuracy (substring)", "closed"),
    "llava_med_open_recall": ("LLaVA-Med metric: open recall", "open"),
    "llava_med_open_hit": ("LLaVA-Med metric: open substring hit", "open"),
    "strict_closed_acc": ("strict: closed accuracy (yes/no parse)", "closed"),
    "closed_unparsed": ("strict: closed, no/ambiguous yes-no (share)", "closed"),
    "exact_match": ("strict: exact match", "all"),
    "open_exact_match": ("strict: open exact match", "open"),
    "token_f1": ("strict: token F1", "all"),
    "open_token_f1": ("strict: open token F1", "open"),
    "bleu1": ("strict: open BLEU-1", "open"),
    "bleu2": ("strict: open BLEU-2", "open"),
    "bleu3": ("strict: open BLEU-3", "open"),
    "bleu4": ("strict: open BLEU-4", "open"),
}

# The two numbers the paper's Table 4 reports, and the strict metrics that stand beside them.
HEADLINE = (
    "llava_med_open_recall",
    "llava_med_closed_acc",
    "strict_closed_acc",
    "open_exact_match",
)


def score_sample(prediction: str, answer: str, answer_type: str) -> dict[str, float]:
    """All metrics that apply to one question (closed questions get closed metrics, open ones
    open metrics; exact match and F1 apply to both)."""
    if answer_type not in ("open", "closed"):
        raise ValueError(f"answer_type must be 'open' or 'closed', not {answer_type!r}")
    s: dict[str, float] = {
        "exact_match": exact_match(prediction, answer),
        "token_f1": token_f1(prediction, answer),
    }
    if answer_type == "closed":
        s["llava_med_closed_acc"] = llava_med_closed_hit(prediction, answer)
        s["strict_closed_acc"] = strict_closed_hit(prediction, answer)
        if _yes_no_value(answer) is not None:
            s["closed_unparsed"] = 1.0 if parse_yes_no(prediction) is None else 0.0
    else:
        s["llava_med_open_recall"] = llava_med_open_recall(prediction, answer)
        s["llava_med_open_hit"] = llava_med_open_hit(prediction, answer)
        s["open_exact_match"] = s["exact_match"]
        s["open_token_f1"] = s["token_f1"]
        for k in (1, 2, 3, 4):
            s[f"bleu{k}"] = sentence_bleu(prediction, answer, k)
    return s


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (seeded, so reports reproduce).

    With ``clusters`` (one label per value, e.g. the image a question is about), whole clusters
    are resampled: VQA-RAD and SLAKE ask several questions about each image, and those answers
    rise and fall together, so resampling questions one by one gives intervals that are too
    narrow. Every value its own cluster is the plain bootstrap, draw for draw.

    Returns (nan, nan) for no values; a single value gives a zero-width interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if clusters is None:
        sums, counts = x, np.ones_like(x)
    else:
        if len(clusters) != x.size:
            raise ValueError("one cluster label per value")
        codes: dict = {}
        inv = np.fromiter((codes.setdefault(c, len(codes)) for c in clusters), np.int64, x.size)
        sums = np.bincount(inv, weights=x)
        counts = np.bincount(inv).astype(np.float64)
    k = sums.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    # Chunked so PathVQA-sized sets (6761 x 1000) stay within a few MB.
    chunk = max(1, 2_000_000 // k)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, k, size=(stop - start, k))
        means[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Resampled ratios of sums and the plain mean can differ in the last bit when every value is
    # the same non-dyadic number (2/3): keep the interval around the estimate, or an error bar
    # of mean - lo comes out at -1e-16 and matplotlib refuses it.
    mean = float(x.mean())
    return (min(float(lo), mean), max(float(hi), mean))


def paired_bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    clusters: Sequence | None = None,
) -> dict[str, float]:
    """Mean of ``a - b`` over paired items (same questions), with a percentile bootstrap CI
    (resampling ``clusters`` whole when given, see :func:`bootstrap_ci`), and the means of ``a``
    and ``b`` over those same items (``mean_a``, ``mean_b``: their difference is ``mean``)."""
    if len(a) != len(b):
        raise ValueError("paired samples must have equal length")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = x - y
    lo, hi = bootstrap_ci(d, n_resamples, alpha, seed, clusters)
    if not d.size:
        return {
            "mean": math.nan,
            "lo": lo,
            "hi": hi,
            "n": 0,
            "mean_a": math.nan,
            "mean_b": math.nan,
        }
    return {
        "mean": float(d.mean()),
        "lo": lo,
        "hi": hi,
        "n": int(d.size),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
    }


def aggregate(
    scores: Iterable[dict],
    n_resamples: int = 1000,
    seed: int = 0,
    keys: Iterable[str] | None = None,
    cluster: str = "image",
) -> dict[str, dict[str, float]]:
    """Mean, 95% bootstrap CI and count for each metric over the scores that carry it. Rows
    with a ``cluster`` field (the question's image) are resampled image by image."""
    scores = list(scores)
    out: dict[str, dict[str, float]] = {}
    for key in keys if keys is not None else METRICS:
        rows = [(i, s) for i, s in enumerate(scores) if key in s]
        if not rows:
            continue
        vals = [s[key] for _, s in rows]
        groups = [s.get(cluster, ("row", i)) for i, s in rows]
        lo, hi = bootstrap_ci(vals, n_resamples=n_resamples, seed=seed, clusters=groups)
        out[key] = {"mean": float(np.mean(vals)), "lo": lo, "hi": hi, "n": len(vals)}
    return out
