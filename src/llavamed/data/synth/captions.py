"""PMC-style figure captions and body sentences written from ground-truth attributes.

Everything stated is true of the attributes; phrasing varies (synonyms, abbreviations such as CXR,
PA, CECT, HU, T2WI, H&E, x400) and some findings or negatives are left out, as real captions do.
"""

from __future__ import annotations

import numpy as np

from llavamed.data.synth.attributes import CTAttrs, MRIAttrs
from llavamed.data.synth.render.ct import lesion_hu


def _p(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ---- per-domain finding phrases -------------------------------------------------------------


def _cxr(a, rng) -> tuple[str, list[str], list[str]]:
    view = a.view
    modality = _p(
        rng,
        [
            f"{view} chest radiograph",
            f"Chest X-ray ({view} view)",
            f"{'Posteroanterior' if view == 'PA' else 'Anteroposterior'} chest radiograph",
            f"{view} CXR",
            "Frontal chest radiograph" if view == "PA" else "Portable AP chest radiograph",
        ],
    )
    pos, neg = [], []
    if a.consolidation:
        s, lobe = a.consolidation_side, a.consolidation_lobe
        pos.append(
            _p(
                rng,
                [
                    f"{s} {lobe} lobe consolidation",
                    f"airspace consolidation in the {s} {lobe} lobe",
                    f"a patchy {s} {lobe} zone opacity consistent with consolidation",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["no focal consolidation", "no airspace consolidation"]))
    if a.nodule:
        s, lobe, mm = a.nodule_side, a.nodule_lobe, a.nodule_size_mm
        pos.append(
            _p(
                rng,
                [
                    f"a {mm} mm nodule in the {s} {lobe} lobe",
                    f"a well-circumscribed {s} {lobe} lobe pulmonary nodule ({mm} mm)",
                    f"a solitary pulmonary nodule in the {s} {lobe} zone",
                ],
            )
        )
    else:
        neg.append("no pulmonary nodule")
    if a.effusion:
        s = a.effusion_side
        pos.append(
            _p(
                rng,
                [
                    f"a {s} pleural effusion",
                    f"a {s}-sided pleural effusion with blunting of the costophrenic angle",
                    f"{s} pleural effusion (meniscus sign)",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["no pleural effusion", "sharp costophrenic angles"]))
    if a.cardiomegaly:
        pos.append(
            _p(
                rng,
                [
                    "cardiomegaly",
                    "an enlarged cardiac silhouette (CTR > 0.5)",
                    "cardiomegaly (cardiothoracic ratio ~0.6)",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["normal heart size", "a cardiac silhouette within normal limits"]))
    devices = []
    if a.ett:
        devices.append(
            _p(
                rng,
                [
                    "an endotracheal tube (ETT) in situ",
                    "an endotracheal tube with its tip above the carina",
                    "an ETT",
                ],
            )
        )
    if a.central_line:
        s = a.central_line_side
        devices.append(
            _p(
                rng,
                [
                    f"a {s}-sided central venous catheter (CVC) terminating in the SVC",
                    f"a {s} subclavian central line",
                    f"a {s} CVC",
                ],
            )
        )
    if a.pacemaker:
        devices.append(
            _p(
                rng,
                [
                    "a left pectoral pacemaker with leads over the heart",
                    "a cardiac pacemaker (PPM)",
                    "a pacemaker generator with transvenous leads",
                ],
            )
        )
    pos.extend(devices)
    if not devices:
        neg.append("no lines or tubes")
    return modality, pos, neg


def _ct(a: CTAttrs, rng) -> tuple[str, list[str], list[str]]:
    if a.contrast:
        modality = _p(
            rng,
            [
                "Axial contrast-enhanced CT (CECT) of the abdomen",
                "Contrast-enhanced axial CT image, corticomedullary phase",
                "Axial CT of the abdomen with IV contrast",
            ],
        )
    else:
        modality = _p(
            rng,
            [
                "Non-contrast axial CT of the abdomen",
                "Unenhanced axial abdominal CT",
                "Axial non-contrast CT (NCCT)",
            ],
        )
    if a.window == "liver":
        modality += _p(rng, [" (liver window)", " (narrow window)"])
    elif rng.random() < 0.3:
        modality += " (W400/L40)"
    pos, neg = [], []
    if a.lesion:
        hu = int(round(lesion_hu(a.organ, a.contrast, a.density) / 10.0) * 10)
        where = f"the {a.side} lobe of the liver" if a.organ == "liver" else f"the {a.side} kidney"
        adj = "hepatic" if a.organ == "liver" else "renal"
        pos.append(
            _p(
                rng,
                [
                    f"a {a.size_cm} cm {a.density} lesion in {where}",
                    f"a {a.density} {adj} lesion ({a.size_cm} cm) in {where}",
                    f"a well-defined {a.density} mass measuring {a.size_cm} cm in {where} (~{hu} HU)",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["no focal hepatic or renal lesion", "no focal lesion"]))
    return modality, pos, neg


def _mri(a: MRIAttrs, rng) -> tuple[str, list[str], list[str]]:
    if a.weighting == "T1":
        modality = _p(
            rng,
            [
                "Axial T1-weighted MRI (T1WI) of the brain",
                "Axial post-contrast T1-weighted image",
                "Brain MRI, axial T1WI",
            ],
        )
    else:
        modality = _p(
            rng,
            [
                "Axial T2-weighted MRI (T2WI) of the brain",
                "Axial T2WI",
                "Brain MRI, axial T2-weighted sequence",
            ],
        )
    pos, neg = [], []
    # The CSF phrase goes after the lesion's: an "(arrow)" is attached to the first finding,
    # and the drawn arrow points at the lesion.
    csf = []
    if rng.random() < 0.35:
        csf = [f"{'dark' if a.weighting == 'T1' else 'bright'} CSF in the ventricles"]
    if a.lesion:
        h, cm = a.hemisphere, a.size_cm
        sig = "hypointense" if a.weighting == "T1" else "hyperintense"
        if a.ring_enhancement:
            ring = "ring-enhancing" if a.weighting == "T1" else "ring-like (peripheral rim)"
            pos.append(
                _p(
                    rng,
                    [
                        f"a {cm} cm {ring} lesion in the {h} cerebral hemisphere with perilesional edema",
                        f"a {cm} cm mass in the {h} hemisphere with "
                        + (
                            "ring enhancement"
                            if a.weighting == "T1"
                            else "a ring-like hypointense rim"
                        ),
                    ],
                )
            )
        else:
            pos.append(
                _p(
                    rng,
                    [
                        f"a {cm} cm {sig} lesion in the {h} cerebral hemisphere without ring enhancement",
                        f"a homogeneous {sig} {h} hemispheric lesion ({cm} cm), no ring enhancement",
                    ],
                )
            )
    else:
        neg.append(_p(rng, ["no focal parenchymal lesion", "no intracranial mass lesion"]))
    return modality, pos + csf, neg


def _histo(a, rng) -> tuple[str, list[str], list[str]]:
    mag = a.magnification
    modality = _p(
        rng,
        [
            f"Histopathology of the {a.tissue} (H&E, ×{mag})",
            f"H&E-stained section of {a.tissue} tissue, original magnification ×{mag}",
            f"Photomicrograph of the {a.tissue} lesion (hematoxylin and eosin, ×{mag})",
        ],
    )
    pos, neg = [], []
    pos.append(
        _p(rng, ["a hypercellular proliferation", "high cellularity", "densely cellular tissue"])
        if a.cellularity == "high"
        else _p(rng, ["low cellularity", "a paucicellular stroma", "sparse cellularity"])
    )
    if a.nuclear_atypia:
        pos.append(
            _p(
                rng,
                [
                    "marked nuclear atypia",
                    "pleomorphic, hyperchromatic nuclei",
                    "enlarged atypical nuclei",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["no significant nuclear atypia", "bland, uniform nuclei"]))
    if a.gland_formation:
        pos.append(
            _p(
                rng,
                ["gland formation", "well-formed glandular structures", "glands with open lumina"],
            )
        )
    else:
        neg.append(_p(rng, ["no gland formation", "solid growth without glands"]))
    if a.inflammation:
        pos.append(
            _p(
                rng,
                [
                    "a dense lymphocytic infiltrate",
                    "an inflammatory infiltrate",
                    "aggregates of inflammatory cells",
                ],
            )
        )
    else:
        neg.append(_p(rng, ["no significant inflammation", "no inflammatory infiltrate"]))
    return modality, pos, neg


def _gross(a, rng) -> tuple[str, list[str], list[str]]:
    modality = _p(
        rng,
        [
            f"Gross photograph of the resected {a.organ}",
            f"Cut surface of the {a.organ} specimen",
            f"Macroscopic appearance of the {a.organ}",
        ],
    )
    color = {
        "white": _p(rng, ["white", "whitish, firm", "white-tan"]),
        "yellow": _p(rng, ["yellow", "golden-yellow", "yellowish"]),
        "red": _p(rng, ["dark red, hemorrhagic", "red", "hemorrhagic"]),
    }[a.lesion_color]
    pos = [
        f"a {a.size_cm:.1f} cm {color} lesion"
        if rng.random() < 0.6
        else f"a {color} tumor measuring {a.size_cm:.1f} cm"
    ]
    pos.append("(ruler in cm)" if a.scale == "ruler" else "(scale bar, cm)")
    return modality, pos, []


_DESCRIBE = {"chest_xray": _cxr, "ct_scan": _ct, "mri": _mri, "histology": _histo, "gross": _gross}


def panel_caption(domain: str, attrs, rng: np.random.Generator, arrow: bool = False) -> str:
    """One sentence for one image: modality, positive findings, sometimes pertinent negatives."""
    modality, pos, neg = _DESCRIBE[domain](attrs, rng)
    if domain == "gross":
        return f"{modality} showing {pos[0]} {pos[1]}."
    if arrow and pos:
        pos = [pos[0] + _p(rng, [" (arrow)", " (arrowhead)", " (white arrow)"])] + pos[1:]
    keep_neg = [n for n in neg if rng.random() < 0.4]
    if pos:
        text = (
            f"{modality} {_p(rng, ['showing', 'demonstrating', 'reveals', 'shows'])} {_join(pos)}"
        )
        if keep_neg:
            text += f"; {_join(keep_neg)}"
    else:
        text = f"{modality}: {_join(keep_neg or neg[:1]) or 'no abnormality'}"
    return text[0].upper() + text[1:] + "."


def findings_phrase(domain: str, attrs, rng: np.random.Generator) -> str:
    """A short clause for body text, e.g. 'a left pleural effusion and an ETT'."""
    _, pos, neg = _DESCRIBE[domain](attrs, rng)
    if domain == "gross":
        return pos[0]
    return _join(pos[:2]) if pos else _join(neg[:1])


TITLES = {
    "chest_xray": [
        "Chest radiograph.",
        "Chest X-ray findings.",
        "Radiographic findings.",
        "Initial chest radiograph.",
    ],
    "ct_scan": ["Abdominal CT.", "CT findings.", "Computed tomography of the abdomen."],
    "mri": ["Brain MRI.", "MRI findings.", "Magnetic resonance imaging of the brain."],
    "histology": ["Histopathological findings.", "Microscopic findings.", "Histology."],
    "gross": ["Gross pathology.", "Macroscopic findings.", "Resected specimen."],
    "chart": ["Summary of laboratory values.", "Clinical course.", "Quantitative analysis."],
}


def figure_caption(
    domain: str, panels: list, rng: np.random.Generator, arrow: bool = False
) -> tuple[str, str]:
    """(title, text) for a figure of one or two panels of ``domain``."""
    title = _p(rng, TITLES[domain])
    if len(panels) == 1:
        text = panel_caption(domain, panels[0], rng, arrow)
    else:
        parts = [
            f"({chr(65 + i)}) {panel_caption(domain, p, rng, arrow and i == 0)}"
            for i, p in enumerate(panels)
        ]
        text = " ".join(parts)
    if domain == "histology" and rng.random() < 0.3:
        text += " Scale bar, 50 μm."
    return title, text


def short_label(domain: str, attrs) -> str:
    """A terse two-line summary for contact sheets and debugging."""
    a = attrs
    if domain == "chest_xray":
        f = []
        if a.consolidation:
            f.append(f"cons {a.consolidation_side[0].upper()}{a.consolidation_lobe[0].upper()}L")
        if a.nodule:
            f.append(f"nod {a.nodule_side[0].upper()}{a.nodule_lobe[0].upper()}L")
        if a.effusion:
            f.append(f"eff {a.effusion_side[0].upper()}")
        if a.cardiomegaly:
            f.append("cardiomeg")
        d = [
            n
            for n, on in (
                ("ETT", a.ett),
                (f"CVC-{(a.central_line_side or ' ')[0].upper()}", a.central_line),
                ("PM", a.pacemaker),
            )
            if on
        ]
        return (
            f"CXR {a.view}: "
            + (", ".join(f) or "no finding")
            + "\n"
            + (", ".join(d) or "no devices")
        )
    if domain == "ct_scan":
        les = f"{a.density} {a.side} {a.organ} {a.size_cm}cm" if a.lesion else "no lesion"
        return f"CT {'C+' if a.contrast else 'C-'} {a.window}\n{les}"
    if domain == "mri":
        les = (
            f"{a.hemisphere} hemi {a.size_cm}cm{' ring' if a.ring_enhancement else ''}"
            if a.lesion
            else "no lesion"
        )
        return f"MRI {a.weighting}\n{les}"
    if domain == "histology":
        f = [
            n
            for n, on in (
                ("atypia", a.nuclear_atypia),
                ("glands", a.gland_formation),
                ("inflam", a.inflammation),
            )
            if on
        ]
        return f"H&E x{a.magnification} {a.cellularity} cellularity\n" + (", ".join(f) or "-")
    return f"gross {a.organ}\n{a.lesion_color} {a.size_cm}cm, {a.scale}"
