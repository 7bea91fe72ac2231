"""train.frozen_lm_layers + train.cache_frozen_layers: a sample seen before starts at the first
trained LM layer, from its kept hidden state, and trains exactly as the full forward does."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from llavamed.config import DataConfig, DataSource
from llavamed.errors import ConfigError
from llavamed.train.data import Collator, TrainDataset, load_samples
from train_helpers import make_bright_dark, run_interrupted, tiny_config


def _packed_and_plain_batches(tmp_path, proc):
    """Two collated micro-batches from a MedSynth world: packed (shared image prefix, padded)
    and plain single-turn samples."""
    from llavamed.data.synth import generate_world

    world = tmp_path / "w"
    generate_world(world, articles=1, seed=3, image_size=64, progress=False, vqa_images=22)
    collate = Collator(proc.tokenizer.pad_token_id)
    out = []
    for grouped in (True, False):
        src = DataSource(
            format="vqa", dataset="slake", path=str(world / "slake"), group_by_image=grouped
        )
        samples, _ = load_samples(DataConfig(sources=[src]), proc, "chatml", quiet=True)
        ds = TrainDataset(samples[:5], proc.image_processor)
        out.append(collate([ds[i] for i in range(len(ds))]))
    assert "segment_ids" in out[0] and "segment_ids" not in out[1]
    assert len(set(out[0]["attention_mask"].sum(1).tolist())) > 1  # padding is exercised
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_start_gives_the_full_forwards_loss_and_skips_the_bottom(
    tmp_path, wide_llava_dir, attn
):
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed.train.frozen_layers import LayerInputCache
    from llavamed.train.trainer import _loss_module_cls

    proc = AutoProcessor.from_pretrained(wide_llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(wide_llava_dir)
    model.set_attn_implementation(attn)
    plain = _loss_module_cls()(model)
    cached = _loss_module_cls()(model)

    def loss(fn, batch, **change):
        kw = {k: v for k, v in batch.items() if torch.is_tensor(v) or k == "idx"} | change
        with torch.no_grad():
            return float(fn(**kw))

    for batch in _packed_and_plain_batches(tmp_path, proc):
        cached.layer_cache = LayerInputCache(model, 1)  # indices restart with each batch's set
        want = loss(plain, batch)
        first = loss(cached, batch)  # the full forward, keeping layer 1's input
        assert cached.layer_cache.has_all(batch["idx"])
        again = loss(cached, batch)  # from the kept states
        assert first == pytest.approx(want, rel=1e-5)
        assert again == pytest.approx(want, rel=1e-5)
        # The kept states stand in for the image and the bottom layer: another image changes the
        # full forward's loss but not the cached one's.
        other = torch.rand_like(batch["pixel_values"])
        assert loss(plain, batch, pixel_values=other) != pytest.approx(want, rel=1e-4)
        assert loss(cached, batch, pixel_values=other) == pytest.approx(want, rel=1e-5)


def test_cached_run_trains_like_the_uncached_one(tmp_path, capsys):
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 24)
    runs = {}
    for cache in (False, True):
        cfg = tiny_config(
            data,
            tmp_path / f"c{cache}",
            trainable=["lm"],
            frozen_lm_layers=1,
            cache_frozen_layers=cache,
            max_steps=None,
            epochs=3,
        )
        runs[cache] = [m["loss"] for m in run_training(cfg, progress=False).metrics]
    assert len(runs[True]) == 9  # 24 samples / 8 per step x 3 epochs
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-6)
    assert runs[True][-1] < runs[True][0]
    assert "kept the layer-1 inputs of 24 samples" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"cache_frozen_layers": True}, "needs train.frozen_lm_layers > 0"),
        (
            {"cache_frozen_layers": True, "frozen_lm_layers": 1, "trainable": ["projector", "lm"]},
            "train.trainable has projector",
        ),
    ],
)
def test_cache_needs_nothing_below_the_lm_training(tmp_path, overrides, needle):
    from llavamed.config import load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(tiny_config(tmp_path / "d.json", tmp_path / "o", **overrides))


def test_freeze_from_epoch_trains_everything_first_then_only_the_top(tmp_path, capsys):
    """Epoch 0 trains projector + LM; from epoch 1 the projector and layer 0 stay as epoch 0 left
    them, the top keeps training, and the kept inputs give the uncached run's losses."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 24)

    def run(name, **kw):
        cfg = tiny_config(
            data,
            tmp_path / name,
            trainable=["projector", "lm"],
            max_steps=None,
            **kw,
        )
        res = run_training(cfg, progress=False)
        model = LlavaForConditionalGeneration.from_pretrained(res.final_checkpoint)
        return [m["loss"] for m in res.metrics], model.state_dict()

    _, one_epoch = run("full1", epochs=1)
    freeze = {"epochs": 3, "frozen_lm_layers": 1, "freeze_from_epoch": 1}
    losses, sd = run("cached", cache_frozen_layers=True, **freeze)
    err = capsys.readouterr().err
    assert "from epoch 2 on, only LM layers >= 1 train" in err
    assert "kept the layer-1 inputs of 24 samples" in err
    plain_losses, _ = run("plain", **freeze)
    assert len(losses) == 9
    assert losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)

    below = [k for k in sd if "multi_modal_projector" in k or "layers.0." in k or "embed" in k]
    top = [k for k in sd if "language_model.layers.1." in k]
    assert below and top
    for k in below:  # trained in epoch 0 only: exactly where the 1-epoch run ended
        torch.testing.assert_close(sd[k], one_epoch[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(sd[k], one_epoch[k]) for k in top)


def test_freeze_from_epoch_needs_frozen_layers_and_a_later_epoch(tmp_path):
    from llavamed.config import load_config

    for kw, needle in (
        ({"freeze_from_epoch": 1, "epochs": 2}, "needs train.frozen_lm_layers > 0"),
        ({"freeze_from_epoch": 2, "frozen_lm_layers": 1, "epochs": 2}, "nothing would ever"),
        ({"freeze_from_epoch": -1}, "must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_config(tiny_config(tmp_path / "d.json", tmp_path / "o", max_steps=None, **kw))
    cfg = load_config(
        tiny_config(
            tmp_path / "d.json",
            tmp_path / "o",
            trainable=["projector", "lm"],
            frozen_lm_layers=1,
            cache_frozen_layers=True,
            freeze_from_epoch=1,
            max_steps=None,
            epochs=2,
        )
    )
    assert cfg.train.freeze_from_epoch == 1


def test_a_run_resumed_after_the_freeze_trains_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """Interrupted in epoch 1 (after the freeze) and resumed from step 4: the resumed run freezes
    again before its first step and refills the kept states, so its losses match."""
    from llavamed.train import run_training

    data = make_bright_dark(tmp_path / "data", 24)
    cfg = tiny_config(
        data,
        tmp_path / "a",
        trainable=["projector", "lm"],
        max_steps=None,
        epochs=3,
        frozen_lm_layers=1,
        cache_frozen_layers=True,
        freeze_from_epoch=1,
    )
    ref = run_training(cfg | {"output": {"dir": str(tmp_path / "ref"), "save_every": 0}})
    cfg["output"]["save_every"] = 4
    run_interrupted(cfg, monkeypatch, at_step=6)
    res = run_training(cfg, progress=False)
    assert [m["step"] for m in res.metrics] == list(range(1, 10))
    assert [m["loss"] for m in res.metrics] == pytest.approx(
        [m["loss"] for m in ref.metrics], rel=1e-4, abs=1e-6
    )
