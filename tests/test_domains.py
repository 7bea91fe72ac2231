import json
from pathlib import Path

import pytest

from llavamed.cli import main
from llavamed.data.domains import classify_text, evaluate_domains
from llavamed.utils.io import iter_jsonl

DATA = Path(__file__).parent / "data"


def _on(labels):
    return {d for d, v in labels.items() if v}


def test_charts_and_imaging_history_do_not_label_a_modality():
    # A reviewer's 33 captions (plots whose captions name the data's modality, histology
    # captions that mention earlier CT/MRI): 0.73 exact match before the chart rule.
    result = evaluate_domains(iter_jsonl(DATA / "domain_captions_audit.jsonl"))
    assert result["n"] == 33 and result["exact_match"] >= 0.95
    assert all(m["precision"] >= 0.85 for m in result["domains"].values())


@pytest.mark.parametrize("name", ["domain_captions.jsonl", "domain_captions_heldout.jsonl"])
def test_precision_recall_floor_on_hand_labelled_captions(name):
    result = evaluate_domains(iter_jsonl(DATA / name))
    assert result["n"] >= 40
    for domain, m in result["domains"].items():
        assert m["support"] >= 5, domain
        assert m["precision"] >= 0.85 and m["recall"] >= 0.85, (domain, m)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("CT-guided biopsy; H&E stain shows adenocarcinoma.", {"histology"}),
        ("Chest radiograph shows no evidence of pneumothorax.", {"chest_xray"}),
        ("MRI was not performed. Axial CT shows a renal mass.", {"ct_scan"}),
        ("No CT or MRI was performed; clinical course.", set()),
        ("T2WI shows a hyperintense lesion.", {"mri"}),
        ("PA chest radiograph.", {"chest_xray"}),
        ("Plain radiograph of the knee.", set()),
        ("Gross specimen of the resected colon.", {"gross"}),
        ("IHC for CD3 (x200).", {"histology"}),
        ("Ct values of qPCR for GAPDH.", set()),
        ("Optical coherence tomography of the retina.", set()),
        ("Mitral regurgitation (MR) on echocardiography.", set()),
        ("Patient after gross total resection.", set()),
        ("(A) CXR. (B) HRCT. (C) H&E, x100.", {"chest_xray", "ct_scan", "histology"}),
    ],
)
def test_tricky_captions(caption, expected):
    assert _on(classify_text(caption)) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        # "hpf" = hours post fertilization (zebrafish), not a high-power field
        ("Lateral view of zebrafish embryos at 48 hpf showing vascular development.", set()),
        ("Whole-mount in situ hybridization of 24 hpf embryos.", set()),
        ("Embryos at 3 dpf/72 hpf.", set()),
        ("Mitoses 12/10 hpf, eosinophils/hpf counted; H&E.", {"histology"}),
        ("Up to 40 eosinophils/hpf.", {"histology"}),
        # micrographs from electron, confocal or fluorescence microscopes are not histology
        ("TEM micrographs of the nanoparticles.", set()),
        ("SEM micrograph of the scaffold.", set()),
        ("Representative SEM micrographs of the titanium surface after 7 days.", set()),
        ("Cryo-EM micrographs of purified virions.", set()),
        ("Representative confocal micrographs of organoids stained with phalloidin.", set()),
        ("Fluorescence micrographs of Caco-2 cells.", set()),
        # ... and when the microscope is named after the word
        ("Micrograph of the cell surface by scanning electron microscopy.", set()),
        ("Micrographs of biofilm on the implant obtained using SEM.", set()),
        ("Photomicrographs of stained spheroids under a confocal microscope.", set()),
        ("Photomicrograph of the tumour stained with H&E, x400.", {"histology"}),
        # "ultrastructure" is an electron microscope's view, however the caption names it
        ("Ultrastructural micrograph of a mitochondrion with disrupted cristae.", set()),
        ("Micrograph of renal tubules, ultrastructure showing lysosomes.", set()),
        ("Ultrastructure of the glomerular basement membrane. Micrograph of podocytes.", set()),
        ("Micrograph of the biopsy (H&E). Ultrastructure of the same biopsy.", {"histology"}),
        ("Micrograph of the liver, x200. Ultrastructure of a hepatocyte.", {"histology"}),
        # the microscope acronyms are capitals: "stem" is a word, not STEM
        ("Brain stem photomicrograph showing gliosis.", {"histology"}),
        ("Photomicrograph of the scaffold seeded with stem cells.", {"histology"}),
        # "confocal" stays visible to the anti cues, so weak histology cues do not add up
        ("Confocal micrographs of kidney sections stained with anti-nephrin; scale bar.", set()),
        # a negated X-ray word does not make the chest X-ray pair
        ("Axial CT of the chest; no chest radiograph was obtained.", {"ct_scan"}),
        (
            "Axial CT of the thorax showing a spiculated nodule; chest radiograph was not performed.",
            {"ct_scan"},
        ),
        (
            "Chest radiograph was not performed; CT angiography showed pulmonary embolism.",
            {"ct_scan"},
        ),
        # positive controls
        ("H&E photomicrograph, x400.", {"histology"}),
        ("Photomicrograph of H&E-stained section.", {"histology"}),
        ("H and E stained section.", {"histology"}),  # spelled out, case-sensitive
        ("Photomicrograph of the tumour, x400.", {"histology"}),
        ("10 cells per HPF.", {"histology"}),
        ("Eosinophils up to 40 per hpf.", {"histology"}),
        ("PA chest radiograph shows right lower lobe consolidation.", {"chest_xray"}),
        ("Plain radiograph of the thorax; no pleural effusion.", {"chest_xray"}),
    ],
)
def test_hpf_microscope_micrographs_and_negated_chest_radiograph(caption, expected):
    assert _on(classify_text(caption)) == expected


def test_mentions_only_when_caption_names_no_modality():
    mention = ["Axial CT showed a mass (Fig. 2)."]
    assert _on(classify_text("Case 2 at presentation.", mention)) == {"ct_scan"}
    assert _on(classify_text("H&E staining of the mass.", mention)) == {"histology"}


def test_cli_relabels_both_input_shapes(tmp_path, capsys):
    llava_med = {
        "chest_xray": [{"pair_id": "a_1", "fig_caption": "Axial T2-weighted MRI of the brain."}],
        "histology": [{"pair_id": "b_1", "fig_caption": "Photomicrograph (H&E, x400)."}],
    }
    src = tmp_path / "captions.json"
    src.write_text(json.dumps(llava_med))
    out = tmp_path / "figures.jsonl"
    assert main(["data", "domains", "--in", str(src), "--out", str(out)]) == 0
    recs = {r["pair_id"]: r for r in iter_jsonl(out)}
    assert _on(recs["a_1"]["domain"]) == {"mri"}  # relabelled from the caption, not the key
    assert _on(recs["b_1"]["domain"]) == {"histology"}
    # in place, and --eval on our own jsonl
    assert main(["data", "domains", "--in", str(out), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "domains", "--in", str(DATA / "domain_captions.jsonl"), "--eval"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["domains"]["mri"]["support"] == 13


def test_figures_jsonl_starting_with_a_blank_line_is_read_as_jsonl(tmp_path):
    """A leading blank line made the shape sniffer take figures.jsonl for one JSON document
    ("invalid JSON (Extra data...)"), though iter_jsonl skips blank lines."""
    from llavamed.data.figures import iter_figures

    recs = [{"pair_id": f"P_{i}", "fig_caption": "Axial CT.", "image": "a.jpg"} for i in range(2)]
    lines = "".join(json.dumps(r) + "\n" for r in recs)
    for text in ("\n" + lines, "  \n\n" + lines, "\n" + json.dumps(recs[0]) + "\n\n"):
        path = tmp_path / "figures.jsonl"
        path.write_text(text)
        assert list(iter_figures(path)) == recs[: text.count("pair_id")]
    # A pretty-printed {domain: [records]} file after a blank line is still that shape.
    path.write_text("\n" + json.dumps({"ct_scan": recs}, indent=1))
    assert [r["pair_id"] for r in iter_figures(path)] == ["P_0", "P_1"]


def test_a_record_that_is_not_an_object_is_named_by_its_index(tmp_path):
    import pytest

    from llavamed.data.figures import iter_figures
    from llavamed.errors import InputError

    rec = {"pair_id": "P_0", "fig_caption": "Axial CT.", "image": "a.jpg"}
    for doc, where in (
        ([rec, rec, 7], "list entry 2"),
        ({"mri": [rec, "x"]}, "record 1 under 'mri'"),
    ):
        path = tmp_path / "figures.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=where):
            list(iter_figures(path))


def test_cli_writes_and_counts_a_figure_filed_under_several_domains_once(tmp_path, capsys):
    """LLaVA-Med's caption JSON files one figure under several domains: each copy was written,
    giving duplicate pair_ids and double counts."""
    fig = {"pair_id": "PMC1_F1", "fig_caption": "Chest CT and chest radiograph."}
    other = {"pair_id": "PMC2_F1", "fig_caption": "Photomicrograph (H&E, x400)."}
    src = tmp_path / "caps.json"
    src.write_text(json.dumps({"chest_xray": [fig], "histology": [other], "ct_scan": [fig]}))
    out = tmp_path / "figures.jsonl"
    assert main(["data", "domains", "--in", str(src), "--out", str(out)]) == 0
    recs = list(iter_jsonl(out))
    assert [r["pair_id"] for r in recs] == ["PMC1_F1", "PMC2_F1"]  # first-seen order
    assert _on(recs[0]["domain"]) == {"chest_xray", "ct_scan"}
    printed = capsys.readouterr().out
    assert printed.startswith("2 records labelled") and '"ct_scan": 1' in printed
    # --eval: one figure, its reference domains ORed over the copies, so an exact match.
    assert main(["data", "domains", "--in", str(src), "--eval"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["exact_match"] == 1.0
    assert result["domains"]["chest_xray"]["support"] == 1


def test_merge_duplicate_figures_ors_domain_flags():
    from llavamed.data.domains import merge_duplicate_figures

    a = {"pair_id": "x", "fig_caption": "first", "domain": {"mri": True}}
    b = {"pair_id": "x", "fig_caption": "second", "domain": ["gross"]}
    c = {"pair_id": "y", "fig_caption": "c"}
    out, merged = merge_duplicate_figures([a, c, b, {"fig_caption": "no id"}, {"fig_caption": "n"}])
    assert merged == 1 and [r["fig_caption"] for r in out] == ["first", "c", "no id", "n"]
    assert _on(out[0]["domain"]) == {"mri", "gross"} and "domain" not in out[1]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("MRI and CT were not performed; ultrasound of the liver.", set()),
        ("CT, MRI or PET was unavailable; plain radiograph of the knee.", set()),
        ("Axial CT and coronal MRI were not obtained; H&E stain, x200.", {"histology"}),
        # the negation reaches no cue that a verb separates from it
        ("Axial CT shows a mass and MRI was not performed.", {"ct_scan"}),
    ],
)
def test_a_negation_covers_every_modality_it_coordinates(caption, expected):
    """Where "MRI was not performed" was negated, "MRI and CT were not performed" labelled mri:
    only a negation straight after the cue counted, so the first of several named together stood."""
    assert _on(classify_text(caption)) == expected


def test_a_negated_pair_in_a_mention_labels_nothing():
    mention = ["MRI and CT were not performed before surgery (Fig. 2)."]
    assert _on(classify_text("Ultrasound of the liver.", mention)) == set()


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("18F-FDG PET-CT showing intense uptake in a mediastinal node.", {"ct_scan"}),
        ("SPECT-CT fused image of the parathyroid adenoma.", {"ct_scan"}),
        ("Whole-body PET - CT, maximum intensity projection.", {"ct_scan"}),
        ("PET/CT fused image.", {"ct_scan"}),  # as before
        ("PET-MRI of the brain.", {"mri"}),  # as before
        ("3D-CT reconstruction of the skull showing the fracture.", {"ct_scan"}),
        ("4D-CT of the parathyroid glands.", {"ct_scan"}),
        ("HR-CT of the lungs: ground-glass opacities.", {"ct_scan"}),
        ("Expression of PET-CTLA4 in transfected cells.", set()),
        ("Staining with an anti-CT antibody in cultured cells.", set()),
    ],
)
def test_ct_spelled_with_a_prefix_and_a_hyphen_is_ct(caption, expected):
    """PET/CT and PET–CT were CT, PET-CT (the commonest spelling), SPECT-CT, 3D-CT and HR-CT
    nothing: the CT cue is not taken after a hyphen."""
    assert _on(classify_text(caption)) == expected


def test_a_huge_caption_is_labelled_in_linear_time():
    """Each cue searched for its clause's start from the text's start: a 1 MB caption (an
    unclosed <caption> in recovered XML takes in the whole article) took 130 s, 0.5 MB 40 s.
    Now about 3 s; the bound leaves room for a loaded machine."""
    import time

    caption = "The axial CT image shows a mass in the liver with no MRI findings, " * 8000
    t0 = time.perf_counter()
    labels = classify_text(caption)
    assert time.perf_counter() - t0 < 15
    assert _on(labels) == {"ct_scan"}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("(A) Axial CT image showing the tumour; (B) box plot of tumour volumes.", {"ct_scan"}),
        (
            "Representative H&E-stained sections (A, B) and a bar graph of the scores (C).",
            {"histology"},
        ),
        ("T2-weighted MRI of the brain (left) and histogram of ADC values (right).", {"mri"}),
        ("Chest radiograph (a) and the Kaplan-Meier curve of the cohort (b).", {"chest_xray"}),
        ("Box plot of ADC values by tumour grade; axial T2-weighted MRI (inset).", set()),
        ("ROC curves of the radiomics model from contrast-enhanced CT images.", set()),
    ],
)
def test_a_compound_figure_with_an_image_panel_before_its_chart_keeps_its_modality(
    caption, expected
):
    """Any chart word in the first sentence made a caption a figure of data, so compound figures
    (an image panel, then a plot) got no domain; a chart named first still does."""
    assert _on(classify_text(caption)) == expected


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Cardiac magnetic resonance of the left ventricle: late enhancement.", {"mri"}),
        ("CMR cine image, four-chamber view.", {"mri"}),
        ("PET-CT after two cycles showed CMR.", {"ct_scan"}),  # complete metabolic response
        ("T2W/T1w images of the knee.", {"mri"}),
        ("Brain MR shows a lesion in the left frontal lobe.", {"mri"}),
        ("Severe MR on echocardiography.", set()),  # mitral regurgitation
        ("Post-contrast T1 of the pituitary.", {"mri"}),
        ("MSCT of the abdomen shows a renal mass.", {"ct_scan"}),
        ("The CT-1 cell line was treated with the drug.", set()),  # cardiotrophin-1
        ("CT26 and CT-26 tumours in mice.", set()),  # a colon carcinoma line
        ("CT- and MRI-based segmentation of the liver.", set()),  # a method, like CT-based
        ("No PET/CT was performed; clinical photograph of the rash.", set()),
    ],
)
def test_modality_spellings_an_audit_found_missed_or_mistaken(caption, expected):
    """Missed: cardiac magnetic resonance / CMR, T1w/T2W, organ + MR, post-contrast T1, MSCT.
    Mistaken for CT: cell lines and cytokines named CT-<number>, a suspended 'CT- and
    MRI-based', and a negated PET/CT (the negation did not reach through 'PET/')."""
    assert _on(classify_text(caption)) == expected


def test_a_lone_surrogate_in_a_figures_file_becomes_u_fffd_for_every_reader(tmp_path, capsys):
    """A caption cut inside an emoji's UTF-16 pair is stored as a "\\ud83d" escape, which JSON
    decodes to a lone surrogate that UTF-8 cannot encode: `data domains` labelled every record and
    then died in a UnicodeEncodeError writing its output; stage 0 read it as a caption, and the
    tokenizer raised a TypeError. iter_figures, which every reader uses, makes it U+FFFD."""
    from PIL import Image

    from llavamed.data.figures import iter_figures
    from llavamed.train.vision_pretrain import load_pairs

    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "a.jpg")
    rec = {
        "pair_id": "PMC1_F1",
        "fig_caption": "Axial CT of the chest \ud83d",
        "image": "a.jpg",
        "in_text_mention": [{"tokens": "CT showed a mass \udca9 (Fig. 1)."}],
    }
    jsonl = tmp_path / "figures.jsonl"
    jsonl.write_text(json.dumps(rec) + "\n")  # ensure_ascii: the file holds "\ud83d" escapes
    caption_json = tmp_path / "caps.json"
    caption_json.write_text(json.dumps({"ct_scan": [rec]}))
    for src in (jsonl, caption_json):
        (got,) = iter_figures(src)
        assert got["fig_caption"] == "Axial CT of the chest \ufffd"
        assert got["in_text_mention"] == [{"tokens": "CT showed a mass \ufffd (Fig. 1)."}]
        out = tmp_path / "out.jsonl"
        assert main(["data", "domains", "--in", str(src), "--out", str(out)]) == 0
        (written,) = iter_jsonl(out)
        assert written["fig_caption"] == "Axial CT of the chest \ufffd"
        assert _on(written["domain"]) == {"ct_scan"}
    pairs, skipped = load_pairs(jsonl)
    assert [p.caption for p in pairs] == ["Axial CT of the chest \ufffd"] and not skipped
    # A file without one is read as it was.
    plain = {"pair_id": "PMC1_F2", "fig_caption": "Axial CT.", "in_text_mention": None}
    jsonl.write_text(json.dumps(plain) + "\n")
    assert list(iter_figures(jsonl)) == [plain]


def test_a_folder_given_for_the_figures_file_points_at_the_one_inside(tmp_path, capsys):
    """`data align --figures corpus` (the ingest output folder, not its figures.jsonl) said
    only "corpus: Is a directory"."""
    from llavamed.cli import main
    from llavamed.data.figures import iter_figures
    from llavamed.errors import InputError

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with pytest.raises(InputError, match="a folder, not a figures file .give a figures.jsonl"):
        list(iter_figures(corpus))
    (corpus / "figures.jsonl").write_text("")
    out = tmp_path / "align.json"
    assert main(["data", "align", "--figures", str(corpus), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"did you mean {corpus / 'figures.jsonl'}?" in err and not out.exists()
