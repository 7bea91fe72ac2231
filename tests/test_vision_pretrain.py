"""Stage 0: losses, phrase extraction, text encoder cache, config validation, and a tiny end-to-end
run (random tiny tower) whose output ``model init --vision DIR`` accepts, with a resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llavamed.errors import ConfigError, InputError
from llavamed.train.contrastive import (
    caption_phrases,
    clip_loss,
    phrase_key,
    phrase_patch_loss,
    pooled_patch_scores,
)
from stage0_helpers import killed_at_step, same_tower, streaming_cfg, tiny_run, write_pairs


def _reference_clip(img, txt, scale):
    logits = scale * img @ txt.T
    n = img.shape[0]
    loss = 0.0
    for i in range(n):
        loss -= torch.log_softmax(logits[i], 0)[i] / (2 * n)
        loss -= torch.log_softmax(logits[:, i], 0)[i] / (2 * n)
    return loss


def test_clip_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ls = torch.tensor(math.log(10.0))
    assert torch.allclose(clip_loss(img, txt, ls), _reference_clip(img, txt, 10.0), atol=1e-5)
    # Perfectly aligned pairs at a high temperature give a near-zero loss.
    assert clip_loss(img, img, torch.tensor(math.log(100.0))) < clip_loss(
        img, txt, torch.tensor(math.log(100.0))
    )


def test_clip_loss_counts_a_repeated_caption_as_a_positive():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    ls = torch.tensor(math.log(10.0))
    # Distinct keys are the one-hot loss.
    assert torch.allclose(clip_loss(img, txt, ls, torch.arange(5)), clip_loss(img, txt, ls))
    # Rows 1 and 3 share a caption: each of their images has two right texts, each text two
    # right images, with half the target on each (hand-written soft cross-entropy).
    keys = torch.tensor([0, 1, 2, 1, 3])
    target = torch.eye(5)
    target[1, 3] = target[3, 1] = 1.0
    target = target / target.sum(1, keepdim=True)
    logits = 10.0 * img @ txt.T
    want = (
        -(target * torch.log_softmax(logits, 1)).sum(1).mean()
        - (target * torch.log_softmax(logits.T, 1)).sum(1).mean()
    ) / 2
    assert torch.allclose(clip_loss(img, txt, ls, keys), want, atol=1e-6)
    # Which of the two same-caption texts sits in which row no longer matters.
    swapped = txt[[0, 3, 2, 1, 4]]
    assert torch.allclose(clip_loss(img, swapped, ls, keys), clip_loss(img, txt, ls, keys))
    assert not torch.allclose(clip_loss(img, swapped, ls), clip_loss(img, txt, ls))


def test_phrase_patch_loss_positives_by_key_and_smooth_max():
    # Image 0 has the finding in exactly one of four patches; image 1 has it nowhere.
    d = 4
    finding = F.normalize(torch.tensor([1.0, 0, 0, 0]), dim=0)
    bg = F.normalize(torch.tensor([0, 1.0, 0, 0]), dim=0)
    patches = torch.stack([torch.stack([bg, bg, finding, bg]), torch.stack([bg] * 4)])
    phrase = finding.view(1, d)
    scores = pooled_patch_scores(patches, phrase, sharpness=50.0)
    assert scores[0, 0] > 0.9 and scores[0, 1] < 0.1  # one patch suffices; mean would be 0.25
    keys = torch.tensor([7])
    image_keys = torch.tensor([[7, -1], [3, -1]])
    good = phrase_patch_loss(
        patches, phrase, keys, image_keys, torch.tensor(math.log(20.0)), torch.tensor(-10.0), 50.0
    )
    swapped = phrase_patch_loss(
        patches,
        phrase,
        keys,
        image_keys.flip(0),
        torch.tensor(math.log(20.0)),
        torch.tensor(-10.0),
        50.0,
    )
    assert good < 0.01 < swapped


def test_a_phrase_gathered_from_two_processes_counts_once():
    # Each process drops its own repeated phrases; gathered, the same finding from two
    # processes arrives twice (one process's view of that is a repeated key here).
    torch.manual_seed(0)
    patches = F.normalize(torch.randn(3, 4, 8), dim=-1)
    phrases = F.normalize(torch.randn(2, 8), dim=-1)
    image_keys = torch.tensor([[5, -1], [9, 5], [-1, -1]])
    args = (image_keys, torch.tensor(math.log(10.0)), torch.tensor(-5.0), 10.0)
    once = phrase_patch_loss(patches, phrases, torch.tensor([5, 9]), *args)
    twice = phrase_patch_loss(
        patches, torch.cat([phrases, phrases[:1]]), torch.tensor([5, 9, 5]), *args
    )
    torch.testing.assert_close(twice, once)


def test_recall_at_k_is_not_fooled_by_ties_or_nan():
    from llavamed.train.vision_pretrain import recall_at_k

    eye = torch.eye(4)
    assert recall_at_k(eye, eye)["i2t_r@1"] == 1.0
    collapsed = torch.ones(4, 3)  # every image and caption embeds the same: chance, no better
    assert recall_at_k(collapsed, collapsed)["i2t_r@1"] == pytest.approx(0.25)
    assert recall_at_k(torch.full((4, 3), float("nan")), eye[:, :3])["t2i_r@5"] == 0.0


def test_caption_phrases_drop_negations_and_lead_in():
    cap = (
        "PA CXR demonstrating right upper lobe consolidation, a 12 mm nodule in the left lower lobe "
        "and a cardiac pacemaker (PPM); no pleural effusion."
    )
    ph = caption_phrases(cap)
    assert ph == [
        "right upper lobe consolidation",
        "a 12 mm nodule in the left lower lobe",
        "a cardiac pacemaker",
    ]
    assert phrase_key("A 21 mm nodule in the left lower lobe") == phrase_key(ph[1])
    assert phrase_key("a left CVC") != phrase_key("a right CVC")  # laterality is kept


def test_config_validation_and_overrides():
    from llavamed.train.vision_pretrain import make_config

    cfg = make_config(
        {"data": "x.jsonl", "epochs": 2},
        ["batch_size=8", "crop_scale=[0.5, 1.0]", "precision=fp32"],
    )
    assert cfg.batch_size == 8 and cfg.crop_scale == (0.5, 1.0) and cfg.epochs == 2.0
    with pytest.raises(ConfigError, match="unknown"):
        make_config({"data": "x", "nope": 1})
    with pytest.raises(ConfigError, match="precision"):
        make_config({"data": "x", "precision": "fp8"})
    with pytest.raises(ConfigError, match="crop_scale"):
        make_config({"data": "x"}, ["crop_scale=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="data"):
        make_config({})
    # Typed like the LLaVA stages: each was a traceback after the data had loaded, or nothing.
    for bad, needle in (
        ("epochs=abc", "epochs: expected a number"),
        ("batch_size=2.5", "batch_size: expected an integer"),
        ("crop_ratio=[1]", "crop_ratio"),
        ("save_every=0", "save_every"),
        ("warmup_frac=2", "warmup_frac"),
        ("local_sharpness=0", "local_sharpness"),
    ):
        with pytest.raises(ConfigError, match=needle):
            make_config({"data": "x"}, [bad])
    assert make_config({"data": "x"}, ["lr=1e-3"]).lr == 1e-3  # YAML alone reads a string


def test_augment_keeps_laterality():
    """No flips: a bright left half stays on the left after augmentation."""
    from llavamed.train.vision_pretrain import augment

    x = torch.zeros(16, 3, 32, 32)
    x[..., :16] = 1.0
    y = augment(x, torch.Generator().manual_seed(0), (0.7, 1.0), (0.85, 1.18), 0.1)
    assert (y[..., :8].mean(dim=(1, 2, 3)) > y[..., -8:].mean(dim=(1, 2, 3))).all()


def test_text_encoder_cache_roundtrip(tmp_path):
    from llavamed.train.text_encoder import TextEncoder, cached_embeddings

    enc = TextEncoder()
    texts = ["a left pleural effusion", "a right pleural effusion", "a left pleural effusion"]
    v = cached_embeddings(enc, texts, tmp_path / "c.pt", progress=False)
    assert v.shape == (3, 384) and torch.equal(v[0], v[2])
    # MiniLM is a real sentence encoder: paraphrases are closer than unrelated text.
    e = F.normalize(
        enc.encode(["an endotracheal tube", "an ETT tube in the trachea", "gland formation"]),
        dim=-1,
    )
    assert e[0] @ e[1] > e[0] @ e[2]
    calls = []
    orig = enc.encode
    enc.encode = lambda t, **k: calls.append(list(t)) or orig(t, **k)
    v2 = cached_embeddings(enc, texts + ["new text"], tmp_path / "c.pt", progress=False)
    assert calls == [["new text"]] and torch.allclose(v2[:3], v)


def test_end_to_end_tiny_resume_and_model_init(tmp_path, monkeypatch):
    from llavamed.model.compose import ModelSpec, build
    from llavamed.train.vision_pretrain import STATE_FILE, run_from_config

    data = write_pairs(tmp_path / "data")
    cfg = tiny_run(data, tmp_path / "run", max_steps=6, save_every=3, log_every=1)

    ref = run_from_config({**cfg, "output_dir": str(tmp_path / "ref")}, progress=False)
    # Interrupted at step 5 (a resume state was written at 3), then re-run with a setting a
    # resume may change: it continues from step 3 and ends where the uninterrupted run did,
    # augmentation included.
    killed_at_step(5, cfg, monkeypatch)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)
    assert state["step"] == 3
    res = run_from_config(cfg, ["time_budget_min=60"], progress=False)
    assert res.report["steps"] == 6
    from safetensors.torch import load_file

    want = load_file(ref.tower_dir / "model.safetensors")
    got = load_file(res.tower_dir / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    log = [
        json.loads(line)
        for line in (tmp_path / "run" / "stage0_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log][-3:] == [4, 5, 6]
    assert res.report["skipped"] == {"no caption": 1, "file not found": 1}
    r = res.report["retrieval"]
    assert 0 <= r["i2t_r@1"] <= r["i2t_r@5"] <= 1 and r["n"] >= 1
    # The saved image processor pads to square with the mean colour, as training did: a wide
    # red strip keeps its width and gets mean-colour rows (0 after normalising) above it. It
    # said resize + centre-crop, which would fill the square with red.
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(res.tower_dir)
    pix = proc(images=[Image.new("RGB", (64, 8), (255, 0, 0))], return_tensors="pt")
    pix = pix["pixel_values"][0]
    size = pix.shape[-1]
    assert pix.shape == (3, size, size)
    assert pix[:, 0].abs().max() < 0.05 and pix[0, size // 2].min() > 1.0
    assert (tmp_path / "run" / "stage0_config.yaml").exists()
    assert "Held-out retrieval" in (tmp_path / "run" / "stage0_report.md").read_text()
    # The tower loads into a LLaVA model with its trained weights.
    model, _ = build(ModelSpec(lm="tiny", vision=str(res.tower_dir)))
    from transformers import CLIPVisionModel

    saved = CLIPVisionModel.from_pretrained(res.tower_dir)
    a = model.model.vision_tower.state_dict()
    for k, v in saved.state_dict().items():
        assert torch.equal(a[k], v), k
    # A finished run is not redone.
    again = run_from_config(cfg, ["time_budget_min=60"], progress=False)
    assert again.wall_time_s < res.wall_time_s and again.report["steps"] == 6
    assert again.report["data"] == res.report["data"]


def test_load_pairs_conversation_json(tmp_path):
    from llavamed.train.vision_pretrain import load_pairs

    conv = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "A CT scan."},
            ],
        },
        {
            "id": "b",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nAgain."},
                {"from": "gpt", "value": "Dup."},
            ],
        },
        {
            "id": "c",
            "conversations": [
                {"from": "human", "value": "no image"},
                {"from": "gpt", "value": "Text only."},
            ],
        },
    ]
    p = tmp_path / "conv.json"
    p.write_text(json.dumps(conv))
    pairs, skipped = load_pairs(p, tmp_path / "imgs")
    assert [(x.id, x.caption, x.image) for x in pairs] == [
        ("a", "A CT scan.", tmp_path / "imgs" / "x.png")
    ]
    assert skipped == {"duplicate image": 1, "no image": 1}
    with pytest.raises(InputError, match="file not found"):
        load_pairs(tmp_path / "none.json")


def test_streaming_loader_skips_unreadable_images(tmp_path):
    """``preload: false`` decodes per step (DataLoader); an unreadable image is replaced, so the
    batch keeps its size."""
    from llavamed.train.vision_pretrain import run_from_config

    data = write_pairs(tmp_path / "data", n=12)
    (tmp_path / "data" / "images" / "3.png").write_bytes(b"not a png")
    cfg = streaming_cfg(data, tmp_path / "run", val_fraction=0.0, log_every=1)
    res = run_from_config(cfg, progress=False)
    assert res.report["steps"] == 2 and "retrieval" not in res.report
    assert (res.tower_dir / "config.json").exists()


def test_streaming_loader_still_scores_the_held_out_pairs(tmp_path):
    """``preload: false`` with held-out pairs: retrieval decodes them after training (it sliced
    None and crashed before the tower was saved, on every re-run)."""
    from llavamed.train.vision_pretrain import run_from_config

    data = write_pairs(tmp_path / "data", n=16)
    res = run_from_config(streaming_cfg(data, tmp_path / "run", val_fraction=0.3), progress=False)
    assert res.report["retrieval"]["chance_r@1"] > 0
    assert (res.tower_dir / "config.json").exists()


def test_a_converted_biomedclip_tower_trains_and_composes(tmp_path, biomedclip_state_dict):
    """Stage 0 from `convert biomedclip`'s ViT (the paper's encoder, as the GPU recipe uses it):
    its pooler weights made strict loading fail before the first step."""
    from llavamed.model.compose import ModelSpec, build
    from llavamed.model.convert.biomedclip import convert_biomedclip
    from llavamed.train.vision_pretrain import run_from_config

    torch.save(biomedclip_state_dict, tmp_path / "open_clip_pytorch_model.bin")
    vit = convert_biomedclip(tmp_path, tmp_path / "vit", num_heads=4)
    cfg = {
        "data": str(write_pairs(tmp_path / "data", n=16)),
        "output_dir": str(tmp_path / "run"),
        "vision": str(vit),
        "batch_size": 8,
        "max_steps": 1,
        "probe_images_per_domain": 0,
        "val_fraction": 0.0,
        "precision": "fp32",
    }
    res = run_from_config(cfg, progress=False)
    model, _ = build(ModelSpec(lm="tiny", vision=str(res.tower_dir), template="chatml"))
    assert model.model.vision_tower.config.model_type == "vit"
    with pytest.raises(ConfigError, match="image_size=64 but the tower was built for 32"):
        run_from_config({**cfg, "output_dir": str(tmp_path / "r2"), "image_size": 64})


def test_other_pairs_under_the_same_config_are_another_run(tmp_path, monkeypatch, capsys):
    """A finished run, and a resume state, were matched by config alone: after the figures
    file was completed in place (an ingest that had been interrupted), stage 0 returned the
    tower trained on the partial file, or resumed it with the full file's batch order."""
    from llavamed.train.vision_pretrain import run_from_config

    data = write_pairs(tmp_path / "data")
    full = data.read_text()
    cfg = tiny_run(data, tmp_path / "run", max_steps=4, save_every=2)
    data.write_text("".join(full.splitlines(keepends=True)[4:]))  # an ingest cut short
    first = run_from_config(cfg, progress=False)
    data.write_text(full)  # ... then completed in place
    second = run_from_config(cfg, progress=False)
    assert second.report["data"] != first.report["data"]
    assert second.report["pairs"] != first.report["pairs"]
    # Killed after its step-2 state; the file changes again; the state is not resumed.
    cut = {**cfg, "output_dir": str(tmp_path / "killed")}
    killed_at_step(3, cut, monkeypatch)
    data.write_text("".join(full.splitlines(keepends=True)[4:]))
    capsys.readouterr()
    run_from_config(cut, progress=False)
    assert "other settings (the figure-caption pairs)" in capsys.readouterr().err


def test_the_same_run_spelled_with_other_paths_or_moved_is_not_trained_again(
    tmp_path, monkeypatch, capsys
):
    """The quickstart runs stage 0 with absolute paths, configs/cpu/stage0_vision.yaml spells
    them relative: the finished run was matched by its config's strings, so the shipped config
    over the quickstart's folder trained stage 0 again from step 0 over the finished tower. So
    did a run folder moved elsewhere (finished, or killed and resumed), and `output_dir=~/x`
    wrote into a folder named '~'."""
    import shutil

    from llavamed.train.vision_pretrain import make_config, run_from_config

    monkeypatch.chdir(tmp_path)
    data = write_pairs(tmp_path / "data")
    kw = dict(max_steps=4, save_every=2)
    done = run_from_config(tiny_run(data, tmp_path / "run", **kw), progress=False)
    weights = done.tower_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    relative = run_from_config(tiny_run(Path("data/figures.jsonl"), Path("run"), **kw), False)
    assert relative.report == done.report and weights.stat().st_mtime_ns == stamp

    shutil.move(tmp_path / "run", tmp_path / "moved")
    moved = run_from_config(tiny_run(data, tmp_path / "moved", **kw), progress=False)
    assert moved.tower_dir == tmp_path / "moved" / "vision_tower"
    assert (moved.tower_dir / "model.safetensors").stat().st_mtime_ns == stamp

    # Killed after its step-2 state, moved, and resumed from that state.
    killed_at_step(3, tiny_run(data, tmp_path / "killed", **kw), monkeypatch)
    shutil.move(tmp_path / "killed", tmp_path / "killed_moved")
    capsys.readouterr()
    resumed = run_from_config(tiny_run(data, tmp_path / "killed_moved", **kw), progress=False)
    assert "other settings" not in capsys.readouterr().err
    assert resumed.report["steps"] == 4

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf = make_config(tiny_run(data, Path("x")), ["output_dir=~/runs/b"])
    assert conf.output_dir == str(tmp_path / "home" / "runs" / "b")
    assert conf.data == str(data) and conf.vision == "tiny" and conf.text_encoder == "minilm"


def test_held_out_pairs_are_whole_articles():
    """The split hashed each figure's id, so sibling figures of one paper (often with
    near-identical captions) fell on both sides and inflated held-out retrieval."""
    from llavamed.train.vision_pretrain import Pair, split_pairs

    pairs = [
        Pair(f"PMC{a}_F{f}", Path(f"{a}_{f}.jpg"), f"caption {a}.{f}", f"PMC{a}")
        for a in range(200)
        for f in range(4)
    ]
    train, val = split_pairs(pairs, 0.2, val_max=50)
    assert 0 < len(val) <= 50 and len(val) % 4 == 0  # whole articles only, capped
    assert {p.article for p in val}.isdisjoint({p.article for p in train})
    assert len(train) + len(val) == len(pairs)
    # without an article, each pair is its own unit, as before
    loose = [Pair(f"p{i}", Path(f"{i}.jpg"), "c") for i in range(100)]
    train, val = split_pairs(loose, 0.2, val_max=1000)
    assert 5 < len(val) < 40 and len(train) + len(val) == 100


def test_killed_between_the_rng_file_and_the_state_resumes_exactly(tmp_path, monkeypatch):
    """The per-process RNG file is written before the main state. It held only the newest step,
    so a run killed between the two writes resumed from the older main state with re-seeded
    crops, and ended on another tower than an uninterrupted run."""
    from llavamed.train.vision_pretrain import STATE_FILE, run_from_config

    data = write_pairs(tmp_path / "data")
    cfg = tiny_run(data, tmp_path / "run", max_steps=8, save_every=3)
    ref = run_from_config({**cfg, "output_dir": str(tmp_path / "ref")}, progress=False)
    real_save = torch.save

    def dies_on_the_step_6_state(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 6 and "module" in obj:
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dies_on_the_step_6_state)
    with pytest.raises(KeyboardInterrupt):
        run_from_config(cfg, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)["step"] == 3
    assert same_tower(run_from_config(cfg, progress=False), ref)


def test_a_trainable_text_tower_resumes_with_its_dropout_masks(tmp_path, monkeypatch):
    """The text tower's dropout draws from torch's global RNG, which a resume did not restore:
    the resumed steps drew other masks than the uninterrupted run."""
    from llavamed.train.vision_pretrain import run_from_config

    data = write_pairs(tmp_path / "data", n=16)
    cfg = tiny_run(
        data, tmp_path / "run", max_steps=4, save_every=2, text_trainable=True, text_max_length=16
    )
    ref = run_from_config({**cfg, "output_dir": str(tmp_path / "ref")}, progress=False)
    killed_at_step(4, cfg, monkeypatch)
    torch.manual_seed(12345)  # whatever the process did in between
    assert same_tower(run_from_config(cfg, progress=False), ref)
