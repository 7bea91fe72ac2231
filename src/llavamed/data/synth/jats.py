"""JATS (.nxml) articles and deterministic PMC OA-style ``.tar.gz`` packages."""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field

from lxml import etree

XLINK = "http://www.w3.org/1999/xlink"
MML = "http://www.w3.org/1998/Math/MathML"
DOCTYPE = (
    '<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD '
    'v1.2 20190208//EN" "JATS-archivearticle1.dtd">'
)


@dataclass
class Xref:
    rid: str
    text: str


@dataclass
class FigureSpec:
    fig_id: str  # "F1"
    label: str  # "Figure 1"
    title: str
    caption: str
    href: str  # as written in <graphic xlink:href>, with or without extension


@dataclass
class ArticleSpec:
    pmid: str
    pmcid: str
    doi: str
    title: str
    authors: list[tuple[str, str]]  # (surname, given names)
    year: int
    month: int
    day: int
    abstract: str
    keywords: list[str]
    sections: list[tuple[str, list[list]]]  # (title, paragraphs); a paragraph mixes str and Xref
    figures: list[FigureSpec]
    fig_section: int = 1  # figures are placed at the end of this section
    table: list[list[str]] | None = None
    supplementary: str | None = None
    references: list[str] = field(default_factory=list)


def _el(parent, tag: str, text: str | None = None, **attrs) -> etree._Element:
    e = etree.SubElement(parent, tag, {k.replace("_", "-"): v for k, v in attrs.items()})
    if text is not None:
        e.text = text
    return e


def _paragraph(parent, parts: list) -> None:
    p = etree.SubElement(parent, "p")
    last = None
    for part in parts:
        if isinstance(part, Xref):
            last = _el(p, "xref", part.text, ref_type="fig", rid=part.rid)
        elif last is None:
            p.text = (p.text or "") + part
        else:
            last.tail = (last.tail or "") + part


def build_nxml(a: ArticleSpec) -> bytes:
    art = etree.Element("article", nsmap={"xlink": XLINK, "mml": MML})
    art.set("article-type", "case-report")
    art.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    front = _el(art, "front")
    jm = _el(front, "journal-meta")
    _el(jm, "journal-id", "MedSynth Case Rep", journal_id_type="nlm-ta")
    _el(_el(jm, "journal-title-group"), "journal-title", "MedSynth Case Reports")
    _el(jm, "issn", "0000-0000", pub_type="epub")
    _el(_el(jm, "publisher"), "publisher-name", "MedSynth Open")
    am = _el(front, "article-meta")
    _el(am, "article-id", a.pmid, pub_id_type="pmid")
    _el(am, "article-id", a.pmcid, pub_id_type="pmc")
    _el(am, "article-id", a.doi, pub_id_type="doi")
    _el(
        _el(_el(am, "article-categories"), "subj-group", subj_group_type="heading"),
        "subject",
        "Case Report",
    )
    _el(_el(am, "title-group"), "article-title", a.title)
    cg = _el(am, "contrib-group")
    for surname, given in a.authors:
        name = _el(_el(cg, "contrib", contrib_type="author"), "name")
        _el(name, "surname", surname)
        _el(name, "given-names", given)
    pd = _el(am, "pub-date", pub_type="epub")
    _el(pd, "day", str(a.day))
    _el(pd, "month", str(a.month))
    _el(pd, "year", str(a.year))
    perm = _el(am, "permissions")
    lic = _el(perm, "license", license_type="open-access")
    lic.set(f"{{{XLINK}}}href", "https://creativecommons.org/licenses/by/4.0/")
    _el(lic, "license-p", "This is an open access article distributed under the CC BY 4.0 license.")
    _el(_el(am, "abstract"), "p", a.abstract)
    kg = _el(am, "kwd-group")
    for k in a.keywords:
        _el(kg, "kwd", k)

    body = _el(art, "body")
    for si, (title, paragraphs) in enumerate(a.sections):
        sec = _el(body, "sec", id=f"s{si + 1}")
        _el(sec, "title", title)
        for parts in paragraphs:
            _paragraph(sec, parts)
        if si == a.fig_section:
            for f in a.figures:
                fig = _el(sec, "fig", id=f.fig_id, position="float")
                _el(fig, "label", f.label)
                cap = _el(fig, "caption")
                _el(cap, "title", f.title)
                _el(cap, "p", f.caption)
                g = _el(fig, "graphic")
                g.set(f"{{{XLINK}}}href", f.href)
            if a.table:
                tw = _el(sec, "table-wrap", id="T1", position="float")
                _el(tw, "label", "Table 1")
                _el(_el(tw, "caption"), "p", "Laboratory findings at admission.")
                tb = _el(tw, "table", frame="hsides", rules="groups")
                for ri, row in enumerate(a.table):
                    tr = _el(_el(tb, "thead" if ri == 0 else "tbody"), "tr")
                    for cell in row:
                        _el(tr, "th" if ri == 0 else "td", cell)
    if a.supplementary:
        sm = _el(body, "supplementary-material", id="SD1", content_type="local-data")
        _el(_el(sm, "caption"), "p", "Supplementary data.")
        media = _el(sm, "media", mimetype="application", mime_subtype="pdf")
        media.set(f"{{{XLINK}}}href", a.supplementary)
    back = _el(art, "back")
    rl = _el(back, "ref-list")
    for i, ref in enumerate(a.references):
        _el(_el(rl, "ref", id=f"R{i + 1}"), "mixed-citation", ref, publication_type="journal")
    return etree.tostring(
        art, xml_declaration=True, encoding="UTF-8", doctype=DOCTYPE, pretty_print=True
    )


def build_package(pmcid: str, files: dict[str, bytes]) -> bytes:
    """A ``.tar.gz`` with ``<pmcid>/`` and its files: sorted members, zero mtimes and ids, and a
    gzip header without a timestamp, so equal inputs give equal bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo(pmcid)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(d)
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(f"{pmcid}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()
