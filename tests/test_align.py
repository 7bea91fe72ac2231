import json

import pytest

from llavamed.cli import main
from llavamed.data.align import IMAGE_TOKEN, alignment_prompts, all_prompts, build_alignment


def _records(n):
    return [
        {"pair_id": f"PMC{i}_F1", "fig_caption": f"Caption {i}.", "image": f"images/PMC{i}_F1.jpg",
         "domain": {"chest_xray": False, "mri": True, "histology": False, "gross": False,
                    "ct_scan": False}}
        for i in range(n)
    ]  # fmt: skip


def test_prompt_lists_are_the_papers():
    brief, detailed = alignment_prompts()
    assert len(brief) == 11 and len(detailed) == 16 and len(set(all_prompts())) == 27
    assert brief[0] == "Describe the image concisely."
    assert detailed[0] == "Describe the following image in detail."
    assert "Write an exhaustive depiction of the given image." in detailed


def test_samples_shape_seeding_and_placement():
    recs = _records(200) + [{"pair_id": "x", "fig_caption": "No image.", "image": None}]
    samples, skipped = build_alignment(recs, seed=3, prompts="uniform")
    assert skipped == {"no image": 1} and len(samples) == 200
    before = after = 0
    used = set()
    for s, rec in zip(samples, recs, strict=False):
        human, gpt = s["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert gpt["value"] == rec["fig_caption"] and s["image"] == rec["image"]
        assert human["value"].count(IMAGE_TOKEN) == 1
        prompt = human["value"].replace(IMAGE_TOKEN, "").strip()
        assert prompt in all_prompts()
        used.add(prompt)
        before += human["value"].startswith(IMAGE_TOKEN + "\n")
        after += human["value"].endswith("\n" + IMAGE_TOKEN)
    assert before + after == 200 and 60 < before < 140
    assert len(used) > 20
    again, _ = build_alignment(recs, seed=3, prompts="uniform")
    assert again == samples
    other, _ = build_alignment(recs, seed=4, prompts="uniform")
    assert other != samples
    subset, _ = build_alignment(recs, seed=3, max_samples=10, prompts="uniform")
    assert len(subset) == 10
    by_id = {s["id"]: s for s in samples}
    assert all(by_id[s["id"]] == s for s in subset)  # same sample whatever the subset


def test_cli_paths_relative_to_output(tmp_path, capsys):
    figs = tmp_path / "corpus" / "figures.jsonl"
    figs.parent.mkdir()
    recs = _records(4)
    for r in recs[:3]:  # the fourth figure's image is missing
        (figs.parent / r["image"]).parent.mkdir(exist_ok=True)
        (figs.parent / r["image"]).write_bytes(b"jpeg")
    # Malformed fields are counted and skipped, never written into the training set.
    recs += [
        {"pair_id": "bad1", "fig_caption": "A caption.", "image": ["images/PMC0_F1.jpg"]},
        {"pair_id": "bad2", "fig_caption": 12345, "image": "images/PMC0_F1.jpg"},
    ]
    figs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "train" / "alignment.json"
    assert main(["data", "align", "--figures", str(figs), "--out", str(out), "--max", "2"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 2
    assert all(s["image"].startswith("../corpus/images/") for s in data)
    printed = capsys.readouterr().out
    assert "2 alignment samples" in printed
    for reason in ("image file not found", "malformed image field", "malformed caption"):
        assert f'"{reason}": 1' in printed


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_prompt_list_follows_caption_length_as_in_the_paper():
    """LLaVA-Med: captions under 30 words are asked for briefly (Table 7), longer ones in
    detail (Table 8). Counted in words of the caption as it goes into the sample."""
    brief, detailed = alignment_prompts()
    recs = [
        {"pair_id": f"p{n}_{k}", "image": "x.jpg", "fig_caption": _words(n)}
        for n in (1, 29, 30, 31, 90)
        for k in range(40)
    ]
    recs.append(
        {"pair_id": "spaced", "image": "x.jpg", "fig_caption": " \n ".join(_words(29).split())}
    )
    samples, _ = build_alignment(recs, seed=0)

    def prompt(s):
        return s["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()

    by_len: dict[int, set] = {}
    for s in samples:
        by_len.setdefault(len(s["conversations"][1]["value"].split()), set()).add(prompt(s))
    assert by_len[1] <= set(brief) and by_len[29] <= set(brief)
    assert by_len[30] <= set(detailed) and by_len[31] <= set(detailed)
    assert by_len[90] <= set(detailed)
    assert len(by_len[1]) > 6 and len(by_len[90]) > 8  # still drawn from the whole list
    # Another cutoff moves the boundary; uniform draws short captions from both lists.
    moved, _ = build_alignment(recs, seed=0, cutoff_words=31)
    assert {prompt(s) for s in moved if s["id"].startswith("p30_")} <= set(brief)
    uniform, _ = build_alignment(recs, seed=0, prompts="uniform")
    short = {prompt(s) for s in uniform if s["id"].startswith("p1_")}
    assert short & set(brief) and short & set(detailed)
    with pytest.raises(ValueError, match="prompt policy 'longest'"):
        build_alignment(recs, prompts="longest")
    with pytest.raises(ValueError, match="cutoff_words"):
        build_alignment(recs, cutoff_words=0)


def test_cli_prompt_policy_and_cutoff(tmp_path, capsys):
    figs = tmp_path / "figures.jsonl"
    recs = [{"pair_id": f"a{i}", "fig_caption": _words(40), "image": "a.jpg"} for i in range(30)]
    figs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "a.jpg").write_bytes(b"jpeg")
    out = tmp_path / "alignment.json"
    argv = ["data", "align", "--figures", str(figs), "--out", str(out)]
    brief, detailed = alignment_prompts()

    def prompts_used():
        return {
            s["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
            for s in json.loads(out.read_text())
        }

    assert main(argv) == 0 and prompts_used() <= set(detailed)
    assert main([*argv, "--cutoff-words", "41"]) == 0 and prompts_used() <= set(brief)
    assert main([*argv, "--prompts", "uniform"]) == 0
    assert prompts_used() & set(brief) and prompts_used() & set(detailed)
    capsys.readouterr()
    before = out.read_bytes()
    # A usage error (argparse's exit 2), refused as the command line is read: the last run's
    # output is left as it was.
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--cutoff-words", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: llavamed data align [-h]"), err
    assert err[-1] == "llavamed data align: error: argument --cutoff-words: 0 must be >= 1", err
    assert out.read_bytes() == before


def test_captions_go_in_on_one_line_without_image_tokens():
    recs = [
        {"pair_id": "a", "image": "a.jpg", "fig_caption": "Axial CT.\n  Arrow: <image> lesion. "},
        {"pair_id": "b", "image": "b.jpg", "fig_caption": " <image> "},  # nothing left: skipped
    ]
    samples, skipped = build_alignment(recs, seed=0)
    assert [s["conversations"][1]["value"] for s in samples] == ["Axial CT. Arrow: lesion."]
    assert skipped == {"empty caption": 1}
    assert all(s["conversations"][0]["value"].count("<image>") == 1 for s in samples)


def test_llava_med_caption_json_records_name_pair_id_jpg(tmp_path, capsys):
    """LLaVA-Med's {domain: [records]} caption JSON has no image field; its images are
    {pair_id}.jpg, as self-instruct reads them. They were all skipped as "no image", exit 0."""
    figs = tmp_path / "llava_med_captions.json"
    recs = [{"pair_id": f"{i}_PMC{i}_F1", "fig_caption": f"Axial CT {i}."} for i in range(3)]
    recs.append({"pair_id": "gone", "fig_caption": "No image.", "image": None})
    figs.write_text(json.dumps({"ct_scan": recs}))
    for r in recs[:2]:  # the third's file is missing
        (tmp_path / f"{r['pair_id']}.jpg").write_bytes(b"jpeg")
    out = tmp_path / "alignment.json"
    assert main(["data", "align", "--figures", str(figs), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [s["image"] for s in data] == ["0_PMC0_F1.jpg", "1_PMC1_F1.jpg"]
    printed = capsys.readouterr().out
    assert '"image file not found": 1' in printed and '"no image": 1' in printed


def test_image_folder_apart_from_the_caption_json(tmp_path, capsys):
    """LLaVA-Med's caption JSON and its downloaded images usually live in different folders:
    --image-folder says where; paths in the output stay relative to the output's folder."""
    figs = tmp_path / "meta" / "llava_med_captions.json"
    figs.parent.mkdir()
    figs.write_text(json.dumps({"mri": [{"pair_id": "7_PMC7_F2", "fig_caption": "Axial MRI."}]}))
    images = tmp_path / "pmc_images"
    images.mkdir()
    (images / "7_PMC7_F2.jpg").write_bytes(b"jpeg")
    out = tmp_path / "train" / "alignment.json"
    out.parent.mkdir()
    argv = ["data", "align", "--figures", str(figs), "--out", str(out)]
    assert main(argv) == 1  # next to the JSON there is no image
    assert '"image file not found": 1' in capsys.readouterr().err
    assert main([*argv, "--image-folder", str(images)]) == 0
    (sample,) = json.loads(out.read_text())
    assert sample["image"] == "../pmc_images/7_PMC7_F2.jpg"
    assert (out.parent / sample["image"]).is_file()
    assert main([*argv, "--image-folder", str(tmp_path / "nope")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_no_sample_at_all_is_an_error_not_an_empty_set(tmp_path, capsys):
    figs = tmp_path / "figures.jsonl"
    figs.write_text(json.dumps({"pair_id": "a", "fig_caption": "x", "image": None}) + "\n")
    out = tmp_path / "alignment.json"
    assert main(["data", "align", "--figures", str(figs), "--out", str(out)]) == 1
    assert not out.exists()
    assert "no figure became an alignment sample" in capsys.readouterr().err


def test_out_naming_the_figures_file_is_refused_before_it_is_replaced(tmp_path, capsys):
    """``--out figures.jsonl`` replaced the figures with the samples made from them, exit 0."""
    figs = tmp_path / "figures.jsonl"
    rec = _records(1)[0]
    (tmp_path / rec["image"]).parent.mkdir()
    (tmp_path / rec["image"]).write_bytes(b"jpeg")
    figs.write_text(json.dumps(rec) + "\n")
    before = figs.read_bytes()
    link = tmp_path / "same.jsonl"
    link.symlink_to(figs)
    for out in (figs, link, tmp_path / "." / "figures.jsonl"):
        assert main(["data", "align", "--figures", str(figs), "--out", str(out)]) == 1
        assert "--out would overwrite --figures" in capsys.readouterr().err
        assert figs.read_bytes() == before


def test_a_lone_surrogate_in_a_caption_is_written_as_a_replacement_character(tmp_path, capsys):
    """A caption's "\\ud83d" escape (text cut inside a UTF-16 pair) decodes to a lone surrogate:
    writing alignment.json raised UnicodeEncodeError, a traceback after all the work."""
    figs = tmp_path / "figures.jsonl"
    rec = _records(1)[0]
    (tmp_path / rec["image"]).parent.mkdir()
    (tmp_path / rec["image"]).write_bytes(b"jpeg")
    line = json.dumps(rec).replace("Caption 0.", "Chest CT \\ud83d with a nodule.")
    figs.write_text(line + "\n")
    out = tmp_path / "alignment.json"
    assert main(["data", "align", "--figures", str(figs), "--out", str(out)]) == 0
    (sample,) = json.loads(out.read_text(encoding="utf-8"))
    assert sample["conversations"][1]["value"] == "Chest CT \ufffd with a nodule."
