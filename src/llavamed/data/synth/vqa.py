"""VQA question templates (English, a Chinese subset), answer derivation and the balanced
per-image question selection used to build the VQA-RAD- and SLAKE-shaped sets.

Anti-leak rules: every template's text is asked for both answers; templates with a slot ("Is the
effusion on the {side} side?") fill it with the truth or a distractor with equal probability; and
:class:`Balancer` keeps yes and no within one of each other for every exact question text in every
split, so a question-only model cannot beat chance on closed questions.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llavamed.data.synth.attributes import GROSS_COLORS, GROSS_ORGANS, SIDES

YES, NO = "yes", "no"


def _yn(b: bool) -> str:
    return YES if b else NO


def _slot(rng: np.random.Generator, truth: str, options: tuple) -> tuple[str, str]:
    """The truth with probability 1/2, else a uniformly drawn distractor; and the answer."""
    if rng.random() < 0.5:
        return truth, YES
    others = [o for o in options if o != truth]
    return others[int(rng.integers(len(others)))], NO


@dataclass(frozen=True)
class Template:
    tid: str
    answer_type: str  # "CLOSED" (yes/no) | "OPEN"
    question_type: str  # VQA-RAD style: PRES, POS, ABN, MODALITY, ORGAN, SIZE, COUNT, ATTRIB, COLOR
    content_type: str  # SLAKE style: Abnormality, Position, Modality, Organ, Size, Quantity, Color
    en: str
    zh: str | None
    answer: Callable  # (attrs, rng) -> (slots, answer) | None when not applicable


def _const(fn):
    return lambda a, rng: ({}, fn(a))


def _when(cond, fn):
    return lambda a, rng: fn(a, rng) if cond(a) else None


MODALITY = {
    "chest_xray": "x-ray",
    "ct_scan": "ct",
    "mri": "mri",
    "histology": "histology",
    "gross": "gross",
}
BODY_PART = {"chest_xray": "chest", "ct_scan": "abdomen", "mri": "brain"}


def _common(domain: str) -> list[Template]:
    out = [
        Template(
            "modality",
            "OPEN",
            "MODALITY",
            "Modality",
            "What imaging modality is this?",
            "这是什么成像方式？",
            _const(lambda a: MODALITY[domain]),
        ),
    ]
    if domain in BODY_PART:
        out.append(
            Template(
                "organ_shown",
                "OPEN",
                "ORGAN",
                "Organ",
                "Which part of the body is shown?",
                "图中显示的是身体的哪个部位？",
                _const(lambda a: BODY_PART[domain]),
            )
        )
    return out


CXR = [
    Template(
        "cxr_effusion",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there a pleural effusion?",
        "是否有胸腔积液？",
        _const(lambda a: _yn(a.effusion)),
    ),
    Template(
        "cxr_cardiomegaly",
        "CLOSED",
        "SIZE",
        "Abnormality",
        "Is the heart enlarged?",
        "心脏是否增大？",
        _const(lambda a: _yn(a.cardiomegaly)),
    ),
    Template(
        "cxr_ett",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is an endotracheal tube present?",
        "是否有气管插管？",
        _const(lambda a: _yn(a.ett)),
    ),
    Template(
        "cxr_cvc",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there a central venous catheter?",
        None,
        _const(lambda a: _yn(a.central_line)),
    ),
    Template(
        "cxr_pacemaker",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is a pacemaker present?",
        "是否有起搏器？",
        _const(lambda a: _yn(a.pacemaker)),
    ),
    Template(
        "cxr_nodule",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there a pulmonary nodule?",
        "是否有肺结节？",
        _const(lambda a: _yn(a.nodule)),
    ),
    Template(
        "cxr_consolidation",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there consolidation in the lungs?",
        "肺部是否有实变？",
        _const(lambda a: _yn(a.consolidation)),
    ),
    Template(
        "cxr_effusion_side",
        "CLOSED",
        "POS",
        "Position",
        "Is the effusion on the {side} side?",
        "积液在{side}侧吗？",
        _when(
            lambda a: a.effusion,
            lambda a, rng: (lambda s: ({"side": s[0]}, s[1]))(_slot(rng, a.effusion_side, SIDES)),
        ),
    ),
    Template(
        "cxr_nodule_side",
        "CLOSED",
        "POS",
        "Position",
        "Is the nodule in the {side} lung?",
        "结节在{side}肺吗？",
        _when(
            lambda a: a.nodule,
            lambda a, rng: (lambda s: ({"side": s[0]}, s[1]))(_slot(rng, a.nodule_side, SIDES)),
        ),
    ),
    Template(
        "cxr_cons_lobe",
        "CLOSED",
        "POS",
        "Position",
        "Does the consolidation involve the {lobe} lobe?",
        None,
        _when(
            lambda a: a.consolidation,
            lambda a, rng: (lambda s: ({"lobe": s[0]}, s[1]))(
                _slot(rng, a.consolidation_lobe, ("upper", "lower"))
            ),
        ),
    ),
    Template(
        "cxr_effusion_side_open",
        "OPEN",
        "POS",
        "Position",
        "Which side is the pleural effusion on?",
        "胸腔积液在哪一侧？",
        _when(lambda a: a.effusion, lambda a, rng: ({}, a.effusion_side)),
    ),
    Template(
        "cxr_nodule_where",
        "OPEN",
        "POS",
        "Position",
        "Where is the nodule located?",
        None,
        _when(lambda a: a.nodule, lambda a, rng: ({}, f"{a.nodule_side} {a.nodule_lobe} lobe")),
    ),
    Template(
        "cxr_cons_where",
        "OPEN",
        "POS",
        "Position",
        "Where is the consolidation?",
        None,
        _when(
            lambda a: a.consolidation,
            lambda a, rng: ({}, f"{a.consolidation_side} {a.consolidation_lobe} lobe"),
        ),
    ),
    Template(
        "cxr_cvc_side",
        "OPEN",
        "POS",
        "Position",
        "On which side is the central line inserted?",
        None,
        _when(lambda a: a.central_line, lambda a, rng: ({}, a.central_line_side)),
    ),
    Template(
        "cxr_devices",
        "OPEN",
        "COUNT",
        "Quantity",
        "How many medical devices are visible?",
        "可以看到几个医疗器械？",
        _const(lambda a: str(int(a.ett) + int(a.central_line) + int(a.pacemaker))),
    ),
]

CT = [
    Template(
        "ct_lesion",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there a focal lesion?",
        "是否有局灶性病变？",
        _const(lambda a: _yn(a.lesion)),
    ),
    Template(
        "ct_contrast",
        "CLOSED",
        "ATTRIB",
        "Modality",
        "Was intravenous contrast given?",
        "是否使用了静脉造影剂？",
        _const(lambda a: _yn(a.contrast)),
    ),
    Template(
        "ct_lesion_organ",
        "CLOSED",
        "POS",
        "Organ",
        "Is the lesion in the {organ}?",
        "病变位于{organ}吗？",
        _when(
            lambda a: a.lesion,
            lambda a, rng: (lambda s: ({"organ": s[0]}, s[1]))(
                _slot(rng, a.organ, ("liver", "kidney"))
            ),
        ),
    ),
    Template(
        "ct_lesion_side",
        "CLOSED",
        "POS",
        "Position",
        "Is the lesion on the {side} side?",
        "病变在{side}侧吗？",
        _when(
            lambda a: a.lesion,
            lambda a, rng: (lambda s: ({"side": s[0]}, s[1]))(_slot(rng, a.side, SIDES)),
        ),
    ),
    Template(
        "ct_density",
        "CLOSED",
        "ATTRIB",
        "Abnormality",
        "Is the lesion {density}?",
        None,
        _when(
            lambda a: a.lesion,
            lambda a, rng: (lambda s: ({"density": s[0]}, s[1]))(
                _slot(rng, a.density, ("hypodense", "hyperdense"))
            ),
        ),
    ),
    Template(
        "ct_which_organ",
        "OPEN",
        "ORGAN",
        "Organ",
        "Which organ contains the lesion?",
        "哪个器官有病变？",
        _when(lambda a: a.lesion, lambda a, rng: ({}, a.organ)),
    ),
    Template(
        "ct_which_side",
        "OPEN",
        "POS",
        "Position",
        "Which side is the lesion on?",
        "病变在哪一侧？",
        _when(lambda a: a.lesion, lambda a, rng: ({}, a.side)),
    ),
    Template(
        "ct_density_open",
        "OPEN",
        "ATTRIB",
        "Abnormality",
        "Is the lesion hypodense or hyperdense?",
        None,
        _when(lambda a: a.lesion, lambda a, rng: ({}, a.density)),
    ),
    Template(
        "ct_size",
        "OPEN",
        "SIZE",
        "Size",
        "How large is the lesion?",
        None,
        _when(lambda a: a.lesion, lambda a, rng: ({}, f"{a.size_cm} cm")),
    ),
]

MRI = [
    Template(
        "mri_t2",
        "CLOSED",
        "MODALITY",
        "Modality",
        "Is this a T2-weighted image?",
        "这是T2加权图像吗？",
        _const(lambda a: _yn(a.weighting == "T2")),
    ),
    Template(
        "mri_csf_bright",
        "CLOSED",
        "ATTRIB",
        "Modality",
        "Does the cerebrospinal fluid appear bright?",
        None,
        _const(lambda a: _yn(a.weighting == "T2")),
    ),
    Template(
        "mri_lesion",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there a brain lesion?",
        "是否有脑部病变？",
        _const(lambda a: _yn(a.lesion)),
    ),
    Template(
        "mri_hemisphere",
        "CLOSED",
        "POS",
        "Position",
        "Is the lesion in the {side} hemisphere?",
        "病变在{side}侧大脑半球吗？",
        _when(
            lambda a: a.lesion,
            lambda a, rng: (lambda s: ({"side": s[0]}, s[1]))(_slot(rng, a.hemisphere, SIDES)),
        ),
    ),
    Template(
        "mri_ring",
        "CLOSED",
        "ATTRIB",
        "Abnormality",
        "Does the lesion show ring enhancement?",
        "病变是否呈环形强化？",
        _when(lambda a: a.lesion, lambda a, rng: ({}, _yn(a.ring_enhancement))),
    ),
    Template(
        "mri_weighting",
        "OPEN",
        "MODALITY",
        "Modality",
        "What is the weighting of this MRI?",
        "这张MRI是什么加权？",
        _const(lambda a: a.weighting.lower()),
    ),
    Template(
        "mri_which_hemi",
        "OPEN",
        "POS",
        "Position",
        "Which hemisphere is the lesion in?",
        "病变在哪一侧大脑半球？",
        _when(lambda a: a.lesion, lambda a, rng: ({}, a.hemisphere)),
    ),
    Template(
        "mri_size",
        "OPEN",
        "SIZE",
        "Size",
        "How large is the lesion?",
        None,
        _when(lambda a: a.lesion, lambda a, rng: ({}, f"{a.size_cm} cm")),
    ),
]

HISTO = [
    Template(
        "his_atypia",
        "CLOSED",
        "ABN",
        "Abnormality",
        "Is there nuclear atypia?",
        "是否有细胞核异型性？",
        _const(lambda a: _yn(a.nuclear_atypia)),
    ),
    Template(
        "his_glands",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Are glands present?",
        "是否有腺体形成？",
        _const(lambda a: _yn(a.gland_formation)),
    ),
    Template(
        "his_inflammation",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is there an inflammatory infiltrate?",
        "是否有炎性细胞浸润？",
        _const(lambda a: _yn(a.inflammation)),
    ),
    Template(
        "his_cellularity",
        "CLOSED",
        "ATTRIB",
        "Abnormality",
        "Is the cellularity high?",
        None,
        _const(lambda a: _yn(a.cellularity == "high")),
    ),
    Template(
        "his_cellularity_open",
        "OPEN",
        "ATTRIB",
        "Abnormality",
        "What is the cellularity?",
        "细胞密度如何？",
        _const(lambda a: a.cellularity),
    ),
]

GROSS = [
    Template(
        "gro_ruler",
        "CLOSED",
        "PRES",
        "Abnormality",
        "Is a ruler present?",
        "图中是否有尺子？",
        _const(lambda a: _yn(a.scale == "ruler")),
    ),
    Template(
        "gro_color",
        "CLOSED",
        "COLOR",
        "Color",
        "Is the lesion {color}?",
        "病变是{color}的吗？",
        lambda a, rng: (lambda s: ({"color": s[0]}, s[1]))(
            _slot(rng, a.lesion_color, GROSS_COLORS)
        ),
    ),
    Template(
        "gro_large",
        "CLOSED",
        "SIZE",
        "Size",
        "Is the lesion larger than 3 cm?",
        "病变大于3厘米吗？",
        _const(lambda a: _yn(a.size_cm > 3)),
    ),
    Template(
        "gro_organ",
        "CLOSED",
        "ORGAN",
        "Organ",
        "Is this specimen a {organ}?",
        None,
        lambda a, rng: (lambda s: ({"organ": s[0]}, s[1]))(_slot(rng, a.organ, GROSS_ORGANS)),
    ),
    Template(
        "gro_which_organ",
        "OPEN",
        "ORGAN",
        "Organ",
        "Which organ is shown?",
        "图中是哪个器官？",
        _const(lambda a: a.organ),
    ),
    Template(
        "gro_color_open",
        "OPEN",
        "COLOR",
        "Color",
        "What color is the lesion?",
        "病变是什么颜色？",
        _const(lambda a: a.lesion_color),
    ),
    Template(
        "gro_size",
        "OPEN",
        "SIZE",
        "Size",
        "How large is the lesion?",
        None,
        _const(lambda a: f"{math.floor(a.size_cm + 0.5)} cm"),  # half up: 4.5 cm is "5 cm"
    ),
]

TEMPLATES: dict[str, list[Template]] = {
    "chest_xray": CXR + _common("chest_xray"),
    "ct_scan": CT + _common("ct_scan"),
    "mri": MRI + _common("mri"),
    "histology": HISTO + _common("histology"),
    "gross": GROSS + _common("gross"),
}

ZH = {
    "yes": "是", "no": "否", "left": "左", "right": "右", "x-ray": "X光", "ct": "CT", "mri": "MRI",
    "histology": "组织学", "gross": "大体标本", "chest": "胸部", "abdomen": "腹部", "brain": "脑",
    "liver": "肝脏", "kidney": "肾脏", "lung": "肺", "spleen": "脾脏", "hypodense": "低密度",
    "hyperdense": "高密度", "t1": "T1", "t2": "T2", "high": "高", "low": "低", "white": "白色",
    "yellow": "黄色", "red": "红色",
}  # fmt: skip


def _zh(value: str) -> str:
    if value in ZH:
        return ZH[value]
    if value.endswith(" cm"):
        return value[:-3] + "厘米"
    return value


def questions_for(domain: str, attrs, rng: np.random.Generator, lang: str = "en") -> list[dict]:
    """Every applicable question for one image, in template order. ``lang="zh"`` gives the
    templates that have a Chinese form, with Chinese answers (是/否 ...), as SLAKE does."""
    if domain not in TEMPLATES:
        raise ValueError(f"unknown MedSynth domain {domain!r}")
    out = []
    for t in TEMPLATES[domain]:
        res = t.answer(attrs, rng)
        if res is None or (lang == "zh" and t.zh is None):
            continue
        slots, answer = res
        if lang == "zh":
            question = t.zh.format(**{k: _zh(v) for k, v in slots.items()})
            answer = _zh(answer)
        else:
            question = t.en.format(**slots)
        out.append(
            {
                "template": t.tid,
                "question": question,
                "answer": answer,
                "answer_type": t.answer_type,
                "question_type": t.question_type,
                "content_type": t.content_type,
                "lang": lang,
            }
        )
    return out


class Balancer:
    """Keeps |#yes - #no| <= 1 per (split, exact question text) over a stream of images."""

    def __init__(self) -> None:
        self.diff: Counter = Counter()

    def admits(self, split: str, q: dict) -> bool:
        if q["answer_type"] != "CLOSED":
            return True
        step = 1 if q["answer"] in (YES, ZH[YES]) else -1
        return abs(self.diff[(split, q["question"])] + step) <= 1

    def add(self, split: str, q: dict) -> None:
        if q["answer_type"] == "CLOSED":
            self.diff[(split, q["question"])] += 1 if q["answer"] in (YES, ZH[YES]) else -1


def select_questions(
    candidates: list[dict],
    rng: np.random.Generator,
    balancer: Balancer,
    split: str,
    n_closed: int = 3,
    n_open: int = 2,
) -> list[dict]:
    """Pick up to ``n_closed`` closed and ``n_open`` open questions for one image, skipping closed
    questions whose answer would unbalance their text's yes/no count in this split."""
    order = rng.permutation(len(candidates))
    chosen, nc, no = [], 0, 0
    for i in order:
        q = candidates[int(i)]
        if q["answer_type"] == "CLOSED":
            if nc >= n_closed or not balancer.admits(split, q):
                continue
            nc += 1
        else:
            if no >= n_open:
                continue
            no += 1
        balancer.add(split, q)
        chosen.append(q)
    return chosen
