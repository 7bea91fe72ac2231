"""Hand-computed checks of the VQA metrics (LLaVA-Med's lenient metric and the strict ones)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llavamed.eval import metrics as m


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes.", "yes"),
        ("The Answer is: No", "answer is: no"),  # ':' is not in LLaVA-Med's punctuation list
        ("There are two lesions, 1,000 cells", "there are 2 lesions 1000 cells"),
        ("left-sided (effusion)", "left sided effusion"),
        ("x - ray", "x ray"),  # '-' touching a space is deleted, not spaced
        ("2.5 cm.", "2.5 cm"),  # decimal point kept, final period dropped
        ("none", "0"),
        ("an MRI of the brain", "mri of brain"),
        ("dont know", "don't know"),
        ("theyll hows youll oclock", "they'll how's you'll o'clock"),  # VQA-v2's full table
        ("somebody'd", "somebodyd"),  # the reference table's slip, kept for parity
    ],
)
def test_normalize_answer_matches_llava_med(raw, expected):
    assert m.normalize_answer(raw) == expected


def test_period_removal_is_capped_like_the_reference():
    text = "." * 40 + "x"
    assert m.normalize_answer(text) == "." * 8 + "x"


def test_llava_med_closed_is_lenient_substring():
    assert m.llava_med_closed_hit("Yes, it is.", "yes") == 1.0
    assert m.llava_med_closed_hit("The heart is normal", "no") == 1.0  # the known leniency
    assert m.llava_med_closed_hit("Yes", "no") == 0.0


def test_llava_med_open_recall_hand_computed():
    assert m.llava_med_open_recall("right lower lobe", "right lung") == pytest.approx(0.5)
    # prediction-multiplicity quirk: tp=2 (left x2), fn=1 (lung) -> 2/3
    assert m.llava_med_open_recall("left left", "left lung") == pytest.approx(2 / 3)
    assert m.llava_med_open_recall("", "left lung") == 0.0
    assert m.llava_med_open_recall("the pancreas", "Pancreas.") == 1.0


def test_parse_yes_no():
    assert m.parse_yes_no("No, there is no effusion") == "no"
    assert m.parse_yes_no("Yes.") == "yes"
    assert m.parse_yes_no("I think yes") == "yes"
    assert m.parse_yes_no("normal heart") is None  # substring never counts
    assert m.parse_yes_no("maybe yes or no") is None  # ambiguous
    assert m.parse_yes_no("") is None
    # Hedges and negated answers are not answers (a model saying "Yes or no" to everything
    # must not get every yes question).
    for hedge in (
        "yes and no",
        "Yes or no.",
        "yes/no",
        "No-yes",
        "not yes",
        "Not no",
        "not yes, no",
    ):
        assert m.parse_yes_no(hedge) is None, hedge
    assert m.parse_yes_no("Yes, there is no effusion") == "yes"
    assert m.parse_yes_no("No, and there is no mass") == "no"
    assert m.parse_yes_no("it is not present, so no") == "no"
    # A comma closes the answer's clause: the "no" after it belongs to the finding.
    assert m.parse_yes_no("Yes, no effusion is seen") == "yes"
    assert m.parse_yes_no("No; yes-no questions aside, there is none") == "no"
    assert m.parse_yes_no("Yes, or no.") is None  # still a hedge
    assert m.parse_yes_no("**Yes**, no effusion is seen") == "yes"  # markdown around it
    assert m.parse_yes_no("**Yes** or **no**") is None
    # A yes that goes on with "and no <finding>" is a yes, not the hedge "yes and no".
    assert m.parse_yes_no("Yes, and no other abnormality is seen.") == "yes"
    assert m.parse_yes_no("yes or no, it is hard to say") is None
    # "No idea" is no answer at all, wherever it stands.
    assert m.parse_yes_no("No idea.") is None
    assert m.parse_yes_no("I have no idea") is None
    # "not" negates only within its own clause: a restated "or not" question, then the answer.
    assert m.parse_yes_no("Is the liver normal or not? No.") == "no"
    assert m.parse_yes_no("It is not. Yes.") == "yes"
    assert m.parse_yes_no("Not no.") is None
    assert m.parse_yes_no("I have no idea. Yes.") == "yes"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("X-ray", "x ray"),
        # one bullet or one "2,5" used to turn every hyphen in the text into nothing
        ("- X-ray", "x ray"),
        ("- T2-weighted MRI", "t2 weighted mri"),
        ("ring-enhancing lesion, 2,5 cm", "ring enhancing lesion 25 cm"),
        ("1,000 ml", "1000 ml"),
        ("3.5 cm.", "3.5 cm"),
        ("Don't know", "dont know"),
        ("_Yes_", "yes"),
        ("The two lobes.", "2 lobes"),
        ("肝脏。", "肝脏"),
    ],
)
def test_normalize_strict_treats_each_mark_alike_wherever_it_stands(raw, expected):
    assert m.normalize_strict(raw) == expected


def test_strict_scores_do_not_depend_on_unrelated_punctuation():
    assert m.exact_match("- X-ray", "x-ray") == 1.0
    assert m.exact_match("- T2-weighted MRI", "t2-weighted mri") == 1.0
    # pred {ring, enhancing, lesion, 25, cm}, ref {ring, enhancing, lesion}: p=3/5, r=1, F1=0.75
    assert m.token_f1("ring-enhancing lesion, 2,5 cm", "ring-enhancing lesion") == pytest.approx(
        0.75
    )


def test_chinese_answers_are_scored_by_character():
    """SLAKE --lang zh: Chinese has no spaces, so whitespace tokens made recall all-or-nothing."""
    # Gold 肝脏 (2 characters), both found in a 9-character sentence: recall 1, precision 2/9.
    assert m.llava_med_open_recall("图像中显示的是肝脏", "肝脏") == 1.0
    assert m.token_f1("图像中显示的是肝脏", "肝脏") == pytest.approx(2 * (2 / 9) / (2 / 9 + 1))
    assert m.llava_med_open_recall("肝脏。", "肝脏") == 1.0  # full-width punctuation dropped
    assert m.exact_match("肝脏。", "肝脏") == 1.0
    assert m.llava_med_open_recall("左肺", "右肺") == pytest.approx(0.5)
    # Strict yes/no reads 是/否 and their usual openings; "不是" is no, not a "是".
    assert m.strict_closed_hit("是的", "是") == 1.0
    assert m.strict_closed_hit("不是", "是") == 0.0
    assert m.strict_closed_hit("没有，未见积液。", "否") == 1.0
    assert m.parse_yes_no("是否有积液") is None
    # Hedges and apologies open like answer words (不, 无, 有, 对) and are no answer.
    for hedge in (
        "不确定",
        "不清楚。",
        "无法判断",
        "对不起，我无法回答",
        "有可能",
        "是不是积液",
        "不能确定",
        "未知",
        "没办法判断",
    ):
        assert m.parse_yes_no(hedge) is None, hedge
        assert m.strict_closed_hit(hedge, "否") == 0.0 and m.strict_closed_hit(hedge, "是") == 0.0
    assert m.parse_yes_no("不对") == "no" and m.parse_yes_no("对，可见积液") == "yes"
    assert m.parse_yes_no("无，未见异常") == "no" and m.parse_yes_no("有，右肺") == "yes"
    # Report-style negatives open with 未 or a bare 没; 未必 / 没法 hedge.
    assert m.parse_yes_no("未见异常") == "no" and m.parse_yes_no("没见到积液") == "no"
    assert m.parse_yes_no("未必") is None and m.parse_yes_no("没法判断") is None
    assert m.score_sample("不是", "是", "closed")["closed_unparsed"] == 0.0
    # English is untouched: whitespace tokens, as LLaVA-Med's metric.
    assert m.llava_med_open_recall("left left", "left lung") == pytest.approx(2 / 3)


def test_strict_closed():
    assert m.strict_closed_hit("The heart is normal", "no") == 0.0
    assert m.strict_closed_hit("no.", "No") == 1.0
    assert m.strict_closed_hit("Left", "left") == 1.0  # non yes/no closed answers: exact match
    assert m.strict_closed_hit("left side", "left") == 0.0


def test_exact_and_f1():
    assert m.exact_match("The Pancreas.", "pancreas") == 1.0
    assert m.exact_match("pancreas head", "pancreas") == 0.0
    # pred {right, lower, lobe}, ref {right, lung}: overlap 1, p=1/3, r=1/2, F1=0.4
    assert m.token_f1("right lower lobe", "right lung") == pytest.approx(0.4)
    assert m.token_f1("", "") == 1.0
    assert m.token_f1("abc", "") == 0.0


def test_bleu_hand_computed():
    assert m.sentence_bleu("effusion", "effusion", 4) == 1.0  # order capped at 1
    # hyp "pleural effusion present" vs ref "pleural effusion": p1=2/3, p2=1/2, bp=1
    assert m.sentence_bleu("pleural effusion present", "pleural effusion", 2) == pytest.approx(
        math.sqrt(1 / 3)
    )
    # short hyp: bp = exp(1 - 3/1); p1 = 1
    assert m.sentence_bleu("lung", "right lung base", 1) == pytest.approx(math.exp(-2))
    # no matching word: 0 at every order (NLTK's method 1), not a smoothed floor that grows with n
    for n in (1, 2, 3, 4):
        assert m.sentence_bleu("heart", "lung", n) == 0.0
        assert m.sentence_bleu("x y z w", "a b c d", n) == 0.0
    # both words match but no bigram: p1 = 2/2, p2 smoothed to 0.1/1; BLEU-2 = sqrt(1 * 0.1)
    assert m.sentence_bleu("left heart", "heart left", 2) == pytest.approx(math.sqrt(0.1))
    assert m.sentence_bleu("", "lung", 1) == 0.0


def test_score_sample_keys_by_type():
    c = m.score_sample("yes", "yes", "closed")
    assert c["llava_med_closed_acc"] == 1 and c["strict_closed_acc"] == 1
    assert "llava_med_open_recall" not in c and c["closed_unparsed"] == 0.0
    o = m.score_sample("left lung", "left lung", "open")
    assert o["open_exact_match"] == 1 and o["bleu4"] == 1 and "strict_closed_acc" not in o
    with pytest.raises(ValueError):
        m.score_sample("a", "b", "OPEN")


def test_bootstrap_ci_is_seeded_and_sane():
    vals = [0.0, 1.0] * 50
    a = m.bootstrap_ci(vals, seed=3)
    assert a == m.bootstrap_ci(vals, seed=3)
    assert a[0] < 0.5 < a[1] and 0.35 < a[0] and a[1] < 0.65
    assert m.bootstrap_ci([1.0]) == (1.0, 1.0)
    # The interval holds the estimate even when resampled ratios round the other way: 2/3 on
    # every question, 5 questions an image, gave lo = 0.6666666666666666 > mean.
    vals, images = [2 / 3] * 10, [f"img{i % 5}" for i in range(10)]
    lo, hi = m.bootstrap_ci(vals, clusters=images)
    assert lo <= float(np.mean(vals)) <= hi
    assert all(math.isnan(v) for v in m.bootstrap_ci([]))


def test_bootstrap_resamples_whole_images():
    """10 images x 10 questions, every question about an image right or wrong together: the
    evidence is 10 images, not 100 questions, and the interval must say so."""
    vals = [float(i % 2) for i in range(10) for _ in range(10)]
    images = [f"img{i}" for i in range(10) for _ in range(10)]
    lo_q, hi_q = m.bootstrap_ci(vals, seed=0)
    lo_i, hi_i = m.bootstrap_ci(vals, seed=0, clusters=images)
    assert hi_i - lo_i > 2 * (hi_q - lo_q)
    # By hand: resampling 10 balanced images, the mean is Binomial(10, 0.5) / 10, whose central
    # 95% runs from 0.2 to 0.8.
    assert (lo_i, hi_i) == pytest.approx((0.2, 0.8), abs=0.051)
    # every question its own image: the plain bootstrap, draw for draw
    assert m.bootstrap_ci(vals, seed=0, clusters=list(range(100))) == (lo_q, hi_q)
    # unequal clusters: the mean is over questions, not over images
    rows = [{"strict_closed_acc": 1.0, "image": "a"}] * 3 + [
        {"strict_closed_acc": 0.0, "image": "b"}
    ]
    assert m.aggregate(rows, n_resamples=50)["strict_closed_acc"]["mean"] == 0.75
    with pytest.raises(ValueError, match="one cluster label per value"):
        m.bootstrap_ci([1.0, 0.0], clusters=["a"])


def test_aggregate_and_paired_diff():
    scores = [m.score_sample("yes", "yes", "closed"), m.score_sample("no", "yes", "closed")]
    agg = m.aggregate(scores, n_resamples=200)
    assert agg["llava_med_closed_acc"]["mean"] == 0.5 and agg["llava_med_closed_acc"]["n"] == 2
    assert "llava_med_open_recall" not in agg
    d = m.paired_bootstrap_diff([1, 1, 1, 1], [0, 1, 0, 1], n_resamples=200)
    assert d["mean"] == 0.5 and d["n"] == 4 and d["lo"] <= 0.5 <= d["hi"]


def test_an_answer_word_closed_by_a_line_break_dash_or_bracket_decides():
    """'Yes' on its own line, or set off by a dash or a bracket, ends the answer as a comma does:
    the 'no' that follows belongs to the finding (these parsed as no answer, scored wrong)."""
    for pred in (
        "Yes\n\nNo other findings are seen.",
        "**Yes**\nNo abnormality",
        "Yes - no mass is seen",
        "Yes \u2014 no effusion.",
        "Yes\u2013no acute findings",
        "Yes (no mass seen)",
        "Yes [no mass]",
    ):
        assert m.parse_yes_no(pred) == "yes", pred
        assert m.strict_closed_hit(pred, "yes") == 1.0, pred
    assert m.parse_yes_no("No\n\nYes, the lung is clear on the other side") == "no"
    # The bare options restated are still no answer, on one line or two.
    for hedge in ("Yes\nno", "Yes - no", "yes-no question", "Yes or no\nIt depends on the view"):
        assert m.parse_yes_no(hedge) is None, hedge


def test_strict_metrics_fold_full_width_letters_and_combining_accents():
    """Chinese input methods type full-width Latin letters and digits; a model trained on them
    answers 'ＣＴ' or 'ｙｅｓ'. They were other words than 'CT' and 'yes' (exact match 0, no
    yes/no at all), and a combining accent was a word break ('cafe\\u0301' was 'cafe')."""
    assert m.exact_match("ＣＴ", "CT") == 1.0
    assert m.exact_match("２个", "2个") == 1.0
    assert m.parse_yes_no("ｙｅｓ") == "yes"
    assert m.parse_yes_no("Ｎｏ，ｎｏ ｍａｓｓ") == "no"
    assert m.strict_closed_hit("ＹＥＳ", "yes") == 1.0
    assert m.exact_match("Me\u0301ne\u0301trier disease", "Ménétrier disease") == 1.0
    assert m.token_f1("ＣＴ ｓｃａｎ", "CT") == pytest.approx(2 / 3)
    # The LLaVA-Med metric is the reference's, untouched.
    assert m.normalize_answer("ＣＴ") == "ｃｔ"
