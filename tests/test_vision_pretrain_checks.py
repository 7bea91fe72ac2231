"""Stage 0 audit: the held-out retrieval metric on hand cases, bad images in the pairs file,
config values that mean nothing, and the text-encoder cache's key."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llavamed.train.vision_pretrain import recall_at_k


def _reference_recall(img, txt, keys, k):
    """Loops over queries and, where candidates tie, over every order of the tied ones (random
    tie-breaking): a query's hit is the share of those orders that put a right candidate among
    the first k, as a user would count it by hand."""
    from itertools import permutations

    sims = img @ txt.T
    n = len(keys)
    hits = {"i2t": 0.0, "t2i": 0.0}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        for q in range(n):
            right = {j for j in range(n) if keys[j] == keys[q]}
            best = max(float(s[q, j]) for j in right)
            above = sum(float(s[q, j]) > best for j in range(n) if j not in right)
            tied = [j for j in range(n) if float(s[q, j]) == best]
            orders = list(permutations(tied))
            hits[name] += sum(
                any(j in right for j in order[: max(0, k - above)]) for order in orders
            ) / len(orders)
    return {name: v / n for name, v in hits.items()}


def test_held_out_recall_counts_a_repeated_caption_as_a_right_answer():
    """Three held-out figures carry the same normal-study caption (the frozen text encoder
    embeds them identically). Each image retrieves that caption first, but tied with its two
    copies it was ranked 1.0 and counted a miss at R@1: a perfect tower scored 0.25."""
    a = F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    b = F.normalize(torch.tensor([0.0, 1.0, 0.0]), dim=0)
    txt = torch.stack([a, a, a, b])
    img = F.normalize(
        torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.2], [1.0, 0.1, 0.1], [0.1, 1.0, 0.0]]), dim=1
    )
    keys = ["no focal lesion.", "no focal lesion.", "no focal lesion.", "a nodule."]
    r = recall_at_k(img, txt, keys=keys)
    assert r["i2t_r@1"] == 1.0 and r["t2i_r@1"] == 1.0
    assert r == recall_at_k(img, txt, keys=keys)  # deterministic
    # Without keys every row is its own caption (the old metric, kept for callers without):
    # images 0-2 tie their caption with its two copies (a hit 1 time in 3), image 3 is a hit.
    assert recall_at_k(img, txt)["i2t_r@1"] == pytest.approx(0.5)


def test_collapsed_embeddings_score_chance_not_a_perfect_recall():
    """A tower whose images all embed alike retrieves nothing. With two held-out pairs it
    scored R@1 = 1.0 both ways, and R@5 = 1.0 with up to ten: each query's rank was half its
    ties, (n - 1) / 2, under k. Random tie-breaking gives chance, as the report's chance_r@1."""
    same = torch.ones(2, 3)
    r = recall_at_k(same, torch.eye(2, 3), keys=["a", "b"])
    assert r["i2t_r@1"] == pytest.approx(0.5) and r["t2i_r@1"] == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    txt = F.normalize(torch.randn(10, 3, generator=g), dim=1)
    r = recall_at_k(torch.ones(10, 3), txt, keys=list("abcdefghij"))
    assert r["t2i_r@5"] == pytest.approx(0.5) and r["t2i_r@1"] == pytest.approx(0.1)
    # Two right captions tied with one wrong one at the top: a right one comes first in 2 of 3
    # orders; with the repeated caption the chance R@1 is (2 + 2 + 1) / 9.
    one = torch.tensor([[1.0, 0.0]] * 3)
    r = recall_at_k(one, one, ks=(1, 2), keys=["a", "a", "b"])
    assert r["i2t_r@1"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3) == 5 / 9
    for k in (1, 2):
        assert r[f"i2t_r@{k}"] == pytest.approx(
            _reference_recall(one, one, ["a", "a", "b"], k)["i2t"]
        )


def test_held_out_recall_matches_a_hand_count():
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(9, 4, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(9, 4, generator=g), dim=1)
    txt[4] = txt[1]  # a repeated caption
    keys = ["c0", "c1", "c2", "c3", "c1", "c5", "c6", "c7", "c8"]
    for k in (1, 5):
        want = _reference_recall(img, txt, keys, k)
        got = recall_at_k(img, txt, ks=(k,), keys=keys)
        assert got[f"i2t_r@{k}"] == pytest.approx(want["i2t"])
        assert got[f"t2i_r@{k}"] == pytest.approx(want["t2i"])
    # A hand-made case: image 0 ranks caption 1 above its own, the rest are right.
    eye = torch.eye(3)
    img = torch.tensor([[0.5, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(img, eye, ks=(1, 2), keys=["x", "y", "z"])
    assert r["i2t_r@1"] == pytest.approx(2 / 3) and r["i2t_r@2"] == 1.0
    # text 1 sees images 0 and 1 tie at 1.0: half a hit at k=1 (it was counted a whole one)
    assert r["t2i_r@1"] == pytest.approx(2.5 / 3) and r["t2i_r@2"] == 1.0
    for k in (1, 2):
        want = _reference_recall(img, eye, ["x", "y", "z"], k)
        assert r[f"t2i_r@{k}"] == pytest.approx(want["t2i"])
    collapsed = torch.ones(4, 3)  # every image and caption embeds the same: chance, 1 in 4
    assert recall_at_k(collapsed, collapsed, keys=list("abcd"))["i2t_r@1"] == pytest.approx(0.25)
    nan = torch.full((4, 3), float("nan"))
    assert recall_at_k(nan, collapsed, keys=list("aabb"))["t2i_r@5"] == 0.0


@pytest.mark.parametrize(
    "override, words",
    [
        ("text_max_length=0", "text_max_length=0"),
        ("text_max_length=-3", "text_max_length=-3"),
        ("max_phrases=-1", "max_phrases=-1"),
        ("intensity_jitter=1.5", "intensity_jitter=1.5"),
        ("intensity_jitter=-0.1", "intensity_jitter=-0.1"),
        ("scalar_lr_mult=-1", "scalar_lr_mult=-1"),
        ("grad_clip=-1", "grad_clip=-1"),
        ("time_budget_min=0", "time_budget_min=0"),
        ("val_max=-1", "val_max"),
        ("probe_images_per_domain=-5", "probe_images_per_domain"),
        ("probe_domains=[chest_xray,lungs]", r"probe_domains=\['chest_xray', 'lungs'\]"),
        ("crop_ratio=[0.8,inf]", "crop_ratio"),
        # A bare number or a word was a TypeError or ValueError traceback.
        ("crop_scale=0.5", r"crop_scale=0.5: give \[min, max\]"),
        ("crop_scale=[a,b]", r"crop_scale=\['a', 'b'\]: give \[min, max\] as two numbers"),
        ("crop_ratio=[null,1]", "crop_ratio=.*two numbers"),
        ("crop_ratio=[true,1]", "crop_ratio=.*two numbers"),
    ],
)
def test_nonsense_stage0_settings_are_named_before_training(override, words):
    """Each was accepted: a negative text_max_length ended in the tokenizer's OverflowError, an
    unknown probe domain in a KeyError after training (on every re-run), time_budget_min=0
    saved the untrained tower as the result, intensity_jitter >= 1 flipped images' contrast,
    and the rest trained something else than asked without a word."""
    from llavamed.errors import ConfigError
    from llavamed.train.vision_pretrain import make_config

    with pytest.raises(ConfigError, match=words):
        make_config({"data": "figures.jsonl"}, [override])


@pytest.mark.parametrize(
    "overrides, first",
    [
        (["epochs=abc", "crop_scale=0.5"], "epochs: expected a number, got 'abc'"),
        (["stepz=1", "crop_scale=0.5"], "unknown stage-0 config key(s): stepz"),
        (["crop_scale=0.5", "text_max_length=0"], "crop_scale=0.5: give [min, max]"),
        (
            ["crop_ratio=[a,1]", "grad_clip=-1"],
            "crop_ratio=['a', 1]: give [min, max] as two numbers",
        ),
    ],
)
def test_a_config_with_two_faults_is_told_the_first_as_before(overrides, first):
    """make_config is config.build_config with stage 0's two steps in it: unknown keys refused
    before the keys are typed, the crop ranges typed after (so a key that will not type is named
    before them) and before validate, as stage 0's own sequence did."""
    from llavamed.errors import ConfigError
    from llavamed.train.vision_pretrain import make_config

    with pytest.raises(ConfigError) as err:
        make_config({"data": "figures.jsonl"}, overrides)
    assert str(err.value) == first


def test_a_feature_layer_or_caption_length_the_models_lack_is_named_up_front(tmp_path):
    """feature_layer=-9 on a 2-layer tower was an IndexError at the first step, after images
    were decoded and captions embedded; a text_max_length past the text encoder's 512
    positions died inside the embedding of the first long caption."""
    from llavamed.errors import ConfigError
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=10)
    cfg = tiny_run(data, tmp_path / "run", max_steps=1)
    with pytest.raises(ConfigError, match=r"feature_layer=-9: the tower has 2 layers"):
        run_from_config(cfg, ["feature_layer=-9"], progress=False)
    with pytest.raises(ConfigError, match=r"text_max_length=600: .* at most 512 tokens"):
        run_from_config(cfg, ["text_max_length=600"], progress=False)
    assert not (tmp_path / "run" / "vision_tower").exists()


@pytest.mark.parametrize("preload", [True, False])
def test_unreadable_images_are_counted_and_named(tmp_path, capsys, preload):
    """With ``preload: false`` an unreadable image was replaced in its batch and never counted:
    the report said nothing of a missing file or a file that is no image. In neither mode was
    the file named, so a user could not find which of thousands of images to fix."""
    from llavamed.train.vision_pretrain import REPORT_MD, run_from_config
    from stage0_helpers import streaming_cfg, write_pairs

    data = write_pairs(tmp_path / "data", n=12)  # + images/missing.png, + a record without caption
    junk = tmp_path / "data" / "images" / "3.png"
    junk.write_bytes(b"not a png")
    # Two steps of 6 from 12 listed images with a readable one moved in for each bad one:
    # every image is met once in streaming mode.
    cfg = streaming_cfg(data, tmp_path / "run", val_fraction=0.0, preload=preload)
    res = run_from_config(cfg, progress=False)
    assert res.report["skipped"] == {"no caption": 1, "not an image": 1, "file not found": 1}
    missing = tmp_path / "data" / "images" / "missing.png"
    assert res.report["skipped_images"] == {
        str(junk): "not an image",
        str(missing): "file not found",
    }
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image(s)" in err and str(junk) in err and str(missing) in err
    assert f"unreadable image {junk}: not an image" in (res.output_dir / REPORT_MD).read_text()


def test_unreadable_held_out_images_are_named_when_streaming(tmp_path, capsys):
    """With ``preload: false`` the held-out images are decoded after training, once the report's
    named list was copied: an unreadable one was counted in ``skipped`` but not named."""
    from llavamed.train.vision_pretrain import (
        REPORT_MD,
        load_pairs,
        make_config,
        run_from_config,
        split_pairs,
    )
    from stage0_helpers import streaming_cfg, write_pairs

    data = write_pairs(tmp_path / "data", n=12)
    cfg = streaming_cfg(data, tmp_path / "run", val_fraction=0.25)
    conf = make_config(cfg)
    _, held_out = split_pairs(load_pairs(conf.data)[0], conf.val_fraction, conf.val_max, conf.data)
    junk = held_out[0].image
    junk.write_bytes(b"not a png")
    res = run_from_config(cfg, progress=False)
    assert res.report["skipped"]["not an image"] >= 1
    assert res.report["skipped_images"][str(junk)] == "not an image"
    assert sum(res.report["skipped"].values()) - res.report["skipped"].get("no caption", 0) == len(
        res.report["skipped_images"]
    )
    assert str(junk) in capsys.readouterr().err
    assert f"unreadable image {junk}: not an image" in (res.output_dir / REPORT_MD).read_text()


def test_records_without_image_or_caption_are_named(tmp_path, capsys):
    """They were only counted ('no caption': 1), so a user could not tell which of thousands
    of records to fix; a record without an id is named by its number in the file."""
    from llavamed.train.vision_pretrain import REPORT_MD, load_pairs, run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=16)  # + a record "nocap" with an empty caption
    with data.open("a") as fh:
        fh.write(json.dumps({"fig_caption": "A nodule.", "image": ""}) + "\n")
        fh.write(
            json.dumps({"pair_id": "p99", "fig_caption": "  ", "image": "images/1.png"}) + "\n"
        )
    named: dict = {}
    _, skipped = load_pairs(data, named=named)
    assert skipped == {"no caption": 2, "no image": 1}
    assert named == {"nocap": "no caption", "#19": "no image", "p99": "no caption"}
    res = run_from_config(tiny_run(data, tmp_path / "run", max_steps=1), progress=False)
    assert res.report["skipped_records"] == named
    assert "skipped 3 record(s) of" in capsys.readouterr().err
    assert "- skipped record #19: no image" in (res.output_dir / REPORT_MD).read_text()


def test_the_caption_cache_follows_the_encoders_files(tmp_path):
    """The cache key hashed the weights' sizes and whole-second times only. A folder whose
    tokenizer changed (here: no lower-casing), or whose weights were replaced by others of the
    same shape with their timestamps kept (tar, rsync -a, cp -p), served the old vectors."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from llavamed.train.text_encoder import (
        TextEncoder,
        cached_embeddings,
        embedded_text_encoder_dir,
    )

    enc_dir = shutil.copytree(embedded_text_encoder_dir(), tmp_path / "enc")
    cache = tmp_path / "cache.pt"
    texts = ["Left PLEURAL Effusion", "a nodule"]
    old = cached_embeddings(TextEncoder(str(enc_dir)), texts, cache, progress=False)

    tok = json.loads((enc_dir / "tokenizer_config.json").read_text())
    tok["do_lower_case"] = False
    (enc_dir / "tokenizer_config.json").write_text(json.dumps(tok))
    cased = TextEncoder(str(enc_dir))
    got = cached_embeddings(cased, texts, cache, progress=False)
    assert torch.equal(got, cased.encode(texts)) and not torch.equal(got[0], old[0])

    weights = enc_dir / "model.safetensors"
    st = weights.stat()
    sd = load_file(weights)
    sd = {k: v * 1.5 if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == st.st_size
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the copy kept its timestamps
    other = TextEncoder(str(enc_dir))
    got = cached_embeddings(other, texts, cache, progress=False)
    assert torch.equal(got, other.encode(texts)) and not torch.equal(got[1], old[1])


def test_a_trainable_text_tower_scores_held_out_captions_with_its_own_vectors(tmp_path):
    """``text_trainable: true`` "disables the cache", but held-out retrieval still read
    ``cache/text_val.pt``, keyed by the encoder's files: vectors that a frozen-text run in the
    same folder left there (here made unmistakable: NaN) scored the tuned tower."""
    from llavamed.train.text_encoder import TextEncoder
    from llavamed.train.vision_pretrain import load_pairs, run_from_config, split_pairs
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    cfg = tiny_run(data, out, max_steps=2, text_trainable=True)
    _, val = split_pairs(load_pairs(data)[0], 0.2, 1000)
    caps = [p.caption for p in val if p.image.exists()]
    enc = TextEncoder()
    (out / "cache").mkdir(parents=True)
    torch.save(
        {
            "fingerprint": enc.fingerprint,
            "texts": caps,
            "vectors": torch.full((len(caps), enc.dim), float("nan")),
        },
        out / "cache" / "text_val.pt",
    )
    r = run_from_config(cfg, progress=False).report["retrieval"]
    assert r["n"] == len(caps) and r["i2t_r@5"] > 0 and r["t2i_r@5"] > 0


def test_a_streamed_run_with_a_trainable_text_tower_resumes_exactly(tmp_path, monkeypatch):
    """With ``preload: false`` the DataLoader drew its base seed from torch's global RNG when
    the loop started, which a resume does only after restoring that RNG: the text tower's
    dropout masks after the resume were one draw off, and so was the tower."""
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import killed_at_step, same_tower, tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=16)
    cfg = tiny_run(
        data,
        tmp_path / "run",
        max_steps=4,
        save_every=2,
        text_trainable=True,
        text_max_length=16,
        preload=False,
    )
    ref = run_from_config({**cfg, "output_dir": str(tmp_path / "ref")}, progress=False)
    killed_at_step(4, cfg, monkeypatch)
    assert same_tower(run_from_config(cfg, progress=False), ref)


def test_an_image_fixed_after_a_run_is_read_again(tmp_path):
    """The decoded-image cache was keyed by pair ids and paths only: after the report named an
    unreadable image and the user replaced it, the next run in the folder (here: more steps)
    still took it from the cache as unreadable (and a replaced image kept its old pixels)."""
    import shutil

    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=16)
    images = tmp_path / "data" / "images"
    good = images / "3.png"
    shutil.copy(good, tmp_path / "3.png")
    good.write_bytes(b"not a png")
    cfg = tiny_run(data, tmp_path / "run", max_steps=1)
    first = run_from_config(cfg, progress=False).report
    assert first["skipped_images"].get(str(good)) == "not an image"
    shutil.copy(tmp_path / "3.png", good)
    again = run_from_config(cfg, ["max_steps=2"], progress=False).report
    assert str(good) not in again["skipped_images"]
    assert "not an image" not in again["skipped"]
    assert sum(again["pairs"].values()) == sum(first["pairs"].values()) + 1


def test_other_weights_behind_the_starting_towers_path_are_another_run(tmp_path, capsys):
    """Stage 0 from a tower folder, then other weights written into that folder (a tower
    converted or trained again there): the re-run returned the old result at once, trained from
    the old weights. Stage 0b already keyed its runs by the starting tower's contents."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llavamed.model.compose import VISION_PRESETS
    from llavamed.train.vision_pretrain import STATE_FILE, run_from_config
    from stage0_helpers import tiny_run, write_pairs

    start = tmp_path / "start"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION_PRESETS["tiny"])).save_pretrained(start)
    data = write_pairs(tmp_path / "data", n=16)
    cfg = tiny_run(data, tmp_path / "run", max_steps=2, vision=str(start), save_every=1)
    first = run_from_config(cfg, progress=False)
    from safetensors.torch import load_file

    a = load_file(first.tower_dir / "model.safetensors")
    same = run_from_config(cfg, progress=False)
    assert same.wall_time_s < first.wall_time_s  # unchanged: returned at once

    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**VISION_PRESETS["tiny"])).save_pretrained(start)
    again = run_from_config(cfg, progress=False)
    assert again.report["start_tower"] != first.report["start_tower"]
    b = load_file(again.tower_dir / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # A resume state from the old weights is not resumed either.
    (tmp_path / "run" / "stage0_report.json").unlink()
    torch.save(
        {**torch.load(tmp_path / "run" / STATE_FILE, weights_only=False), "start_tower": "x"},
        tmp_path / "run" / STATE_FILE,
    )
    run_from_config(cfg, progress=False)
    assert f"the weights in {start}" in capsys.readouterr().err


def test_other_files_behind_the_text_encoders_name_are_another_run(tmp_path):
    """The same config over a text encoder folder whose files changed (a new package version,
    a tokenizer or weights written again) returned the old tower at once."""
    import json
    import shutil

    from llavamed.train.text_encoder import embedded_text_encoder_dir
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    enc = shutil.copytree(embedded_text_encoder_dir(), tmp_path / "enc")
    data = write_pairs(tmp_path / "data", n=16)
    cfg = tiny_run(data, tmp_path / "run", max_steps=1, text_encoder=str(enc))
    first = run_from_config(cfg, progress=False).report
    assert run_from_config(cfg, progress=False).report == first  # unchanged: done
    tok = json.loads((enc / "tokenizer_config.json").read_text())
    (enc / "tokenizer_config.json").write_text(json.dumps({**tok, "do_lower_case": False}))
    again = run_from_config(cfg, progress=False).report
    assert again["text_encoder"] != first["text_encoder"]  # trained again, a new report


def test_a_finished_run_is_not_redone_for_a_setting_that_changes_nothing(tmp_path):
    """A finished run re-run with another log_every, save_every, num_workers or time budget
    resumed at its last step, evaluated and probed again and rewrote its tower (minutes with
    the default probes), although `llavamed train --help` says a finished run returns at once.
    A run the time budget stopped still goes on under another budget."""
    from llavamed.train.vision_pretrain import REPORT_JSON, run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=20)
    cfg = tiny_run(data, tmp_path / "run", max_steps=3)
    first = run_from_config(cfg, progress=False)
    weights = first.tower_dir / "model.safetensors"
    stamp, report = weights.stat().st_mtime_ns, (tmp_path / "run" / REPORT_JSON).read_text()
    for change in (["log_every=2", "save_every=1", "num_workers=1"], ["time_budget_min=60"]):
        again = run_from_config(cfg, change, progress=False)
        assert again.report["steps"] == 3
        assert weights.stat().st_mtime_ns == stamp
        assert (tmp_path / "run" / REPORT_JSON).read_text() == report

    budget = tiny_run(data, tmp_path / "cut", max_steps=3, time_budget_min=1e-9)
    stopped = run_from_config(budget, progress=False)
    assert stopped.report["stopped_early"] and stopped.report["steps"] == 1
    assert run_from_config(budget, progress=False).report["steps"] == 1  # same budget: done
    more = run_from_config(budget, ["time_budget_min=60"], progress=False)
    assert more.report["steps"] == 3 and not more.report["stopped_early"]


def test_a_damaged_report_or_resume_state_is_named_not_a_traceback(tmp_path, capsys):
    """A report or resume state cut short (a machine crash before the disk wrote it out) was a
    JSONDecodeError or torch traceback on every re-run. The report is then not a finished run
    (the state at the last step finishes it again); a damaged state is a one-line error naming
    it and the way on."""
    from llavamed.errors import InputError
    from llavamed.train.vision_pretrain import REPORT_JSON, STATE_FILE, run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=20)
    cfg = tiny_run(data, tmp_path / "run", max_steps=2)
    first = run_from_config(cfg, progress=False)
    report = tmp_path / "run" / REPORT_JSON
    report.write_text(report.read_text()[:40])
    again = run_from_config(cfg, progress=False)
    assert "is unreadable" in capsys.readouterr().err
    assert again.report["steps"] == 2 and again.report["data"] == first.report["data"]
    report.write_text(report.read_text()[:40])
    state = tmp_path / "run" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(InputError, match=r"stage0_state.pt: damaged resume checkpoint .*Delete it"):
        run_from_config(cfg, progress=False)


def test_too_few_pairs_names_the_file_and_comes_before_the_decoding(tmp_path):
    """One pair was 'data: too few pairs left for training after the held-out split' (the
    config key, not the file, and a split that had held nothing out); a batch larger than the
    pairs was refused only after every image was decoded and cached."""
    from llavamed.errors import InputError
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=12)
    one = tmp_path / "data" / "one.jsonl"
    one.write_text(data.read_text().splitlines()[0] + "\n")
    cfg = tiny_run(one, tmp_path / "run", max_steps=1)
    with pytest.raises(InputError, match=r"one.jsonl: too few pairs to train on .*1 usable pair"):
        run_from_config(cfg, progress=False)
    cfg = tiny_run(data, tmp_path / "big", max_steps=1, batch_size=64)
    with pytest.raises(InputError, match=r"figures.jsonl: fewer training pairs than batch_size"):
        run_from_config(cfg, progress=False)
    assert not (tmp_path / "big" / "cache").exists()


def test_pairs_of_other_articles_that_share_an_id_stay_in_training(tmp_path):
    """Figure records whose pair_id is the bare figure id ("fig1" in 40 articles): the held-out
    articles' ids were removed from training, and with them every other article's "fig1", so
    no pair was left to train on."""
    from llavamed.train.vision_pretrain import load_pairs, split_pairs

    (tmp_path / "images").mkdir()
    recs = [
        {"pair_id": "fig1", "pmcid": f"PMC{i}", "fig_caption": f"Case {i}.", "image": f"{i}.png"}
        for i in range(40)
    ]
    data = tmp_path / "figures.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    pairs, _ = load_pairs(data)
    train, val = split_pairs(pairs, 0.2, 1000, data)
    assert val and len(train) + len(val) == 40
    assert not {p.article for p in train} & {p.article for p in val}


@pytest.mark.parametrize("preload", [True, False])
def test_a_wrong_image_folder_is_named_not_blamed_on_batch_size(tmp_path, capsys, preload):
    """Every image missing (image_folder pointing elsewhere) was 'fewer training pairs than
    batch_size (0 < 8)', with a stderr line sending the user to a report the failed run never
    wrote; streamed (preload: false), a bare 'no readable images'."""
    from llavamed.errors import InputError
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    data = write_pairs(tmp_path / "data", n=12)
    elsewhere = tmp_path / "elsewhere"
    cfg = tiny_run(data, tmp_path / "run", max_steps=1, image_folder=str(elsewhere))
    cfg["preload"] = preload
    with pytest.raises(InputError, match=r"readable images .*file not found.* under .*elsewhere"):
        run_from_config(cfg, progress=False)
    assert "stage0_report.json" not in capsys.readouterr().err


def test_a_folder_that_is_no_text_encoder_is_named(tmp_path):
    """text_encoder= a vision tower's folder (config.json, no tokenizer) was a multi-line
    ValueError traceback from transformers."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llavamed.errors import InputError
    from llavamed.train.text_encoder import TextEncoder

    conf = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    CLIPVisionModel(conf).save_pretrained(tmp_path / "tower")
    with pytest.raises(InputError, match=r"tower: not a text encoder folder"):
        TextEncoder(str(tmp_path / "tower"))


def test_a_refused_run_leaves_no_output_folder(tmp_path):
    """`llavamed train configs/cpu/stage0_vision.yaml` before the pairs exist failed rightly but
    left an empty runs/cpu/stage0/, and `llavamed quickstart --out runs/cpu` then refused the
    folder as not its own."""
    from llavamed.errors import InputError
    from llavamed.train.vision_pretrain import run_from_config
    from stage0_helpers import tiny_run, write_pairs

    cfg = tiny_run(tmp_path / "missing.jsonl", tmp_path / "runs" / "stage0", max_steps=1)
    with pytest.raises(InputError, match="missing.jsonl"):
        run_from_config(cfg, progress=False)
    data = write_pairs(tmp_path / "data", n=12)
    cfg = tiny_run(data, tmp_path / "runs" / "big", max_steps=1, batch_size=64)
    with pytest.raises(InputError, match="fewer training pairs than batch_size"):
        run_from_config(cfg, progress=False)
    assert not (tmp_path / "runs").exists()
