"""The training loop: data and labels, batch schedule, loss invariance, overfitting, image
conditioning, LoRA export, idempotent re-runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from llavamed.config import load_config
from llavamed.errors import ConfigError
from llavamed.model.processing import IGNORE_INDEX
from llavamed.train.data import (
    Collator,
    TrainDataset,
    epoch_schedule,
    load_samples,
    padding_fraction,
    vqa_messages,
)
from train_helpers import QUESTION, make_bright_dark, run_cli, tiny_config

# Shared 2-core machine: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bright_dark(tmp_path_factory):
    return make_bright_dark(tmp_path_factory.mktemp("bd") / "data", 48)


def _processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


# --- data ------------------------------------------------------------------------------------


def test_labels_are_exactly_the_assistant_turns(tmp_path, tiny_llava_dir):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    recs = [
        {
            "id": "multi",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "What is it?\n<image>"},
                {"from": "gpt", "value": "A red square."},
                {"from": "human", "value": "Any finding?"},
                {"from": "gpt", "value": "No finding."},
            ],
        }
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    proc = _processor(tiny_llava_dir)
    cfg = load_config(
        {"model": {"from": str(tiny_llava_dir)}, "data": {"path": str(tmp_path / "d.json")}}
    )
    samples, report = load_samples(cfg.data, proc, "chatml")
    assert report.n_loaded == 1 and not report.skipped
    s = samples[0]
    spans, cur = [], []
    for tid, lab in zip(s.input_ids, s.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(lab)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    texts = [proc.tokenizer.decode(sp) for sp in spans]
    assert texts == ["A red square.<|im_end|>", "No finding.<|im_end|>"]
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert s.input_ids.count(image_id) == 16


def test_bad_samples_are_counted_not_dropped_silently(tmp_path, tiny_llava_dir, capsys):
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    good = {"from": "human", "value": "<image>\nQ?"}
    recs = [
        {"id": "ok", "image": "ok.png", "conversations": [good, {"from": "gpt", "value": "A"}]},
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [good, {"from": "gpt", "value": "A"}],
        },
        {"id": "malformed", "image": "ok.png", "conversations": [{"from": "human"}]},
        {
            "id": "count",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "corrupt",
            "image": "corrupt.png",
            "conversations": [good, {"from": "gpt", "value": "A"}],
        },
        "not a record",
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    proc = _processor(tiny_llava_dir)
    cfg = load_config(
        {"model": {"from": str(tiny_llava_dir)}, "data": {"path": str(tmp_path / "d.json")}}
    )
    samples, report = load_samples(cfg.data, proc, "chatml")
    assert report.n_records == 6 and report.n_loaded == 2
    assert dict(report.skipped) == {
        "missing image": 1,
        "malformed conversation": 1,
        "image token count mismatch": 1,
        "record is not an object": 1,
    }
    err = capsys.readouterr().err
    assert "id=missing: missing image" in err
    # the corrupt image is found when decoded (in a worker) and dropped from its batch, counted
    ds = TrainDataset(samples, proc.image_processor)
    items = [ds[i] for i in range(len(ds))]
    batch = Collator(proc.tokenizer.pad_token_id)(items)
    ((idx, reason, where),) = batch["bad"]
    assert batch["n"] == 1 and reason == "not an image" and "id=corrupt" in where
    assert "id=corrupt" in str(samples[idx].source)


def test_vqa_sample_prompt_matches_eval_runner(tiny_llava_dir):
    from llavamed.eval.vqa_runner import CLOSED_SUFFIX, VQAGenerator
    from llavamed.model.templates import get_template

    proc = _processor(tiny_llava_dir)
    msgs = vqa_messages("Is there a mass?", "yes", "closed", closed_suffix=True)
    rendered = (
        get_template("chatml").render(msgs[:1], eos="<|im_end|>", add_generation_prompt=True).text
    )
    gen = VQAGenerator.__new__(VQAGenerator)
    gen.processor = proc
    assert rendered == gen.prompt(f"Is there a mass? {CLOSED_SUFFIX}")


@pytest.mark.parametrize("source", ["from", "init"])
def test_a_template_override_is_what_the_checkpoint_prompts_with(tmp_path, tiny_llava_dir, source):
    """model.template changes what training renders; the saved processor must prompt the same
    way, or eval/serve/chat ask in chatml a model trained on vicuna."""
    from llavamed.model.checkpoint import checkpoint_template, load_llava
    from llavamed.model.processing import generation_prompt, question_messages
    from llavamed.model.templates import Message, get_template
    from llavamed.train.trainer import run_training

    data = make_bright_dark(tmp_path / "data", 4)
    cfg = tiny_config(data, tmp_path / "out", max_steps=1, global_batch_size=4)
    if source == "from":
        cfg["model"] = {"from": str(tiny_llava_dir), "template": "vicuna_v1"}  # a chatml model
    else:
        cfg["model"]["template"] = "vicuna_v1"  # over the init spec's chatml
    final = run_training(cfg, progress=False).final_checkpoint
    _, proc = load_llava(final)
    assert checkpoint_template(final) == "vicuna_v1"
    # the resolved config went in with the checkpoint (same atomic save)
    assert yaml.safe_load((final / "train_config.yaml").read_text())["model"]["template"] == (
        "vicuna_v1"
    )
    q = "Is the image bright?"
    trained = get_template("vicuna_v1").render(
        [Message("user", f"<image>\n{q}")], eos=proc.tokenizer.eos_token, add_generation_prompt=True
    )
    assert generation_prompt(proc, question_messages(q)) == trained.text


# --- schedule --------------------------------------------------------------------------------


def test_schedule_is_pure_complete_and_grouped():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(20, 400) for _ in range(203)]
    has_image = [i % 7 != 0 for i in range(203)]
    kw = dict(global_batch_size=16, micro_batch_size=4, seed=3, megabatch=8)
    a = epoch_schedule(lengths, has_image, epoch=0, grouped=True, **kw)
    assert a == epoch_schedule(lengths, has_image, epoch=0, grouped=True, **kw)
    assert a != epoch_schedule(lengths, has_image, epoch=1, grouped=True, **kw)
    assert all(len(step) == 4 and all(len(mb) == 4 for mb in step) for step in a)
    seen = [i for step in a for mb in step for i in mb]
    assert set(seen) == set(range(203)) and len(seen) == 13 * 16  # last batch filled, none dropped
    r = epoch_schedule(lengths, has_image, epoch=0, grouped=False, **kw)
    assert padding_fraction(a, lengths) < 0.25 * padding_fraction(r, lengths)
    # modality-aware: few micro-batches mix text-only and image samples
    mixed = sum(len({has_image[i] for i in mb}) > 1 for step in a for mb in step)
    assert mixed <= 4


# --- the loop --------------------------------------------------------------------------------


def test_loss_independent_of_micro_batching(tmp_path, bright_dark):
    from llavamed.train import run_training

    runs = {}
    for micro in (8, 2):
        cfg = tiny_config(bright_dark, tmp_path / f"m{micro}", micro_batch_size=micro, max_steps=3)
        runs[micro] = [m["loss"] for m in run_training(cfg, progress=False).metrics]
    assert len(runs[8]) == 3
    assert runs[8] == pytest.approx(runs[2], rel=1e-4, abs=1e-5)


def test_logged_lr_is_the_rate_each_step_used(tmp_path, bright_dark):
    from llavamed.train import run_training

    # 4 steps, 2 of warmup, then cosine: the rates used are 1/2, 1, 1 and 1/2 of the peak. The
    # log used to show the next step's rate (1, 1, 1/2, 0: a last step that seemingly did not
    # move the weights).
    cfg = tiny_config(
        bright_dark, tmp_path / "o", max_steps=4, lr=1e-2, lr_scheduler="cosine", warmup_ratio=0.5
    )
    lrs = [m["lr"] for m in run_training(cfg, progress=False).metrics]
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])


def test_overfits_a_handful_and_reruns_are_idempotent(tmp_path, bright_dark):
    from transformers import LlavaForConditionalGeneration

    from llavamed.train import run_training

    data = json.loads(bright_dark.read_text())[:4]
    small = bright_dark.parent / "four.json"
    small.write_text(json.dumps(data))
    cfg = tiny_config(
        small, tmp_path / "out", max_steps=40, global_batch_size=4, micro_batch_size=4, lr=1e-2
    )
    res = run_training(cfg, progress=False)
    losses = [m["loss"] for m in res.metrics]
    assert losses[0] > 5 and losses[-1] < 0.05, losses[::8]
    out = tmp_path / "out"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "data_report.json",
        "checkpoint-final/config.json",
    ):
        assert (out / f).is_file(), f
    assert {"step", "loss", "lr", "tokens_per_s"} <= res.metrics[0].keys()
    LlavaForConditionalGeneration.from_pretrained(out / "checkpoint-final")  # plain transformers
    again = run_training(cfg, progress=False)
    assert again.wall_time_s < 5 and len(again.metrics) == len(res.metrics)
    with pytest.raises(ConfigError, match="train.lr"):
        run_training(cfg | {"train": cfg["train"] | {"lr": 1e-3}}, progress=False)


def _closed_accuracy(model_dir: Path, data: Path, blank: bool) -> float:
    from PIL import Image

    from llavamed.eval.metrics import strict_closed_hit
    from llavamed.eval.vqa_runner import VQAGenerator, blank_image

    gen = VQAGenerator(model_dir, max_new_tokens=3)
    recs = json.loads(data.read_text())
    imgs = [Image.open(data.parent / r["image"]).convert("RGB") for r in recs]
    if blank:
        imgs = [blank_image(i) for i in imgs]
    preds = gen.generate(imgs, [QUESTION] * len(recs))
    return sum(strict_closed_hit(p, r["answer"]) for p, r in zip(preds, recs, strict=True)) / len(
        recs
    )


def test_image_conditioning_learned_and_blank_images_fall_to_chance(tmp_path, bright_dark):
    from llavamed.train import run_training

    test = make_bright_dark(tmp_path / "test", 32, seed=99, pad_words=0)
    cfg = tiny_config(
        bright_dark,
        tmp_path / "run",
        max_steps=50,
        lr=1e-2,
        global_batch_size=8,
        micro_batch_size=8,
    )
    from transformers import AutoProcessor

    from llavamed.data.vqa import VQASample
    from llavamed.eval.closed_logits import closed_accuracy, prepare_closed

    recs = json.loads(test.read_text())
    held_out = [
        VQASample(r["id"], str(test.parent / r["image"]), QUESTION, r["answer"], "closed")
        for r in recs
    ]
    curve = []

    def on_step(step, model, proc):  # the learning-curve hook, scored by next-token logits
        if step % 25:
            return None
        acc = closed_accuracy(model, proc, prepare_closed(held_out, proc))
        curve.append((step, acc, model.training))
        return {"held_out_acc": acc}

    res = run_training(cfg, progress=False, on_step=on_step)
    acc = _closed_accuracy(res.final_checkpoint, test, blank=False)
    acc_blank = _closed_accuracy(res.final_checkpoint, test, blank=True)
    print(f"bright/dark closed accuracy: image {acc:.2f}, blank {acc_blank:.2f} (chance 0.50)")
    assert acc >= 0.9
    assert acc_blank <= 0.6
    # The hook ran on the live model, left it training, and its numbers reached metrics.jsonl.
    assert [c[0] for c in curve] == [25, 50] and all(c[2] for c in curve)
    logged = {m["step"]: m.get("held_out_acc") for m in res.metrics}
    assert logged[25] == curve[0][1] and logged[50] == curve[1][1]
    # The logit metric agrees with generated answers on the final model (same prompt, image).
    assert abs(curve[1][1] - acc) <= 0.07
    proc = AutoProcessor.from_pretrained(res.final_checkpoint)
    from transformers import LlavaForConditionalGeneration

    final = LlavaForConditionalGeneration.from_pretrained(res.final_checkpoint)
    data = prepare_closed(held_out, proc)
    assert closed_accuracy(final, proc, data, batch_size=5) == closed_accuracy(final, proc, data)
    assert closed_accuracy(final, proc, data, blank=True) <= 0.6


def test_lora_exports_a_plain_merged_checkpoint(tmp_path, bright_dark):
    from transformers import LlavaForConditionalGeneration

    from llavamed.train import run_training

    cfg = tiny_config(
        bright_dark, tmp_path / "lora", max_steps=4, trainable=["projector", "lm"], lr=1e-2
    )
    cfg["train"]["lora"] = {
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    res = run_training(cfg, progress=False)
    from safetensors import safe_open

    with safe_open(str(res.final_checkpoint / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k for k in keys)
    LlavaForConditionalGeneration.from_pretrained(res.final_checkpoint)
    assert res.metrics[-1]["loss"] < res.metrics[0]["loss"]


def test_merge_lora_preserves_outputs(tiny_llava_dir):
    from llavamed.train.trainer import apply_lora, build_model, merge_lora

    cfg = load_config(
        {
            "model": {"from": str(tiny_llava_dir)},
            "data": {"path": "x.json"},
            "train": {"lora": {"r": 4, "dropout": 0.0}},
        }
    )
    model, *_ = build_model(cfg)
    model = apply_lora(model, cfg).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # non-zero adapters so merging matters
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = merge_lora(model)(input_ids=ids).logits
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-4)


def test_qlora_on_cpu_is_a_clear_error(tmp_path, bright_dark):
    from llavamed.train import run_training

    cfg = tiny_config(bright_dark, tmp_path / "q", trainable=["projector", "lm"])
    cfg["train"]["lora"] = {"r": 4, "quantize": "4bit"}
    with pytest.raises(ConfigError, match="QLoRA needs bitsandbytes and a CUDA GPU"):
        run_training(cfg, progress=False)


def test_cli_print_config_and_vision_dispatch(tmp_path, monkeypatch, capsys):
    r = run_cli(
        ["train", "configs/cpu/tiny_smoke.yaml", "train.lr=0.5", "--print-config"],
        cwd=Path(__file__).parent.parent,
    )
    assert r.returncode == 0, r.stderr
    assert "lr: 0.5" in r.stdout and "sources:" in r.stdout
    r = run_cli(
        ["train", "configs/cpu/tiny_smoke.yaml", "train.lrr=1"], cwd=Path(__file__).parent.parent
    )
    assert r.returncode == 1 and "train.lrr: unknown key" in r.stderr
    # stage: vision goes to stage-0 pretraining, whose own validation names its data key.
    # (This test used to hide the stage-0 module through sys.modules, which only worked when an
    # earlier test had imported it: alone, the import error escaped as a traceback.)
    from llavamed.cli import main

    (tmp_path / "v.yaml").write_text("stage: vision\n")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # restored after the test
    assert main(["train", str(tmp_path / "v.yaml")]) == 1
    assert "figures.jsonl" in capsys.readouterr().err
    assert "TQDM_DISABLE" not in os.environ
    # --no-progress also silences the libraries' own tqdm bars (transformers' weight loading).
    assert main(["train", "--no-progress", str(tmp_path / "v.yaml")]) == 1
    assert os.environ["TQDM_DISABLE"] == "1"


def test_param_groups_give_each_part_its_own_rate(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    from llavamed.config import TrainSection
    from llavamed.train.freeze import apply_trainable, parts
    from llavamed.train.trainer import param_groups

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    apply_trainable(model, ["projector", "lm", "vision"])
    # Parts by module attribute (freeze.parts), independent of the name matching under test.
    want = {k: {id(p) for p in ps if p.requires_grad} for k, ps in parts(model).items()}
    t = TrainSection(lr=1e-4, lr_projector=2e-3, lr_vision=5e-4)
    got = param_groups(model, t)
    assert [g["lr"] for g in got] == [1e-4, 2e-3, 5e-4]
    assert [{id(p) for p in g["params"]} for g in got] == [
        want["lm"],
        want["projector"],
        want["vision"],
    ]
    # Unset part rates fall back to lr; frozen parts get no group at all.
    apply_trainable(model, ["projector"])
    only = param_groups(model, TrainSection(lr=3e-4))
    assert len(only) == 1 and only[0]["lr"] == 3e-4
    assert {id(p) for p in only[0]["params"]} == want["projector"]


@pytest.mark.parametrize("tower", ["clip", "vit"])
def test_every_trainable_vision_parameter_gets_a_gradient(tmp_path, tower):
    """Parameters after the feature layer must be frozen: DDP stops on a trainable parameter
    with no gradient, and AdamW would keep state for it. ViT (what `convert biomedclip` writes)
    keeps its blocks and final norm in other places than CLIP."""
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    from llavamed.model.compose import ModelSpec, build
    from llavamed.train.freeze import apply_trainable

    vision = "tiny"
    if tower == "vit":
        vision = tmp_path / "vit"
        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
        )
        ViTModel(cfg, add_pooling_layer=True).save_pretrained(vision)
    model, proc = build(ModelSpec(lm="tiny", vision=str(vision), template="chatml"))
    apply_trainable(model, ["projector", "vision"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + "yes"
    enc = proc(text=text, images=[Image.new("RGB", (32, 32), (200, 10, 10))], return_tensors="pt")
    model(**enc, labels=enc["input_ids"]).loss.backward()
    vision_params = dict(model.model.vision_tower.named_parameters())
    trained = {n for n, p in vision_params.items() if p.requires_grad}
    assert trained and any(p.grad is not None for p in vision_params.values())
    assert [n for n in trained if vision_params[n].grad is None] == []


def test_frozen_lm_layers_stop_backward_at_the_first_trained_layer(tiny_llava_dir):
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed.errors import ConfigError
    from llavamed.train.freeze import apply_trainable

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    lm = model.model.language_model
    counts = apply_trainable(model, ["lm"], frozen_lm_layers=1)
    top = sum(p.numel() for p in (*lm.layers[1].parameters(), *lm.norm.parameters()))
    assert counts == {"vision": 0, "projector": 0, "lm": top}
    seen = []  # inputs of each decoder layer, to see where the graph starts
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw.get("hidden_states", a and a[0])), with_kwargs=True
        )
        for layer in lm.layers
    ]
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    # Nothing below layer 1 is recorded by autograd: backward stops where training starts.
    assert [h.requires_grad for h in seen] == [False, False]
    out.loss.backward()
    assert lm.layers[0].self_attn.q_proj.weight.grad is None
    assert lm.embed_tokens.weight.grad is None
    assert lm.layers[1].self_attn.q_proj.weight.grad is not None
    with pytest.raises(ConfigError, match="has only 2 layers"):
        apply_trainable(model, ["lm"], frozen_lm_layers=2)


def test_fused_adamw_only_where_its_kernel_applies():
    import torch

    from llavamed.train.trainer import _fused_adamw

    w = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    assert _fused_adamw("single", w) is True
    assert _fused_adamw("ddp", w) is True
    # FSDP2 shards (DTensors) and DeepSpeed's own optimizer wrapper keep torch's default.
    assert _fused_adamw("fsdp", w) is None
    assert _fused_adamw("deepspeed", w) is None
    assert _fused_adamw("single", w + [torch.zeros(2, dtype=torch.int64)]) is None


@pytest.mark.parametrize("key", ["lr_projector", "lr_vision"])
def test_part_rates_must_be_positive(tmp_path, bright_dark, key):
    cfg = tiny_config(bright_dark, tmp_path / "run", max_steps=1)
    cfg["train"][key] = 0.0
    with pytest.raises(ConfigError, match=key):
        load_config(cfg)
