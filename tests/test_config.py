"""Training config: YAML + overrides, strict keys, validation, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llavamed.config import (
    TrainConfig,
    apply_overrides,
    describe,
    dump_yaml,
    field_docs,
    load_config,
    to_dict,
)
from llavamed.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "stage": "instruct",
    "model": {"init": {"lm": "tiny", "vision": "tiny"}},
    "data": {"format": "llava_json", "path": "d/train.json"},
}


def test_single_source_shorthand_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        BASE, ["train.lr=1e-4", "train.trainable=[projector]", "data.max_length=99", "output.dir=o"]
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.trainable_parts() == ["projector"]
    assert cfg.data.max_length == 99
    assert len(cfg.data.sources) == 1
    assert cfg.data.sources[0].path == str(tmp_path / "d/train.json")  # cwd-relative, absolute
    assert cfg.output.dir == str(tmp_path / "o")
    # the resolved (sources-form) config round-trips and still takes `data.path=`
    again = load_config(yaml.safe_load(dump_yaml(cfg)), ["data.path=/x.json"])
    assert again.data.sources[0].path == "/x.json"
    assert to_dict(load_config(yaml.safe_load(dump_yaml(cfg)))) == to_dict(cfg)


def test_stage_default_trainable():
    assert load_config(BASE | {"stage": "align"}).trainable_parts() == ["projector"]
    assert load_config(BASE).trainable_parts() == ["projector", "lm"]
    assert load_config(BASE | {"stage": "finetune"}).trainable_parts() == ["projector", "lm"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("bogus=1", "bogus: unknown key"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer"),
        ("train.trainable=[projector,brain]", "unknown part 'brain'"),
        ("train.global_batch_size=10", "not a multiple"),
        ("stage=pretrain", "stage='pretrain'"),
        ("data.batching=packed2", "data.batching"),
        ("model.init.lmm=tiny", "model.init.lmm: unknown key"),
        # The config sets model.init: the error says how to replace it from the command line.
        (
            "model.from=/x",
            "both set; use one. An override replaces the config file's choice "
            "only with the other set to null: `model.from=DIR model.init=null`",
        ),
        ("model.init=null", "model: set model.init"),
        ("train.lora.r=0", "train.lora.r"),
        ("distributed.engine=horovod", "distributed.engine"),
        ("data.sources.0.path=x", "data.sources: expected a list"),
        # Out of range: each used to fail after the model loaded, or not at all.
        ("train.max_steps=-1", "train.max_steps must be >= 1"),  # exited 0, untrained
        ("output.log_every=0", "output.log_every >= 1"),
        ("output.save_every_minutes=-5", "save_every_minutes must be >= 0"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.betas=[0.9]", "train.betas"),
        ("data.max_samples=-3", "max_samples must be >= 1"),
        ("data.max_samples=0", "max_samples must be >= 1"),
        ("data.num_workers=-1", "data.num_workers"),
        ("train.lora={r: 4, dropout: 1.5}", "train.lora.dropout"),
        ("model.template=foo", "model.template='foo'"),
        # Non-finite numbers passed every range check and crashed after the model had loaded.
        ("train.epochs=.nan", "train.epochs: expected a finite number"),
        ("train.epochs=.inf", "train.epochs: expected a finite number"),
        ("output.save_every_minutes=.nan", "output.save_every_minutes: expected a finite"),
        ("distributed.timeout_minutes=-5", "distributed.timeout_minutes must be > 0"),
        ("train.lora={r: 4, alpha: -3}", "train.lora.alpha must be > 0"),
        # An empty list silently trained the stage's default parts.
        ("train.trainable=[]", "train.trainable: empty"),
        # A seed past ~1.8e13 overflowed the data loader's seed after the model had loaded.
        ("train.seed=100000000000000", "train.seed=100000000000000: must be in 0"),
        ("train.seed=-1", "train.seed=-1: must be in"),
        # model.init is typed as ModelSpec: a bare TypeError, or accepted until the tower was built.
        ("model.init.lm_layers=x", "model.init.lm_layers: expected an integer"),
        ("model.init.vision_feature_layer=abc", "model.init.vision_feature_layer: expected an"),
        ("model.init.lm_layers=0", "model.init: lm_layers must be >= 1"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        load_config(BASE, [override])


def test_a_checkpoint_replaces_the_configs_init_from_the_command_line():
    """The manual pipeline's stage 1 on `model init`'s folder: configs/cpu/stage1_alignment.yaml
    composes with model.init; `model.from=DIR model.init=null` starts from DIR instead."""
    cfg = load_config(
        ROOT / "configs/cpu/stage1_alignment.yaml", ["model.from=/x/init", "model.init=null"]
    )
    assert cfg.model.from_ == "/x/init" and cfg.model.init is None


def test_a_mistyped_config_path_names_the_config_it_is_close_to(tmp_path):
    """`llavamed train configs/cpu/stage2_instruct.yml` said only "file not found"."""
    (tmp_path / "stage2_instruct.yaml").write_text("stage: instruct\n")
    (tmp_path / "stage1_alignment.yaml").write_text("stage: align\n")
    for typo in ("stage2_instruct.yml", "stage2_instuct.yaml"):
        with pytest.raises(
            InputError, match=r"file not found \(did you mean .*/stage2_instruct\.yaml\?\)$"
        ):
            load_config(tmp_path / typo)
    with pytest.raises(InputError, match=r"nothing_like_it\.yaml: file not found$"):
        load_config(tmp_path / "nothing_like_it.yaml")
    with pytest.raises(InputError, match=r"file not found$"):  # no folder to look in
        load_config(tmp_path / "nowhere" / "stage2_instruct.yaml")


def test_lora_needs_lm():
    with pytest.raises(ConfigError, match="train.lora needs 'lm'"):
        load_config(BASE, ["train.lora={r: 4}", "train.trainable=[projector]"])
    cfg = load_config(BASE, ["train.lora={r: 4, alpha: 8}"])
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 8


def test_frozen_lm_layers_needs_a_trainable_lm():
    assert load_config(BASE, ["train.frozen_lm_layers=1"]).train.frozen_lm_layers == 1
    with pytest.raises(ConfigError, match="frozen_lm_layers: the LM is not in train.trainable"):
        load_config(BASE, ["train.frozen_lm_layers=1", "train.trainable=[projector]"])
    with pytest.raises(ConfigError, match="frozen_lm_layers must be >= 0"):
        load_config(BASE, ["train.frozen_lm_layers=-1"])
    with pytest.raises(ConfigError, match="choose one"):
        load_config(BASE, ["train.frozen_lm_layers=1", "train.lora={r: 4}"])


def test_override_syntax():
    raw = apply_overrides({"a": {"b": [1, 2]}}, ["a.b.1=5", "a.c.d=[x, y]", "e=null"])
    assert raw == {"a": {"b": [1, 5], "c": {"d": ["x", "y"]}}, "e": None}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["noequals"])


def test_overrides_typed_as_numbers_keep_their_spelling_for_string_settings(tmp_path, monkeypatch):
    # YAML reads 1.10 as 1.1 and 007 as 7; a folder named by them must not change name, while
    # number settings still read the number, and a free-form mapping still dumps as YAML.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        BASE,
        [
            "output.dir=1.10",
            "data.image_folder=007",
            "train.lr=2.50e-4",
            "train.epochs=1.50",
            "train.micro_batch_size=004",
            "model.init.lm_layers=02",
        ],
    )
    assert Path(cfg.output.dir).name == "1.10"
    assert Path(cfg.data.sources[0].image_folder).name == "007"
    assert cfg.train.lr == 2.5e-4 and type(cfg.train.lr) is float
    assert cfg.train.epochs == 1.5
    assert cfg.train.micro_batch_size == 4 and type(cfg.train.micro_batch_size) is int
    assert cfg.model.init["lm_layers"] == 2 and type(cfg.model.init["lm_layers"]) is int
    assert "lm_layers: 2" in dump_yaml(cfg)
    # the raw values compare as the numbers YAML reads
    assert apply_overrides({}, ["a=1.10", "b=007"]) == {"a": 1.1, "b": 7}


def test_every_field_documented():
    rows = describe()
    assert len(rows) > 40
    missing = [k for k, _, doc in rows if not doc]
    assert not missing, missing
    # The keys inside the list of sources and the optional LoRA section are listed too.
    keys = {k for k, _, _ in rows}
    assert {"data.sources.N.group_by_image", "data.sources.N.path", "train.lora.r"} <= keys
    assert "projector" in field_docs(TrainConfig.__mro__[0])["stage"] or True


def test_vision_stage_rejected_by_our_config():
    with pytest.raises(ConfigError, match="stage-0"):
        load_config(BASE | {"stage": "vision"})


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_shipped_configs(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "first line must be a comment with the command"
    if path.parent.name == "accelerate":
        assert "accelerate launch" in first and "llavamed train" in first
        return
    assert "llavamed train" in first and str(path.relative_to(ROOT)) in first
    raw = yaml.safe_load(path.read_text())
    if raw.get("stage") in ("vision", "vision_vqa"):
        # Stages 0 and 0b have their own flat configs; their loaders refuse unknown keys.
        from llavamed.train import vision_pretrain, vision_vqa

        mod = vision_pretrain if raw["stage"] == "vision" else vision_vqa
        mod.make_config(raw)
        return
    cfg = load_config(path)
    cfg.validate()
    if path.parent.name == "llava_med":
        # DESIGN.md §4: paper hyperparameters
        t = cfg.train
        assert t.precision == "bf16" and t.lr_scheduler == "cosine" and t.warmup_ratio == 0.03
        assert t.weight_decay == 0.0
        for world in (1, 8, 16):  # one node of 8 GPUs, the two-node accelerate config
            assert (t.global_batch_size // t.micro_batch_size) % world == 0, world
        if cfg.stage == "align":
            assert t.lr == 2e-3 and t.epochs == 1 and t.global_batch_size == 128
            assert cfg.trainable_parts() == ["projector"] and cfg.data.max_length == 2048
        elif cfg.train.lora is None:
            assert t.lr == 2e-5 and t.epochs == 3 and "vision" not in cfg.trainable_parts()
    else:
        assert cfg.train.precision == "auto" or "tiny" in path.name
        assert cfg.data.num_workers <= 1 and cfg.data.batching == "length_grouped"


def test_a_mistyped_path_fails_before_loading_and_does_not_lock_the_output(tmp_path):
    """A typo in data.path used to surface after the model loaded, and the corrected command was
    then refused: the output folder held the mistyped run's config.yaml."""
    from llavamed.train import run_training

    (tmp_path / "train.json").write_text("[]")
    cfg = BASE | {"output": {"dir": str(tmp_path / "out")}}
    bad = cfg | {"data": {"format": "llava_json", "path": str(tmp_path / "trian.json")}}
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path: .*trian.json: file not found"):
        run_training(bad, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="model.from: .*nowhere: file not found"):
        run_training(cfg | {"model": {"from": str(tmp_path / "nowhere")}}, progress=False)
    # A run that stopped before its first step leaves nothing to protect.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("stage: align\n")
    good = cfg | {"data": {"format": "llava_json", "path": str(tmp_path / "train.json")}}
    with pytest.raises(InputError, match="no training samples"):  # the next thing it finds
        run_training(good, progress=False)


def test_model_from_a_previous_stage_that_is_not_a_model_is_named_before_anything_is_written(
    tmp_path,
):
    """Chaining stages by hand, model.from named stage 1's run folder before it had finished, or
    one of its resume checkpoints: both said "not a checkpoint folder (no config.json (and no
    checkpoint-final/ inside))", after the output folder and its config.yaml had been written."""
    from llavamed.train import run_training

    (tmp_path / "train.json").write_text("[]")
    stage1 = tmp_path / "stage1"  # as a run that stopped after its step-1 checkpoint leaves it
    step = stage1 / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    for name in ("state.json", "trainable.pt", "optimizer.pt"):
        (step / name).write_text("{}")
    (stage1 / "config.yaml").write_text("stage: align\n")
    (stage1 / "metrics.jsonl").write_text("")
    (tmp_path / "corpus").mkdir()
    early = tmp_path / "early"  # stopped before its first step (while tokenizing, say)
    early.mkdir()
    (early / "config.yaml").write_text("stage: align\n")
    (early / "data_report.json").write_text("{}")
    cfg = BASE | {
        "data": {"format": "llava_json", "path": str(tmp_path / "train.json")},
        "output": {"dir": str(tmp_path / "out")},
    }
    cases = [
        (stage1, "a training run that has not finished .no .*stage1/checkpoint-final yet; re-run"),
        (early, "a training run that has not finished"),
        (step, "the resume state of a training run that has not finished"),
        (stage1 / "checkpoints", "the resume state of a training run that has not finished"),
        (tmp_path / "corpus", "model.from: .*corpus: not a checkpoint folder"),
    ]
    for path, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            run_training(cfg | {"model": {"from": str(path)}}, progress=False)
        assert not (tmp_path / "out").exists()
    # Finished: its resume state is not a model either, and the error names the one it has.
    (stage1 / "checkpoint-final").mkdir()
    (stage1 / "checkpoint-final" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a model .its model is .*stage1/checkpoint-final"):
        run_training(cfg | {"model": {"from": str(step)}}, progress=False)


def test_cpu_configs_are_the_quickstarts_small_recipe():
    """configs/cpu/* reproduce the measured quickstart stage by stage (its folder layout under
    runs/cpu); they had drifted to an older, unmeasured recipe (vision trained, one dataset, stage
    1 reading the stage-0 tower rather than stage 0b's)."""
    import dataclasses

    from llavamed.config import to_dict
    from llavamed.quickstart import SIZES, training_configs
    from llavamed.train import vision_pretrain, vision_vqa

    def resolved(cfg: dict) -> dict:
        if cfg.get("stage") == "vision":
            return dataclasses.asdict(vision_pretrain.make_config(cfg))
        if cfg.get("stage") == "vision_vqa":
            return dataclasses.asdict(vision_vqa.make_config(cfg))
        return to_dict(load_config(cfg))

    ours = training_configs(SIZES["small"], Path("runs/cpu"), seed=0)
    files = {
        "stage0": "stage0_vision",
        "stage0b": "stage0b_vision_vqa",
        "stage1": "stage1_alignment",
        "stage2": "stage2_instruct",
        "finetune": "finetune_vqa",
    }
    assert set(files) == set(ours)
    for stage, name in files.items():
        shipped = yaml.safe_load((ROOT / "configs" / "cpu" / f"{name}.yaml").read_text())
        assert resolved(shipped) == resolved(ours[stage]), name


def test_4d_mask_options_and_grouping_are_checked_before_anything_loads():
    vqa = BASE | {
        "data": {"format": "vqa", "dataset": "slake", "path": "s", "group_by_image": True}
    }
    with pytest.raises(ConfigError, match="group_by_image need a 4-D attention mask"):
        load_config(vqa, ["train.attn_implementation=flash_attention_2"])
    assert load_config(vqa, ["train.attn_implementation=eager"]).data.sources[0].group_by_image
    with pytest.raises(ConfigError, match="cache_frozen_layers need a 4-D attention mask"):
        load_config(
            BASE,
            [
                "train.trainable=[lm]",
                "train.frozen_lm_layers=1",
                "train.cache_frozen_layers=true",
                "train.attn_implementation=flash_attention_2",
            ],
        )
    # on a conversation source it packed nothing, silently
    with pytest.raises(ConfigError, match="a llava_json source has nothing to pack"):
        load_config(BASE, ["data.group_by_image=true"])


def test_build_config_is_the_sequence_stage_0b_built_its_config_by(tmp_path, monkeypatch):
    """Stage 0b's make_config is config.build_config; it builds the config the sequence stage
    0b wrote out before (overrides, typing, paths, validate) built, and stops at the same first
    error for a broken override."""
    import dataclasses

    from llavamed.config import apply_overrides, from_dict
    from llavamed.train import vision_vqa

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "configs/cpu/stage0b_vision_vqa.yaml").read_text())
    overrides = ["steps=7", "output_dir=~/stage0b", "sources.1.path=vqa"]

    def by_hand(ovs):
        conf = from_dict(vision_vqa.VisionVQAConfig, apply_overrides(raw, ovs))
        vision_vqa._resolve_paths(conf)
        conf.validate()
        return conf

    ours = vision_vqa.make_config(raw, overrides)
    assert dataclasses.asdict(ours) == dataclasses.asdict(by_hand(overrides))
    assert ours.steps == 7 and ours.sources[1].path == str(tmp_path / "vqa")
    for bad in (["steps=x"], ["stepz=1"], ["steps=0"], ["steps=x", "readout=max"]):
        with pytest.raises(ConfigError) as theirs:
            by_hand(bad)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(theirs.value))}$"):
            vision_vqa.make_config(raw, bad)
