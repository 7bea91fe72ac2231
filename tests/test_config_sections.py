"""Each config section checks its own fields; the whole config reports the same first error as
when one method held every rule (the order is user-visible: the message a broken config gets)."""

from __future__ import annotations

import pytest

from llavamed.config import (
    DataConfig,
    DataSource,
    DistributedConfig,
    LoraConfig,
    OutputConfig,
    TrainSection,
    load_config,
)
from llavamed.errors import ConfigError

BASE = {
    "stage": "instruct",
    "model": {"init": {"lm": "tiny", "vision": "tiny"}},
    "data": {"format": "llava_json", "path": "d/train.json"},
}
GROUPED_VQA = ["data.format=vqa", "data.dataset=slake", "data.group_by_image=true"]
FLASH = ["train.attn_implementation=flash_attention_2"]


@pytest.mark.parametrize(
    "check, needle",
    [
        (
            lambda: DataSource(format="csv", path="x").validate("data.sources[3]"),
            "data.sources[3].format='csv'",
        ),
        (
            lambda: DataSource(path="x", group_by_image=True).validate("data.sources[1]"),
            "data.sources[1].group_by_image packs",
        ),
        (lambda: DataConfig().validate(), "data: no sources"),
        (
            lambda: DataConfig(sources=[DataSource(path="x", repeat=0)]).validate(),
            "data.sources[0].repeat must be >= 1",
        ),
        (
            lambda: TrainSection(micro_batch_size=3).validate(["lm"]),
            "train.global_batch_size=16 is not a multiple",
        ),
        (
            lambda: TrainSection(frozen_lm_layers=2).validate(["projector"]),
            "the LM is not in train.trainable",
        ),
        (lambda: LoraConfig(r=0).validate(["lm"]), "train.lora.r must be >= 1"),
        (lambda: LoraConfig().validate(["projector"]), "train.lora needs 'lm'"),
        (
            lambda: OutputConfig(keep_last=0).validate(),
            "output.keep_last and output.log_every >= 1",
        ),
        (lambda: DistributedConfig(engine="mpi").validate(), "distributed.engine='mpi'"),
    ],
)
def test_a_section_checks_its_own_fields(check, needle):
    with pytest.raises(ConfigError) as exc:
        check()
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    "overrides, first",
    [
        # The 4-D mask rule (data x train) comes before train.epochs and every train.lora rule.
        (GROUPED_VQA + FLASH + ["train.epochs=0"], "group_by_image need a 4-D attention mask"),
        (GROUPED_VQA + FLASH + ["train.lora={r: 0}"], "group_by_image need a 4-D attention mask"),
        # ... and after the rest of the train section.
        (GROUPED_VQA + FLASH + ["train.warmup_ratio=2"], "train.warmup_ratio must be in"),
        # train.lora: quantize, then 'lm' among the trained parts, then the ranges.
        (["stage=align", "train.lora={r: 0, quantize: 2bit}"], "train.lora.quantize='2bit'"),
        (["stage=align", "train.lora={r: 0}"], "train.lora needs 'lm'"),
        # Sections in order: data, model.template, train, distributed, output.
        (["data.max_length=4", "model.template=foo"], "data.max_length must be >= 8"),
        (["model.template=foo", "train.lr=0"], "model.template='foo'"),
        (["train.lr=0", "train.lora={r: 0}", "distributed.engine=mpi"], "train.lr=0.0"),
        (["distributed.timeout_minutes=0", "output.log_every=0"], "distributed.timeout_minutes"),
    ],
)
def test_a_config_broken_in_several_ways_reports_the_same_first_error(overrides, first):
    with pytest.raises(ConfigError) as exc:
        load_config(BASE, overrides)
    assert first in str(exc.value)
