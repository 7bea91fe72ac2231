import pytest

from llavamed.data.pmc.jats import parse_article, parse_articles
from llavamed.errors import InputError
from pmc_fixtures import DATA


def _article(name):
    return parse_article((DATA / f"{name}.nxml").read_bytes(), name)


def test_ids_captions_labels_and_skips():
    a = _article("PMC1000001")
    assert (a.pmid, a.pmcid) == ("31000001", "PMC1000001")
    figs = {f.fig_id: f for f in a.figures}
    # <title> plus two <p>, whitespace normalised, <italic> flattened.
    assert figs["F1"].caption == (
        "Chest radiograph on admission. Posteroanterior view showing a right upper lobe opacity. "
        "The cardiac silhouette is normal."
    )
    assert figs["F1"].graphic_ref == "pmc-1000001-g001"
    # <fig-group>: the group's caption leads each member's caption.
    assert figs["F3"].caption == "CT follow-up. Coronal CT at 3 months."
    assert figs["F5"].label is None and figs["F5"].caption.endswith("(H&E, ×400).")
    assert figs["SF1"].skip_reason == "supplementary figure"
    assert figs["F7"].skip_reason == "no caption"
    assert figs["F6"].skip_reason is None
    assert "T1" not in figs  # a table-wrap is not a figure


def test_mentions_ranges_lists_and_sentence_bounds():
    m = _article("PMC1000001").mentions
    range_sentence = (
        "Contrast-enhanced CT images are shown in Figs. 2–4, as described by Smith et al. (2019)."
    )
    list_sentence = "Panels are summarised in Fig. 3, 4, 5."
    assert m["F1"] == ["The admission chest radiograph showed a right upper lobe opacity (Fig. 1)."]
    assert m["F2"] == [range_sentence]
    assert m["F3"] == [range_sentence, list_sentence]  # F3 sits inside the range 2–4
    assert m["F4"] == [range_sentence, list_sentence]
    # F5 has no <label> but is the fifth figure, so "Fig. 3, 4, 5" cites it.
    assert m["F5"] == [
        "Histology, e.g. the H&E stain in Fig. 5, confirmed adenocarcinoma.",
        list_sentence,
    ]
    assert "SF1" not in m and "F7" not in m


def test_default_namespace_prefixed_xlink_latin1_and_multi_rid():
    a = _article("PMC1000002")
    assert a.pmcid == "PMC1000002" and a.pmid is None
    figs = {f.fig_id: f for f in a.figures}
    assert "München" in figs["F1"].caption
    assert figs["F2"].graphic_ref == "brain-g2"
    assert figs["F3"].skip_reason == "table figure"
    both = "Brain MRI findings (Figures 1 and 2) were reviewed by two radiologists, i.e. independently."
    inside = "T2 hyperintensities were most frequent (Figures 1-2)."
    assert a.mentions["F1"] == [both, inside]
    assert a.mentions["F2"] == [both, inside]  # rid="F1 F2" and a range inside one xref


def test_malformed_xml_is_recovered_and_noted():
    a = _article("PMC1000003")
    assert "malformed XML recovered" in a.notes
    assert a.pmcid == "PMC1000003"
    assert a.figures[0].caption.startswith("Gross appearance of the resected kidney")
    assert a.mentions["f1"][0].startswith("The specimen is shown in Fig. 1.")  # &nbsp; kept


def test_unusable_xml_raises_countable_errors():
    with pytest.raises(InputError) as e:
        parse_article(b"", "x.nxml")
    assert e.value.reason == "empty XML file"
    with pytest.raises(InputError) as e:
        parse_article(b"\x00\x01 not xml", "x.nxml")
    assert e.value.reason == "malformed XML"
    with pytest.raises(InputError) as e:
        parse_article(b"<html><body/></html>", "x.nxml")
    assert e.value.reason == "not a JATS article"


def test_wrong_declared_encoding_and_missing_ids():
    doc = (
        b'<?xml version="1.0" encoding="no-such-encoding"?><article><body><fig>'
        b"<caption><p>CT scan.</p></caption><graphic href='a.png'/></fig></body></article>"
    )
    a = parse_article(doc, "PMC77.nxml", fallback_pmcid="PMC77")
    assert a.notes == ["XML encoding or entities repaired", "figure without id"]
    assert a.pmcid == "PMC77"
    assert a.figures[0].fig_id == "fig1" and a.figures[0].graphic_ref == "a.png"


def test_formulas_inline_markup_and_several_images_in_captions():
    # What real PMC OA files carry: formulas as <alternatives> of a whole LaTeX document and
    # MathML, TeX-only formulas, inline markup straight in <caption>, and panels as separate files.
    xml = b"""<article xmlns:xlink="http://www.w3.org/1999/xlink"
      xmlns:mml="http://www.w3.org/1998/Math/MathML"><front><article-meta>
      <article-id pub-id-type="pmc">123</article-id></article-meta></front><body>
      <fig id="F1"><label>Figure 1</label><caption><p>Lesion (H&amp;E, <inline-formula>
        <alternatives><tex-math id="M1">\\documentclass[12pt]{minimal}\\usepackage{amsmath}
        \\begin{document}$\\times 400$\\end{document}</tex-math><mml:math><mml:mo>&#x00d7;</mml:mo>
        <mml:mn>400</mml:mn></mml:math><inline-graphic xlink:href="m1.gif"/></alternatives>
        </inline-formula>).</p></caption><graphic xlink:href="g1"/></fig>
      <fig id="F2"><label>Figure 2</label><caption><p>Scale bar <inline-formula><tex-math>
        \\documentclass{minimal}\\begin{document}$50\\,\\mu$m\\end{document}</tex-math>
        </inline-formula>.</p></caption><graphic xlink:href="g2"/></fig>
      <fig id="F3"><label>Figure 3</label><caption>CD4<sup>+</sup> T cells in H<sub>2</sub>O
        (<italic>n</italic>=5)</caption>
        <graphic xlink:href="g3a"/><graphic xlink:href="g3b"/></fig>
      <fig id="F4"><label>Figure 4</label><caption><title>One image</title></caption>
        <alternatives><graphic xlink:href="g4.tif"/><graphic xlink:href="g4.jpg"/></alternatives>
      </fig>
    </body></article>"""
    a = parse_article(xml, "x.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert figs["F1"].caption == "Lesion (H&E, \u00d7 400)."  # MathML text, no LaTeX
    assert "documentclass" not in figs["F2"].caption and "\u00b5" in figs["F2"].caption
    assert figs["F3"].caption == "CD4+ T cells in H2O (n=5)"
    assert figs["F3"].graphic_ref == "g3a" and figs["F4"].graphic_ref == "g4.tif"
    assert a.notes.count("figure with several images: the first is taken") == 1  # F3, not F4


def test_notices_and_peer_review_figures_are_not_article_figures():
    notice = b"""<article article-type="retraction"><front><article-meta>
      <article-id pub-id-type="pmc">9</article-id></article-meta></front><body><fig id="F1">
      <label>Figure 1</label><caption><p>Axial CT.</p></caption><graphic href="g1"/></fig>
      </body></article>"""
    with pytest.raises(InputError, match="notice article"):
        parse_article(notice, "n.nxml")
    reviewed = b"""<article article-type="research-article"><body>
      <p>See <xref ref-type="fig" rid="F1">Fig. 1</xref>.</p>
      <fig id="F1"><label>Figure 1</label><caption><p>Axial CT.</p></caption>
      <graphic href="g1"/></fig></body><sub-article article-type="reply"><body>
      <fig id="sa2fig1"><label>Author response image 1.</label><caption><p>Re-analysis.</p>
      </caption><graphic href="sa2fig1"/></fig></body></sub-article></article>"""
    a = parse_article(reviewed, "r.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert figs["F1"].skip_reason is None and a.mentions["F1"] == ["See Fig. 1."]
    assert figs["sa2fig1"].skip_reason == "sub-article figure"


def _with_figures(body: str, extra: str = "", figures: str | None = None) -> dict:
    figs = figures or "".join(
        f'<fig id="F{i}"><label>Figure {i}</label><caption><p>Cap {i}.</p></caption>'
        f'<graphic xlink:href="g{i}"/></fig>'
        for i in (1, 2, 3)
    )
    xml = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink" '
        'xmlns:mml="http://www.w3.org/1998/Math/MathML"><front><article-meta>'
        '<article-id pub-id-type="pmc">123</article-id></article-meta></front>'
        f"<body><sec>{body}{figs}</sec></body>{extra}</article>"
    )
    return parse_article(xml.encode(), "a.nxml").mentions


def test_citations_of_supplements_are_not_main_figure_mentions():
    # eLife: "Figure 4—figure supplement 1" linked to the supplement; its "1" is not Figure 1.
    elife = "".join(
        f'<fig-group><fig id="fig{i}"><label>Figure {i}.</label><caption><p>Main {i}.</p>'
        f'</caption><graphic xlink:href="f{i}"/></fig><fig id="fig{i}s1" specific-use="child-fig">'
        f"<label>Figure {i}\u2014figure supplement 1.</label><caption><p>Supp.</p></caption>"
        f'<graphic xlink:href="f{i}s1"/></fig></fig-group>'
        for i in (1, 2, 3, 4)
    )
    m = _with_figures(
        '<p>Neurons fired (<xref ref-type="fig" rid="fig4s1">Figure 4\u2014figure supplement 1'
        '</xref>). Mice lost weight (<xref ref-type="fig" rid="fig3s1">Figure 3\u2014figure '
        "supplements 1\u20132</xref>).</p>",
        figures=elife,
    )
    assert not any(k in m for k in ("fig1", "fig2"))
    assert m["fig4s1"] == ["Neurons fired (Figure 4\u2014figure supplement 1)."]
    # An xref to supplementary material, typed "fig": its numbers are the supplement's.
    m = _with_figures(
        '<p>Other cohorts agreed (<xref ref-type="fig" rid="MOESM1">Supplementary Figs. '
        "1\u20133</xref>).</p>"
    )
    assert m == {}


def test_peer_review_text_and_formulas_in_mentions():
    review = (
        '<sub-article article-type="referee-report"><body><p>The authors should improve '
        '<xref ref-type="fig" rid="F1">Figure 1</xref>, it is unreadable.</p></body></sub-article>'
    )
    m = _with_figures('<p>See <xref ref-type="fig" rid="F1">Fig. 1</xref>.</p>', extra=review)
    assert m["F1"] == ["See Fig. 1."]  # the decision letter is not the article's prose
    m = _with_figures(
        "<p>Imaged at <inline-formula><alternatives><tex-math>\\documentclass{minimal}"
        "\\begin{document}$\\times 400$\\end{document}</tex-math><mml:math><mml:mo>\u00d7"
        "</mml:mo><mml:mn>400</mml:mn></mml:math></alternatives></inline-formula> "
        '(<xref ref-type="fig" rid="F1">Fig. 1</xref>).</p>'
    )
    assert m["F1"] == ["Imaged at \u00d7400 (Fig. 1)."]  # neither lost nor raw TeX


def test_a_count_after_a_citation_is_not_a_figure_number():
    m = _with_figures(
        '<p>Lesions were hypodense in <xref ref-type="fig" rid="F1">Fig. 1</xref>, 3 of the 10 '
        'patients.</p><p>Both views (<xref ref-type="fig" rid="F1">Fig. 1</xref>, 2) agree.</p>'
    )
    assert "F3" not in m
    assert m["F1"] == [
        "Lesions were hypodense in Fig. 1, 3 of the 10 patients.",
        "Both views (Fig. 1, 2) agree.",
    ]
    assert m["F2"] == ["Both views (Fig. 1, 2) agree."]


def test_fig_group_members_labelled_by_panel_take_the_group_number():
    figures = (
        '<fig id="F1"><label>Figure 1</label><caption><p>Cap 1.</p></caption>'
        '<graphic xlink:href="g1"/></fig>'
        '<fig-group id="G2"><label>Figure 2.</label><caption><p>CT follow-up.</p></caption>'
        + "".join(
            f'<fig id="F2{p}"><label>{p}</label><caption><p>Panel {p}.</p></caption>'
            f'<graphic xlink:href="g2{p}"/></fig>'
            for p in "AB"
        )
        + '</fig-group><fig id="F3"><label>Figure 3</label><caption><p>Cap 3.</p></caption>'
        '<graphic xlink:href="g3"/></fig>'
    )
    xml = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><body><sec><p>Nodules '
        '(<xref ref-type="fig" rid="F1">Fig. 1</xref>, 3) and follow-up '
        f'(<xref ref-type="fig" rid="G2">Fig. 2</xref>). Both series agree '
        f'(<xref ref-type="fig" rid="F1">Figs. 1\u20132</xref>).</p>{figures}</sec></body></article>'
    )
    a = parse_article(xml.encode(), "g.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert (figs["F2A"].label, figs["F2B"].label) == ("Figure 2A", "Figure 2B")
    assert figs["F2A"].number == figs["F2B"].number == 2
    # "Fig. 1, 3" names Figure 3, not panel B (the third figure in reading order)
    assert "F2B" in a.mentions
    both = "Both series agree (Figs. 1\u20132)."
    assert a.mentions["F2B"] == ["Nodules (Fig. 1, 3) and follow-up (Fig. 2).", both]
    assert a.mentions["F2A"] == a.mentions["F2B"]  # a number names every panel that has it
    assert a.mentions["F3"] == ["Nodules (Fig. 1, 3) and follow-up (Fig. 2)."]


def test_a_citation_linked_to_a_main_figure_without_image_still_names_the_others():
    figures = "".join(
        f'<fig id="F{i}"><label>Figure {i}</label><caption><p>Cap {i}.</p></caption>'
        + ("" if i == 2 else f'<graphic xlink:href="g{i}"/>')
        + "</fig>"
        for i in (1, 2, 3, 4)
    )
    m = _with_figures(
        '<p>Serial scans (<xref ref-type="fig" rid="F2">Figs. 2\u20134</xref>).</p>',
        figures=figures,
    )
    assert m == {"F3": ["Serial scans (Figs. 2\u20134)."], "F4": ["Serial scans (Figs. 2\u20134)."]}


def test_named_entities_survive_a_doctype():
    # PMC files declare the JATS DTD, which is never loaded: &nbsp; &times; &alpha; parse as
    # entity nodes that carry no text, and were deleted ("Tumour400, -SMA.", "See Fig.1").
    xml = (
        '<?xml version="1.0"?><!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal '
        'Archiving and Interchange DTD v1.2//EN" "JATS-archivearticle1.dtd" '
        '[<!ENTITY micro "&#181;m">]>'
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        '<article-id pub-id-type="pmc">5</article-id></article-meta></front><body>'
        '<p>See <xref ref-type="fig" rid="F1">Fig.&nbsp;1</xref> at 37&deg;C.</p>'
        '<fig id="F1"><label>Figure&nbsp;1</label><caption><p>Tumour&nbsp;&times;400, '
        "&alpha;-SMA<italic>+</italic>&ndash;cells, bar 5&micro;&#8203;&zzunknown;.</p>"
        '</caption><graphic xlink:href="g1"/></fig></body></article>'
    )
    a = parse_article(xml.encode(), "e.nxml")
    f = a.figures[0]
    assert f.caption == "Tumour \u00d7400, \u03b1-SMA+\u2013cells, bar 5\u00b5m\u200b&zzunknown;."
    assert f.label == "Figure 1" and f.number == 1
    assert a.mentions["F1"] == ["See Fig. 1 at 37\u00b0C."]
    assert a.notes == ["unknown entity kept as text"]


def _one_caption_article(caption: bytes) -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8"?><article><front><article-meta>'
        b'<article-id pub-id-type="pmc">6</article-id></article-meta></front><body>'
        b'<fig id="F1"><label>Figure 1</label><caption><p>' + caption + b"</p></caption>"
        b'<graphic href="g1"/></fig></body></article>'
    )


def test_a_stray_byte_does_not_turn_a_utf8_file_into_cp1252():
    # One Latin-1 byte (0xB1, "±") in a UTF-8 file: only that byte is read as cp1252.
    a = parse_article(_one_caption_article("Größe 5 µm, ".encode() + b"\xb1 2."), "u.nxml")
    assert a.figures[0].caption == "Größe 5 µm, ± 2."
    assert a.notes == ["XML encoding or entities repaired"]
    # A file that is cp1252 throughout (declared UTF-8) is still read as cp1252.
    a = parse_article(_one_caption_article("Größe 5 µm – ± 2.".encode("cp1252")), "c.nxml")
    assert a.figures[0].caption == "Größe 5 µm – ± 2."


def test_other_label_series_take_no_main_figure_numbers():
    # "Scheme 1" and eLife's "Figure 2—figure supplement 1." are numbered on their own: a range
    # "Figures 1–3" tagged as two xrefs names Figures 1 to 3, not the scheme or the supplement.
    figures = "".join(
        f'<fig id="F{i}"><label>Figure {i}</label><caption><p>Cap {i}.</p></caption>'
        f'<graphic xlink:href="g{i}"/></fig>'
        for i in (1, 2, 3)
    ) + (
        '<fig id="sch1"><label>Scheme 1</label><caption><p>Synthesis.</p></caption>'
        '<graphic xlink:href="s1"/></fig><fig-group><fig id="fig2s1"><label>Figure 2\u2014'
        "figure supplement 1.</label><caption><p>More.</p></caption>"
        '<graphic xlink:href="f2s1"/></fig></fig-group>'
        '<fig id="U"><caption><p>Unlabelled fifth figure.</p></caption>'
        '<graphic xlink:href="u"/></fig>'
    )
    xml = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><body><sec><p>All rose '
        '(<xref ref-type="fig" rid="F1">Figures 1</xref>\u2013<xref ref-type="fig" rid="F3">3'
        '</xref>). Yields fell (<xref ref-type="fig" rid="F3">Figs. 3</xref>, 4).</p>'
        f"{figures}</sec></body></article>"
    )
    a = parse_article(xml.encode(), "s.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert figs["sch1"].number is None and figs["fig2s1"].number is None
    assert figs["fig2s1"].label == "Figure 2\u2014figure supplement 1."
    assert figs["U"].number == 4  # the scheme and the supplement hold no place among figures
    assert sorted(a.mentions) == ["F1", "F2", "F3", "U"]
    assert a.mentions["U"] == ["Yields fell (Figs. 3, 4)."]


def test_an_unlabelled_figure_after_a_panel_group_takes_the_next_number():
    # Two unlabelled panels in a fig-group are one figure of the text (Figure 2): the figure
    # after them is the third, not the fourth.
    figures = (
        '<fig id="F1"><label>Figure 1</label><caption><p>Cap 1.</p></caption>'
        '<graphic xlink:href="g1"/></fig><fig-group id="G2"><caption><p>Two panels.</p>'
        "</caption>"
        + "".join(f'<fig id="F2{p}"><graphic xlink:href="g2{p}"/></fig>' for p in "ab")
        + '</fig-group><fig id="X"><caption><p>Third.</p></caption><graphic xlink:href="x"/>'
        "</fig>"
    )
    xml = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><body><sec><p>Follow-up '
        '(<xref ref-type="fig" rid="X">Figure 3</xref>).</p><p>Series (<xref ref-type="fig" '
        f'rid="F1">Figs. 1</xref>\u20133).</p>{figures}</sec></body></article>'
    )
    a = parse_article(xml.encode(), "o.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert (figs["F2a"].number, figs["F2b"].number, figs["X"].number) == (2, 2, 3)
    assert a.mentions["X"] == ["Follow-up (Figure 3).", "Series (Figs. 1\u20133)."]


def test_a_panel_range_ends_the_citing_sentence():
    m = _with_figures(
        '<p>Lesions are shown in <xref ref-type="fig" rid="F1">Figure 1A\u2013C</xref>. '
        'Treatment reduced them (<xref ref-type="fig" rid="F2">Figure 2</xref>).</p>'
    )
    assert m == {
        "F1": ["Lesions are shown in Figure 1A\u2013C."],
        "F2": ["Treatment reduced them (Figure 2)."],
    }


def test_lists_and_line_breaks_do_not_fuse_words():
    figures = (
        '<fig id="F1"><label>Figure 1</label><caption><p>Panels:<list><list-item><p>(A) axial '
        "CT</p></list-item><list-item><label>(B)</label><p>coronal CT</p></list-item></list>"
        '</p></caption><graphic xlink:href="g1"/></fig>'
        '<fig id="F2"><label>Figure 2</label><caption><title>Axial CT<break/>of the liver'
        '</title><p>Mass.</p>Arrow<break/>head</caption><graphic xlink:href="g2"/></fig>'
    )
    xml = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><body><sec><p>Two findings:<list '
        'list-type="bullet"><list-item><p>a mass in the liver (<xref ref-type="fig" rid="F1">'
        "Figure 1</xref>);</p></list-item><list-item><p>Ascites was seen.</p></list-item></list>"
        '</p><p>Other text<break/>as in <xref ref-type="fig" rid="F2">Figure 2</xref>.</p>'
        f"{figures}</sec></body></article>"
    )
    a = parse_article(xml.encode(), "l.nxml")
    figs = {f.fig_id: f for f in a.figures}
    assert figs["F1"].caption == "Panels: (A) axial CT (B) coronal CT"
    assert figs["F2"].caption == "Axial CT of the liver. Mass. Arrow head"
    assert a.mentions["F1"] == ["Two findings: a mass in the liver (Figure 1); Ascites was seen."]
    assert a.mentions["F2"] == ["Other text as in Figure 2."]


@pytest.mark.parametrize(
    ("encoding", "caption"),
    [
        ("ISO-8859-2", "Zdjęcie płuc, RTG"),
        ("windows-1251", "Рентгенограмма грудной клетки"),
        ("Shift_JIS", "胸部X線写真"),
        ("ISO-8859-1", "Radiographie “thoracique” é"),  # cp1252 quotes in a Latin-1 file
    ],
)
def test_a_declared_encoding_holds_when_an_entity_forces_the_repair_parse(encoding, caption):
    """A file in the encoding its prolog declares parses as is, until one &nbsp; (no DTD) sends it
    to the repair parse, which read every non-UTF-8 file as cp1252: "płuc" became "p³uc"."""
    xml = (
        f'<?xml version="1.0" encoding="{encoding}"?><article><front><article-meta>'
        '<article-id pub-id-type="pmc">6</article-id></article-meta></front><body>'
        f'<fig id="F1"><label>Figure 1</label><caption><p>{caption}&nbsp;(a).</p></caption>'
        '<graphic href="g1"/></fig></body></article>'
    )
    data = xml.encode("cp1252" if encoding == "ISO-8859-1" else encoding)
    a = parse_article(data, "e.nxml")
    assert a.figures[0].caption == f"{caption} (a)."  # the no-break space, normalised
    assert a.notes == ["XML encoding or entities repaired"]


def test_every_article_of_an_articleset_is_read_and_a_notice_among_them_refused():
    """An E-utilities <pmc-articleset> of three articles gave the first one's figures only."""
    one = (
        '<article article-type="{kind}"><front><article-meta>'
        '<article-id pub-id-type="pmc">{i}</article-id></article-meta></front><body>'
        '<fig id="F1"><label>Figure 1</label><caption><p>CT {i}.</p></caption>'
        '<graphic href="g{i}"/></fig></body></article>'
    )
    kinds = {1: "research-article", 2: "retraction", 3: "case-report"}
    xml = "".join(one.format(i=i, kind=k) for i, k in kinds.items())
    articles, rejected = parse_articles(f"<pmc-articleset>{xml}</pmc-articleset>".encode(), "s.xml")
    assert [(a.pmcid, a.figures[0].caption) for a in articles] == [
        ("PMC1", "CT 1."),
        ("PMC3", "CT 3."),
    ]
    assert [(e.source, e.reason) for e in rejected] == [
        ("s.xml (article 2 of 3)", "notice article")
    ]
    # parse_article keeps its meaning, the (first) article of a file; a file name's PMCID names
    # a lone article, not each one of a set.
    single = parse_article(
        ("<pmc-articleset>" + one.format(i=4, kind="x") + "</pmc-articleset>").encode()
    )
    assert single.pmcid == "PMC4" and single.notes == []
    bare = one.replace('<article-id pub-id-type="pmc">{i}</article-id>', "")
    two = "<pmc-articleset>" + bare.format(i=5, kind="x") * 2 + "</pmc-articleset>"
    arts, _ = parse_articles(two.encode(), "PMC9.xml", fallback_pmcid="PMC9")
    assert [a.pmcid for a in arts] == [None, None]
    assert parse_article(bare.format(i=6, kind="x").encode(), fallback_pmcid="PMC9").pmcid == "PMC9"


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "windows-1252", "ISO-8859-2", "us-ascii"])
def test_a_utf8_file_declared_in_a_single_byte_encoding_is_read_as_utf8(encoding):
    """Every byte sequence is valid Latin-1, so a UTF-8 file whose prolog says ISO-8859-1 parsed
    without complaint into mojibake: "Röntgen ×400" read "RÃ¶ntgen Ã\\x97400"."""
    caption = "Röntgen: α-SMA, 5 µm, ×400 – “Größe”."
    xml = _one_caption_article(caption.encode()).replace(b"UTF-8", encoding.encode(), 1)
    a = parse_article(xml, "u.nxml")
    assert a.figures[0].caption == caption
    assert a.notes == ["XML encoding or entities repaired"]
    # A file really in that encoding is still read in it.
    if encoding != "us-ascii":
        text = "Zdjęcie płuc" if encoding == "ISO-8859-2" else "Radiographie é"
        a = parse_article(
            _one_caption_article(text.encode(encoding)).replace(b"UTF-8", encoding.encode(), 1)
        )
        assert (a.figures[0].caption, a.notes) == (text, [])


@pytest.mark.parametrize(
    "caption",
    ["<p>.</p>", "<title>Figure 1.</title>", "<p><bold>Fig. 1</bold></p>", "<title/><p>–</p>"],
)
def test_a_caption_that_says_nothing_is_no_caption(caption):
    """A caption of punctuation or of the label alone was kept as the figure's caption ("." or
    "Figure 1."): an alignment answer saying nothing about the image."""
    xml = (
        '<article><front><article-meta><article-id pub-id-type="pmc">7</article-id>'
        '</article-meta></front><body><p>See <xref ref-type="fig" rid="F2">Fig. 2</xref>.</p>'
        f'<fig id="F1"><label>Figure 1</label><caption>{caption}</caption><graphic href="g1"/>'
        '</fig><fig id="F2"><caption><p>Axial CT.</p></caption><graphic href="g2"/></fig>'
        "</body></article>"
    )
    f1, f2 = parse_article(xml.encode()).figures
    assert f1.skip_reason == "no caption"
    assert (f2.skip_reason, f2.caption, f2.number) == (None, "Axial CT.", 2)  # still counted


def test_many_entities_in_one_element_expand_in_linear_time():
    """Each entity was merged into its parent's growing text by copying it: 40,000 entities in
    one paragraph (a DOCTYPE file written with &nbsp;) took 28 s, 160,000 five minutes. 80,000
    here: over 20 s before, 0.2 s now."""
    import time

    body = "<p>" + "5&nbsp;&times;" * 40000 + "</p>"
    xml = (
        '<?xml version="1.0"?><!DOCTYPE article PUBLIC "-//NLM//DTD JATS" "JATS.dtd">'
        '<article><front><article-meta><article-id pub-id-type="pmc">1</article-id>'
        "</article-meta></front><body>" + body + '<fig id="F1"><caption><p>Axial CT.</p>'
        '</caption><graphic href="g1"/></fig></body></article>'
    )
    t0 = time.perf_counter()
    a = parse_article(xml.encode())
    assert time.perf_counter() - t0 < 5
    assert a.figures[0].caption == "Axial CT."


def test_a_range_ending_at_a_shared_id_or_a_group_id_names_the_figures_between():
    """ "Figs. <xref>2</xref>–<xref>4</xref>" took the range's end from the second xref's rid as
    written: an id two figures share ended it at the first of them (Figure 2: no range, Figure 3
    missed), and a fig-group's id, or a member's of a group that is one figure, at nothing."""

    def fig(xml_id, n, graphic=True):
        img = f'<graphic xlink:href="g{n}"/>' if graphic else ""
        return (
            f'<fig id="{xml_id}"><label>Figure {n}</label><caption><p>Cap {n}.</p></caption>'
            f"{img}</fig>"
        )

    def cite(a, a_text, b, b_text):
        return (
            f'<p>Serial scans (Figs. <xref ref-type="fig" rid="{a}">{a_text}</xref>\u2013'
            f'<xref ref-type="fig" rid="{b}">{b_text}</xref>).</p>'
        )

    sentence = ["Serial scans (Figs. 2\u20134)."]
    # "F2" is both Figure 2 and Figure 4 (invalid JATS, but it occurs): its "4" is Figure 4.
    shared = fig("F1", 1) + fig("F2", 2) + fig("F3", 3) + fig("F2", 4)
    m = _with_figures(cite("F2", "2", "F2", "4"), figures=shared)
    assert m == {"F2": sentence, "F3": sentence, "F2_4": sentence}
    # Figure 4 is a fig-group whose panels have images: the group's id names both panels.
    panels = "".join(
        f'<fig id="F4{p}"><label>{p}</label><caption><p>Panel {p}.</p></caption>'
        f'<graphic xlink:href="g4{p}"/></fig>'
        for p in "AB"
    )
    group = (
        f'<fig-group id="G4"><label>Figure 4</label><caption><p>Follow-up.</p></caption>{panels}'
    )
    figures = fig("F1", 1) + fig("F2", 2) + fig("F3", 3) + group + "</fig-group>"
    m = _with_figures(cite("F2", "2", "G4", "4"), figures=figures)
    assert m == {f: sentence for f in ("F2", "F3", "F4A", "F4B")}
    # Figure 4 is a fig-group that is one figure (its image on the group): a member's id names it.
    members = "".join(
        f'<fig id="F4{p}"><label>{p}</label><caption><p>{p}.</p></caption></fig>' for p in "AB"
    )
    whole = group.replace(panels, '<graphic xlink:href="g4"/>' + members) + "</fig-group>"
    m = _with_figures(cite("F2", "2", "F4B", "4B"), figures=fig("F2", 2) + fig("F3", 3) + whole)
    sentence = ["Serial scans (Figs. 2\u20134B)."]
    assert m == {"F2": sentence, "F3": sentence, "G4": sentence}


def test_a_supplementary_citation_of_an_id_a_main_figure_shares_is_not_a_main_mention():
    """Figure 1 and Figure S1 with one id (invalid JATS, but it occurs): "Figure S1" and
    "Supplementary Fig. 1" linked to it were mentions of Figure 1, by the main-first rule or by
    their "1"."""
    figures = (
        '<fig id="F1"><label>Figure 1</label><caption><p>Axial CT.</p></caption>'
        '<graphic xlink:href="g1"/></fig>'
        '<supplementary-material><fig id="F1"><label>Figure S1</label><caption><p>More.</p>'
        '</caption><graphic xlink:href="s1"/></fig></supplementary-material>'
    )
    m = _with_figures(
        '<p>The mass grew (<xref ref-type="fig" rid="F1">Figure S1</xref>). Its wall was thin '
        '(<xref ref-type="fig" rid="F1">Supplementary Fig. 1</xref>). It was solid '
        '(<xref ref-type="fig" rid="F1">Figure 1</xref>).</p>',
        figures=figures,
    )
    assert m == {"F1": ["It was solid (Figure 1)."]}


def test_an_id_a_figure_shares_with_a_group_or_a_group_member_is_told_apart_by_number():
    """A fig-group that is one figure (its image on the group) with the id of another figure,
    or with a member whose id another figure has: every citation of the id went to the group,
    "Figure 3" included, and Figure 3 had no mention."""

    def cite(rid, text):
        return f'<xref ref-type="fig" rid="{rid}">{text}</xref>'

    def group(group_id, member_id):
        return (
            f'<fig-group id="{group_id}"><label>Figure 2</label><caption><p>MRI.</p></caption>'
            f'<graphic xlink:href="g2"/><fig id="{member_id}"><label>A</label><caption>'
            "<p>Axial.</p></caption></fig></fig-group>"
        )

    def fig3(xml_id):
        return (
            f'<fig id="{xml_id}"><label>Figure 3</label><caption><p>Gross.</p></caption>'
            '<graphic xlink:href="g3"/></fig>'
        )

    m = _with_figures(
        f"<p>The specimen ({cite('F2', 'Figure 3')}). The MRI ({cite('F2', 'Figure 2')}).</p>",
        figures=group("F2", "F2a") + fig3("F2"),
    )
    assert m == {"F2_2": ["The specimen (Figure 3)."], "F2": ["The MRI (Figure 2)."]}
    m = _with_figures(
        f"<p>The specimen ({cite('F3', 'Figure 3')}). The MRI ({cite('F3', 'Figure 2A')}).</p>",
        figures=group("G2", "F3") + fig3("F3"),
    )
    assert m == {"F3": ["The specimen (Figure 3)."], "G2": ["The MRI (Figure 2A)."]}
