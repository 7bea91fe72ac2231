"""Stage 0b: VQA-supervised vision warm-up (``stage: vision_vqa``).

Why: a LLaVA learns to read a finding out of its image tokens only through the LM's attention,
whose gradient is diluted over every image token; measured on MedSynth with the embedded default
(random 4-layer ViT, SmolLM2 cut to 8 layers), 120 steps of VQA fine-tuning left every local
finding at chance. The same tower trained *directly* on the closed questions of the VQA train
split -- one cheap vision-only step per 64 images, no LM -- reaches ~79% in four CPU minutes.
This stage does that before the LLaVA curriculum: it teaches the tower's patch tokens at
``feature_layer`` (the tokens LLaVA's projector receives) to carry each yes/no attribute (by
default in every token, ``readout: token``), where the LM can read it with any attention pattern.
Images go through the composed LLaVA's own processor (``aspect``: pad or crop).

Readout: the question, embedded once by the frozen text encoder (MiniLM by default), is mapped to
a weight vector and a bias; the answer logit is their product with the layer-normed patch tokens:
``token`` (default) trains *every* patch token to answer every question (the ViT's own attention
must spread each finding to all tokens, so whichever image tokens the LM attends to carry it),
``mean`` reads the mean token, ``lse`` a log-mean-exp over per-patch scores. Measured on MedSynth
(4,500 VQA images, 400 steps): held-out tower accuracy token 0.78, mean 0.79, lse 0.82; after 120
LLaVA fine-tuning steps on top, token 0.64 and mean 0.63. The head is
discarded; only the tower is saved, in the same folder format as stage 0, so ``llavamed model
init --vision DIR`` and the stage-1 config accept it.

Only closed questions with a yes/no answer train (``answer_type`` closed, English). Bad records
are counted by the VQA loaders; unreadable images are counted and skipped here.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError, InputError
from llavamed.model.processing import llava_image_processor
from llavamed.utils.io import atomic_path, atomic_write_json, atomic_write_text
from llavamed.utils.precision import check_precision, resolve_precision

REPORT = "vision_vqa_report.json"
TEXT_MAX_LENGTH = 128
"""Tokens of a question the text encoder reads (part of its fingerprint)."""
STATE_FILE = "stage0b_state.pt"
RESUMABLE_CHANGES = frozenset({"time_budget_min", "log_every", "save_every", "output_dir"})
"""Settings a resumed run may change: none of them changes what is computed (``output_dir``: a
run moved or copied to another folder goes on there)."""


@dataclass
class VQASourceSpec:
    dataset: str
    """``vqa-rad``, ``slake``, ``pathvqa`` or ``llava-med`` (the evaluator's loaders)."""
    path: str
    """The dataset's file or folder, as ``llavamed eval vqa`` takes it."""
    split: str = "train"
    """Which split's questions train the tower (never the split you evaluate on)."""


@dataclass
class VisionVQAConfig:
    """Stage-0b recipe; every field can be set in YAML or as ``key=value``."""

    sources: list[VQASourceSpec] = field(default_factory=list)
    """VQA sets whose closed yes/no questions train the tower."""
    vision: str = "cpu"
    """Starting tower: a preset (random) or a vision folder, e.g. stage 0's ``vision_tower``."""
    output_dir: str = "runs/stage0b"
    """Where the trained tower (``vision_tower/``), report and caches go."""
    feature_layer: int = -2
    """Hidden state trained; match the LLaVA's ``vision_feature_layer`` (-2 for a folder tower)."""
    aspect: str = "pad"
    """Image geometry; match the LLaVA's ``aspect``: ``pad`` (to square with the mean colour, then
    resize) or ``crop`` (resize the short side, centre-crop)."""
    readout: str = "token"
    """How the discarded question head reads the patches: ``token`` (every patch token answers),
    ``mean`` (pooled) or ``lse`` (a smooth max over patches)."""
    text_encoder: str = "minilm"
    """Encoder of the question texts: ``minilm`` (the bundled all-MiniLM-L6-v2) or a local HF
    encoder folder."""
    steps: int = 400
    """Optimizer steps (the cosine schedule spans them)."""
    batch_size: int = 64
    """Images per step (each with all of its yes/no questions)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW; linear warm-up, then cosine decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warm-up."""
    time_budget_min: float | None = None
    """Stop early after this many minutes of training, counted over every attempt of a resumed
    run (the schedule still assumes ``steps``)."""
    val_fraction: float = 0.1
    """Train-split images held out (by image) to report accuracy; 0 disables it."""
    precision: str = "auto"
    """``bf16``, ``fp32`` or ``auto`` (bf16 where the hardware computes it; resolved at start)."""
    seed: int = 0
    """Seed for the held-out split, batches and initialisation."""
    log_every: int = 25
    """Log the loss every N steps."""
    save_every: int = 100
    """Write resume state (tower, head, optimizer, batch stream) every N steps, so a killed run
    goes on from the last one instead of from step 0."""
    stage: str = "vision_vqa"
    """``vision_vqa``: this config is stage 0b."""

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("stage vision_vqa: give at least one entry in sources")
        if self.readout not in ("token", "mean", "lse"):
            raise ConfigError(f"readout={self.readout!r}: choose token, mean or lse")
        check_precision(self.precision)
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError("lr must be > 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction must be in [0, 1)")
        if self.log_every < 1 or self.save_every < 1:
            raise ConfigError("log_every and save_every must be >= 1")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            # 0 or less ran no step and still wrote the starting tower as the stage's result.
            raise ConfigError(
                f"time_budget_min={self.time_budget_min:g}: must be > 0 (or null for no budget)"
            )
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps and weight_decay must be >= 0")
        if self.aspect not in ("pad", "crop"):
            raise ConfigError(f"aspect={self.aspect!r}: choose pad or crop")
        if self.feature_layer == 0:
            raise ConfigError("feature_layer=0 is the patch embedding; use -1, -2, ...")


@dataclass
class VisionVQAResult:
    output_dir: Path
    tower_dir: Path
    report: dict
    wall_time_s: float


def make_config(cfg: dict | VisionVQAConfig, overrides: list[str] | None = None) -> VisionVQAConfig:
    from llavamed.config import build_config

    if isinstance(cfg, VisionVQAConfig):
        cfg = asdict(cfg)
    return build_config(
        VisionVQAConfig, dict(cfg), list(overrides or []), resolve_paths=_resolve_paths
    )


def _resolve_paths(cfg: VisionVQAConfig) -> None:
    """Make the paths absolute (``~`` expanded) against the current directory, as the LLaVA
    stages' configs are. A finished run and a resume state are matched by their config, and the
    shipped config spells the paths relative where the quickstart spells them absolute: the same
    run written the other way (or from ``output_dir=~/x``, which made a folder named ``~``) was
    trained again from step 0 over the finished tower."""
    from llavamed.model.compose import VISION_PRESETS
    from llavamed.train.text_encoder import EMBEDDED_TEXT_ENCODER

    def res(p: str) -> str:
        return str(Path(p).expanduser().resolve()) if p else p

    cfg.output_dir = res(cfg.output_dir)
    if cfg.vision not in VISION_PRESETS:
        cfg.vision = res(cfg.vision)
    if cfg.text_encoder != EMBEDDED_TEXT_ENCODER:
        cfg.text_encoder = res(cfg.text_encoder)
    for src in cfg.sources:
        src.path = res(src.path)


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class YesNoTable:
    """Images (preprocessed) and, per image, the (question index, is_yes) pairs asked of it."""

    pixel_values: Any  # (N, 3, S, S)
    labels: list[list[tuple[int, bool]]]
    questions: list[str]
    skipped: dict
    skipped_images: dict = field(default_factory=dict)
    """The images that failed to decode, ``{image: reason}``."""


def collect_yes_no(cfg: VisionVQAConfig) -> tuple[dict[str, tuple[Any, list]], dict[str, int]]:
    """Every closed yes/no English question of the sources, grouped by image key (images not
    decoded yet): ``{key: (image, [(question, is_yes), ...])}`` and the loaders' skip counts."""
    from llavamed.data.vqa import load_vqa

    by_image: dict[str, tuple[Any, list[tuple[str, bool]]]] = {}
    loader_bad: dict[str, int] = {}
    for src in cfg.sources:
        samples, rep = load_vqa(src.dataset, src.path, split=src.split, lang="en")
        for reason, n in rep.bad.items():
            loader_bad[reason] = loader_bad.get(reason, 0) + n
        for s in samples:
            ans = s.answer.strip().lower()
            if s.answer_type != "closed" or ans not in ("yes", "no"):
                continue
            # An image given as bytes (parquet) is keyed by its content: keyed per question, its
            # other questions' copies would land on both sides of the held-out split.
            key = s.image_key if isinstance(s.image, bytes) else str(s.image)
            by_image.setdefault(key, (s.image, []))[1].append((s.question, ans == "yes"))
    if not by_image:
        raise ConfigError("stage vision_vqa: the sources hold no closed yes/no questions")
    return by_image, loader_bad


def yes_no_data_key(by_image: dict[str, tuple[Any, list]]) -> str:
    """What a run trained on: every image key with its questions and answers. A finished run or
    a resume state with another key was made from other VQA files."""
    blob = json.dumps(sorted((k, qa) for k, (_, qa) in by_image.items()))
    return hashlib.sha1(blob.encode()).hexdigest()


def load_yes_no(
    cfg: VisionVQAConfig, image_processor, by_image=None, loader_bad=None
) -> tuple[YesNoTable, dict]:
    """Every closed yes/no English question of the sources, grouped by image, images decoded
    and preprocessed (``by_image``/``loader_bad``: :func:`collect_yes_no`'s result, if read)."""
    import torch

    from llavamed.images import load_image

    if by_image is None:
        by_image, loader_bad = collect_yes_no(cfg)
    questions = sorted({q for _, qa in by_image.values() for q, _ in qa})
    qidx = {q: i for i, q in enumerate(questions)}
    pix, labels, skipped = [], [], dict(loader_bad or {})
    bad: dict[str, str] = {}
    for key, (image, qa) in by_image.items():
        try:
            img = load_image(image, name=key)
        except InputError as err:
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
            bad[key] = err.reason
            print(f"llavamed train: skipped {err}", file=sys.stderr)
            continue
        pix.append(image_processor(images=[img], return_tensors="pt")["pixel_values"][0])
        labels.append([(qidx[q], y) for q, y in qa])
    if not pix:
        raise InputError(
            ", ".join(str(src.path) for src in cfg.sources),
            "no usable image for any yes/no question",
            "skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())),
        )
    table = YesNoTable(torch.stack(pix), labels, questions, skipped, bad)
    return table, {"images": len(labels)}


def image_processor(cfg: VisionVQAConfig, tower):
    """The composed LLaVA's geometry for this tower (stage 0 pads the same way), so the tower is
    not trained on squashed images and then shown padded ones."""
    return llava_image_processor(tower.image_size, tower.mean, tower.std, pad=cfg.aspect == "pad")


# ---- model --------------------------------------------------------------------------------------


def _head(hidden: int, text_dim: int):
    from torch import nn

    class QuestionReadout(nn.Module):
        """Question embedding -> (weight vector, bias) over the pooled patch features."""

        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(hidden)
            self.weight = nn.Linear(text_dim, hidden)
            self.bias = nn.Linear(text_dim, 1)

        def forward(self, patches, q_emb, readout: str):
            w = self.weight(q_emb)  # (Q, H)
            b = self.bias(q_emb).squeeze(-1)  # (Q,)
            x = self.norm(patches)  # (B, K, H)
            if readout == "mean":
                return x.mean(1) @ w.T + b  # (B, Q)
            s = x @ w.T + b  # (B, K, Q): per-patch evidence
            if readout == "token":
                return s
            return s.logsumexp(1) - math.log(s.shape[1])

    return QuestionReadout()


def _batch_targets(labels: list[list[tuple[int, bool]]], idx, n_q: int):
    import torch

    y = torch.full((len(idx), n_q), -1.0)
    for r, i in enumerate(idx):
        for q, yes in labels[int(i)]:
            y[r, q] = 1.0 if yes else 0.0
    return y


def _accuracy(head, feats_fn, pix, labels, q_emb, readout, autocast) -> dict:
    import torch

    correct = total = 0
    per_q: dict[int, list[int]] = {}
    with torch.no_grad(), autocast():
        for i in range(0, len(pix), 128):
            idx = range(i, min(i + 128, len(pix)))
            logits = head(feats_fn(pix[i : i + 128]), q_emb, readout).float()
            if logits.dim() == 3:  # token readout: the tokens' mean verdict
                logits = logits.mean(1)
            y = _batch_targets(labels, idx, q_emb.shape[0])
            mask = y >= 0
            hit = ((logits > 0).float() == y) & mask
            correct += int(hit.sum())
            total += int(mask.sum())
            for q in range(y.shape[1]):
                m = int(mask[:, q].sum())
                if m:
                    c = per_q.setdefault(q, [0, 0])
                    c[0] += m
                    c[1] += int(hit[:, q].sum())
    return {"accuracy": correct / max(total, 1), "n": total, "per_question": per_q}


# ---- training -----------------------------------------------------------------------------------

GRAD_CLIP = 1.0
"""Gradient-norm clip: the 1.0 of stage 0's ``grad_clip`` and the LLaVA stages'
``max_grad_norm`` defaults, which bounds the steps a still-random readout head drives through
the tower it reads from. A constant: stage 0b's recipe has no setting for it."""


def _lr_at(step: int, cfg: VisionVQAConfig) -> float:
    """Linear warm-up over ``warmup_steps`` multiplied into a cosine over all the steps that ends
    at 0. Stage 0's schedule differs (its cosine starts after the warm-up and stops at
    ``min_lr_frac``); this one is kept because the measured stage-0b results (docs/stage0.md,
    docs/measurements.md) were made with it."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def train_vision_vqa(cfg: VisionVQAConfig, progress: bool = True) -> VisionVQAResult:
    import contextlib

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from llavamed.model.vision_tower import (
        check_tower_layer,
        load_tower,
        save_tower,
        tower_features,
    )
    from llavamed.train.checkpointing import load_file, rng_state, set_rng_state
    from llavamed.train.run_inputs import (
        RunInputs,
        read_finished_report,
        run_changes,
        start_tower_key,
    )
    from llavamed.train.text_encoder import (
        TextEncoder,
        cached_embeddings,
        encoder_fingerprint,
        resolve_text_encoder,
    )

    t0 = time.time()
    cfg.precision = resolve_precision(cfg.precision, "cpu")  # this stage runs on the CPU
    _resolve_paths(cfg)
    out = Path(cfg.output_dir)
    tower_dir, report_path = out / "vision_tower", out / REPORT
    resolved = asdict(cfg)

    by_image, loader_bad = collect_yes_no(cfg)
    # The same recipe on other questions or images (the VQA files changed), from other weights
    # behind the same tower path, or with the same text_encoder name over other files (a folder
    # trained again, another package version: the readout head learnt that encoder's question
    # embeddings) is another run.
    data_key = yes_no_data_key(by_image)
    start_key = start_tower_key(cfg.vision)
    text_path = resolve_text_encoder(cfg.text_encoder)
    inputs = RunInputs(data_key, start_key, encoder_fingerprint(text_path, TEXT_MAX_LENGTH))
    words = ("the VQA data", "the starting tower's weights", "the text encoder's files")
    finished = (tower_dir / "config.json").exists()
    old = read_finished_report(report_path, "stage 0b") if finished else None
    if old is not None:
        # The report keeps its data key under data_key: its "data" holds the counts.
        why = run_changes(
            old, resolved, inputs, words, may_change=RESUMABLE_CHANGES, data_field="data_key"
        )
        if not why:
            # A finished run is done whatever the budget now; one its budget stopped goes on
            # only when the budget changed (its resume state is still there).
            done = old.get("steps", 0) >= cfg.steps
            if done or old.get("config", {}).get("time_budget_min") == cfg.time_budget_min:
                return VisionVQAResult(out, tower_dir, old, 0.0)
        elif not (out / STATE_FILE).exists():
            # Its tower was trained over again from step 0 without a word (a resume state, when
            # there is one, says what changed below).
            print(
                f"stage 0b: {out} holds a finished run with other settings ({', '.join(why)}); "
                "training again from step 0",
                file=sys.stderr,
            )
    from llavamed.utils.io import require_writable

    # One line naming output_dir, before the tower loads: a folder that cannot be made
    # (/proc/x) ended in a FileNotFoundError traceback here. After the return above: a finished
    # run on a read-only disk is still returned without writing.
    require_writable(out, "output_dir", folder=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tower = load_tower(cfg.vision, seed=cfg.seed)
    # Named by this stage's key: the LLaVA check spoke of vision_feature_layer and a
    # --vision-feature-layer flag that stage 0b does not have.
    check_tower_layer(cfg.feature_layer, tower)
    proc = image_processor(cfg, tower)
    table, counts = load_yes_no(cfg, proc, by_image, loader_bad)
    encoder = TextEncoder(text_path, max_length=TEXT_MAX_LENGTH)
    q_emb = cached_embeddings(
        encoder, table.questions, out / "cache" / "questions.pt", progress=False
    ).float()

    n = len(table.labels)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    # At least one image is left to train on, whatever the fraction.
    n_val = min(int(round(cfg.val_fraction * n)), n - 1) if n >= 20 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]

    head = _head(tower.model.config.hidden_size, q_emb.shape[1])
    params = [p for p in tower.model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def autocast():
        if cfg.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def feats(x):
        return tower_features(tower, x, cfg.feature_layer)[1]

    log: list[dict] = []
    step, trained_s = 0, 0.0
    state_path = out / STATE_FILE
    if state_path.exists():
        state = load_file(state_path, f"Delete it to start over from step 0 in {out}")
        # Unlike a report's, a state's missing data key is not trusted: states written before
        # it was stored may have been made from other questions.
        changed = run_changes(
            {"data": None} | state, resolved, inputs, words, may_change=RESUMABLE_CHANGES
        )
        if not changed:
            # Strict loads: the state was written by this recipe, so every key must match.
            tower.model.load_state_dict(state["tower"])
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            g.set_state(state["batches"])  # the batch stream goes on where it stopped
            set_rng_state(state["rng"])
            step, trained_s, log = state["step"], state["trained_s"], state["log"]
            print(f"stage 0b: resuming {out} at step {step}/{cfg.steps}", file=sys.stderr)
        else:
            print(
                f"stage 0b: {out} holds a run with other settings ({', '.join(changed)}); "
                "starting from step 0",
                file=sys.stderr,
            )

    def save_state() -> None:
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "config": resolved,
                    **inputs.as_fields(),
                    "tower": tower.model.state_dict(),
                    "head": head.state_dict(),
                    "optimizer": opt.state_dict(),
                    "batches": g.get_state(),
                    "rng": rng_state(),
                    "step": step,
                    "trained_s": trained_s,
                    "log": log,
                },
                tmp,
            )

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="stage 0b (vision VQA)",
        disable=not progress,
        file=sys.stderr,
    )
    # The time budget counts training time over every attempt, as stage 0's does.
    budget = None if cfg.time_budget_min is None else 60 * cfg.time_budget_min
    t_seg, trained_at_seg = time.time(), trained_s
    tower.model.train()
    while step < cfg.steps and (budget is None or trained_s < budget):
        idx = train_idx[torch.randint(len(train_idx), (cfg.batch_size,), generator=g)]
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, cfg)
        y = _batch_targets(table.labels, idx, len(table.questions))
        with autocast():
            logits = head(feats(table.pixel_values[idx]), q_emb, cfg.readout).float()
        if logits.dim() == 3:  # token readout: every patch token answers
            y = y[:, None, :].expand_as(logits)
        mask = y >= 0
        loss = F.binary_cross_entropy_with_logits(logits[mask], y[mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        trained_s = trained_at_seg + (time.time() - t_seg)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.append({"step": step, "loss": loss.item(), "wall_s": round(trained_s, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % cfg.save_every == 0 and step < cfg.steps:
            save_state()
    bar.close()
    finished = step >= cfg.steps
    if not finished:  # the time budget stopped it: a larger budget goes on from here
        save_state()
    tower.model.eval()
    report: dict[str, Any] = {"config": resolved, "steps": step, "data": counts, "log": log}
    report.update(inputs.as_fields("data_key"))
    report["skipped"] = table.skipped
    # Named, not only counted (they were on stderr only, gone with the terminal).
    report["skipped_images"] = dict(sorted(table.skipped_images.items()))
    report["questions"] = len(table.questions)
    if n_val:
        acc = _accuracy(
            head,
            feats,
            table.pixel_values[val_idx],
            [table.labels[int(i)] for i in val_idx],
            q_emb,
            cfg.readout,
            autocast,
        )
        report["val_accuracy"] = acc["accuracy"]
        report["val_n"] = acc["n"]
        report["val_per_question"] = {
            table.questions[q]: {"n": c[0], "accuracy": c[1] / c[0]}
            for q, c in sorted(acc["per_question"].items())
        }
    save_tower(tower.model, tower, tower.image_size, tower_dir)
    report["wall_time_s"] = round(time.time() - t0, 1)
    # The JSON report marks the run finished, so it is written last: a run killed between the
    # two was found finished and never wrote its report.md.
    atomic_write_text(out / "vision_vqa_report.md", report_markdown(report))
    atomic_write_json(report_path, report)
    if finished:
        state_path.unlink(missing_ok=True)  # the report and tower now stand for the whole run
    return VisionVQAResult(out, tower_dir, report, time.time() - t0)


def report_markdown(report: dict) -> str:
    lines = [
        "# Stage 0b: VQA-supervised vision warm-up",
        "",
        f"- steps: {report['steps']}, images: {report['data']['images']}, "
        f"yes/no questions: {report['questions']}, wall: {report.get('wall_time_s', 0):.0f} s",
        f"- skipped: {report.get('skipped') or 'none'}",
    ]
    bad = report.get("skipped_images") or {}
    lines += [f"  - unreadable image {key}: {reason}" for key, reason in list(bad.items())[:20]]
    if len(bad) > 20:
        lines.append("  - ... (all of them in vision_vqa_report.json)")
    if "val_accuracy" in report:
        lines += [
            f"- held-out train-split images: yes/no accuracy {100 * report['val_accuracy']:.1f}% "
            f"over {report['val_n']} questions (the discarded readout head; chance ~50%)",
            "",
            "| question | n | accuracy |",
            "|---|---:|---:|",
        ]
        for q, r in report["val_per_question"].items():
            lines.append(f"| {q} | {r['n']} | {100 * r['accuracy']:.0f}% |")
    return "\n".join(lines) + "\n"


def run_from_config(
    cfg: dict, overrides: list[str] | None = None, progress: bool = True
) -> VisionVQAResult:
    """Entry for ``llavamed train CONFIG.yaml`` with ``stage: vision_vqa`` and the quickstart."""
    return train_vision_vqa(make_config(cfg, overrides), progress=progress)
