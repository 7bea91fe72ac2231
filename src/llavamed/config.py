"""Typed training configuration: YAML + dotted ``key=value`` overrides, validated on load.

A config is a tree of dataclasses. Every field carries a docstring (the string literal after it,
as in :class:`llavamed.model.ModelSpec`); :func:`describe` prints them for ``--help``-style
listings. Unknown keys are errors that name the key, so a typo never silently trains with a
default. The resolved config (defaults filled in, overrides applied) is saved beside every
checkpoint as ``config.yaml``.

Top-level keys: ``stage``, ``model``, ``data``, ``train`` (alias ``optim``), ``output``,
``distributed``. ``stage: vision`` belongs to stage-0 pretraining, which has its own config
(:mod:`llavamed.train.vision_pretrain`); :func:`load_raw` + :func:`apply_overrides` are shared.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError, InputError
from llavamed.utils.precision import check_precision

STAGES = ("align", "instruct", "finetune")
TRAINABLE_PARTS = ("projector", "lm", "vision")
# The stages that train the vision tower alone (stage 0 and 0b), with flat configs of their own.
TOWER_STAGES = {"vision": "stage-0 pretraining", "vision_vqa": "stage 0b (VQA vision warm-up)"}
_STAGE_CHOICES = f"choose from {', '.join((*STAGES, *TOWER_STAGES))}"
# Stage defaults for ``train.trainable`` (DESIGN.md §4: stage 1 = projector; stage 2 and VQA
# fine-tuning = projector + LM with the vision tower frozen).
STAGE_TRAINABLE = {
    "align": ["projector"],
    "instruct": ["projector", "lm"],
    "finetune": ["projector", "lm"],
}


@dataclass
class ModelConfig:
    """Where the weights come from: a fresh composition or a previous stage's output."""

    init: dict | None = None
    """Compose a fresh checkpoint from these :class:`llavamed.model.ModelSpec` fields
    (``lm``, ``lm_layers``, ``vision``, ``vision_feature_layer``, ``template``, ``aspect``,
    ``seed``). Exactly one of ``init`` and ``from`` is set."""
    from_: str | None = None
    """A native llava checkpoint folder (YAML key ``from``), e.g. the previous stage's
    ``OUT/checkpoint-final`` (or ``OUT`` itself)."""
    template: str | None = None
    """Conversation template override; default: the checkpoint's own (``llavamed.json``)."""


@dataclass
class DataSource:
    """One training set."""

    format: str = "llava_json"
    """``llava_json`` (a LLaVA conversation list, LLaVA-Med's released files as-is, or a
    ``.jsonl`` file with one such record per line) or ``vqa``
    (a VQA set through :func:`llavamed.data.vqa.load_vqa`, one single-turn sample per
    question)."""
    path: str = ""
    """The JSON file (llava_json) or the dataset file/folder (vqa). Relative paths (here and
    everywhere in the config) resolve against the current directory."""
    image_folder: str | None = None
    """Folder that ``image`` fields are relative to (llava_json; default: the JSON's folder), or,
    for ``format: vqa``, the image folder of LLaVA-Med's test.json or of PathVQA's pickles
    (default: next to them, as ``eval vqa --images``)."""
    dataset: str | None = None
    """For ``format: vqa``: ``vqa-rad``, ``slake``, ``pathvqa`` or ``llava-med``."""
    split: str = "train"
    """For ``format: vqa``: which split to train on."""
    lang: str = "en"
    """For SLAKE: question language."""
    closed_suffix: bool = False
    """For ``format: vqa``: append the paper's "Please choose from the following two options:
    [yes, no]" to closed yes/no questions (must match ``eval vqa --closed-suffix``)."""
    max_samples: int | None = None
    """Use at most this many records (``llava_json``) or questions (``vqa``, chosen before
    ``group_by_image`` packs them) of this source: a seeded random subset."""
    repeat: int = 1
    """Repeat this source N times per epoch (to up-weight a small set in a mixture)."""
    group_by_image: bool = False
    """For ``format: vqa``: pack an image's questions into one sample that computes the image
    tokens once. Each question attends only to the image prefix and to itself, at the positions
    of its own single-turn prompt, so it cannot read its answer off another question's
    (``llavamed.train.shared_prefix``). Several times cheaper per epoch than single-turn."""

    def validate(self, where: str) -> None:
        """This source's own rules; ``where`` names it in errors (``data.sources[0]``)."""
        if self.format not in ("llava_json", "vqa"):
            raise ConfigError(f"{where}.format={self.format!r}: choose llava_json or vqa")
        if not self.path:
            raise ConfigError(f"{where}.path: required")
        if self.format == "vqa":
            from llavamed.data.vqa import DATASETS

            if self.dataset not in DATASETS:
                raise ConfigError(
                    f"{where}.dataset={self.dataset!r}: choose from {', '.join(DATASETS)}"
                )
        if self.repeat < 1:
            raise ConfigError(f"{where}.repeat must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"{where}.max_samples must be >= 1 (or null for all)")
        if self.group_by_image and self.format != "vqa":
            raise ConfigError(
                f"{where}.group_by_image packs a VQA set's questions per image; a "
                f"{self.format} source has nothing to pack (set it on a format: vqa source)"
            )


@dataclass
class DataConfig:
    """Training data and batching. ``data`` may also be written as a single source's fields
    (``data: {format: ..., path: ...}``) or as a list of sources."""

    sources: list[DataSource] = field(default_factory=list)
    """The training sets; their samples are mixed."""
    max_length: int = 2048
    """Maximum tokens per sample (image tokens included); longer samples are truncated, or
    skipped when the cut would fall inside image tokens."""
    batching: str = "length_grouped"
    """``length_grouped`` (LLaVA's modality-aware grouping: each micro-batch holds samples of
    similar length and the same modality, so little compute goes to padding) or ``random``
    (plain shuffled batches, the reference behaviour)."""
    group_megabatch: int = 8
    """Length grouping sorts this many global batches' worth of shuffled samples by length before
    cutting them into global batches; larger = less padding, less randomness."""
    num_workers: int = 0
    """DataLoader worker processes that decode images (0 = in the training process)."""

    def validate(self) -> None:
        """The data section's own rules, each source's first."""
        if not self.sources:
            raise ConfigError("data: no sources (set data.path or data.sources)")
        for i, s in enumerate(self.sources):
            s.validate(f"data.sources[{i}]")
        if self.batching not in ("length_grouped", "random"):
            raise ConfigError(f"data.batching={self.batching!r}: choose length_grouped or random")
        if self.max_length < 8:
            raise ConfigError("data.max_length must be >= 8")
        if self.num_workers < 0 or self.group_megabatch < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.group_megabatch >= 1")


@dataclass
class LoraConfig:
    """LoRA adapters on the LM through peft; the projector (and vision, if listed) stay fully
    trainable. Adapters are merged into the weights on export."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    """LM linear layers that get adapters (names inside the language model only)."""
    quantize: str | None = None
    """``4bit`` or ``8bit`` for QLoRA (bitsandbytes; CUDA only), or null."""

    def validate(self, parts: list[str]) -> None:
        """``train.lora``'s rules. ``parts`` is :meth:`TrainConfig.trainable_parts` (the adapters
        train the LM, so it must be one of them)."""
        if self.quantize not in (None, "4bit", "8bit"):
            raise ConfigError(f"train.lora.quantize={self.quantize!r}: choose 4bit, 8bit or null")
        if "lm" not in parts:
            raise ConfigError(
                "train.lora needs 'lm' in train.trainable (the adapters train the LM)"
            )
        if self.r < 1:
            raise ConfigError("train.lora.r must be >= 1")
        if self.alpha <= 0:
            raise ConfigError("train.lora.alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("train.lora.dropout must be in [0, 1)")


@dataclass
class TrainSection:
    """What is trained and how."""

    trainable: list[str] | None = None
    """Parts to train, from ``projector``, ``lm``, ``vision``. Default by stage: align ->
    [projector]; instruct/finetune -> [projector, lm]."""
    epochs: float = 1.0
    """Passes over the data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when set)."""
    global_batch_size: int = 16
    """Samples per optimizer step, over all processes and accumulation steps."""
    micro_batch_size: int = 16
    """Samples per forward pass per process; gradient accumulation makes up the rest."""
    lr: float = 2e-5
    """Peak learning rate (of the LM, and of every part without its own rate below)."""
    lr_projector: float | None = None
    """Peak learning rate of the projector (LLaVA's ``mm_projector_lr``); null = ``lr``."""
    lr_vision: float | None = None
    """Peak learning rate of the vision tower when it trains; null = ``lr``. A tower trained
    from scratch (the embedded default) learns local findings far faster at a higher rate
    than a pretrained LM tolerates."""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 0)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_ratio: float = 0.03
    """Linear warmup over this share of the steps (the paper: 3%)."""
    lr_scheduler: str = "cosine"
    """``cosine`` (to 0), ``linear`` (to 0) or ``constant`` (after warmup)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0 disables)."""
    precision: str = "auto"
    """``bf16`` (autocast, fp32 master weights; ~2.3x faster than fp32 on CPUs with AVX512-BF16
    or AMX, ~19x slower per step of an 8-layer transformer on AVX2-only ones), ``fp32``, or ``auto``: bf16 where the hardware
    computes it (``llavamed.utils.precision``). The saved config holds the resolved value."""
    frozen_lm_layers: int = 0
    """Keep the LM's embeddings (tied to its output head) and its first N decoder layers frozen
    while the rest of the LM trains. With the projector and tower frozen too, nothing below
    layer N needs a gradient, so backward stops there: the bottom costs a forward pass only."""
    cache_frozen_layers: bool = False
    """With ``frozen_lm_layers`` and nothing below the LM training (no ``projector`` or
    ``vision`` in ``trainable``): keep each sample's hidden state entering the first trained
    layer in memory the first time it is seen, and start there on every later visit, so later
    epochs skip the tower, projector and frozen layers (``llavamed.train.frozen_layers``). One
    process only; costs ``tokens x hidden size`` floats of RAM."""
    freeze_from_epoch: int = 0
    """With ``frozen_lm_layers``: train every part in ``trainable`` for the first E epochs, then
    only the LM layers from ``frozen_lm_layers`` up (the embeddings, the bottom layers, the
    projector and the tower freeze at the start of epoch E). The early epochs let the bottom of
    the LM and the projector adapt to the image tokens; the later ones, with
    ``cache_frozen_layers``, skip them. 0 = frozen from the start. One process only."""
    gradient_checkpointing: bool = False
    """Recompute LM activations in backward (less memory, ~30% more compute)."""
    attn_implementation: str = "sdpa"
    """``sdpa``, ``eager`` or ``flash_attention_2`` (needs the flash-attn package and a GPU)."""
    compile: bool = False
    """Compile the LM's decoder layers with ``torch.compile`` (Inductor, dynamic shapes), so
    the norms, rotary embeddings and activations between the matmuls run as fused kernels. The
    first step pays for the compilation (about half a minute on 2 CPU cores, less when
    Inductor's on-disk cache holds it); the quickstart's fine-tuning on a 2-core AMX CPU then ran
    1.4x as many tokens a second (``docs/measurements.md``). The same arithmetic, rounded
    differently: a run may switch it on or off when it resumes. Needs a C++ compiler on CPU; the
    single-process and ddp engines; not with ``gradient_checkpointing``."""
    seed: int = 0
    """Seed for data order, dropout and LoRA init."""
    lora: LoraConfig | None = None
    """LoRA/QLoRA on the LM (null = full fine-tuning of the parts listed in ``trainable``)."""

    def validate(self, parts: list[str]) -> None:
        """The train section's own rules, but for ``epochs`` and ``lora``, which
        :meth:`TrainConfig.validate` checks after the 4-D mask rule. ``parts`` is
        :meth:`TrainConfig.trainable_parts`: ``trainable``, or the stage's default when it is
        null (the stage is the one thing outside this section that these rules read)."""
        if self.trainable is not None and not self.trainable:
            # An empty list is falsy: it used to fall back to the stage's default parts silently.
            raise ConfigError(
                "train.trainable: empty; list the parts to train (projector, lm, vision), or "
                "null for the stage's default"
            )
        for p in parts:
            if p not in TRAINABLE_PARTS:
                raise ConfigError(
                    f"train.trainable: unknown part {p!r} (choose from {', '.join(TRAINABLE_PARTS)})"
                )
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ConfigError("train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.lr_scheduler={self.lr_scheduler!r}: choose cosine, linear or constant"
            )
        check_precision(self.precision, "train.precision")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ConfigError(
                f"train.attn_implementation={self.attn_implementation!r}: choose sdpa, eager or flash_attention_2"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1 (or null to use train.epochs)")
        if not self.weight_decay >= 0 or not self.max_grad_norm >= 0:
            raise ConfigError("train.weight_decay and train.max_grad_norm must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas!r}: two numbers in [0, 1)")
        for name in ("lr", "lr_projector", "lr_vision"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"train.{name}={v!r}: must be > 0")
        if not 0 <= self.seed < 2**32:
            # As every llavamed --seed: a larger one passed here and failed after the model had
            # loaded and the data tokenized (the data loader's seed overflowed torch's).
            raise ConfigError(f"train.seed={self.seed}: must be in 0 .. 2**32-1")
        if self.frozen_lm_layers < 0:
            raise ConfigError("train.frozen_lm_layers must be >= 0")
        if self.frozen_lm_layers and "lm" not in parts:
            raise ConfigError(
                "train.frozen_lm_layers: the LM is not in train.trainable, so it is frozen whole"
            )
        if self.frozen_lm_layers and self.lora is not None:
            raise ConfigError("train.frozen_lm_layers and train.lora: choose one")
        if self.freeze_from_epoch < 0:
            raise ConfigError("train.freeze_from_epoch must be >= 0")
        if self.freeze_from_epoch and not self.frozen_lm_layers:
            raise ConfigError(
                "train.freeze_from_epoch needs train.frozen_lm_layers > 0 (the layers to freeze)"
            )
        if self.freeze_from_epoch and not self.max_steps and self.freeze_from_epoch >= self.epochs:
            raise ConfigError(
                f"train.freeze_from_epoch={self.freeze_from_epoch}: the run has only "
                f"{self.epochs:g} epochs, so nothing would ever freeze"
            )
        if self.compile and self.gradient_checkpointing:
            raise ConfigError("train.compile and train.gradient_checkpointing: choose one")
        if self.cache_frozen_layers:
            # With freeze_from_epoch, everything below the LM freezes when the cache starts.
            below = [
                p for p in ("projector", "vision") if p in parts and not self.freeze_from_epoch
            ]
            if not self.frozen_lm_layers or below:
                raise ConfigError(
                    "train.cache_frozen_layers needs train.frozen_lm_layers > 0 and nothing "
                    "below the LM training"
                    + (f" (train.trainable has {', '.join(below)})" if below else "")
                )
            if self.gradient_checkpointing:
                raise ConfigError(
                    "train.cache_frozen_layers and train.gradient_checkpointing: choose one"
                )


@dataclass
class OutputConfig:
    """Where results go and how often."""

    dir: str = "runs/train"
    """Output folder: ``checkpoint-final/``, ``config.yaml``, ``metrics.jsonl``, ``loss.png``,
    ``data_report.json`` and resume checkpoints under ``checkpoints/``."""
    save_every: int = 100
    """Write a resume checkpoint every N optimizer steps (0 = only at the end)."""
    save_every_minutes: float = 0.0
    """Also write one when this many minutes passed since the last (0 = off)."""
    keep_last: int = 1
    """How many resume checkpoints to keep."""
    log_every: int = 1
    """Append a metrics.jsonl record every N steps."""
    tensorboard: bool = False
    """Also log to TensorBoard under ``OUT/tensorboard`` (needs the tensorboard package)."""

    def validate(self) -> None:
        if (
            self.save_every < 0
            or self.save_every_minutes < 0
            or self.keep_last < 1
            or self.log_every < 1
        ):
            raise ConfigError(
                "output.save_every and output.save_every_minutes must be >= 0, "
                "output.keep_last and output.log_every >= 1"
            )


@dataclass
class DistributedConfig:
    """Multi-process training. Launch with ``torchrun`` or ``accelerate launch``; a single process
    ignores this section."""

    engine: str = "ddp"
    """``ddp``, ``fsdp`` (FSDP2 ``fully_shard``, full shard per decoder/vision layer) or
    ``deepspeed``."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON (e.g. ``configs/deepspeed/zero3.json``) for its ZeRO settings. Batch sizes
    and gradient clipping are written into it from this config; its ``bf16``/``fp16``,
    ``optimizer`` and ``scheduler`` blocks are dropped (the trainer's autocast, AdamW and schedule
    apply to every engine)."""
    backend: str | None = None
    """torch.distributed backend; default nccl with CUDA, gloo otherwise."""
    find_unused_parameters: bool = False
    """DDP only, and rarely needed: unused tower layers are frozen automatically, and in a
    multi-process run a micro-batch without images still runs the tower on a blank image (times
    zero), so every trained parameter gets a gradient on every process."""
    timeout_minutes: float = 30.0
    """Collective timeout."""

    def validate(self) -> None:
        if self.engine not in ("ddp", "fsdp", "deepspeed"):
            raise ConfigError(f"distributed.engine={self.engine!r}: choose ddp, fsdp or deepspeed")
        if self.timeout_minutes <= 0:
            raise ConfigError("distributed.timeout_minutes must be > 0")


@dataclass
class TrainConfig:
    """A stage-1, stage-2 or VQA fine-tuning run."""

    stage: str = "instruct"
    """``align`` (stage 1), ``instruct`` (stage 2) or ``finetune`` (VQA). Decides the default
    trainable parts; everything else is explicit. (``vision`` and ``vision_vqa`` configs are
    stage 0 and 0b, with keys of their own: ``llavamed train THAT.yaml --list-keys``.)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Initial weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainSection = field(default_factory=TrainSection)
    """Trainable parts, schedule, precision."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Output folder and checkpoint cadence."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process engine."""

    def check_inputs_exist(self) -> None:
        """The files this run reads exist. The trainer checks before anything loads or is
        written: a typo would otherwise surface minutes later, after the model loaded. (Not part
        of :meth:`validate`, so a config can be printed or checked before its data exists.)"""
        named = [("model.from", self.model.from_)]
        for i, s in enumerate(self.data.sources):
            named += [(f"data.sources[{i}].path", s.path)]
            named += [(f"data.sources[{i}].image_folder", s.image_folder)]
        for key, value in named:
            if value and not Path(value).exists():
                raise ConfigError(f"{key}: {value}: file not found")
        if self.model.from_:
            _check_model_from(Path(self.model.from_))

    # --- derived -----------------------------------------------------------------------------
    def trainable_parts(self) -> list[str]:
        return list(self.train.trainable or STAGE_TRAINABLE[self.stage])

    def validate(self) -> None:
        """The stage, ``model.init``/``model.from`` and the rules that span sections; each section
        checks its own fields (:meth:`DataConfig.validate`, :meth:`TrainSection.validate`, ...).
        Checks run in the order they had when this method held them all, so a config broken in
        several ways reports the same first error."""
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: {_STAGE_CHOICES}")
        m = self.model
        if m.init is not None and m.from_ is not None:
            # Said "set exactly one" to `train stage1.yaml model.from=DIR`, which sets one: the
            # other came from the YAML, and nothing said how to drop it.
            raise ConfigError(
                "model: model.init and model.from are both set; use one. An override replaces "
                "the config file's choice only with the other set to null: "
                "`model.from=DIR model.init=null` (or `model.init.lm=... model.from=null`)"
            )
        if m.init is None and m.from_ is None:
            raise ConfigError(
                "model: set model.init (compose a new model) or model.from (a checkpoint folder)"
            )
        if m.init is not None:
            from llavamed.model.compose import ModelSpec

            known = {f.name for f in dataclasses.fields(ModelSpec)}
            for k in m.init:
                if k not in known:
                    raise ConfigError(
                        f"model.init.{k}: unknown key (known: {', '.join(sorted(known))})"
                    )
            # Typed as ModelSpec's fields: `lm_layers: x` raised a bare TypeError, and
            # `vision_feature_layer: abc` passed, to fail once the tower was built.
            spec = from_dict(ModelSpec, m.init, prefix="model.init")
            m.init = {k: getattr(spec, k) for k in m.init}
            try:
                spec.validate()
            except (InputError, ConfigError) as exc:
                raise ConfigError(f"model.init: {exc}") from exc
        self.data.validate()
        from llavamed.model.templates import TEMPLATES

        if m.template is not None and m.template not in TEMPLATES:
            raise ConfigError(f"model.template={m.template!r}: choose from {', '.join(TEMPLATES)}")
        # --- rules that span sections ---
        # The train section's rules read the stage for train.trainable's default.
        parts = self.trainable_parts()
        self.train.validate(parts)
        t = self.train
        # Data and train: both run the decoder with a custom 4-D mask, which flash attention does
        # not take; said here, not at the first step after the model has loaded and the data
        # tokenized.
        four_d = [
            name
            for name, on in (
                ("train.cache_frozen_layers", t.cache_frozen_layers),
                ("data.sources[].group_by_image", any(s.group_by_image for s in self.data.sources)),
            )
            if on
        ]
        if four_d and t.attn_implementation == "flash_attention_2":
            raise ConfigError(
                f"{' and '.join(four_d)} need a 4-D attention mask: use "
                "train.attn_implementation=sdpa or eager"
            )
        # Train-section rules that always ran after the 4-D mask rule (a config broken both ways
        # reports the mask first).
        if t.epochs <= 0 and not t.max_steps:
            raise ConfigError("train.epochs must be > 0 (or set train.max_steps)")
        if t.lora is not None:
            t.lora.validate(parts)
        self.distributed.validate()
        self.output.validate()


# --- generic dataclass <-> dict ------------------------------------------------------------------

_ALIASES = {"from": "from_"}  # YAML key -> field name
_REV_ALIASES = {v: k for k, v in _ALIASES.items()}
_TOP_ALIASES = {"optim": "train"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: may not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str | int | float) and not isinstance(value, bool) and item is str:
            value = [value]  # `trainable=projector` on the command line
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _plain(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "2e-5" as a string
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # .nan or .inf would pass every "> 0" check (or fail none) and crash a run later, after
        # the model had loaded: no setting takes them.
        what = "a finite number" if number is not None else "a number"
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return getattr(value, "spelling", None) or str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return _plain(value)


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys raise :class:`ConfigError`."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for raw_key, value in data.items():
        name = _ALIASES.get(raw_key, raw_key)
        full = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if name not in names:
            known = ", ".join(_REV_ALIASES.get(n, n) for n in names)
            raise ConfigError(f"{full}: unknown key (known here: {known})")
        kwargs[name] = _coerce(value, hints[name], full)
    required = [
        f.name
        for f in names.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        # A stage-0b source without its path was a TypeError traceback from the constructor.
        key = _REV_ALIASES.get(required[0], required[0])
        raise ConfigError(f"{prefix}.{key}: required" if prefix else f"{key}: required")
    return cls(**kwargs)


def to_dict(obj) -> Any:
    """Dataclass tree -> plain dict with YAML key names."""
    if dataclasses.is_dataclass(obj):
        return {
            _REV_ALIASES.get(f.name, f.name): to_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _check_model_from(path: Path) -> None:
    """``model.from`` holds a model, checked before the output folder is made (a previous
    stage's unfinished run folder or its resume checkpoints are named as what they are)."""
    from llavamed.model.checkpoint import resolve_checkpoint

    try:
        resolve_checkpoint(path)
    except InputError as exc:
        raise ConfigError(f"model.from: {exc}") from exc


# --- YAML and overrides ------------------------------------------------------------------------


def load_raw(path: str | os.PathLike) -> dict:
    """Read a YAML config as a plain dict (no validation)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(p, "file not found", _near_configs(p)) from exc
    except IsADirectoryError as exc:
        raise InputError(p, "is a folder, not a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise InputError(p, "not UTF-8 text", str(exc)) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(p, "invalid YAML", str(exc).replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise InputError(p, "config must be a YAML mapping")
    return data


def _near_configs(path: Path) -> str:
    """The YAML files beside a mistyped config path that are close to its name
    (``stage2_instruct.yml``, ``stage2_instuct.yaml``), as a hint; "" when none."""
    import difflib

    try:
        names = sorted(c.name for c in path.parent.iterdir() if c.suffix in (".yaml", ".yml"))
    except OSError:
        return ""
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.8)
    return f"did you mean {path.parent / near[0]}?" if near else ""


class _SpelledInt(int):
    """An override's integer that remembers how it was typed (``007`` reads as 7)."""

    spelling: str


class _SpelledFloat(float):
    """An override's float that remembers how it was typed (``1.10`` reads as 1.1)."""

    spelling: str


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (``3`` -> int, ``[a, b]`` -> list, ``null``).

    A number whose canonical form differs from what was typed keeps the typed text, so a string
    setting such as ``output.dir=1.10`` or ``model.from=007`` means that folder, not ``1.1`` or
    ``7``; number settings read it as the number."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    typed = text.strip()
    if isinstance(value, int | float) and not isinstance(value, bool) and str(value) != typed:
        spelled = _SpelledInt(value) if isinstance(value, int) else _SpelledFloat(value)
        spelled.spelling = typed
        return spelled
    return value


def _plain(value: Any) -> Any:
    """``value`` with every spelled number turned back into a plain int or float (so that a
    free-form mapping such as ``model.init`` dumps as YAML)."""
    if isinstance(value, _SpelledInt):
        return int(value)
    if isinstance(value, _SpelledFloat):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def apply_overrides(raw: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a raw config dict (returns a copy). Lists are
    indexed by number: ``data.sources.0.path=x``."""
    out = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        key, _, text = ov.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {ov!r}: empty key")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where)
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {ov!r}: {where} is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            idx = _index(last, key)
            if idx >= len(node):
                raise ConfigError(f"override {ov!r}: index {idx} out of range")
            node[idx] = parse_value(text)
        else:
            node[last] = parse_value(text)
    return out


def _index(part: str, where: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ConfigError(f"{where}: expected a list index, got {part!r}") from None


def _list_item(node: list, part: str, where: str):
    idx = _index(part, where)
    if idx >= len(node):
        raise ConfigError(f"{where}: index out of range")
    return node[idx]


_SOURCE_KEYS = {f.name for f in dataclasses.fields(DataSource)}


def _normalise(raw: dict) -> dict:
    raw = dict(raw)
    for alias, name in _TOP_ALIASES.items():
        if alias in raw:
            if name in raw:
                raise ConfigError(f"{alias}: given together with {name}; use one")
            raw[name] = raw.pop(alias)
    data = raw.get("data")
    if isinstance(data, list):
        raw["data"] = {"sources": data}
    elif isinstance(data, dict) and (_SOURCE_KEYS & data.keys()):
        src = {k: v for k, v in data.items() if k in _SOURCE_KEYS}
        rest = {k: v for k, v in data.items() if k not in _SOURCE_KEYS}
        if "sources" in data:
            # `data.path=X` on a resolved (sources-form) config edits its only source.
            srcs = rest["sources"]
            if not isinstance(srcs, list):
                raise ConfigError(
                    "data.sources: expected a list; this config gives one source's fields "
                    "directly under data (override data.path, data.format, ...)"
                )
            if len(srcs) != 1 or not isinstance(srcs[0], dict):
                raise ConfigError(
                    f"data.{next(iter(src))}: ambiguous with several data.sources; "
                    "use data.sources.N.<key>"
                )
            rest["sources"] = [srcs[0] | src]
            raw["data"] = rest
        else:
            raw["data"] = rest | {"sources": [src]}
    return raw


def _resolve_paths(cfg: TrainConfig) -> None:
    """Make file paths absolute against the current directory (as they will be saved in
    ``config.yaml``, so a resumed or chained stage finds them from anywhere)."""

    def res(p: str | None) -> str | None:
        if p is None or p == "":
            return p
        # ``~`` too: the shell leaves it alone in ``output.dir=~/runs/x`` (not an assignment),
        # and a folder named ``~`` appeared in the current directory.
        p = os.path.expanduser(p)
        # Symlinks are kept, in an absolute path as typed and in a relative one made absolute
        # (abspath, not resolve; stage 0 and 0b resolve theirs): a resume compares the saved
        # config's paths as strings, and for moved data it offers a symlink at the old path,
        # which resolving would turn into the new place and refuse.
        return p if os.path.isabs(p) else os.path.abspath(p)

    if cfg.model.from_ is not None:
        cfg.model.from_ = res(cfg.model.from_)
    if cfg.model.init is not None:
        from llavamed.model.compose import VISION_PRESETS

        v = cfg.model.init.get("vision")
        if isinstance(v, str) and v not in VISION_PRESETS:
            cfg.model.init["vision"] = res(v)
        lm = cfg.model.init.get("lm")
        if (
            isinstance(lm, str)
            and lm not in ("embedded", "tiny")
            and Path(lm).expanduser().exists()
        ):
            cfg.model.init["lm"] = res(lm)
    for s in cfg.data.sources:
        s.path = res(s.path) or ""
        s.image_folder = res(s.image_folder)
    if cfg.distributed.deepspeed_config:
        cfg.distributed.deepspeed_config = res(cfg.distributed.deepspeed_config)
    cfg.output.dir = res(cfg.output.dir) or cfg.output.dir


def build_config(
    cls: type[Any],
    raw: dict,
    overrides: typing.Iterable[str] = (),
    *,
    resolve_paths: typing.Callable[[Any], None],
    normalise: typing.Callable[[dict], dict] | None = None,
) -> Any:
    """A validated ``cls`` from a raw config dict, by the steps every training config takes:
    the ``key=value`` overrides, then ``normalise`` (the raw dict's shorthands, and the checks
    that must come before the keys are typed), :func:`from_dict`, ``resolve_paths`` (the paths
    made absolute, as they are saved and compared on resume), and ``cls.validate()``."""
    data = apply_overrides(raw, overrides)
    if normalise is not None:
        data = normalise(data)
    cfg = from_dict(cls, data)
    resolve_paths(cfg)
    cfg.validate()
    return cfg


def _train_raw(raw: dict) -> dict:
    """A LLaVA-stage raw config with its shorthands expanded and its stage checked."""
    raw = _normalise(raw)
    stage = raw.get("stage")
    if stage in TOWER_STAGES:
        raise ConfigError(
            f"stage: {stage} is {TOWER_STAGES[stage]}, with a config of its own; run it with "
            "`llavamed train`"
        )
    if stage is not None and stage not in STAGES:
        # Before the keys: a stage-0b config with `stage: vision-vqa` was told its `sources`
        # were an unknown key of a LLaVA config, not that the stage was misspelt.
        raise ConfigError(f"stage={stage!r}: {_STAGE_CHOICES}")
    return raw


def load_config(
    config: str | os.PathLike | dict | TrainConfig, overrides: typing.Iterable[str] = ()
) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML path, a raw dict or a config object.
    Relative paths resolve against the current directory, like every other llavamed command."""
    if isinstance(config, TrainConfig):
        raw = to_dict(config)
    elif isinstance(config, dict):
        raw = config
    else:
        raw = load_raw(config)
    return build_config(
        TrainConfig, raw, overrides, resolve_paths=_resolve_paths, normalise=_train_raw
    )


def dump_yaml(cfg: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


# --- documentation -----------------------------------------------------------------------------


@cache
def field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) of a dataclass."""
    src = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:], strict=False):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, doc)`` for every field, for help listings and docs."""
    rows = []
    hints = _hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = prefix + _REV_ALIASES.get(f.name, f.name)
        tp, _ = _unwrap_optional(hints[f.name])
        (item,) = typing.get_args(tp) if typing.get_origin(tp) is list else (None,)
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            rows.append((key, "(required)", docs.get(f.name, "")))
            continue
        if dataclasses.is_dataclass(tp) and value is not None:
            rows.append((key, "", docs.get(f.name, "")))
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, repr(to_dict(value)), docs.get(f.name, "")))
            # An optional section (train.lora) or a list of them (data.sources): their keys
            # too, or `--list-keys` hides every setting inside them.
            if dataclasses.is_dataclass(tp):
                rows.extend(describe(tp, key + "."))
            elif item is not None and dataclasses.is_dataclass(item):
                rows.extend(describe(item, key + ".N."))
    return rows


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts. Lists of mappings of the
    same length (``data.sources``) are compared item by item and named as overrides name them
    (``data.sources.1.repeat``), so a refused resume says which source's setting changed."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(diff(va, vb, key + "."))
        elif (
            isinstance(va, list)
            and isinstance(vb, list)
            and len(va) == len(vb)
            and all(
                isinstance(x, dict) and isinstance(y, dict) for x, y in zip(va, vb, strict=True)
            )
        ):
            for i, (x, y) in enumerate(zip(va, vb, strict=True)):
                out.extend(diff(x, y, f"{key}.{i}."))
        elif va != vb:
            out.append(key)
    return out
