"""The one training loop. The config decides the stage: trainable parts, data and schedule.

Loss: the mean cross-entropy over the supervised (assistant) tokens of the whole *global* batch.
Each micro-batch contributes ``sum(token CE) / (supervised tokens in the global batch)``, so the
loss and its gradient do not depend on how the global batch is cut into micro-batches, processes
or accumulation steps, nor on padding: one process and N processes on the same global batch give
the same numbers (a test holds each engine to that). Logits are computed only at supervised
positions (the LM head over a 49K vocabulary is a large share of a small LM's compute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavamed.config import TrainConfig, diff, dump_yaml, load_config, to_dict
from llavamed.errors import ConfigError, InputError
from llavamed.model.checkpoint import FINAL, resolve_checkpoint
from llavamed.train import checkpointing as ck
from llavamed.train.data import (
    Collator,
    TrainDataset,
    data_fingerprint,
    load_samples,
    run_epoch_schedule,
    steps_per_epoch,
)
from llavamed.train.distributed import DistInfo
from llavamed.utils.io import (
    JsonlAppender,
    atomic_write_json,
    atomic_write_text,
    iter_jsonl,
    write_jsonl,
)
from llavamed.utils.precision import resolve_precision

# Keys that may change between a run and its resumption without changing what is trained
# (distributed.engine only within single/ddp/fsdp: DeepSpeed checkpoints have their own layout).
RESUMABLE_CHANGES = (
    "output.dir",  # the run's folder itself: a run moved or copied elsewhere resumes there
    "output.save_every",
    "output.save_every_minutes",
    "output.keep_last",
    "output.log_every",
    "output.tensorboard",
    "data.num_workers",
    "distributed.",
    # How a global batch is cut: the steps' batches and their loss do not depend on it
    # (epoch_schedule), and lowering it is the way on after an out-of-memory on resume.
    "train.micro_batch_size",
    # The other way on after an out-of-memory: backward recomputes the same activations (torch
    # restores the RNG for the recomputation, so dropout masks match too).
    "train.gradient_checkpointing",
    # Fused kernels for the same arithmetic: the losses differ in rounding only.
    "train.compile",
)


StepHook = Callable[[int, Any, Any], "dict | None"]
"""``on_step(step, model, processor) -> extra metrics or None`` (see :func:`run_training`)."""


@dataclass
class TrainResult:
    output_dir: Path
    final_checkpoint: Path
    metrics: list[dict]
    wall_time_s: float


# --- model -------------------------------------------------------------------------------------


def _loss_module_cls():
    import torch
    import torch.nn.functional as F

    from llavamed.model.processing import IGNORE_INDEX
    from llavamed.train.frozen_layers import forward_from_layer
    from llavamed.train.shared_prefix import PAD, attention_mask_4d

    class CausalLMLoss(torch.nn.Module):
        """Summed next-token CE over supervised positions, as one module so DDP/FSDP/DeepSpeed
        wrap a single forward. ``layer_cache`` (a ``frozen_layers.LayerInputCache``, single
        process only) lets a sample seen before start at the first trained LM layer.

        ``tower_every_step``: a micro-batch without images still runs the vision tower and
        projector, on a blank image, and adds their output times zero to the loss (LLaVA's own fix).
        In a multi-process run the processes must meet the same collectives in the same order:
        FSDP2 and ZeRO-3 gather the tower's weights layer by layer in its forward, and DDP
        reduces the gradients of every trained parameter. A process holding only text would skip
        them and stall or crash the others. Run first, as the tower runs before the LM on a
        process with images, so the gathers come in the same order."""

        def __init__(self, llava, tower_every_step: bool = False):
            super().__init__()
            self.llava = llava
            self.layer_cache = None
            self.tower_every_step = tower_every_step

        def _blank_image_term(self, like):
            size = self.llava.config.vision_config.image_size
            blank = torch.zeros(1, 3, size, size, dtype=like.dtype, device=like.device)
            feats = self.llava.model.get_image_features(pixel_values=blank).pooler_output
            return sum(f.sum() for f in feats) * 0.0

        def forward(
            self,
            input_ids,
            attention_mask,
            labels,
            pixel_values=None,
            segment_ids=None,
            position_ids=None,
            idx=None,
        ):
            blank_term = None
            if pixel_values is None and self.tower_every_step:
                blank_term = self._blank_image_term(self.llava.lm_head.weight)
            cache = self.layer_cache if idx is not None else None
            if cache is not None and segment_ids is None:
                # The cached path runs the decoder layers with a 4-D mask; plain samples get one
                # too (one segment each), so first and later visits compute alike.
                segment_ids = attention_mask.long() - 1  # 1 -> 0 (the prefix), 0 -> PAD
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
                    input_ids
                )
            if segment_ids is not None:
                # Several questions share one image prefix: a custom 4-D mask (transformers
                # passes a 4-D mask through unchanged) with positions restarting per question.
                impl = self.llava.config.text_config._attn_implementation
                if impl == "flash_attention_2":
                    raise ConfigError(
                        "data.sources[].group_by_image needs a 4-D attention mask: use "
                        "train.attn_implementation=sdpa or eager"
                    )
                attention_mask = attention_mask_4d(segment_ids)
                if impl == "eager":
                    attention_mask = torch.zeros(
                        attention_mask.shape, device=attention_mask.device
                    ).masked_fill(~attention_mask, torch.finfo(torch.float32).min)
            if cache is not None and cache.has_all(idx):
                hidden = cache.batch(idx, input_ids.shape[1])
                h = forward_from_layer(
                    self.llava.model.language_model,
                    hidden,
                    cache.n_layers,
                    attention_mask,
                    position_ids,
                )
            else:
                with cache.capture() if cache is not None else contextlib.nullcontext():
                    h = self.llava.model(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        pixel_values=pixel_values,
                        use_cache=False,
                    ).last_hidden_state
                if cache is not None:
                    cache.store(idx, (segment_ids != PAD).sum(1).tolist())
            h = h[:, :-1]
            tgt = labels[:, 1:]
            sel = tgt != IGNORE_INDEX
            logits = self.llava.lm_head(h[sel])
            loss = F.cross_entropy(logits.float(), tgt[sel], reduction="sum")
            return loss if blank_term is None else loss + blank_term

    return CausalLMLoss


def build_model(cfg: TrainConfig):
    """``(llava, processor, spec, template)`` as the config describes, before freezing/LoRA."""
    import torch

    from llavamed.model import ModelSpec, build, checkpoint_template
    from llavamed.model.checkpoint import checkpoint_spec
    from llavamed.model.checkpoint_format import model_files, strict_from_pretrained
    from llavamed.model.compose import set_chat_template
    from llavamed.model.templates import get_template

    attn = cfg.train.attn_implementation
    if cfg.model.init is not None:
        spec = ModelSpec(**cfg.model.init)
        model, processor = build(spec)
        template = cfg.model.template or spec.template
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = resolve_checkpoint(cfg.model.from_)
        with model_files(path):
            model = strict_from_pretrained(LlavaForConditionalGeneration, path, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(path)
        spec = checkpoint_spec(path)
        template = cfg.model.template or checkpoint_template(
            path, default=None if spec is None else spec.template
        )
    if spec is not None and spec.template != template:
        spec = dataclasses.replace(spec, template=template)
    if cfg.model.template is not None:  # the saved processor must prompt as training does
        set_chat_template(processor, get_template(template), model.generation_config)
    try:
        model.set_attn_implementation(attn)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"train.attn_implementation={attn!r}: {exc}") from exc
    model.config.use_cache = False
    return model, processor, spec, template


def apply_lora(model, cfg: TrainConfig):
    lc = cfg.train.lora
    if lc is None:
        return model
    if lc.quantize is not None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.lora.quantize={lc.quantize!r}: QLoRA needs bitsandbytes and a CUDA GPU; "
                "use plain LoRA (quantize: null) on CPU"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError("train.lora.quantize: install bitsandbytes for QLoRA") from exc
        _quantize_lm(model, lc.quantize)
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    # Which names can take an adapter: the LM's linear layers, by their last name part.
    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.model.language_model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    unknown = [t for t in lc.target_modules if t not in linear]
    if len(unknown) == len(lc.target_modules):
        # peft's NoMatchingPeftModuleError (a traceback) named a regex, not the setting.
        raise ConfigError(
            f"train.lora.target_modules={lc.target_modules!r}: "
            + ("empty" if not unknown else "no linear layer of the LM has these names")
            + f"; this LM's linear layers: {', '.join(linear)}"
        )
    if unknown and os.environ.get("RANK", "0") == "0":  # a typo trained fewer adapters, unsaid
        print(
            f"llavamed train: train.lora.target_modules: no linear layer named "
            f"{', '.join(unknown)} in the LM (it has {', '.join(linear)}); adapters go on "
            f"{', '.join(t for t in lc.target_modules if t not in unknown)} only",
            file=sys.stderr,
        )
    names = "|".join(lc.target_modules)
    pc = LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        # Adapters only inside the language model, never the vision tower or projector.
        target_modules=rf".*language_model.*\.({names})$",
    )
    return inject_adapter_in_model(pc, model)


def _quantize_lm(model, mode: str) -> None:
    """QLoRA: swap the LM's linear layers for bitsandbytes 4/8-bit ones (GPU only)."""
    import bitsandbytes as bnb
    import torch

    lm = model.model.language_model
    for name, mod in list(lm.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                if mode == "4bit":
                    q = bnb.nn.Linear4bit(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                    )
                    q.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, quant_type="nf4"
                    )
                else:
                    q = bnb.nn.Linear8bitLt(
                        child.in_features,
                        child.out_features,
                        bias=child.bias is not None,
                        has_fp16_weights=False,
                    )
                    q.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False)
                if child.bias is not None:
                    q.bias = child.bias
                setattr(mod, cname, q.cuda())
        del name


def merge_lora(model):
    """Fold adapters into the base weights and remove them (export is a plain llava)."""
    import torch
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            base = mod.get_base_layer()
            setattr(parent, name.rsplit(".", 1)[1], base)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    del torch
    return model


# --- schedule ----------------------------------------------------------------------------------


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    frac = (step - warmup) / max(1, total - warmup)
    frac = min(max(frac, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - frac
    return 0.5 * (1.0 + math.cos(math.pi * frac))


class _LR:
    """Picklable schedule function (LambdaLR saves callable objects' state)."""

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind

    def __call__(self, step: int) -> float:
        return lr_lambda(step, self.total, self.warmup, self.kind)


class _GroupLR:
    """LambdaLR's contract (step, get_last_lr, state_dict) for optimizers that only expose
    ``param_groups`` (DeepSpeed's ZeRO wrappers)."""

    def __init__(self, optimizer, fn):
        self.optimizer, self.fn, self.last_epoch = optimizer, fn, 0
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * self.fn(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, sd: dict) -> None:
        self.last_epoch = sd["last_epoch"]
        self._apply()


def param_groups(module, t) -> list[dict]:
    """AdamW groups of the trainable parameters, one per part with its own peak rate (LM first,
    so the logged lr is the LM's). Parts are told apart by the native llava module names, as
    transformers' own trainers do for ``mm_projector_lr``; names survive FSDP2/DDP wrapping,
    parameter identities do not."""
    rates = {"lm": t.lr, "projector": t.lr_projector or t.lr, "vision": t.lr_vision or t.lr}
    groups: dict[str, list] = {k: [] for k in rates}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = (
            "projector"
            if "multi_modal_projector." in name
            else "vision"
            if "vision_tower." in name
            else "lm"
        )
        groups[part].append(p)
    return [{"params": ps, "lr": rates[k]} for k, ps in groups.items() if ps]


def _fused_adamw(kind: str, params) -> bool | None:
    """Whether AdamW runs as one fused kernel per parameter (``None`` = torch's default).

    Why: on a CPU torch's default AdamW walks every parameter several times (one op per update
    term), and fine-tuning updates SmolLM2's 28M-entry tied embedding every step; the fused
    kernel makes one pass: 240 -> 44 ms a step for the quickstart's 57M trainable parameters on
    the 2-core machine (``benchmarks/optimizer_step.py``), the same update up to float rounding.
    Plain tensors only: FSDP2 shards are DTensors and DeepSpeed wraps the optimizer itself."""
    if kind not in ("single", "ddp"):
        return None
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None


# --- engines -----------------------------------------------------------------------------------


class Engine:
    """Forward/backward/step and state dicts for one of: single process, DDP, FSDP2, DeepSpeed."""

    def __init__(
        self,
        kind: str,
        llava,
        cfg: TrainConfig,
        info: DistInfo,
        accum: int,
        total_steps: int,
        find_unused: bool = False,
    ):
        import torch

        self.kind, self.llava, self.info, self.cfg, self.accum = kind, llava, info, cfg, accum
        t = cfg.train
        wrapper = _loss_module_cls()(llava, tower_every_step=info.world_size > 1)
        params = [p for p in wrapper.parameters() if p.requires_grad]
        warmup = int(round(t.warmup_ratio * total_steps))
        self.max_grad_norm = t.max_grad_norm
        if kind == "fsdp":
            from llavamed.train.distributed import wrap_fsdp2

            wrapper = wrap_fsdp2(wrapper, llava)
            params = [p for p in wrapper.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(wrapper, t),
            lr=t.lr,
            betas=tuple(t.betas),
            weight_decay=t.weight_decay,
            fused=_fused_adamw(kind, params),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _LR(total_steps, warmup, t.lr_scheduler)
        )
        if kind == "ddp":
            from llavamed.train.distributed import wrap_ddp

            wrapper = wrap_ddp(wrapper, info, find_unused)
        elif kind == "deepspeed":
            import deepspeed

            from llavamed.train.distributed import deepspeed_config

            ds = deepspeed_config(
                cfg.distributed.deepspeed_config,
                micro_batch=t.micro_batch_size,
                accum=accum,
                world=info.world_size,
                lr_holder={"max_grad_norm": t.max_grad_norm},
            )
            wrapper, self.optimizer, _, _ = deepspeed.initialize(
                model=wrapper, optimizer=self.optimizer, config=ds
            )
            # ZeRO's optimizer wrapper is not a torch Optimizer, so LambdaLR refuses it.
            self.scheduler = _GroupLR(self.optimizer, _LR(total_steps, warmup, t.lr_scheduler))
        self.module = wrapper
        self.params = params
        # The parts only an image reaches. In a multi-process run they get a zero gradient from
        # the blank-image term on a step without images, where one process alone gets none.
        inner = llava.model
        self.image_params = [
            p
            for part in (inner.vision_tower, inner.multi_modal_projector)
            for p in part.parameters()
            if p.requires_grad
        ]

    def sync_context(self, last: bool):
        if self.kind == "ddp" and not last:
            return self.module.no_sync()
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def forward(self, batch: dict):
        kw = {
            k: batch[k]
            for k in (
                "input_ids",
                "attention_mask",
                "labels",
                "pixel_values",
                "segment_ids",
                "position_ids",
                "idx",
            )
            if k in batch
        }
        return self.module(**kw)

    def dummy_loss(self):
        """A zero loss touching every trainable parameter, for a micro-batch whose samples were all
        skipped in a one-process run (multi-process runs take a placeholder forward instead:
        collectives are armed in the forward)."""
        return sum((p * 0).sum() for p in self.module.parameters() if p.requires_grad)

    def backward(self, loss_sum, total_tokens: float) -> None:
        # DDP/FSDP/DeepSpeed average gradients over processes; DeepSpeed also divides by its
        # accumulation steps. Undo both so the gradient is d(global mean loss).
        scale = self.info.world_size / total_tokens
        if self.kind == "deepspeed":
            self.module.backward(loss_sum * scale * self.accum)
        else:
            (loss_sum * scale).backward()

    def step(self, skip: bool = False, no_images: bool = False) -> float:
        """Clip, step and zero. ``skip``: nothing in the global batch was supervised (every
        sample failed to load), so the weights stay put: AdamW would still move them on its
        momentum. The schedule advances, as the step is counted. ``no_images``: no process had
        an image this step, so the tower and projector stay put, as in one process, where they
        get no gradient at all (DeepSpeed owns its gradients: there AdamW still moves them)."""
        import torch

        if no_images and self.kind in ("ddp", "fsdp"):
            for p in self.image_params:
                p.grad = None
        if skip and self.kind != "deepspeed":
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return 0.0
        if self.kind == "deepspeed":
            self.module.step()  # clips, steps and zeroes at the accumulation boundary
            gn = self.module.get_global_grad_norm()
            self.scheduler.step()
            return float(gn) if gn is not None else float("nan")
        if self.max_grad_norm and self.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            gn = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(gn, "full_tensor"):
            gn = gn.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(gn)

    def ds_micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself: step() after every backward, the optimizer
        only moves at the boundary."""
        if self.kind == "deepspeed":
            self.module.step()

    # state ---------------------------------------------------------------------------------
    def _sd_options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def save(self, tmp: Path) -> None:
        """Collective: every process calls it; rank 0 writes weights and optimizer."""
        import torch

        if self.kind == "deepspeed":
            self.module.save_checkpoint(str(tmp), tag="deepspeed")
            return
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Parameters this run has trained: the ones trainable now, and those that trained before
        # train.freeze_from_epoch froze them (their weights are no longer the initial ones).
        refrozen = {id(p) for p in self.params if not p.requires_grad}
        msd = get_model_state_dict(
            self.module, options=self._sd_options(ignore_frozen_params=not refrozen)
        )
        if refrozen:
            keep = {
                n
                for n, p in self.module.named_parameters(remove_duplicate=False)
                if p.requires_grad or id(p) in refrozen
            }
            msd = {k: v for k, v in msd.items() if k in keep}
        osd = get_optimizer_state_dict(self.module, self.optimizer, options=self._sd_options())
        if self.info.is_main:
            torch.save(msd, tmp / "trainable.pt")
            torch.save(
                {"optimizer": osd, "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt"
            )

    def load(self, ckpt: Path) -> None:
        if self.kind == "deepspeed":
            self.module.load_checkpoint(str(ckpt), tag="deepspeed", load_lr_scheduler_states=False)
            sched = ckpt / "scheduler.pt"
            if sched.exists():
                self.scheduler.load_state_dict(ck.load_file(sched))
            return
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        ck.check_files(ckpt, ["trainable.pt", "optimizer.pt"])
        msd = ck.load_file(ckpt / "trainable.pt")
        opt = ck.load_file(ckpt / "optimizer.pt")
        # Not strict in torch's sense, as the file holds only what this run trains; strict in
        # ours: every parameter being trained must come from it, and it may hold nothing else.
        saved = set(msd)  # before loading, which may add to msd
        got = set_model_state_dict(self.module, msd, options=self._sd_options(strict=False))
        trainable = {
            n.removeprefix("module.")  # DDP's wrapper; the file has canonical names
            for n, p in self.module.named_parameters()
            if p.requires_grad
        }
        missing = sorted(trainable - saved)
        if missing or got.unexpected_keys:
            raise InputError(
                ckpt / "trainable.pt",
                "does not match the model being trained",
                f"missing {missing[:5]} ({len(missing)}), unexpected "
                f"{sorted(got.unexpected_keys)[:5]} ({len(got.unexpected_keys)}); resume from "
                "another checkpoint or delete this one",
            )
        set_optimizer_state_dict(
            self.module, self.optimizer, opt["optimizer"], options=self._sd_options()
        )
        self.scheduler.load_state_dict(opt["scheduler"])

    def full_state_dict(self) -> dict | None:
        """Collective: the whole model's weights (on rank 0; None elsewhere), llava key names."""
        if self.kind == "deepspeed":
            import deepspeed

            params = list(self.llava.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                sd = (
                    {k: v.detach().cpu().clone() for k, v in self.llava.state_dict().items()}
                    if self.info.is_main
                    else None
                )
            return sd
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            sd = get_model_state_dict(self.module, options=self._sd_options())
            return (
                {k.removeprefix("llava."): v for k, v in sd.items()} if self.info.is_main else None
            )
        return None  # self.llava itself holds the full weights


# --- metrics -----------------------------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict]:
    return list(iter_jsonl(path, skip_bad=True)) if path.exists() else []


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume from ``step``, drop records logged after it (they will be re-logged)."""
    rows = _read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) != len(rows) or (
        path.exists() and not path.read_bytes().endswith(b"\n") and path.stat().st_size
    ):
        write_jsonl(path, keep)


# --- the run -----------------------------------------------------------------------------------


def _merge_skips(report, info: DistInfo) -> None:
    """Move every process's count of images skipped while training into rank 0's report (which
    alone is written); each process decodes only its own share of the batches. A collective:
    every process calls it."""
    from llavamed.train import distributed as D

    mine = (dict(report.failed_at_load), report.load_failures)
    gathered = D.gather_objects(mine, info)
    if info.world_size == 1:
        return
    if info.is_main:
        for failed, visits in gathered[1:]:
            report.merge_load_failures(failed, visits)
    else:
        report.skipped_at_load.clear()
        report.failed_at_load.clear()
        report.load_failures = 0


def _to_device(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _placeholder_batch(dataset, collate) -> dict:
    """A one-sample micro-batch with every label masked: the first sample whose image loads."""
    from llavamed.model.processing import IGNORE_INDEX

    for i in range(len(dataset)):
        b = collate([dataset[i]])
        if b["n"]:
            b["labels"] = b["labels"].new_full(b["labels"].shape, IGNORE_INDEX)
            b.pop("idx", None)  # not a cached sample
            return b
    raise InputError("data", "no sample loads", "every image failed to decode")


def _saved_config(out: Path) -> tuple[dict | None, list[str]]:
    """The config the run in ``out`` was trained with: ``OUT/config.yaml``, else the copy in its
    newest resume checkpoint or in ``checkpoint-final`` (a file cut short by a machine crash, or
    deleted). Returns ``(config or None, why each unreadable one was passed over)``."""
    import yaml

    from llavamed.errors import first_line

    places = [out / "config.yaml"]
    if (latest := ck.latest(out)) is not None:
        places.append(latest / "config.yaml")
    places.append(out / FINAL / "train_config.yaml")
    bad = []
    for p in places:
        if not p.is_file():
            continue
        try:
            saved = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            bad.append(f"{p}: {first_line(exc)}")
            continue
        if isinstance(saved, dict) and saved:
            return saved, bad
        bad.append(f"{p}: not a config mapping")
    return None, bad


def _check_same_run(out: Path, resolved: dict) -> bool:
    """Refuse a different config on a started run; True when a saved config was found and
    matched (so a ``checkpoint-final`` there is this config's)."""
    metrics = out / "metrics.jsonl"
    started = (
        (out / FINAL).exists()
        or (metrics.exists() and metrics.stat().st_size > 0)
        or any(ck.checkpoint_root(out).glob("step-*"))
    )
    if not started:  # a run that stopped before its first step (a bad path): nothing to keep
        return False
    # An empty or damaged config.yaml was a YAML traceback, or "a different config (data,
    # distributed, model, ...)" that sent the user to delete the run; a deleted one let any
    # config resume the checkpoints.
    saved, bad = _saved_config(out)
    if saved is None:
        if bad:
            raise ConfigError(
                f"{out}: the run's saved config is unreadable ({'; '.join(bad)}); put back "
                "config.yaml, or use another output.dir"
            )
        return False
    changed = [
        k
        for k in diff(saved, resolved)
        if not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
    ]
    if "model.from" in changed and _same_checkpoint(
        _dotted(saved, "model.from"), _dotted(resolved, "model.from")
    ):
        # A run folder and its checkpoint-final are one model (the docs offer both spellings);
        # the resume checkpoints' fingerprint of the weights still guards what is behind them.
        changed.remove("model.from")
    moved = [k for k in changed if re.fullmatch(r"data\.sources\.\d+\.(path|image_folder)", k)]
    if changed and moved == changed:
        # The same data at a new place: "delete the folder" threw away a run that only needs its
        # data back where they were (the image paths are part of the checkpoints' data check).
        where = "; ".join(f"{k}: {_dotted(saved, k)} -> {_dotted(resolved, k)}" for k in moved)
        raise ConfigError(
            f"{out}: holds a run trained on data at another path ({where}); to resume it, put "
            "the data back at the old path (a symlink to the new place will do) and keep the old "
            "path in the config, or start over in another output.dir"
        )
    if changed:
        raise ConfigError(
            f"{out}: holds a run with a different config ({', '.join(changed)}); "
            "use another output.dir or delete the folder"
        )
    return True


def _from_weights(cfg: TrainConfig) -> str | None:
    """The id of the weights at ``model.from`` (None for ``model.init``), as a finished run
    records it in its checkpoint's ``llavamed.json`` (``train.from_weights``)."""
    if cfg.model.from_ is None:
        return None
    return ck.files_fingerprint(resolve_checkpoint(cfg.model.from_))


def _check_same_start(cfg: TrainConfig, out: Path, final: Path) -> str | None:
    """Refuse to return a finished run whose ``model.from`` weights changed since it trained on
    them (that stage trained again in place, or its checkpoint replaced): returned as finished,
    its checkpoint was silently a model of the old ones. Returns what was checked, for the
    finished-run note: "" for ``model.init`` (nothing to check), None for a run finished before
    the id was recorded (accepted as before)."""
    from llavamed.model.checkpoint import read_meta

    if cfg.model.from_ is None:
        return ""
    try:
        train = read_meta(final).get("train")
    except InputError:  # a damaged llavamed.json: left to what reads the checkpoint
        return None
    recorded = train.get("from_weights") if isinstance(train, dict) else None
    if not isinstance(recorded, str):
        return None
    if _from_weights(cfg) != recorded:
        raise ConfigError(
            f"{out}: the starting weights changed since this run finished: the checkpoint at "
            f"model.from={cfg.model.from_} is not the one it trained from (trained again or "
            "replaced); train on it in another output.dir, or delete the run to train it again "
            "here"
        )
    return "its model.from weights are unchanged; "


def _same_checkpoint(a, b) -> bool:
    """Whether two ``model.from`` values name one checkpoint (``runs/s1`` and
    ``runs/s1/checkpoint-final``)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return resolve_checkpoint(a).resolve() == resolve_checkpoint(b).resolve()
    except InputError:
        return False


def _dotted(d: dict, key: str):
    """The value at a dotted key of a plain config dict (``data.sources.0.path``)."""
    for part in key.split("."):
        d = d[int(part)] if isinstance(d, list) else d.get(part)
    return d


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _engine_kind(cfg: TrainConfig, info: DistInfo) -> str:
    return cfg.distributed.engine if info.enabled else "single"


def run_training(
    config: Any, overrides=(), *, progress: bool = True, on_step: StepHook | None = None
) -> TrainResult:
    """Train as the config says; resume from the newest checkpoint in ``output.dir``; return at
    once if ``checkpoint-final`` exists for the identical resolved config (and refuse if the
    ``model.from`` weights it started from have changed since).

    ``on_step(step, model, processor)`` runs on the main process after every optimizer step (single-process
    runs: ``model`` is the live ``LlavaForConditionalGeneration``); a dict it returns is merged
    into that step's ``metrics.jsonl`` record. Its own time is not counted in ``step_time_s``.
    Use it for learning curves (e.g. accuracy every N steps); put the model back in train mode."""

    from llavamed.train import distributed as D

    t0 = time.time()
    cfg = (
        config
        if isinstance(config, TrainConfig) and not overrides
        else load_config(config, overrides)
    )
    out = Path(cfg.output.dir).resolve()
    # Resolved before the run's identity is taken: a run resumed on a machine that resolves
    # ``auto`` differently would silently change its arithmetic, so that is a different run.
    cfg.train.precision = resolve_precision(
        cfg.train.precision, "cuda" if _cuda_available() else "cpu"
    )
    resolved = to_dict(cfg)
    final = out / FINAL
    metrics_path = out / "metrics.jsonl"
    cfg.check_inputs_exist()
    same = _check_same_run(out, resolved)
    # Checked against OUT/config.yaml or, that one deleted, the copy inside checkpoint-final:
    # requiring OUT/config.yaml retrained a finished run from scratch and replaced its final.
    if (final / "config.json").is_file() and same:
        checked = _check_same_start(cfg, out, final)
        # Said, not silent: the data are not tokenized again to check them (minutes for a large
        # set), so a user who edited the data file would otherwise take the old model for new.
        if checked is None:  # a run from before finished runs kept their model.from's id
            why = (
                "neither its data nor its model.from checkpoint were read again: to train on "
                "changed data or a retrained model.from"
            )
        else:
            why = f"{checked}its data were not read again: to train on changed data"
        if os.environ.get("RANK", "0") == "0":  # one line under torchrun, not one a process
            print(
                f"llavamed train: {out} already holds {FINAL} for this config; returned it "
                f"without training ({why}, use another output.dir)",
                file=sys.stderr,
            )
        return TrainResult(out, final, _read_metrics(metrics_path), 0.0)

    info = D.init(cfg.distributed)
    try:
        return _run(cfg, out, resolved, info, progress, t0, on_step)
    finally:
        D.shutdown(info)


def _run(
    cfg: TrainConfig,
    out: Path,
    resolved: dict,
    info: DistInfo,
    progress: bool,
    t0: float,
    on_step: StepHook | None = None,
) -> TrainResult:
    import torch

    from llavamed.model import save_checkpoint
    from llavamed.train import distributed as D
    from llavamed.train.freeze import apply_trainable

    t = cfg.train
    # Checked before the model loads and the data tokenizes (minutes to hours for a 7B run).
    per_step = t.global_batch_size // t.micro_batch_size
    if per_step % info.world_size:
        raise ConfigError(
            f"train.global_batch_size / train.micro_batch_size = {per_step} micro-batches per step "
            f"cannot be split over {info.world_size} processes; set train.micro_batch_size so "
            f"that global / (micro x {info.world_size}) is a whole number"
        )
    accum = per_step // info.world_size
    kind = _engine_kind(cfg, info)
    if t.compile:
        from llavamed.train.compile_layers import check_can_compile

        check_can_compile(kind, "cuda" if info.device.startswith("cuda") else "cpu")
    if info.is_main:
        from llavamed.utils.io import require_writable

        # One line naming output.dir, before the model loads: a folder that cannot be made
        # (/proc/x) ended in a FileNotFoundError traceback here. Not earlier: a finished run on a
        # read-only disk is still returned above without writing.
        require_writable(out, "output.dir", folder=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    torch.manual_seed(t.seed)

    model, processor, spec, template = build_model(cfg)
    # model.init rebuilds the same weights from the config; model.from reads whatever is there.
    base_key = ck.weights_fingerprint(model) if cfg.model.from_ is not None else None
    from_weights = _from_weights(cfg)  # kept in checkpoint-final for the finished-run check
    model = apply_lora(model, cfg)
    counts = apply_trainable(
        model,
        cfg.trainable_parts(),
        lora=t.lora is not None,
        # With freeze_from_epoch the bottom trains at first and freezes later (below).
        frozen_lm_layers=0 if t.freeze_from_epoch else t.frozen_lm_layers,
    )
    if t.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if t.compile:
        from llavamed.train.compile_layers import compile_lm_layers

        compile_lm_layers(model)
    model.train()
    model.to(info.device)

    samples, report = _load_training_samples(cfg, processor, template, out, info)
    data_key = data_fingerprint(samples)

    spe = steps_per_epoch(len(samples), t.global_batch_size)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * spe))
    if t.freeze_from_epoch and t.freeze_from_epoch * spe >= total_steps:
        # The config checks this against train.epochs; with train.max_steps the epoch length is
        # known only now. Unchecked, the run trained every part to the end, silently.
        raise ConfigError(
            f"train.freeze_from_epoch={t.freeze_from_epoch}: the run ends after step {total_steps}, "
            f"the freeze would come after step {t.freeze_from_epoch * spe} ({spe} steps per "
            "epoch), so nothing would ever freeze; lower it or raise train.max_steps"
        )

    engine = Engine(
        kind,
        model,
        cfg,
        info,
        accum,
        total_steps,
        find_unused=cfg.distributed.find_unused_parameters,
    )
    for opt in ("cache_frozen_layers", "freeze_from_epoch"):
        if getattr(t, opt) and kind != "single":
            raise ConfigError(
                f"train.{opt} works in one process; unset it for {info.world_size}-process runs"
            )
    layer_cache = None
    narrowed = False  # only the LM's top trains (from the start, or from freeze_from_epoch on)

    def narrow_to_top() -> None:
        """Start training only the LM's top layers; keep their inputs if so configured. Frozen
        parameters get no gradient, so AdamW (fused or not) skips them from here on."""
        nonlocal layer_cache, narrowed
        if t.freeze_from_epoch:
            apply_trainable(model, ["lm"], frozen_lm_layers=t.frozen_lm_layers)
            engine.optimizer.zero_grad(set_to_none=True)
        if t.cache_frozen_layers:
            from llavamed.train.frozen_layers import LayerInputCache

            layer_cache = engine.module.layer_cache = LayerInputCache(model, t.frozen_lm_layers)
        narrowed = True

    if not t.freeze_from_epoch:
        narrow_to_top()

    step, tokens_seen = 0, 0
    resume = ck.latest(out)
    if resume is not None:
        st = ck.read_state(resume)
        # DeepSpeed writes its own checkpoint layout; single/ddp/fsdp share one (torch's
        # distributed state dicts), so only a switch across that line cannot resume.
        saved = st.get("engine")
        if saved is not None and (saved == "deepspeed") != (engine.kind == "deepspeed"):
            raise ConfigError(
                f"{resume} was saved by the {saved} engine and this run uses {engine.kind}: "
                "their checkpoints differ; resume with the same distributed.engine, or start "
                "over in another output.dir"
            )
        if st.get("data", data_key) != data_key:
            raise ConfigError(
                f"{resume} was trained on other data: the training samples changed since (a data "
                f"file edited, images added or gone; {len(samples)} samples now). Restore the "
                "data to resume, or start over in another output.dir"
            )
        if st.get("base", base_key) != base_key:
            raise ConfigError(
                f"{resume} was trained from another model.from: the checkpoint at "
                f"{cfg.model.from_} changed since (trained again or replaced), and this run's "
                "trained parts belong on the old one. Put the old checkpoint back to resume, or "
                "start over in another output.dir"
            )
        engine.load(resume)
        ck.load_rng(resume, info.rank, st.get("world_size"))
        step, tokens_seen = st["step"], st.get("tokens_seen", 0)
        if info.is_main:  # the totals of every process; the others count from here on
            if "skipped_while_training_samples" in st:
                report.merge_load_failures(
                    st["skipped_while_training_samples"], st.get("skipped_while_training_visits", 0)
                )
            else:  # a checkpoint from before samples were kept: counts only
                report.skipped_at_load.update(st.get("skipped_while_training", {}))
        if info.is_main:
            _truncate_metrics(out / "metrics.jsonl", step)
            print(
                f"llavamed train: resuming from {resume.name} (step {step}/{total_steps})",
                file=sys.stderr,
            )
    elif info.is_main and (out / "metrics.jsonl").exists():
        _truncate_metrics(out / "metrics.jsonl", 0)
    D.barrier(info)

    metrics_log = JsonlAppender(out / "metrics.jsonl") if info.is_main else None
    tb = _tensorboard(out, cfg) if info.is_main else None
    collate = Collator(processor.tokenizer.pad_token_id)
    dataset = TrainDataset(samples, processor.image_processor)
    placeholder = None  # built on the first micro-batch that loads nothing (multi-process)
    autocast = torch.autocast(
        device_type="cuda" if info.device.startswith("cuda") else "cpu",
        dtype=torch.bfloat16,
        enabled=t.precision == "bf16",
    )
    bar = None
    if info.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=step,
            desc=f"train {cfg.stage}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
    if info.is_main:
        n_train = sum(counts.values())
        print(
            f"llavamed train: {len(samples)} samples, {spe} steps/epoch, {total_steps} steps, "
            f"{info.world_size} process(es) x {accum} accumulation x {t.micro_batch_size} = global batch "
            f"{t.global_batch_size}; engine {kind}; trainable {n_train / 1e6:.2f}M "
            f"({', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items() if v)})"
            # Said, as the first step then takes a minute where later ones take a second.
            + ("; train.compile: the first step compiles the LM's layers" if t.compile else ""),
            file=sys.stderr,
        )

    last_save = time.time()
    run_start = time.time()
    while step < total_steps:
        epoch, in_epoch = divmod(step, spe)
        if not narrowed and epoch >= t.freeze_from_epoch:
            narrow_to_top()
            if info.is_main:
                print(
                    f"llavamed train: from epoch {epoch + 1} on, only LM layers "
                    f">= {t.frozen_lm_layers} train (train.freeze_from_epoch)",
                    file=sys.stderr,
                )
        sched = run_epoch_schedule(cfg, samples, epoch)
        n_steps_here = min(spe - in_epoch, total_steps - step)
        mine = [
            mb
            for s in sched[in_epoch : in_epoch + n_steps_here]
            for mb in s[info.rank * accum : (info.rank + 1) * accum]
        ]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=mine,
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            # Its own generator: starting an iterator draws a seed, which from the global RNG
            # would shift every dropout mask after a mid-epoch resume (the RNG is restored from
            # the checkpoint, then the iterator draws once more than the uninterrupted run did).
            generator=torch.Generator().manual_seed(t.seed * 1_000_003 + epoch),
        )
        it = iter(loader)
        for _ in range(n_steps_here):
            t_step = time.time()
            micro = [next(it) for _ in range(accum)]
            sup_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro if b["n"])
            tok_local = sum(int(b["attention_mask"].sum()) for b in micro if b["n"])
            sup_total = D.all_reduce_sum(sup_local, info)
            images = D.all_reduce_sum(sum("pixel_values" in b for b in micro if b["n"]), info)
            loss_local = 0.0
            for k, b in enumerate(micro):
                for idx, reason, where in b["bad"]:
                    report.add_load_failure(idx, reason, where)
                with engine.sync_context(k == accum - 1):
                    if b["n"]:
                        with autocast:
                            loss_sum = engine.forward(_to_device(b, info.device))
                    elif engine.kind != "single":
                        # Every sample failed to load. The other processes wait in this step's
                        # collectives (DDP's gradient all-reduce is armed by the forward, FSDP
                        # gathers weights in it), so this one runs a forward too: a sample
                        # that loads, with nothing supervised, its loss weighted 0.
                        if placeholder is None:
                            placeholder = _to_device(
                                _placeholder_batch(dataset, collate), info.device
                            )
                        with autocast:
                            loss_sum = engine.forward(placeholder) * 0
                    else:
                        loss_sum = engine.dummy_loss()
                    engine.backward(loss_sum, max(sup_total, 1.0))
                    loss_local += float(loss_sum.detach())
                if k < accum - 1:
                    engine.ds_micro_step()
            lr_used = engine.optimizer.param_groups[0]["lr"]  # step() moves it to the next one
            grad_norm = engine.step(skip=sup_total == 0, no_images=images == 0)
            step += 1
            loss = D.all_reduce_sum(loss_local, info) / max(sup_total, 1.0)
            tokens = D.all_reduce_sum(tok_local, info)
            tokens_seen += int(tokens)
            if tokens_seen == 0 and (step >= spe or step == total_steps):
                # A whole epoch (or the whole run) and not one sample loaded: every image failed
                # in the workers. The run went on to write an untrained checkpoint-final, exit 0.
                _stop_nothing_loads(cfg, out, report, info)
            dt = time.time() - t_step
            rec = {
                "step": step,
                "epoch": round(step / spe, 4),
                "loss": loss,
                "lr": lr_used,
                "grad_norm": grad_norm,
                "tokens": int(tokens),
                "supervised_tokens": int(sup_total),
                "tokens_per_s": tokens / dt if dt > 0 else 0.0,
                "step_time_s": dt,
                "tokens_seen": tokens_seen,
            }
            if not math.isfinite(loss):
                raise ConfigError(
                    f"loss became {loss} at step {step}; lower train.lr or use precision=fp32"
                )
            if on_step is not None and info.is_main:
                rec.update(on_step(step, model, processor) or {})
            if metrics_log is not None and (
                step % cfg.output.log_every == 0 or step == total_steps
            ):
                metrics_log.append(rec)
                if tb is not None:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        tb.add_scalar(f"train/{key}", rec[key], step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False
                )
            due = bool(cfg.output.save_every and step % cfg.output.save_every == 0)
            if cfg.output.save_every_minutes:
                timed = time.time() - last_save > 60 * cfg.output.save_every_minutes
                if info.enabled:
                    # Each process reads its own clock: the main one decides for all, or one
                    # process enters the save's barrier while another waits in the next step's
                    # all-reduce, until the collective timeout.
                    timed = D.all_reduce_sum(float(timed and info.is_main), info) > 0
                due = due or timed
            if due and step < total_steps:
                _save_resume(
                    engine,
                    out,
                    step,
                    tokens_seen,
                    epoch,
                    info,
                    cfg,
                    report,
                    data_key=data_key,
                    base_key=base_key,
                )
                last_save = time.time()
    if bar is not None:
        bar.close()
    if layer_cache is not None and info.is_main:
        print(
            f"llavamed train: kept the layer-{layer_cache.n_layers} inputs of "
            f"{len(layer_cache)} samples ({layer_cache.nbytes() / 2**30:.2f} GiB)",
            file=sys.stderr,
        )

    # export ----------------------------------------------------------------------------------
    _merge_skips(report, info)
    full_sd = engine.full_state_dict()
    if info.is_main:
        # The run's reports before its final checkpoint: that checkpoint makes a re-run return
        # at once, so a kill between the two left a finished run without loss.png and with the
        # data report of its last resume checkpoint.
        atomic_write_json(out / "data_report.json", report.to_dict())
        if metrics_log is not None:
            metrics_log.close()
        from llavamed.train.plots import plot_loss

        metrics = _read_metrics(out / "metrics.jsonl")
        plot_loss(metrics, out / "loss.png", title=f"{cfg.stage}: {out.name}")
        if tb is not None:
            tb.close()
        export = model
        if full_sd is not None:  # sharded engines: a plain copy holding the gathered weights
            export = _plain_copy(cfg, full_sd)
        export = export.to("cpu")
        if t.lora is not None:
            export = merge_lora(export)
        export.config.use_cache = True
        save_checkpoint(
            export,
            processor,
            out / FINAL,
            spec,
            extra={
                "train": {
                    "stage": cfg.stage,
                    "steps": step,
                    "tokens_seen": tokens_seen,
                    "config": resolved,
                    **({"from_weights": from_weights} if from_weights is not None else {}),
                }
            },
            # Inside the atomic save: a kill between the two would leave a final checkpoint that
            # the finished-run check accepts, without its config.
            files={"train_config.yaml": dump_yaml(cfg)},
        )
        wall = time.time() - run_start
        toks = sum(m.get("tokens", 0) for m in metrics)
        print(
            f"llavamed train: done in {wall:.0f}s; wrote {out / FINAL} ({toks} tokens logged)",
            file=sys.stderr,
        )
    D.barrier(info)
    return TrainResult(out, out / FINAL, _read_metrics(out / "metrics.jsonl"), time.time() - t0)


def _load_training_samples(cfg: TrainConfig, processor, template: str, out: Path, info: DistInfo):
    """``(samples, report)`` of the config's data, the report written to ``OUT/data_report.json``;
    refuses data that leave no sample, or a source that gives none."""
    samples, report = load_samples(
        cfg.data, processor, template, seed=cfg.train.seed, quiet=not info.is_main
    )
    if info.is_main:
        atomic_write_json(out / "data_report.json", report.to_dict())
    if not samples:
        from llavamed.errors import format_counts

        # Why, here: "see data_report.json" alone sent the user to a file to learn that, say,
        # every sample was cut at data.max_length.
        why = (
            f"{report.n_records} record(s), all skipped: {format_counts(report.skipped)}"
            if report.skipped
            else f"{report.n_records} record(s) read"
        )
        raise InputError(
            cfg.data.sources[0].path, "no training samples left", f"{why}; see data_report.json"
        )
    empty = [k for k, n in report.per_source.items() if n == 0]
    if empty:
        # One source of several that gives nothing (a VQA split the set does not have: VQA-RAD
        # has no "val") trained on the others alone, with nothing said.
        raise InputError(
            empty[0],
            "no training samples from this source",
            f"{len(samples)} from the others; a split it does not have, or every record "
            "skipped; see data_report.json. Fix the source or remove it from data.sources",
        )
    return samples, report


def _plain_copy(cfg: TrainConfig, full_sd: dict):
    """A freshly built (unsharded) model of the config holding a sharded engine's gathered
    weights."""
    export, _, _, _ = build_model(cfg)
    export = apply_lora(export, cfg)
    # strict=False only so that a tied lm_head (shared with the embeddings, so absent from the
    # gathered weights) can be tied back; anything else missing is an error.
    missing, unexpected = export.load_state_dict(full_sd, strict=False)
    tied = export.config.tie_word_embeddings
    if [m for m in missing if not (tied and "lm_head" in m)] or unexpected:
        raise RuntimeError(f"export: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if "lm_head.weight" in missing:
        export.tie_weights()
    return export


def _stop_nothing_loads(cfg: TrainConfig, out: Path, report, info: DistInfo) -> None:
    """Raise when no sample has loaded (a collective: every process calls it at the same step)."""
    from llavamed.errors import format_counts

    _merge_skips(report, info)
    if info.is_main:
        atomic_write_json(out / "data_report.json", report.to_dict())
    raise InputError(
        cfg.data.sources[0].path,
        "no sample loads",
        f"every sample's image failed while training ({format_counts(report.skipped_at_load)}"
        "); nothing was trained; see data_report.json",
    )


def _save_resume(
    engine: Engine,
    out: Path,
    step: int,
    tokens_seen: int,
    epoch: int,
    info: DistInfo,
    cfg,
    report,
    *,
    data_key: str,
    base_key: str | None = None,
) -> None:
    import shutil

    import torch

    from llavamed.train import distributed as D
    from llavamed.utils.io import disk_full_error

    tmp = ck.tmp_dir(out, step)
    if info.is_main:
        ck.begin(out, step)
    D.barrier(info)
    try:
        engine.save(tmp)
        if engine.kind == "deepspeed" and info.is_main:
            torch.save(engine.scheduler.state_dict(), tmp / "scheduler.pt")
        ck.write_rng(tmp, info.rank)
    except (OSError, RuntimeError) as exc:
        if (full := disk_full_error(exc, out)) is None:
            raise
        # The half-written folder would hold on to the space the user has to free.
        shutil.rmtree(tmp, ignore_errors=True)
        raise full from exc
    D.barrier(info)
    _merge_skips(report, info)
    if info.is_main:
        shutil.copy(out / "config.yaml", tmp / "config.yaml")
        ck.commit(
            out,
            step,
            {
                "step": step,
                "epoch": epoch,
                "tokens_seen": tokens_seen,
                "world_size": info.world_size,
                "engine": engine.kind,
                "data": data_key,
                **({"base": base_key} if base_key is not None else {}),
                # The batches before this point are not read again on resume: keep their skips.
                "skipped_while_training": dict(report.skipped_at_load),
                "skipped_while_training_samples": {
                    str(i): r for i, r in sorted(report.failed_at_load.items())
                },
                "skipped_while_training_visits": report.load_failures,
            },
            cfg.output.keep_last,
        )
        atomic_write_json(out / "data_report.json", report.to_dict())
    D.barrier(info)


def _tensorboard(out: Path, cfg: TrainConfig):
    if not cfg.output.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(
            "llavamed train: output.tensorboard needs the tensorboard package; skipping",
            file=sys.stderr,
        )
        return None
    return SummaryWriter(str(out / "tensorboard"))


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
