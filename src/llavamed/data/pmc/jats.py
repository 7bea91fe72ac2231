"""Parse a PMC JATS article (``.nxml``) into its figures and the body sentences that cite them.

Real PMC files vary: with or without a default namespace, ``xlink:href`` or plain ``href``,
``<fig-group>`` wrapping several ``<fig>``, missing ``<label>`` or ``id``, captions made of a
``<title>`` and several ``<p>``, citations tagged as one ``<xref>`` per figure or one per range
("Figs. 2–4"). Malformed XML is parsed again with a recovering parser and the fact is reported,
so the caller can count it instead of losing the article.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.entities import html5

from lxml import etree

from llavamed.data.pmc.sentences import (
    is_range_gap,
    label_number,
    numbers_in_citation,
    split_sentences,
    trailing_is_range,
    trailing_numbers,
)
from llavamed.errors import InputError

_STRICT = dict(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    huge_tree=True,
    remove_comments=True,
    remove_pis=True,
)

# Elements whose text is not running body prose: their figures' captions, tables, formulas.
_NOT_PROSE = frozenset(
    {
        "fig",
        "fig-group",
        "table-wrap",
        "table-wrap-group",
        "table",
        "supplementary-material",
        "disp-formula",
        "caption",
        "media",
        "graphic",
        "alternatives",
    }
)
# A paragraph inside one of these is not the article's running text about its figures: prose
# elements above, a nested paragraph (the outer one is walked), and peer review (<sub-article>
# decision letters and <response> author replies: "Figure 1 is unreadable").
_NOT_MENTION_CONTEXT = _NOT_PROSE | {"p", "sub-article", "response"}
_SUPPL_LABEL = re.compile(
    r"^\s*(?:supplementa|suppl\.|additional\s+file|online\s+resource|appendix|"
    r"(?:fig(?:ure)?s?\.?\s*)?S\d|(?:extended\s+data|video|movie)\b)",
    re.I,
)
_TABLE_LABEL = re.compile(r"^\s*table\b", re.I)
_UNPAIRED_MAIN = frozenset({"no graphic", "no caption"})
_WS = re.compile(r"\s+")


@dataclass
class Figure:
    fig_id: str
    label: str | None
    caption: str
    graphic_ref: str | None
    number: int | None = None
    skip_reason: str | None = None  # set for figures that are not figure-caption pairs
    xml_id: str | None = None  # the id as written, when another figure has it too


@dataclass
class Article:
    pmid: str | None
    pmcid: str | None
    figures: list[Figure]
    mentions: dict[str, list[str]]  # fig_id -> unique citing sentences, in reading order
    notes: list[str] = field(default_factory=list)  # countable oddities, e.g. "recovered XML"


def normalize_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


NOTICE_TYPES = frozenset(
    {"retraction", "correction", "expression-of-concern", "removal", "retraction-forum"}
)


def parse_article(data: bytes, name: str = "<nxml>", fallback_pmcid: str | None = None) -> Article:
    """Parse one JATS document; of a file holding several articles, the first. Raises
    :class:`InputError` ("malformed XML", "not a JATS article", "notice article") when nothing
    usable can be read."""
    articles, rejected = parse_articles(data, name, fallback_pmcid)
    if not articles:
        raise rejected[0]
    return articles[0]


def parse_articles(
    data: bytes, name: str = "<nxml>", fallback_pmcid: str | None = None
) -> tuple[list[Article], list[InputError]]:
    """Parse every article of a JATS file: one ``<article>``, or the several of an E-utilities
    ``<pmc-articleset>``. Returns the articles read and, one per article refused (a retraction
    notice among them), the reason. Raises :class:`InputError` when the file itself cannot be
    read or holds no article. Notes about the file (a repaired encoding) go on its first article
    read, so they are counted once per file."""
    notes: list[str] = []
    root = _parse(data, name, notes)
    _expand_entities(root, notes)
    _strip_namespaces(root)
    if root.tag == "article":
        elements = [root]
    else:  # top-level articles only: a JATS <article> never nests another one
        elements = [a for a in root.iter("article") if _outermost(a)]
    if not elements:
        raise InputError(name, "not a JATS article", f"root element <{root.tag}>")
    articles: list[Article] = []
    rejected: list[InputError] = []
    for i, element in enumerate(elements):
        where = name if len(elements) == 1 else f"{name} (article {i + 1} of {len(elements)})"
        kind = (element.get("article-type") or "").strip().lower()
        if kind in NOTICE_TYPES:
            # A retraction or correction notice re-publishes figures of another article (or none).
            rejected.append(InputError(where, "notice article", f"article-type={kind}"))
            continue
        own_notes = [] if articles else notes
        pmid, pmcid = _ids(element)
        if not pmcid and fallback_pmcid and len(elements) == 1:
            pmcid = fallback_pmcid  # a file name names one article, not each of a set
        figures, group_members = _figures(element, own_notes)
        mentions = _mentions(element, figures, group_members, own_notes)
        articles.append(Article(pmid, pmcid, figures, mentions, own_notes))
    return articles, rejected


def _outermost(element: etree._Element) -> bool:
    parent = element.getparent()
    while parent is not None:
        if parent.tag == "article":
            return False
        parent = parent.getparent()
    return True


def _parse(data: bytes, name: str, notes: list[str]) -> etree._Element:
    if not data or not data.strip():
        raise InputError(name, "empty XML file")
    relabelled = _utf8_declared_single_byte(data)
    if relabelled is not None:
        data = relabelled
        notes.append("XML encoding or entities repaired")
    try:
        return etree.fromstring(data, etree.XMLParser(**_STRICT))
    except (etree.XMLSyntaxError, ValueError) as exc:  # ValueError: unknown declared encoding
        first_error = str(exc)
    # Second try: decode ourselves (a wrong declared encoding) and turn HTML entities such as
    # &nbsp; (declared only in the DTD, which is never loaded) into character references.
    text = _HTML_ENTITY.sub(_entity_ref, _decode(data))
    text = re.sub(r"^\s*<\?xml[^>]*\?>", "", text, count=1)
    try:
        root = etree.fromstring(text, etree.XMLParser(**_STRICT))
        notes.append("XML encoding or entities repaired")
        return root
    except (etree.XMLSyntaxError, ValueError):
        pass
    try:
        root = etree.fromstring(text, etree.XMLParser(recover=True, **_STRICT))
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise InputError(name, "malformed XML", str(exc)) from exc
    if root is None:
        raise InputError(name, "malformed XML", first_error)
    notes.append("malformed XML recovered")
    return root


_HTML_ENTITY = re.compile(r"&([A-Za-z][A-Za-z0-9]{1,31});")
_XML_ENTITIES = frozenset({"amp", "lt", "gt", "quot", "apos"})


def _entity_ref(m: re.Match) -> str:
    name = m.group(1)
    chars = html5.get(f"{name};")
    if name in _XML_ENTITIES or chars is None:
        return m.group(0)
    return "".join(f"&#{ord(c)};" for c in chars)


def _expand_entities(root: etree._Element, notes: list[str]) -> None:
    """Replace entity reference nodes with their characters. A document with a DOCTYPE parses
    with ``&nbsp;``, ``&times;``, ``&alpha;`` left as entity nodes (the DTD that defines them is
    never loaded), and those nodes carry no text: "Tumour&nbsp;&times;400" read "Tumour400".
    Entities declared in the internal subset take their declared text; the others are looked up
    in the HTML5 table (a superset of the ISO sets JATS uses); an unknown one is kept as written."""
    entities = list(root.iter(etree.Entity))
    if not entities:
        return
    declared: dict[str, str] = {}
    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None:
        declared = {e.name: e.content or "" for e in dtd.iterentities()}
    # Each parent's text is rebuilt once: merging entity by entity into the growing text before
    # it copied that text per entity (quadratic), and an article with 40,000 entities in one
    # element took 28 s, 160,000 five minutes.
    parents: dict[etree._Element, None] = {}  # in document order, each once
    for ent in entities:
        parent = ent.getparent()
        if parent is not None:
            parents[parent] = None
    for parent in parents:
        kept: list[tuple[etree._Element | None, str]] = []  # (node whose tail, None: text)
        target: etree._Element | None = None
        pieces = [parent.text or ""]
        for child in list(parent):
            if child.tag is not etree.Entity:
                kept.append((target, "".join(pieces)))
                target, pieces = child, [child.tail or ""]
                continue
            name = child.name
            text = declared.get(name, html5.get(f"{name};"))
            if text is None:
                text = f"&{name};"
                notes.append("unknown entity kept as text")
            pieces += (text, child.tail or "")
            child.tail = None
            parent.remove(child)
        kept.append((target, "".join(pieces)))
        for node, text in kept:
            if node is None:
                parent.text = text or None
            else:
                node.tail = text or None


_STRAY_BYTE = re.compile("[\udc80-\udcff]")


def _decode(data: bytes) -> str:
    """Decode a file whose declared encoding did not hold. UTF-8 with a few stray bytes (a
    Latin-1 "\xb1" pasted into a UTF-8 file) keeps its UTF-8 and reads only the stray bytes as
    cp1252: decoding the whole file as cp1252 for one bad byte turned every "ö" into "Ã¶". A file
    with more invalid bytes than valid multi-byte characters is not UTF-8: it is read in the
    encoding its prolog declares, else as cp1252."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    text = data.decode("utf-8-sig", errors="surrogateescape")
    stray = len(_STRAY_BYTE.findall(text))
    if not stray:
        return text
    multibyte = sum(1 for c in text if c > "\x7f") - stray
    if stray > multibyte:
        # Not UTF-8: the encoding the prolog names when the bytes decode in it ("ISO-8859-2",
        # "windows-1251", "Shift_JIS"), else cp1252. Read as cp1252, a Polish or Russian
        # caption with one &nbsp; in it became mojibake ("płuc" -> "p³uc").
        declared = _declared_encoding(data)
        if declared is not None:
            try:
                return data.decode(declared)
            except UnicodeDecodeError:
                pass
        return data.decode("cp1252", errors="replace")
    return _STRAY_BYTE.sub(
        lambda m: bytes([ord(m.group(0)) - 0xDC00]).decode("cp1252", errors="replace"), text
    )


_ENCODING_DECL = re.compile(rb"""^\s*<\?xml[^>]*?\bencoding\s*=\s*["']([A-Za-z][\w.:-]*)["']""")


def _utf8_declared_single_byte(data: bytes) -> bytes | None:
    """``data`` declared UTF-8 instead, when its prolog names a single-byte encoding (ISO-8859-1,
    windows-1252, ...) but its bytes are UTF-8 with non-ASCII characters in them. Every byte
    sequence is valid Latin-1, so the strict parser read such a file without complaint and
    every "ö" became "Ã¶", "×400" "Ã\x97400"; legacy text that happens to be valid UTF-8 is
    mojibake already ("Ã¶" written in Latin-1)."""
    m = _ENCODING_DECL.match(data[:512])
    if not m:
        return None
    try:
        codec = codecs.lookup(m.group(1).decode("ascii")).name
    except LookupError:
        return None
    if codec.startswith("utf") or len(bytes(range(256)).decode(codec, errors="replace")) != 256:
        return None  # a UTF, or a multi-byte encoding (Shift_JIS, GBK)
    if data.isascii():
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data[: m.start(1)] + b"UTF-8" + data[m.end(1) :]


def _declared_encoding(data: bytes) -> str | None:
    """The codec the XML declaration names, when Python knows it and it is not a UTF. Latin-1
    and ASCII are read as cp1252, as browsers do: files labelled so often hold cp1252's quotes."""
    m = _ENCODING_DECL.match(data[:512])
    if not m:
        return None
    try:
        name = codecs.lookup(m.group(1).decode("ascii")).name
    except LookupError:
        return None
    if name.startswith("utf"):
        return None
    return "cp1252" if name in ("iso8859-1", "ascii") else name


def _strip_namespaces(root: etree._Element) -> None:
    """Drop element namespaces (JATS with a default namespace, or prefixed ones) so that one set
    of tag names serves every variant. Attributes keep theirs (``{xlink}href``)."""
    for el in root.iter():
        tag = el.tag
        if isinstance(tag, str) and tag[0] == "{":
            el.tag = tag.rsplit("}", 1)[1]
    etree.cleanup_namespaces(root)


def _href(el: etree._Element) -> str | None:
    for key, value in el.attrib.items():
        if key == "href" or key.endswith("}href"):
            return value.strip() or None
    return None


# Blocks and line breaks inside a paragraph, caption or title: their text is separated from its
# neighbours ("Panels:<list><list-item><p>(A) axial CT</p></list-item>...", "Axial CT<break/>of").
_BLOCKS = frozenset(
    {
        "p",
        "list",
        "list-item",
        "def-list",
        "def-item",
        "term",
        "def",
        "label",
        "title",
        "disp-quote",
        "boxed-text",
        "statement",
        "verse-group",
        "verse-line",
        "break",
    }
)


def _flat(el: etree._Element) -> str:
    """The element's text, with formulas as readable text: PMC gives most formulas as
    ``<alternatives>`` of TeX and MathML, and the TeX is a whole LaTeX document
    (``\\documentclass...\\begin{document}$\\times 400$\\end{document}``) that would otherwise land in
    captions and training answers. MathML's text is kept; TeX only when nothing else is there,
    reduced to its formula."""

    def inner(e: etree._Element) -> str:
        if e.tag == "tex-math":
            alt = e.getparent()
            if alt is None or alt.tag != "alternatives" or alt.find("math") is None:
                return _tex_text("".join(e.itertext()))
            return ""
        if not isinstance(e.tag, str):
            return ""
        text = (e.text or "") + "".join(
            (f" {inner(c)} " if c.tag in _BLOCKS else inner(c)) + (c.tail or "") for c in e
        )
        # A formula's markup is laid out over lines; inside the sentence it is one token.
        return normalize_ws(text) if e.tag in ("inline-formula", "disp-formula") else text

    return inner(el)


_TEX_DOC = re.compile(r"\\begin\{document\}(.*?)\\end\{document\}", re.S)
_TEX_SYMBOLS = {
    "times": "\u00d7", "pm": "\u00b1", "mu": "\u00b5", "alpha": "\u03b1", "beta": "\u03b2",
    "gamma": "\u03b3", "le": "\u2264", "leq": "\u2264", "ge": "\u2265", "geq": "\u2265",
    "sim": "~", "approx": "\u2248", "circ": "\u00b0", "%": "%",
}  # fmt: skip


def _tex_text(tex: str) -> str:
    m = _TEX_DOC.search(tex)
    body = (m.group(1) if m else tex).strip().strip("$").strip()
    body = re.sub(r"\\([A-Za-z]+|%)", lambda t: _TEX_SYMBOLS.get(t.group(1), t.group(0)), body)
    return re.sub(r"\\(?:mathrm|text|rm|mathit)\{([^{}]*)\}", r"\1", body)


def _ids(article: etree._Element) -> tuple[str | None, str | None]:
    meta = article.find("front/article-meta")
    if meta is None:
        meta = article.find(".//article-meta")
    pmid = pmcid = None
    if meta is not None:
        for aid in meta.findall("article-id"):
            kind = (aid.get("pub-id-type") or "").lower()
            value = normalize_ws(_flat(aid))
            if not value:
                continue
            if kind == "pmid" and pmid is None:
                pmid = value
            elif kind in ("pmc", "pmcid") and pmcid is None:
                pmcid = value if value.upper().startswith("PMC") else f"PMC{value}"
    return pmid, pmcid


_CAPTION_BLOCKS = frozenset({"title", "p", "list", "def-list", "disp-quote", "disp-formula"})


def _caption(fig: etree._Element) -> str:
    caption = fig.find("caption")
    if caption is None:
        return ""
    # Blocks (title, paragraphs) are separate sentences; inline markup directly in the caption
    # ("CD4<sup>+</sup> T cells") joins its neighbours without a space, as in a paragraph.
    parts: list[str] = []
    run = [caption.text or ""]
    for child in caption:
        if child.tag in _CAPTION_BLOCKS:
            parts.append("".join(run))
            run = []
            text = normalize_ws(_flat(child))
            if child.tag == "title" and text and text[-1] not in ".!?:;":
                text += "."  # "Chest radiograph" + "Bilateral..." reads as two sentences
            parts.append(text)
        else:  # inline markup, or a line break straight in the caption
            run.append(f" {_flat(child)} " if child.tag in _BLOCKS else _flat(child))
        run.append(child.tail or "")
    parts.append("".join(run))
    return normalize_ws(" ".join(p for p in parts if p.strip()))


def _skip_reason(fig: etree._Element, label: str | None) -> str | None:
    fig_type = (fig.get("fig-type") or "").lower()
    ancestors = {a.tag for a in fig.iterancestors()}
    if "supplementary-material" in ancestors or fig_type.startswith("suppl"):
        return "supplementary figure"
    if "sub-article" in ancestors or "response" in ancestors:
        # Peer-review material ("Author response image 1"), numbered apart from the article's
        # own figures: its "1" would take the citations of the article's Figure 1.
        return "sub-article figure"
    if label and _SUPPL_LABEL.match(label):
        return "supplementary figure"
    if "table-wrap" in ancestors or fig_type == "table" or (label and _TABLE_LABEL.match(label)):
        return "table figure"
    return None


def _graphic(fig: etree._Element, outside: frozenset[str] = frozenset()) -> tuple[str | None, int]:
    """The figure's image and how many images it has: several (panels as separate files)
    pair the whole caption with the first panel only, which the ingest report counts. Each
    ``<alternatives>`` counts once: it holds versions of one image. Graphics inside a
    ``<caption>``, or inside an element named in ``outside`` below ``fig``, are not its own."""
    refs: list[str] = []
    seen_alternatives: list[etree._Element] = []  # kept alive, so `is` compares nodes
    for g in fig.iter("graphic"):
        if any(a.tag == "caption" for a in g.iterancestors()):
            continue
        if outside and any(a.tag in outside for a in _ancestors_below(g, fig)):
            continue
        ref = _href(g)
        if not ref:
            continue
        alt = g.getparent()
        if alt is not None and alt.tag == "alternatives":
            if any(alt is a for a in seen_alternatives):
                continue
            seen_alternatives.append(alt)
        refs.append(ref)
    return (refs[0] if refs else None), len(refs)


def _ancestors_below(el: etree._Element, top: etree._Element) -> Iterator[etree._Element]:
    """``el``'s ancestors up to, not including, ``top``."""
    for a in el.iterancestors():
        if a is top:
            return
        yield a


_PANEL_LABEL = re.compile(r"^\(?([A-Za-z]{1,2})[.):]?$")
_DIGIT = re.compile(r"\d")


def _member_label(label: str, group_label: str) -> str:
    """A fig-group member's label in full: members are often labelled by panel only ("A" in the
    group "Figure 2"), which names no figure number; without it the member takes its position
    in reading order as its number, which can be another figure's ("Fig. 3" citations landing on
    panel B of Figure 2)."""
    if not label:
        return group_label
    if label_number(label) is not None or label_number(group_label) is None:
        return label
    if _DIGIT.search(label):  # its own number in another series: "Figure 2—figure supplement 1."
        return label
    if _SUPPL_LABEL.match(label) or _TABLE_LABEL.match(label):
        return label
    panel = _PANEL_LABEL.match(label)
    stem = group_label.rstrip(" .:")
    return f"{stem}{panel.group(1)}" if panel else f"{stem} {label}"


_ALNUM = re.compile(r"[^\W_]")
_LABEL_ONLY = re.compile(r"(?:fig(?:ure)?s?\.?\s*)?\d{1,3}[A-Za-z]?", re.I)


def _says_nothing(caption: str, label: str | None) -> bool:
    """An empty caption, or one that is only punctuation or the figure's label again
    (``<caption><p>.</p></caption>``, ``<caption><title>Figure 1</title></caption>``): such a
    figure was kept with "." or "Figure 1." as its caption, a training answer saying nothing."""
    if not _ALNUM.search(caption):
        return True
    text = caption.strip().rstrip(".:;,").strip()
    if label and text.lower() == label.strip().rstrip(".:;,").strip().lower():
        return True
    return bool(_LABEL_ONLY.fullmatch(text))


def _group_image(group: etree._Element) -> tuple[str, int] | None:
    """The image of a ``<fig-group>`` that is one figure: a ``<graphic>`` on the group itself
    (JATS allows graphics beside or instead of the member figures), when none of its member
    figures has an image of its own. Such members carry only panel captions ("A", "Axial
    view"), or there are none; a group whose members have images is read member by member."""
    members = [c for c in group if c.tag == "fig"]
    if any(_graphic(m)[0] for m in members):
        return None
    ref, n = _graphic(group, outside=frozenset({"fig", "fig-group"}))
    return (ref, n) if ref else None


def _label_of(el: etree._Element) -> str:
    label_el = el.find("label")
    return normalize_ws(_flat(label_el)) if label_el is not None else ""


def _unique_id(
    xml_id: str, fallback: str, suffix: str, seen_ids: set[str], notes: list[str]
) -> str:
    """A figure's id, unique in its article: its XML id, else ``fallback``; an id seen before
    gets ``_<suffix>``, so both figures keep a record of their own (each case noted)."""
    fig_id = xml_id or fallback
    if not xml_id:
        notes.append("figure without id")
    if fig_id in seen_ids:
        notes.append("duplicate figure id")
        fig_id = f"{fig_id}_{suffix}"
    seen_ids.add(fig_id)
    return fig_id


def _whole_group(
    group: etree._Element,
    image: tuple[str, int],
    n_group: int,
    seen_ids: set[str],
    group_members: dict[str, list[str]],
    notes: list[str],
) -> Figure:
    """The one figure of a group whose image sits on the group: its label, its caption followed
    by the members' ("(A) Axial view. (B) Coronal view."), citations of a member its own."""
    members = [c for c in group if c.tag == "fig"]
    parts = [_caption(group)]
    for member in members:
        caption = _caption(member)
        label = _label_of(member)
        if caption and label:
            panel = _PANEL_LABEL.match(label)
            lead = f"({panel.group(1)})" if panel else label
            if not panel and lead[-1] not in ".!?:;)":
                lead += "."
            caption = f"{lead} {caption}"
        parts.append(caption)
    caption = normalize_ws(" ".join(p for p in parts if p))
    label = _label_of(group)
    member_ids = [(m.get("id") or "").strip() for m in members]
    xml_id = (group.get("id") or "").strip() or next((i for i in member_ids if i), "")
    fig_id = _unique_id(xml_id, f"fig-group{n_group}", f"group{n_group}", seen_ids, notes)
    for member_id in member_ids:
        if member_id and member_id != fig_id:
            group_members[member_id] = [fig_id]
    return _figure(group, fig_id, label, caption, image, notes, xml_id)


def _figure(
    el: etree._Element,
    fig_id: str,
    label: str,
    caption: str,
    image: tuple[str | None, int],
    notes: list[str],
    xml_id: str | None = None,
) -> Figure:
    """The figure read from ``el`` (a ``<fig>``, or a ``<fig-group>`` that is one figure), with
    the reason it is not a figure-caption pair when it is not one."""
    graphic_ref, n_graphics = image
    if n_graphics > 1:
        notes.append("figure with several images: the first is taken")
    f = Figure(
        fig_id=fig_id,
        label=label or None,
        caption=caption,
        graphic_ref=graphic_ref,
        number=label_number(label),
        xml_id=xml_id or None,
    )
    f.skip_reason = _skip_reason(el, f.label)
    if f.skip_reason is None:
        if not f.graphic_ref:
            f.skip_reason = "no graphic"
        elif _says_nothing(f.caption, f.label):
            f.skip_reason = "no caption"
    return f


def _figures(
    article: etree._Element, notes: list[str]
) -> tuple[list[Figure], dict[str, list[str]]]:
    figures: list[Figure] = []
    # fig-group id -> ids of its figures; a member of a group that is one image -> the group's
    group_members: dict[str, list[str]] = {}
    seen_ids: set[str] = set()
    slots: list[tuple] = []  # per figure: the place it takes in the figures' reading order
    last_group: etree._Element | None = None  # kept alive, so `is` compares nodes
    whole_groups: list[etree._Element] = []  # groups that are one figure; kept alive, as above
    n_groups = 0
    index = 0  # of the <fig> elements, as their fallback ids count them
    for fig in article.iter("fig", "fig-group"):
        if fig.tag == "fig-group":
            image = _group_image(fig)
            if image is not None:
                whole_groups.append(fig)
                n_groups += 1
                f = _whole_group(fig, image, n_groups, seen_ids, group_members, notes)
                figures.append(f)
                slots.append(("group", n_groups, f.number))
            continue
        index += 1
        group = fig.getparent()
        in_group = group is not None and group.tag == "fig-group"
        if in_group and any(group is g for g in whole_groups):
            continue  # its caption is part of its group's
        if in_group and group is not last_group:
            last_group = group
            n_groups += 1
        label = _label_of(fig)
        caption = _caption(fig)
        if in_group:
            group_label = _label_of(group)
            group_caption = _caption(group)
            if not caption:
                caption = group_caption
            elif group_caption:
                caption = f"{group_caption} {caption}"
            label = _member_label(label, group_label)
        xml_id = (fig.get("id") or "").strip()
        fig_id = _unique_id(xml_id, f"fig{index}", str(index), seen_ids, notes)
        if in_group and group.get("id"):
            group_members.setdefault(group.get("id"), []).append(fig_id)
        f = _figure(fig, fig_id, label, caption, _graphic(fig), notes, xml_id)
        figures.append(f)
        # A group's panels that share a number (or have none) are one figure of the text; its
        # members with numbers of their own ("Figure 3", "Figure 4") are one each.
        slots.append(("group", n_groups, f.number) if in_group else ("fig", index))
    _number_by_position(figures, slots)
    return figures, group_members


def _number_by_position(figures: list[Figure], slots: list[tuple]) -> None:
    """A figure without a numbered label is still "Fig. 5" in the text when it is the fifth.
    Positions count the main figure series only (a "Scheme 1", "Box 2" or figure supplement has
    numbers of its own), main figures left out for want of an image or caption included (they
    are numbered in the text all the same), and a fig-group's panels once."""
    counted = [
        (f, slot)
        for f, slot in zip(figures, slots, strict=True)
        if (f.skip_reason is None or f.skip_reason in _UNPAIRED_MAIN)
        and (f.number is not None or not (f.label and _DIGIT.search(f.label)))
    ]
    taken = {f.number for f, _ in counted if f.number is not None}
    ordinal = 0
    last_slot = None
    for f, slot in counted:
        if slot != last_slot:
            ordinal += 1
            last_slot = slot
        if f.number is None and ordinal not in taken:
            f.number = ordinal


# --- inline mentions -------------------------------------------------------------------------


@dataclass
class _Ref:
    start: int
    end: int
    rids: list[str]
    text: str


def _paragraph(p: etree._Element) -> tuple[str, list[_Ref]]:
    """The paragraph's running text, and the spans of its figure citations within it."""
    parts: list[str] = []
    refs: list[_Ref] = []
    pos = 0

    def add(text: str | None) -> None:
        nonlocal pos
        if text:
            parts.append(text)
            pos += len(text)

    def walk(el: etree._Element) -> None:
        add(el.text)
        for child in el:
            tag = child.tag
            if tag == "inline-formula":  # "P<0.05", "×400": readable text, not raw TeX or nothing
                add(normalize_ws(_flat(child)))
            elif not isinstance(tag, str) or tag in _NOT_PROSE:
                pass
            elif tag == "xref" and (child.get("ref-type") or "").lower() == "fig":
                text = _flat(child)
                start = pos
                add(text)
                refs.append(_Ref(start, pos, (child.get("rid") or "").split(), text))
            elif tag in _BLOCKS:  # a list in the paragraph: "Findings:<list-item>a mass..."
                add(" ")
                walk(child)
                add(" ")
            else:
                walk(child)
            add(child.tail)

    walk(p)
    return "".join(parts), refs


def _mentions(
    article: etree._Element,
    figures: list[Figure],
    group_members: dict[str, list[str]],
    notes: list[str],
) -> dict[str, list[str]]:
    main = [f for f in figures if f.skip_reason is None]
    if not main:
        return {}
    # An id several figures share (invalid JATS, but it occurs): a citation of it went to the
    # first of them only, whichever figure its text named.
    sharing: dict[str, list[Figure]] = {}
    for f in figures:
        if f.xml_id:
            sharing.setdefault(f.xml_id, []).append(f)
    shared = {k: v for k, v in sharing.items() if len(v) > 1}
    # So is a fig-group's id, or the id of a member of a group that is one figure, that another
    # figure has too: its citations all went to the group, "Figure 3" included.
    by_id = {f.fig_id: f for f in figures}
    for rid, ids in group_members.items():
        if rid in sharing:
            group = [by_id[i] for i in ids if i in by_id]
            shared[rid] = list({id(f): f for f in sharing[rid] + group}.values())

    def rid_ids(rid: str, text: str) -> list[str]:
        if rid not in shared:
            return group_members.get(rid, [rid])
        if _SUPPL_LABEL.match(text):
            # "Figure S1", "Supplementary Figure 1" linked to an id that Figure 1 has too: the
            # supplementary figure, not Figure 1 (which its "1" or the main-first rule picked).
            suppl = [f.fig_id for f in shared[rid] if f.skip_reason == "supplementary figure"]
            if suppl:
                return suppl
        candidates = [f for f in shared[rid] if f.skip_reason is None] or shared[rid]
        named = set(numbers_in_citation(text))
        picked = [f.fig_id for f in candidates if f.number is not None and f.number in named]
        if picked:
            return picked  # the one whose number the citation names ("Figure 2")
        if len(candidates) > 1:  # no number tells them apart: each may be the one meant
            notes.append("ambiguous citation of a duplicate figure id")
        return [f.fig_id for f in candidates]

    known = {f.fig_id for f in main}
    # Main figures left out for want of an image or caption are still numbered in the text.
    main_like = known | {f.fig_id for f in figures if f.skip_reason in _UNPAIRED_MAIN}
    by_number: dict[int, list[str]] = {}  # several for a fig-group's panels ("Figure 2A", "2B")
    number_of: dict[str, int] = {}
    for f in main:
        if f.number is not None:
            by_number.setdefault(f.number, []).append(f.fig_id)
            number_of[f.fig_id] = f.number
    out: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}

    def cited_numbers(numbers: list[int]) -> list[str]:
        return [x for n in numbers for x in by_number.get(n, [])]

    for body in article.iter("body"):
        for p in body.iter("p"):
            if any(a.tag in _NOT_MENTION_CONTEXT for a in p.iterancestors()):
                continue
            if not any(
                (x.get("ref-type") or "").lower() == "fig" for x in p.iter("xref")
            ):  # most paragraphs cite no figure: skip the walk
                continue
            text, refs = _paragraph(p)
            if not refs:
                continue
            for a, b in split_sentences(text):
                in_sentence = [r for r in refs if a <= r.start < b]
                if not in_sentence:
                    continue
                # Each citation's figures, its rids resolved (a fig-group's id, a shared id):
                # also the end of a range the citation before it opens.
                linked = [[x for rid in r.rids for x in rid_ids(rid, r.text)] for r in in_sentence]
                cited: list[str] = []
                for i, ref in enumerate(in_sentence):
                    ids = list(linked[i])
                    if ref.rids and not any(x in main_like for x in ids):
                        # It links to something else: a figure supplement ("Figure 4-figure
                        # supplement 1"), "Supplementary Figs. 1-3", a table. Its numbers are
                        # not main figures' numbers.
                        continue
                    ids = [x for x in ids if x in known]
                    own_numbers = numbers_in_citation(ref.text)
                    if len(own_numbers) > 1:  # "Figs. 2–4" inside one xref
                        ids.extend(cited_numbers(own_numbers))
                    nxt = in_sentence[i + 1].start if i + 1 < len(in_sentence) else b
                    after = text[ref.end : nxt]
                    last = max((number_of[x] for x in ids if x in number_of), default=None)
                    trailing = trailing_numbers(after)
                    if trailing and last is not None and trailing_is_range(after):
                        ids.extend(cited_numbers(list(range(last, trailing[0] + 1))))
                    ids.extend(cited_numbers(trailing))
                    if i + 1 < len(in_sentence) and is_range_gap(after) and last is not None:
                        # Resolved, not as written: a range ending at a fig-group's id, or at
                        # an id two figures share, ended at nothing or at the wrong figure.
                        nxt_ids = [x for x in linked[i + 1] if x in number_of]
                        if nxt_ids:
                            hi = number_of[nxt_ids[0]]
                            if 0 < hi - last <= 50:
                                ids.extend(cited_numbers(list(range(last, hi + 1))))
                    cited.extend(ids)
                if not cited:
                    continue
                sentence = normalize_ws(text[a:b])
                for fig_id in dict.fromkeys(cited):
                    if sentence not in seen.setdefault(fig_id, set()):
                        seen[fig_id].add(sentence)
                        out.setdefault(fig_id, []).append(sentence)
    return out
