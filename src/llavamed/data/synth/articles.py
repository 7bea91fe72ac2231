"""One synthetic PMC case report: a plan (attributes and text, cheap and deterministic) and its
build (rendered figures, JATS, the ``.tar.gz`` package)."""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from llavamed.data.synth.attributes import DOMAINS, attrs_to_dict, sample_attributes
from llavamed.data.synth.captions import figure_caption, findings_phrase
from llavamed.data.synth.jats import ArticleSpec, FigureSpec, Xref, build_nxml, build_package
from llavamed.data.synth.render import render_with_targets
from llavamed.data.synth.render.common import font

PMC_BASE = 9000000
PMID_BASE = 39000000
ARTICLE_STREAM = 1

SURNAMES = [
    "Chen",
    "Garcia",
    "Müller",
    "Okafor",
    "Tanaka",
    "Rossi",
    "Novak",
    "Singh",
    "Kim",
    "Silva",
    "Haddad",
    "Larsen",
]
GIVEN = ["A", "B", "C", "D", "E", "F", "H", "J", "K", "L", "M", "S", "T", "Y"]
PRESENTATIONS = {
    "chest_xray": [
        "dyspnea and productive cough",
        "fever and pleuritic chest pain",
        "progressive shortness of breath",
    ],
    "ct_scan": [
        "right upper quadrant pain",
        "painless hematuria",
        "weight loss and abdominal discomfort",
    ],
    "mri": ["new-onset seizures", "headache and left-sided weakness", "progressive confusion"],
    "histology": ["a palpable mass", "rectal bleeding", "an incidental finding on screening"],
    "gross": ["an enlarging mass", "flank pain", "abnormal imaging findings"],
}
MODALITY_NOUN = {
    "chest_xray": ["A chest radiograph", "The chest X-ray", "Frontal chest radiography"],
    "ct_scan": ["Abdominal CT", "A contrast CT of the abdomen", "Computed tomography"],
    "mri": ["Brain MRI", "Magnetic resonance imaging of the brain", "MRI"],
    "histology": ["Histological examination", "Microscopy of the biopsy", "Histopathology"],
    "gross": [
        "Gross examination of the specimen",
        "The resected specimen",
        "Macroscopic examination",
    ],
    "chart": ["Serial laboratory values", "The clinical course"],
}
KEYWORDS = {
    "chest_xray": ["chest radiograph", "pneumonia"],
    "ct_scan": ["computed tomography", "abdomen"],
    "mri": ["magnetic resonance imaging", "brain"],
    "histology": ["histopathology", "H&E"],
    "gross": ["gross pathology", "surgical specimen"],
}


@dataclass
class FigurePlan:
    fig_id: str
    number: int
    domain: str  # one of DOMAINS, or "chart" (a non-target figure)
    panels: list  # attribute dataclasses (empty for charts)
    arrow: bool
    fmt: str  # "jpg" | "png" | "tif"
    filename: str
    href: str
    title: str
    caption: str


@dataclass
class ArticlePlan:
    index: int
    pmcid: str
    pmid: str
    split: str
    domain: str
    figures: list[FigurePlan]
    spec: ArticleSpec


def _p(rng, options):
    return options[int(rng.integers(len(options)))]


def has_target(domain: str, a) -> bool:
    if domain == "chest_xray":
        return a.consolidation or a.nodule or a.effusion
    if domain in ("ct_scan", "mri"):
        return a.lesion
    return domain == "gross"


def plan_article(seed: int, index: int) -> ArticlePlan:
    rng = np.random.default_rng([seed, ARTICLE_STREAM, index, 0])
    pmcid, pmid = f"PMC{PMC_BASE + 1 + index}", str(PMID_BASE + 1 + index)
    domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
    split = "test" if rng.random() < 0.1 else "train"
    n_figs = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.35, 0.2]))
    style = int(rng.integers(3))
    figures = []
    for k in range(1, n_figs + 1):
        r = rng.random()
        fdom = (
            "chart" if r < 0.07 else domain if r < 0.8 else DOMAINS[int(rng.integers(len(DOMAINS)))]
        )
        n_panels = 0 if fdom == "chart" else (2 if rng.random() < 0.25 else 1)
        panels = [sample_attributes(fdom, rng) for _ in range(n_panels)]
        arrow = (
            bool(panels) and has_target(fdom, panels[0]) and fdom != "gross" and rng.random() < 0.35
        )
        fmt = str(rng.choice(["jpg", "png", "tif"], p=[0.7, 0.15, 0.15]))
        stem = [f"{pmcid.lower()}-g{k:03d}", f"fig{k}", f"gr{k}"][style]
        filename = f"{stem}.{fmt}"
        href = stem if rng.random() < 0.4 else filename  # real PMC often omits the extension
        if fdom == "chart":
            title, caption = (
                _p(rng, ["Clinical course.", "Laboratory values."]),
                _p(
                    rng,
                    [
                        "Serial inflammatory markers during admission. Bars show mean values per week.",
                        "Bar chart of laboratory values at admission, week 1 and discharge.",
                    ],
                ),
            )
        else:
            title, caption = figure_caption(fdom, panels, rng, arrow)
        figures.append(
            FigurePlan(f"F{k}", k, fdom, panels, arrow, fmt, filename, href, title, caption)
        )

    age, sex = int(rng.integers(18, 90)), _p(rng, ["man", "woman"])
    intro = [
        [
            f"We report a case in which imaging and pathology findings were documented in detail. "
            f"Such cases illustrate the value of correlating {_p(rng, ['radiological', 'clinical', 'imaging'])} "
            "and pathological data."
        ]
    ]
    case = [[f"A {age}-year-old {sex} presented with {_p(rng, PRESENTATIONS[domain])}. "]]
    for f in figures:
        noun = _p(rng, MODALITY_NOUN[f.domain])
        if f.domain == "chart":
            case.append([f"{noun} is summarised in ", Xref(f.fig_id, f"Fig. {f.number}"), "."])
            continue
        finding = findings_phrase(f.domain, f.panels[0], rng)
        verb = _p(rng, ["showed", "revealed", "demonstrated"])
        if rng.random() < 0.5:
            case.append(
                [
                    f"{noun} {verb} {finding} (",
                    Xref(f.fig_id, f"Fig. {f.number}{'A' if len(f.panels) > 1 else ''}"),
                    ").",
                ]
            )
        else:
            case.append(
                [
                    "As shown in ",
                    Xref(f.fig_id, f"Figure {f.number}"),
                    f", {noun[0].lower() + noun[1:]} {verb} {finding}.",
                ]
            )
    discussion = [["The differential diagnosis was discussed at the multidisciplinary meeting. "]]
    if len(figures) >= 3:
        discussion.append(
            [
                "Key findings are summarised in ",
                Xref("F1", "Figs. 1"),
                "\u2013",
                Xref(f"F{len(figures)}", str(len(figures))),
                ".",
            ]
        )
    elif len(figures) == 2:
        discussion.append(
            [
                "Findings on imaging (",
                Xref("F1", "Fig. 1"),
                ", ",
                Xref("F2", "2"),
                ") guided management.",
            ]
        )
    spec = ArticleSpec(
        pmid=pmid,
        pmcid=pmcid,
        doi=f"10.5555/medsynth.{index + 1}",
        title=f"{_p(rng, ['Case report', 'A case of', 'Clinical image'])}: "
        f"{findings_phrase(figures[0].domain, figures[0].panels[0], rng) if figures[0].panels else 'an instructive course'}",
        authors=[(_p(rng, SURNAMES), _p(rng, GIVEN)) for _ in range(int(rng.integers(1, 5)))],
        year=int(rng.integers(2015, 2025)),
        month=int(rng.integers(1, 13)),
        day=int(rng.integers(1, 29)),
        abstract=f"We describe a {age}-year-old {sex} with {_p(rng, PRESENTATIONS[domain])}.",
        keywords=KEYWORDS[domain],
        sections=[("Introduction", intro), ("Case presentation", case), ("Discussion", discussion)],
        figures=[
            FigureSpec(f.fig_id, f"Figure {f.number}", f.title, f.caption, f.href) for f in figures
        ],
        table=[["Test", "Value"], ["CRP (mg/L)", str(int(rng.integers(1, 200)))]]
        if rng.random() < 0.2
        else None,
        supplementary=f"{pmcid.lower()}-s001.pdf" if rng.random() < 0.15 else None,
        references=[
            f"Author {i + 1}. A related report. J Synth Med. 20{10 + i}."
            for i in range(int(rng.integers(1, 4)))
        ],
    )
    return ArticlePlan(index, pmcid, pmid, split, domain, figures, spec)


# ---- rendering --------------------------------------------------------------------------------


def _arrow(img: Image.Image, x: float, y: float, rng: np.random.Generator) -> None:
    d = ImageDraw.Draw(img)
    s = min(img.size)
    ang = rng.uniform(0, 2 * np.pi)
    length, off = 0.13 * s, 0.07 * s
    tx, ty = x + off * np.cos(ang), y + off * np.sin(ang)
    sx, sy = tx + length * np.cos(ang), ty + length * np.sin(ang)
    col = 255 if img.mode == "L" else (255, 255, 0)
    d.line((sx, sy, tx, ty), fill=col, width=max(2, int(s * 0.012)))
    head = 0.045 * s
    pts = [(tx, ty)] + [
        (tx + head * np.cos(ang + da), ty + head * np.sin(ang + da)) for da in (0.45, -0.45)
    ]
    d.polygon(pts, fill=col)


def _label(img: Image.Image, text: str, corner: str = "tl") -> None:
    d = ImageDraw.Draw(img)
    s = min(img.size)
    f = font(0.09 * s)
    x0, y0, x1, y1 = d.textbbox((0, 0), text, font=f)
    pad = 0.02 * s
    x = pad if corner[1] == "l" else img.width - (x1 - x0) - 2 * pad
    y = pad if corner[0] == "t" else img.height - (y1 - y0) - 3 * pad
    fg, bg = (255, 0) if img.mode == "L" else ((255, 255, 255), (0, 0, 0))
    if img.mode == "RGB":
        d.rectangle((x - pad / 2, y - pad / 2, x + x1 + pad / 2, y + y1 + pad / 2), fill=bg)
    d.text((x, y), text, fill=fg, font=f)


def _chart(rng: np.random.Generator, size: int) -> Image.Image:
    w, h = int(size * 1.3), size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 0.12 * w, 0.08 * h, 0.95 * w, 0.85 * h
    d.line((x0, y0, x0, y1, x1, y1), fill=(0, 0, 0), width=2)
    vals = rng.uniform(0.2, 1.0, 4)
    bw = (x1 - x0) / 9
    for i, v in enumerate(vals):
        bx = x0 + bw * (1 + 2 * i)
        d.rectangle((bx, y1 - v * (y1 - y0), bx + bw, y1), fill=(70, 110, 170))
        d.text((bx, y1 + 4), ["Adm", "W1", "W2", "D/C"][i], fill=(0, 0, 0), font=font(0.05 * h))
    return img


def render_figure(f: FigurePlan, rng: np.random.Generator, size: int) -> Image.Image:
    if f.domain == "chart":
        return _chart(rng, size)
    panels = []
    for i, attrs in enumerate(f.panels):
        img, targets = render_with_targets(
            f.domain, attrs, rng, size, aspect=1.0 if len(f.panels) > 1 else None
        )
        if f.arrow and i == 0 and targets:
            _arrow(img, *targets[0], rng)
        if len(f.panels) > 1:
            _label(img, chr(65 + i))
        elif rng.random() < 0.15:
            _label(img, "A")
        if f.domain == "mri" and rng.random() < 0.25:
            _label(img, attrs.weighting, "br")
        panels.append(img)
    if len(panels) == 1:
        return panels[0]
    gap = max(2, size // 64)
    mode = "RGB" if any(p.mode == "RGB" for p in panels) else "L"
    h = max(p.height for p in panels)
    out = Image.new(
        mode, (sum(p.width for p in panels) + gap, h), 255 if mode == "L" else (255, 255, 255)
    )
    x = 0
    for p in panels:
        out.paste(p.convert(mode), (x, 0))
        x += p.width + gap
    return out


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=90)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        # libtiff pads the last strip to an even offset. Saving into a BytesIO, Pillow grows its
        # own buffer and leaves that pad byte uninitialised (same image, different bytes from one
        # save to the next); in a real file the OS fills the gap with a zero.
        with tempfile.TemporaryFile() as fh:
            img.save(fh, "TIFF", compression="tiff_lzw")
            fh.seek(0)
            return fh.read()
    return buf.getvalue()


def build_article(plan: ArticlePlan, seed: int, size: int) -> bytes:
    """Render the figures and return the package bytes."""
    files = {f"{plan.pmcid.lower()}.nxml": build_nxml(plan.spec)}
    for f in plan.figures:
        rng = np.random.default_rng([seed, ARTICLE_STREAM, plan.index, f.number])
        files[f.filename] = encode(render_figure(f, rng, size), f.fmt)
    if plan.spec.supplementary:
        files[plan.spec.supplementary] = b"%PDF-1.4\n% MedSynth placeholder supplement\n%%EOF\n"
    return build_package(plan.pmcid, files)


def manifest_entries(plan: ArticlePlan) -> list[dict]:
    out = []
    for f in plan.figures:
        out.append(
            {
                "set": "pmc",
                "path": f"packages/{plan.pmcid}.tar.gz",
                "member": f"{plan.pmcid}/{f.filename}",
                "pmcid": plan.pmcid,
                "pmid": plan.pmid,
                "fig_id": f.fig_id,
                "pair_id": f"{plan.pmcid}_{f.fig_id}",
                "domain": f.domain if f.domain in DOMAINS else "other",
                "split": plan.split,
                "caption": f.caption,
                "arrow": f.arrow,
                "panels": [
                    {"panel": chr(65 + i), "attributes": attrs_to_dict(a)}
                    for i, a in enumerate(f.panels)
                ],
            }
        )
    return out
