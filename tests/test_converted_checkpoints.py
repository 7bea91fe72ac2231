"""Audit regressions for converted checkpoints after conversion: what training, resaving and
the next stage read back from them."""

from __future__ import annotations

import json

import yaml

from llavamed.model.checkpoint import checkpoint_template
from train_helpers import make_bright_dark, run_cli, tiny_config


def test_a_checkpoint_trained_from_a_converted_one_keeps_its_template(
    original_llava_med,
    tmp_path,
):
    """A converted checkpoint has no spec; the trainer saved its result with the template
    recorded as null, so the next stage trained from it stopped with "unknown conversation
    template (not a llavamed checkpoint; ...)"."""
    from llavamed.cli import main

    conv = tmp_path / "conv"
    assert main(["convert", "llava-med", str(original_llava_med[0]), str(conv)]) == 0
    data = make_bright_dark(tmp_path / "data", 4, size=28)
    cfg = tiny_config(
        data, tmp_path / "stage1", max_steps=1, global_batch_size=4, trainable=["projector"]
    )
    cfg["model"] = {"from": str(conv)}
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(["train", str(tmp_path / "stage1.yaml")])
    assert r.returncode == 0, r.stderr[-600:]
    start = tmp_path / "stage1" / "checkpoint-final"
    meta = json.loads((start / "llavamed.json").read_text())
    assert meta["template"] == "mistral_instruct"
    assert checkpoint_template(start) == "mistral_instruct"  # what the next stage reads
    # One saved before the fix (template null) is read by its saved chat template.
    meta["template"] = None
    (start / "llavamed.json").write_text(json.dumps(meta))
    assert checkpoint_template(start) == "mistral_instruct"


def test_biomedclip_from_a_distributed_open_clip_training_checkpoint(
    biomedclip_state_dict, tmp_path
):
    """open_clip's trainer saves ``{"epoch", "name", "state_dict", "optimizer"}`` with the DDP
    wrapper's ``module.`` before every key when the run was distributed (its loader strips it);
    converting such an ``epoch_N.pt`` said "not an open_clip timm-trunk checkpoint"."""
    import torch
    from safetensors.torch import load_file

    from llavamed.model.convert.biomedclip import convert_biomedclip

    plain = tmp_path / "plain.pt"
    torch.save(biomedclip_state_dict, plain)
    trained = tmp_path / "epoch_3.pt"
    torch.save(
        {
            "epoch": 3,
            "name": "biomedclip-ft",
            "state_dict": {"module." + k: v for k, v in biomedclip_state_dict.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
        },
        trained,
    )
    want = load_file(convert_biomedclip(plain, tmp_path / "a") / "model.safetensors")
    got = load_file(convert_biomedclip(trained, tmp_path / "b") / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_converting_llava_med_does_not_warn_that_its_model_type_is_unsupported(
    original_llava_med,
    tmp_path,
):
    """Reading the tokenizer, transformers loaded config.json (model_type llava_mistral) and
    printed "You are using a model of type `llava_mistral` to instantiate a model of type ``
    ... not supported and can yield errors" on every conversion, which was fine."""
    r = run_cli(["convert", "llava-med", str(original_llava_med[0]), str(tmp_path / "n")])
    assert r.returncode == 0, r.stderr[-600:]
    assert "llava_mistral" not in r.stderr and "not supported" not in r.stderr


def test_a_native_llava_checkpoint_is_named_as_already_converted(
    original_llava_med,
    tiny_llava_dir,
    tmp_path,
):
    """Converting an already converted (or composed) checkpoint said "model_type='llava' is a
    Llama/Vicuna LLaVA; this converter writes LLaVA-Med v1.5 only", of a Mistral LLaVA-Med."""
    import pytest

    from llavamed.errors import InputError
    from llavamed.model.convert.llava_med import convert_llava_med

    done = convert_llava_med(original_llava_med[0], tmp_path / "native")
    for src in (done, tiny_llava_dir):
        with pytest.raises(InputError, match="already a native llava checkpoint") as info:
            convert_llava_med(src, tmp_path / "again")
        assert "Llama/Vicuna" not in str(info.value)
    assert not (tmp_path / "again").exists()


def test_model_init_on_an_unconverted_biomedclip_says_to_convert_it(
    biomedclip_state_dict, tmp_path, capsys
):
    """BiomedCLIP as downloaded (open_clip_config.json + open_clip_pytorch_model.bin) given to
    --vision was "not a vision preset or a folder with config.json (presets: ...)"."""
    import json

    import torch

    from llavamed.cli import main

    src = tmp_path / "BiomedCLIP"
    src.mkdir()
    torch.save(biomedclip_state_dict, src / "open_clip_pytorch_model.bin")
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    for given in (src, src / "open_clip_pytorch_model.bin"):
        capsys.readouterr()
        assert main(["model", "init", "--out", str(tmp_path / "o"), "--vision", str(given)]) == 1
        err = capsys.readouterr().err
        assert "an open_clip model" in err and "llavamed convert biomedclip" in err
    # Its conversion is what --vision reads.
    tower = tmp_path / "tower"
    assert main(["convert", "biomedclip", str(src), str(tower)]) == 0
    out = tmp_path / "o"
    assert main(["model", "init", "--out", str(out), "--lm", "tiny", "--vision", str(tower)]) == 0


def test_biomedclip_fine_tuned_with_the_siglip_loss_converts(biomedclip_state_dict, tmp_path):
    """open_clip's --siglip fine-tuning adds a ``logit_bias`` beside ``logit_scale``; neither is
    part of the vision tower, but the bias was refused as an unmapped source key."""
    import pytest
    import torch

    from llavamed.errors import InputError
    from llavamed.model.convert.biomedclip import convert_biomedclip

    sd = dict(biomedclip_state_dict, logit_bias=torch.tensor(-10.0))
    torch.save(sd, tmp_path / "siglip.pt")
    assert (convert_biomedclip(tmp_path / "siglip.pt", tmp_path / "t") / "config.json").is_file()
    # Still strict about what is neither the tower nor CLIP's own.
    torch.save(dict(sd, **{"visual.trunk.fc_norm.weight": torch.ones(32)}), tmp_path / "x.pt")
    with pytest.raises(
        InputError, match=r"unmapped source keys \(visual\.trunk\.fc_norm\.weight\)"
    ):
        convert_biomedclip(tmp_path / "x.pt", tmp_path / "u")


def test_a_checkpoint_naming_an_unknown_template_is_refused_naming_its_metadata(
    tiny_llava_dir, tmp_path
):
    """llavamed.json with "template": "mistral" (a hand edit, a typo): training from it skipped
    every sample as "--template: unknown template 'mistral'" and stopped with "no training
    samples left", blaming the data and a flag nobody gave."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    meta = json.loads((ckpt / "llavamed.json").read_text())
    (ckpt / "llavamed.json").write_text(json.dumps(meta | {"template": "mistral"}))
    data = make_bright_dark(tmp_path / "data", 4)
    cfg = tiny_config(data, tmp_path / "run", max_steps=1, global_batch_size=4)
    cfg["model"] = {"from": str(ckpt)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(["train", str(tmp_path / "run.yaml")])
    assert r.returncode != 0
    assert f"{ckpt / 'llavamed.json'}: unknown conversation template" in r.stderr
    assert "skipping" not in r.stderr and "--template" not in r.stderr


def test_a_template_of_the_wrong_type_in_llavamed_json_is_one_line(tiny_llava_dir, tmp_path):
    import shutil

    import pytest

    from llavamed.errors import InputError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    meta = json.loads((ckpt / "llavamed.json").read_text())
    (ckpt / "llavamed.json").write_text(json.dumps(meta | {"template": ["chatml"]}))
    with pytest.raises(InputError, match=r"llavamed.json: unknown conversation template"):
        checkpoint_template(ckpt)  # was a TypeError: unhashable type: 'list'
