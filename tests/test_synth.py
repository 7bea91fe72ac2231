"""MedSynth: determinism, JATS validity, VQA balance and leakage, and visual sanity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from lxml import etree
from PIL import Image

from llavamed.cli import main
from llavamed.data.synth import (
    DOMAINS,
    attrs_from_dict,
    attrs_to_dict,
    generate_world,
    questions_for,
    render,
    sample_attributes,
)
from llavamed.data.synth.captions import panel_caption
from llavamed.data.synth.vqa import TEMPLATES
from llavamed.data.synth.world import plan_vqa
from llavamed.errors import ConfigError

XLINK = "{http://www.w3.org/1999/xlink}href"
SMALL = dict(articles=6, vqa_images=60, image_size=80, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("medsynth") / "w"
    generate_world(out, seed=3, workers=1, **SMALL)
    return out


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pad128(img: Image.Image) -> np.ndarray:
    """What a 128 px LLaVA vision tower sees: pad to square, resize."""
    img = img.convert("RGB")
    side = max(img.size)
    sq = Image.new("RGB", (side, side), (0, 0, 0))
    sq.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return np.asarray(sq.resize((128, 128), Image.BICUBIC), dtype=np.float32)


# ---- attributes and rendering -------------------------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_every_domain_varies_size_and_looks_like_its_modality(domain):
    sizes, means = set(), []
    for i in range(6):
        rng = np.random.default_rng(i)
        attrs = sample_attributes(domain, rng)
        assert attrs_from_dict(domain, json.loads(json.dumps(attrs_to_dict(attrs)))) == attrs
        img = render(domain, attrs, rng, 128)
        sizes.add(img.size)
        assert min(img.size) >= 100 and max(img.size) <= 200
        arr = np.asarray(img, dtype=np.float32)
        means.append(arr.mean())
        if domain in ("chest_xray", "ct_scan", "mri"):
            assert img.mode == "L"
            assert arr.std() > 20  # real contrast, not a flat field
        else:
            assert img.mode == "RGB"
    assert len(sizes) > 1  # aspect ratios and sizes vary
    if domain == "histology":  # H&E: pink/purple, so green is the weakest channel on average
        arr = np.asarray(img, dtype=np.float32)
        assert arr[..., 1].mean() < arr[..., 0].mean() and arr[..., 1].mean() < arr[..., 2].mean()


def test_attributes_are_independent():
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        rows = [attrs_to_dict(sample_attributes(domain, rng)) for _ in range(3000)]
        flags = {
            k: np.array([r[k] for r in rows], dtype=float)
            for k, v in rows[0].items()
            if isinstance(v, bool)
        }
        for k, x in flags.items():
            assert 0.45 < x.mean() < 0.55, (domain, k)
        keys = sorted(flags)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                assert abs(np.corrcoef(flags[a], flags[b])[0, 1]) < 0.07, (domain, a, b)


def _counterfactual(domain, base, change, size=256, seed=11):
    """Render the same scene (same random stream) with and without one change."""
    a0 = attrs_from_dict(domain, {**attrs_to_dict(base), **change[0]})
    a1 = attrs_from_dict(domain, {**attrs_to_dict(base), **change[1]})
    return (
        render(domain, a0, np.random.default_rng(seed), size, aspect=1.25),
        render(domain, a1, np.random.default_rng(seed), size, aspect=1.25),
    )


def _cxr_base():
    return dict(
        view="PA", consolidation=False, consolidation_side=None, consolidation_lobe=None,
        nodule=False, nodule_side=None, nodule_lobe=None, nodule_size_mm=None, effusion=False,
        effusion_side=None, cardiomegaly=False, ett=False, central_line=False,
        central_line_side=None, pacemaker=False,
    )  # fmt: skip


def test_endotracheal_tube_changes_pixels_where_the_tube_is_drawn():
    base = sample_attributes("chest_xray", np.random.default_rng(0))
    base = attrs_from_dict("chest_xray", _cxr_base())
    off, on = _counterfactual("chest_xray", base, ({"ett": False}, {"ett": True}))
    d = np.asarray(on, dtype=np.float32) - np.asarray(off, dtype=np.float32)
    h, w = d.shape
    changed = np.abs(d) > 30
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 0.01 * h * w * 0.5  # a visible line, not a speck
    # Only along the midline and above the carina, and brighter (radio-opaque).
    assert np.all(np.abs(xs - w / 2) < 0.04 * min(h, w))
    assert ys.max() < h / 2
    assert d[changed].mean() > 60
    # Still a few pixels wide after the pad-to-square 128 px resize a small ViT sees.
    d128 = pad128(on)[..., 0] - pad128(off)[..., 0]
    row = np.abs(d128[40]) > 40
    assert 2 <= row.sum() <= 6


@pytest.mark.parametrize(
    "domain,base,change",
    [
        ("chest_xray", _cxr_base(), ({}, {"effusion": True, "effusion_side": "left"})),
        ("chest_xray", _cxr_base(), ({}, {"cardiomegaly": True})),
        ("chest_xray", _cxr_base(), ({}, {"nodule": True, "nodule_side": "right", "nodule_lobe": "upper", "nodule_size_mm": 14})),
        ("chest_xray", _cxr_base(), ({}, {"consolidation": True, "consolidation_side": "left", "consolidation_lobe": "lower"})),
        ("chest_xray", _cxr_base(), ({}, {"central_line": True, "central_line_side": "right"})),
        ("chest_xray", _cxr_base(), ({}, {"pacemaker": True})),
        ("ct_scan", dict(contrast=False, lesion=False, organ=None, side=None, density=None, size_cm=None, window="soft tissue"),
         ({}, {"lesion": True, "organ": "kidney", "side": "left", "density": "hypodense", "size_cm": 2})),
        ("ct_scan", dict(contrast=False, lesion=False, organ=None, side=None, density=None, size_cm=None, window="soft tissue"),
         ({}, {"contrast": True})),
        ("mri", dict(weighting="T1", lesion=True, hemisphere="left", ring_enhancement=False, size_cm=2),
         ({}, {"ring_enhancement": True})),
        ("mri", dict(weighting="T1", lesion=False, hemisphere=None, ring_enhancement=None, size_cm=None),
         ({}, {"weighting": "T2"})),
        ("histology", dict(tissue="colon", cellularity="low", nuclear_atypia=False, gland_formation=False, inflammation=False, magnification=200),
         ({}, {"inflammation": True})),
        ("histology", dict(tissue="colon", cellularity="low", nuclear_atypia=False, gland_formation=False, inflammation=False, magnification=200),
         ({}, {"gland_formation": True})),
        ("gross", dict(organ="kidney", lesion_color="white", size_cm=1.2, scale="ruler", background="green"),
         ({}, {"lesion_color": "red"})),
        ("gross", dict(organ="kidney", lesion_color="white", size_cm=1.2, scale="ruler", background="green"),
         ({}, {"size_cm": 3.6})),
    ],
)  # fmt: skip
def test_findings_stay_visible_at_128px(domain, base, change):
    off, on = _counterfactual(domain, attrs_from_dict(domain, base), change)
    d = np.abs(pad128(on) - pad128(off)).max(axis=-1)
    # A blob of clearly changed pixels (>= 12 px at > 35 grey levels) in the 128x128 input.
    assert (d > 35).sum() >= 12, (domain, change, int((d > 35).sum()))


_HARD_HISTO = dict(tissue="colon", cellularity="high", nuclear_atypia=True, gland_formation=False, inflammation=False, magnification=200)  # fmt: skip
_CT_CONTRAST = dict(contrast=True, lesion=False, organ=None, side=None, density=None, size_cm=None)  # fmt: skip
_KIDNEY_HYPO = {"lesion": True, "organ": "kidney", "side": "left", "density": "hypodense", "size_cm": 2}  # fmt: skip


@pytest.mark.parametrize(
    "domain,base,change,least",
    [
        # Atypical nuclei in a highly cellular field covered the gland lumens and lymphocytes.
        ("histology", _HARD_HISTO, ({}, {"gland_formation": True}), 600),
        ("histology", _HARD_HISTO, ({}, {"inflammation": True}), 250),
        # A hypodense kidney lesion after contrast was brighter than the medulla it sits on.
        ("ct_scan", {**_CT_CONTRAST, "window": "soft tissue"}, ({}, _KIDNEY_HYPO), 15),
        ("ct_scan", {**_CT_CONTRAST, "window": "liver"}, ({}, _KIDNEY_HYPO), 15),
        # A same-side effusion replaced a lower-lobe nodule.
        ("chest_xray", {**_cxr_base(), "effusion": True, "effusion_side": "right"},
         ({}, {"nodule": True, "nodule_side": "right", "nodule_lobe": "lower", "nodule_size_mm": 14}), 40),
        # A spleen lesion straddled the crescent's cut-out and showed a sliver.
        ("gross", dict(organ="spleen", lesion_color="white", size_cm=2.4, scale="ruler", background="green"),
         ({}, {"lesion_color": "red"}), 120),
    ],
)  # fmt: skip
def test_findings_stay_visible_in_the_hard_combinations(domain, base, change, least):
    """The combinations the renderer audit found a finding hard or impossible to see in, over
    several scenes: the count of clearly changed pixels at 128 px, in the worst scene."""
    worst = min(
        int((np.abs(pad128(on) - pad128(off)).max(axis=-1) > 35).sum())
        for off, on in (
            _counterfactual(domain, attrs_from_dict(domain, base), change, seed=seed)
            for seed in range(4)
        )
    )
    assert worst >= least, (domain, change, worst)


def test_the_ct_caption_quotes_the_rendered_attenuation():
    from llavamed.data.synth.render.ct import lesion_hu

    a = attrs_from_dict("ct_scan", {**_CT_CONTRAST, "window": "soft tissue", **_KIDNEY_HYPO})
    assert lesion_hu("kidney", True, "hypodense") == 15.0  # below the enhanced medulla's 90 HU
    for seed in range(40):
        text = panel_caption("ct_scan", a, np.random.default_rng(seed))
        if "HU" in text:
            assert "~20 HU" in text, text  # 15 rounded to tens, as the caption rounds
            break
    else:
        raise AssertionError("no caption quoted an HU value in 40 draws")


def test_the_mri_arrow_marks_the_lesion_not_the_csf():
    a = attrs_from_dict("mri", dict(weighting="T2", lesion=True, hemisphere="left", ring_enhancement=False, size_cm=2))  # fmt: skip
    seen = 0
    for seed in range(60):
        text = panel_caption("mri", a, np.random.default_rng(seed), arrow=True)
        if "CSF" in text:
            seen += 1
            assert "CSF in the ventricles (" not in text, text
            assert "arrow" in text.split("CSF")[0], text
    assert seen  # the CSF phrase does appear in some captions


def test_gross_size_answers_round_half_up():
    a = attrs_from_dict("gross", dict(organ="liver", lesion_color="red", size_cm=4.5, scale="ruler", background="blue"))  # fmt: skip
    qs = {q["template"]: q for q in questions_for("gross", a, np.random.default_rng(0))}
    assert qs["gro_size"]["answer"] == "5 cm"  # round() would give "4 cm" (half to even)


# ---- VQA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_vqa():
    return {name: plan_vqa(5, name, n) for name, n in (("vqa_rad", 900), ("slake", 1800))}


def test_questions_derive_from_attributes():
    a = attrs_from_dict("chest_xray", {**_cxr_base(), "effusion": True, "effusion_side": "left"})
    qs = {q["template"]: q for q in questions_for("chest_xray", a, np.random.default_rng(0))}
    assert qs["cxr_effusion"]["answer"] == "yes" and qs["cxr_ett"]["answer"] == "no"
    assert qs["cxr_effusion_side_open"]["answer"] == "left"
    assert qs["cxr_devices"]["answer"] == "0" and qs["modality"]["answer"] == "x-ray"
    assert "cxr_nodule_side" not in qs  # only asked about findings that are there
    zh = {
        q["template"]: q
        for q in questions_for("chest_xray", a, np.random.default_rng(0), lang="zh")
    }
    assert zh["cxr_effusion"]["answer"] == "是" and zh["cxr_ett"]["answer"] == "否"
    assert all(TEMPLATES[d] for d in DOMAINS)


def test_yes_no_balanced_per_template(big_vqa):
    for name, (_, records) in big_vqa.items():
        per = defaultdict(Counter)
        for r in records:
            if r["answer_type"] == "CLOSED":
                lang = r.get("q_lang", "en")
                per[(r["template"], lang)][r["answer"] in ("yes", "是")] += 1
        assert len(per) >= 15
        for key, c in per.items():
            n = c[True] + c[False]
            if n >= 20:
                assert 0.45 <= c[True] / n <= 0.55, (name, key, c)


def test_question_only_baseline_stays_at_chance(big_vqa):
    for name, (images, records) in big_vqa.items():

        def split(r, images=images):
            return (
                images[r["img_id"]]["split"]
                if "img_id" in r
                else ("test" if r["phrase_type"] == "test_freeform" else "train")
            )

        train = [r for r in records if split(r) == "train" and r["answer_type"] == "CLOSED"]
        test = [r for r in records if split(r) == "test" and r["answer_type"] == "CLOSED"]
        by_q = defaultdict(Counter)
        for r in train:
            by_q[r["question"]][r["answer"]] += 1
        overall = Counter(r["answer"] for r in train).most_common(1)[0][0]
        pred = [
            by_q[r["question"]].most_common(1)[0][0] if r["question"] in by_q else overall
            for r in test
        ]
        acc = np.mean([p == r["answer"] for p, r in zip(pred, test, strict=True)])
        assert len(test) > 150
        assert 0.4 <= acc <= 0.6, (name, acc)


def test_splits_are_by_image_and_slake_has_chinese(big_vqa):
    images, records = big_vqa["slake"]
    splits = defaultdict(set)
    for r in records:
        splits[images[r["img_id"]]["split"]].add(r["img_name"])
    assert set(splits) == {"train", "validate", "test"}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["validate"])
    zh = np.mean([r["q_lang"] == "zh" for r in records])
    assert 0.12 <= zh <= 0.25
    per_image = Counter(r["img_id"] for r in records)
    assert 4 <= np.mean(list(per_image.values())) <= 6.5
    assert {r["modality"] for r in records} == {"X-Ray", "CT", "MRI", "Histology", "Gross"}


# ---- the world on disk ----------------------------------------------------------------------


def test_world_is_deterministic_across_worker_counts(world, tmp_path):
    other = tmp_path / "w2"
    generate_world(other, seed=3, workers=2, **SMALL)
    assert _tree_hashes(world) == _tree_hashes(other)
    third = tmp_path / "w3"
    generate_world(third, seed=4, workers=1, **SMALL)
    assert _tree_hashes(third) != _tree_hashes(world)


def test_packages_are_valid_jats_and_graphics_resolve(world):
    packages = sorted((world / "packages").glob("PMC*.tar.gz"))
    assert len(packages) == 6
    n_figs = 0
    for pkg in packages:
        pmcid = pkg.name.split(".")[0]
        with tarfile.open(pkg) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert all(m.mtime == 0 and m.uid == 0 for m in members.values())
            nxml = [n for n in members if n.endswith(".nxml")]
            assert len(nxml) == 1 and nxml[0].startswith(pmcid + "/")
            root = etree.fromstring(tar.extractfile(nxml[0]).read())
            files = {n.split("/", 1)[1] for n in members if "/" in n}
            assert root.findtext(".//article-meta/article-id[@pub-id-type='pmid']").isdigit()
            assert root.findtext(".//article-meta/article-id[@pub-id-type='pmc']") == pmcid
            assert root.findtext(".//article-title")
            figs = root.findall(".//fig")
            assert figs
            for fig in figs:
                n_figs += 1
                assert fig.get("id") and fig.findtext("label").startswith("Figure")
                assert fig.findtext("caption/p")
                href = fig.find("graphic").get(XLINK)
                match = [f for f in files if f == href or f.rsplit(".", 1)[0] == href]
                assert len(match) == 1, (pmcid, href, files)
                img = Image.open(io.BytesIO(tar.extractfile(f"{pmcid}/{match[0]}").read()))
                img.load()
            fig_ids = {f.get("id") for f in figs}
            xrefs = root.findall(".//body//xref[@ref-type='fig']")
            assert xrefs and {x.get("rid") for x in xrefs} <= fig_ids
    manifest = json.loads((world / "manifest.json").read_text())
    assert sum(1 for im in manifest["images"] if im["set"] == "pmc") == n_figs


def test_vqa_files_have_native_shapes_and_resolve(world):
    rad = json.loads((world / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text())
    keys = {
        "qid",
        "image_name",
        "image_organ",
        "question",
        "answer",
        "answer_type",
        "question_type",
        "phrase_type",
    }
    assert rad and all(keys <= set(r) for r in rad)
    assert {r["phrase_type"] for r in rad} == {"freeform", "test_freeform"}
    assert {r["answer_type"] for r in rad} == {"OPEN", "CLOSED"}
    for r in rad:
        assert (world / "vqa_rad" / "VQA_RAD Image Folder" / r["image_name"]).is_file()
    for split in ("train", "validate", "test"):
        recs = json.loads((world / "slake" / f"{split}.json").read_text())
        assert recs
        for r in recs:
            assert {
                "img_id",
                "img_name",
                "question",
                "answer",
                "q_lang",
                "answer_type",
                "content_type",
                "modality",
                "location",
                "qid",
            } <= set(r)
            assert (world / "slake" / "imgs" / r["img_name"]).is_file()
    # Ground truth in the manifest agrees with the answers.
    manifest = json.loads((world / "manifest.json").read_text())
    gt = {im["image_name"]: im for im in manifest["images"] if im["set"] == "vqa_rad"}
    for r in rad:
        im = gt[r["image_name"]]
        if r["template"] == "modality":
            assert (
                r["answer"] == {"chest_xray": "x-ray", "ct_scan": "ct", "mri": "mri"}[im["domain"]]
            )
        if r["template"] == "cxr_effusion":
            assert r["answer"] == ("yes" if im["attributes"]["effusion"] else "no")
        if r["template"] == "ct_lesion":
            assert r["answer"] == ("yes" if im["attributes"]["lesion"] else "no")
    assert manifest["seed"] == 3 and manifest["generator_version"]
    assert set(manifest["counts"]) == {"pmc", "vqa_rad", "slake"}
    assert all(
        im["split"] and im["attributes"] is not None
        for im in manifest["images"]
        if im["set"] != "pmc"
    )


def test_rerun_is_noop_resumes_and_refuses_other_args(world, tmp_path):
    before = _tree_hashes(world)
    mtime = (world / "manifest.json").stat().st_mtime_ns
    generate_world(world, seed=3, workers=1, **SMALL)
    assert (world / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError):
        generate_world(world, seed=99, workers=1, **SMALL)
    # Simulate an interrupted run: the manifest and some outputs are missing.
    copy = tmp_path / "copy"
    generate_world(copy, seed=3, workers=1, **SMALL)
    (copy / "manifest.json").unlink()
    next((copy / "packages").glob("*.tar.gz")).unlink()
    next((copy / "slake" / "imgs").rglob("*.jpg")).unlink()
    generate_world(copy, seed=3, workers=1, **SMALL)
    assert _tree_hashes(copy) == before


@pytest.mark.parametrize("vqa_images", [22, 23, 25, 28, 30, 33, 37, 40])
def test_small_worlds_give_every_split_every_domain(vqa_images):
    """Rounding each domain's split fractions alone left small worlds with no SLAKE test image
    (30 VQA images) or no VQA-RAD test image (fewer than 21)."""
    from llavamed.data.synth.world import SETS, _rad_images

    n_rad = _rad_images(vqa_images)
    for name, n in (("vqa_rad", n_rad), ("slake", vqa_images - n_rad)):
        images, _ = plan_vqa(0, name, n)
        _, domains, fractions = SETS[name]
        seen = {(im["domain"], im["split"]) for im in images}
        assert seen == {(d, s) for d in domains for s in fractions}, (name, n)


def test_too_few_vqa_images_is_refused_with_the_minimum(tmp_path):
    from llavamed.data.synth.world import min_vqa_images

    assert min_vqa_images() == 22  # 7 VQA-RAD images (2 per domain), 15 SLAKE (3 per domain)
    with pytest.raises(ConfigError, match="vqa_images must be >= 22"):
        generate_world(tmp_path / "w", articles=1, vqa_images=21, progress=False)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '{"name": "my dataset"}',
        # Another tool's manifest with a version of its own was called "a MedSynth world made
        # with None (2.14.0)" and the user told to delete it.
        '{"generator": "datasets-cli", "generator_version": "2.14.0"}',
    ],
)
def test_a_folder_with_another_manifest_is_refused(tmp_path, text):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(text)
    with pytest.raises(ConfigError, match="is not a MedSynth manifest"):
        generate_world(out, articles=1, image_size=64, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_a_world_of_an_older_medsynth_is_refused_as_one(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text(
        '{"generator": "MedSynth", "generator_version": "medsynth-1.0", "args": {"articles": 1}}'
    )
    with pytest.raises(ConfigError, match=r"already holds a MedSynth world .*\(medsynth-1\.0\)"):
        generate_world(out, articles=1, image_size=64, progress=False)


def test_cli_synth(tmp_path, capsys):
    from llavamed.commands import synth as cmd
    from llavamed.data.synth import pairs
    from llavamed.data.synth import world as w

    assert (cmd.DEFAULT_ARTICLES, cmd.DEFAULT_IMAGE_SIZE, cmd.PAIRS_IMAGE_SIZE) == (
        w.DEFAULT_ARTICLES,
        w.DEFAULT_IMAGE_SIZE,
        pairs.PAIRS_IMAGE_SIZE,
    )
    out = tmp_path / "cli"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--articles",
            "2",
            "--vqa-images",
            "22",
            "--image-size",
            "64",
            "--workers",
            "1",
            "--caption-pairs",
            "6",
            "--pairs-image-size",
            "72",
            "--quiet",
        ]
    )
    assert rc == 0 and (out / "manifest.json").is_file()
    printed = capsys.readouterr().out
    assert "2 articles" in printed and "6 caption pairs" in printed
    recs = [
        json.loads(x) for x in (out / "caption_pairs" / "figures.jsonl").read_text().splitlines()
    ]
    assert len(recs) == 6
    # the pairs' own size, not the 160 px default (--image-size is the world's)
    sides = [min(Image.open(out / "caption_pairs" / r["image"]).size) for r in recs]
    assert all(50 <= side <= 100 for side in sides), sides
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--articles",
                "3",
                "--vqa-images",
                "22",
                "--image-size",
                "64",
                "--quiet",
            ]
        )
        == 1
    )


def _image_of(r: dict) -> str:
    return r.get("image_name") or r["img_name"]


def test_dense_train_questions_leave_validation_and_test_unchanged():
    for name in ("vqa_rad", "slake"):
        imgs_sparse, sparse = plan_vqa(5, name, 300)
        imgs_dense, dense = plan_vqa(5, name, 300, train_closed=12)
        assert imgs_sparse == imgs_dense  # same images, attributes and splits
        split_of = {im["image_name"]: im["split"] for im in imgs_sparse}
        per_split = {}
        for label, records in (("sparse", sparse), ("dense", dense)):
            for r in records:
                per_split.setdefault((label, split_of[_image_of(r)]), []).append(r)

        def closed(label, split, table=per_split):
            return sum(str(r["answer_type"]).upper() == "CLOSED" for r in table[(label, split)])

        assert closed("dense", "train") > 1.15 * closed("sparse", "train"), name
        for split in set(split_of.values()) - {"train"}:
            same = [
                [(_image_of(r), r["question"], r["answer"]) for r in per_split[(lab, split)]]
                for lab in ("sparse", "dense")
            ]
            assert same[0] and same[0] == same[1], (name, split)


def test_caption_pairs_are_deterministic_resumable_and_readable_by_stage0(tmp_path):
    from llavamed.data.synth.pairs import write_caption_pairs
    from llavamed.train.vision_pretrain import load_pairs

    kw = dict(seed=5, image_size=96, chest_frac=0.5, progress=False)
    one = write_caption_pairs(tmp_path / "a", 24, workers=1, **kw)
    two = write_caption_pairs(tmp_path / "b", 24, workers=2, **kw)
    assert _tree_hashes(one.parent) == _tree_hashes(two.parent)
    recs = [json.loads(line) for line in one.read_text().splitlines()]
    assert len(recs) == 24 and len({r["fig_caption"] for r in recs}) > 12
    # Single-panel figures: the caption has no (A)/(B) panel labels, and each record carries
    # the ground truth it was drawn from.
    assert not any("(A)" in r["fig_caption"] for r in recs)
    for r in recs[:6]:
        attrs_from_dict(r["domain"], r["attributes"])
        with Image.open(one.parent / r["image"]) as im:
            assert im.format == "JPEG" and min(im.size) >= 80
    pairs, skipped = load_pairs(one)
    assert len(pairs) == 24 and not skipped
    # A run killed before writing the index, with an image missing, resumes to the same bytes.
    before = _tree_hashes(one.parent)
    one.unlink()
    (one.parent / recs[3]["image"]).unlink()
    write_caption_pairs(tmp_path / "a", 24, workers=1, **kw)
    assert _tree_hashes(one.parent) == before
    with pytest.raises(ConfigError, match="already holds caption pairs"):
        write_caption_pairs(tmp_path / "a", 25, workers=1, **kw)


def test_caption_pairs_chest_share_follows_chest_frac():
    from llavamed.data.synth.pairs import _plan

    for frac in (0.0, 0.4, 1.0):
        domains = Counter(_plan(0, i, frac)["domain"] for i in range(400))
        share = domains["chest_xray"] / 400
        assert abs(share - frac) < 0.08, (frac, domains)
        assert frac == 1.0 or len(domains) == len(DOMAINS) - (frac == 0.0)


def test_caption_pairs_draw_from_their_own_random_stream():
    # Sharing a stream with the articles or the VQA sets would render test images as pairs.
    from llavamed.data.synth.articles import ARTICLE_STREAM
    from llavamed.data.synth.pairs import PAIRS_STREAM
    from llavamed.data.synth.world import SETS

    assert PAIRS_STREAM not in {ARTICLE_STREAM, *(stream for stream, _, _ in SETS.values())}
