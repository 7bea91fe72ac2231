"""Training throughput: llavamed's trainer against the reference approach, same model, same data,
same precision.

    python benchmarks/train_throughput.py                      # embedded SmolLM2-135M + CPU ViT
    python benchmarks/train_throughput.py --n 96 --lm-layers 8 --batch 8

Both train projector + LM (vision frozen, as stage 2) for one pass over the same samples, whose
lengths spread like real instruction data (short questions, answers from a few words to a
paragraph; 64 image tokens each), in the precision ``precision: auto`` resolves to here (fp32 on
AVX2-only CPUs, bf16 autocast with AMX/AVX512-BF16; ``--precision`` forces one), both with fused
AdamW, both timed from the batch's collation to the optimizer step's end:

* **ours** -- ``llavamed.train.run_training``: length-grouped batches, logits only at supervised
  positions, loss = mean over the global batch's supervised tokens;
* **baseline** -- transformers' ``LlavaForConditionalGeneration(..., labels=...)`` on
  random-order padded batches (the LLaVA reference recipe).

Both see the same samples: the baseline takes exactly the samples of our run's steps (the
trainer's own schedule (``run_epoch_schedule``), so with ``--max-steps K`` the samples of our first K
length-grouped steps, and the trainer's fill-up of a short last batch) and shuffles them into
random batches of the same size, as many as our steps. The table prints the step and real-token
counts of both and whether they match.

Reported: real (non-padding) tokens/s for each (medians of per-step rates), the ratio, the
padding share, our achieved FLOP/s as a fraction of this machine's measured matmul peak in the
same precision, and the loss of both on one identical batch (selected logits vs full logits, same
precision) to show the loss is unchanged. FLOPs use the usual 6 x params x tokens for the trained
LM (+2 x params x patches for the frozen vision tower), i.e. model FLOPs, not the fewer FLOPs our
loss actually runs (it skips the head at unsupervised positions), so the fraction overstates the
hardware's utilisation by up to the head's share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import matmul_peak_flops  # noqa: E402

WORDS = (
    "the chest radiograph shows a right lower lobe opacity with small pleural effusion no "
    "pneumothorax heart size normal axial ct demonstrates hypodense hepatic lesion histology "
    "reveals glandular architecture with nuclear atypia mri t2 hyperintense signal in the left "
    "temporal lobe consistent with edema gross specimen shows a well circumscribed mass"
).split()


def make_data(out: Path, n: int, seed: int = 0, size: int = 128) -> Path:
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        arr = (nrng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(out / "images" / f"{i}.png")
        # answer lengths: log-uniform from ~3 to ~300 words (VQA answers to detailed descriptions)
        n_words = int(round(3 * (100 ** rng.random())))
        answer = " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "?"
        turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": answer}]
        recs.append({"id": str(i), "image": f"images/{i}.png", "conversations": turns})
    p = out / "train.json"
    p.write_text(json.dumps(recs))
    return p


def model_flops_per_token(model, image_tokens_per_sample: float, tokens_per_sample: float) -> float:
    lm = model.model.language_model
    n_lm = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    n_lm += model.lm_head.weight.numel()
    n_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    n_vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    per_tok = 6 * n_lm
    per_sample_img = (6 * n_proj + 2 * n_vis) * image_tokens_per_sample
    return per_tok + per_sample_img / tokens_per_sample


def run_ours(cfg: dict) -> dict:
    from llavamed.train import run_training

    res = run_training(cfg, progress=False)
    if len(res.metrics) < 2:
        raise SystemExit(
            "train_throughput: our run took 1 step; the first is warm-up and not timed, so "
            "raise --n or --max-steps (or lower --batch) for at least 2"
        )
    m = res.metrics[1:]  # first step includes one-off warm-up (allocations, oneDNN kernels)
    toks = sum(r["tokens"] for r in m)
    secs = sum(r["step_time_s"] for r in m)
    return {
        "steps": len(res.metrics),
        "step_tokens": [r["tokens"] for r in res.metrics],
        "all_tokens": sum(r["tokens"] for r in res.metrics),
        "tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in m),
        "tokens": toks,
        "seconds": secs,
        "mean_loss": sum(r["loss"] for r in res.metrics) / len(res.metrics),
        "dir": res.output_dir,
    }


def _autocast(precision: str):
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def ours_sample_steps(samples, cfg) -> list[list[int]]:
    """The sample indices of each optimizer step our run takes: the trainer's schedule
    (``run_epoch_schedule``) for every epoch it starts, cut at its step count (``max_steps`` or
    ``epochs`` epochs)."""
    import math

    from llavamed.train.data import run_epoch_schedule, steps_per_epoch

    t = cfg.train
    total = t.max_steps or max(
        1, math.ceil(t.epochs * steps_per_epoch(len(samples), t.global_batch_size))
    )
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total:
        for step in run_epoch_schedule(cfg, samples, epoch):
            steps.append([i for mb in step for i in mb])
        epoch += 1
    return steps[:total]


def run_baseline(model_dir: Path, ours_cfg: dict, seed: int, precision: str) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed.config import load_config
    from llavamed.train.data import Collator, TrainDataset, load_samples
    from llavamed.train.freeze import apply_trainable

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    processor = AutoProcessor.from_pretrained(model_dir)
    apply_trainable(model, ["projector", "lm"])
    model.train()
    cfg = load_config(ours_cfg)
    samples, _ = load_samples(cfg.data, processor, "chatml", seed=cfg.train.seed, quiet=True)
    ds = TrainDataset(samples, processor.image_processor)
    # The samples our run trains on (all of them, or its first --max-steps steps' worth), in
    # random order: the same work, only the batching differs.
    ours_steps = ours_sample_steps(samples, cfg)
    order = [i for step in ours_steps for i in step]
    random.Random(seed).shuffle(order)
    batch = cfg.train.global_batch_size
    batches = [order[k : k + batch] for k in range(0, len(order), batch)]
    opt = torch.optim.AdamW(  # fused, as the trainer's on CPU
        [p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0, fused=True
    )
    collate = Collator(processor.tokenizer.pad_token_id)
    toks = secs = 0.0
    rates, losses = [], []
    padded = 0
    for k, b in enumerate(batches):
        t = time.perf_counter()  # from loading and collating, as the trainer's step time
        bt = collate([ds[i] for i in b])
        with _autocast(precision):
            out = model(
                input_ids=bt["input_ids"],
                attention_mask=bt["attention_mask"],
                pixel_values=bt["pixel_values"],
                labels=bt["labels"],
            )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(out.loss.item())
        if k:  # skip warm-up, as for ours
            real = float(bt["attention_mask"].sum())
            toks += real
            secs += dt
            rates.append(real / dt)
            padded += bt["attention_mask"].numel()
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens": toks,
        "seconds": secs,
        "mean_loss": sum(losses) / len(losses),
        "padding": 1 - toks / padded,
        "steps": len(batches),
        "all_tokens": sum(samples[i].length for i in order),
        "ours_step_tokens": [sum(samples[i].length for i in step) for step in ours_steps],
    }


def same_batch_losses(
    model_dir: Path, data: Path, precision: str, n: int = 8
) -> tuple[float, float]:
    """HF's full-logit loss vs our selected-logit loss on one identical batch, same precision."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavamed.config import load_config
    from llavamed.train.data import Collator, TrainDataset, load_samples
    from llavamed.train.trainer import _loss_module_cls

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    cfg = load_config(
        {"model": {"from": str(model_dir)}, "data": {"path": str(data), "max_length": 2048}}
    )
    samples, _ = load_samples(cfg.data, processor, "chatml", quiet=True)
    ds = TrainDataset(samples[:n], processor.image_processor)
    bt = Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    kw = {k: bt[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    with torch.no_grad(), _autocast(precision):
        ref = float(model(**kw).loss)
        s = _loss_module_cls()(model)(**kw)
        ours = float(s) / int((bt["labels"][:, 1:] != -100).sum())
    return ref, ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=64, help="training samples")
    ap.add_argument("--batch", type=int, default=8, help="batch size (both)")
    ap.add_argument("--lm", default="embedded")
    ap.add_argument("--lm-layers", type=int, default=None)
    ap.add_argument("--vision", default="cpu")
    ap.add_argument("--max-steps", type=int, default=None, help="cap both runs at this many steps")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llavamed-train-bench"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both sides; auto: what the trainer's precision: auto resolves to here",
    )
    args = ap.parse_args(argv)

    import torch

    from llavamed.utils.precision import resolve_precision

    precision = resolve_precision(args.precision)

    from llavamed.model import ModelSpec, init_checkpoint

    cache = Path(args.cache)
    spec = ModelSpec(lm=args.lm, lm_layers=args.lm_layers, vision=args.vision)
    model_dir = cache / f"model-{args.lm}-{args.lm_layers}-{args.vision}"
    if not (model_dir / "config.json").exists():
        init_checkpoint(model_dir, spec)
    data = make_data(cache / f"data-{args.n}", args.n)

    import shutil

    run_dir = cache / "ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = {
        "stage": "instruct",
        "model": {"from": str(model_dir)},
        "data": {
            "format": "llava_json",
            "path": str(data),
            "max_length": 2048,
            "batching": "length_grouped",
        },
        "train": {
            "trainable": ["projector", "lm"],
            "epochs": 1,
            "max_steps": args.max_steps,
            "global_batch_size": args.batch,
            "micro_batch_size": args.batch,
            "lr": 2e-5,
            "precision": precision,
            "warmup_ratio": 0.0,
        },
        "output": {"dir": str(run_dir), "save_every": 0},
    }
    from llavamed.utils.precision import cpu_has_fast_bf16

    peak = None
    if precision == "fp32" or cpu_has_fast_bf16():
        print(f"measuring the {precision} matmul peak ...", file=sys.stderr)
        peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else torch.float32)
    # else: PyTorch emulates bf16 here; its 2048^3 "peak" takes minutes and is no ceiling.
    print("training: ours ...", file=sys.stderr)
    ours = run_ours(cfg)
    print(f"training: baseline (HF, random order, {precision}) ...", file=sys.stderr)
    base = run_baseline(model_dir, cfg, 0, precision)
    # Our run's per-step real tokens, as logged, against the schedule the baseline reproduced.
    same_samples = ours["step_tokens"] == base["ours_step_tokens"]
    ref_loss, our_loss = same_batch_losses(model_dir, data, precision)

    from transformers import LlavaForConditionalGeneration

    from llavamed.model.processing import num_image_tokens

    m = LlavaForConditionalGeneration.from_pretrained(model_dir)
    from transformers import AutoProcessor

    n_img = num_image_tokens(AutoProcessor.from_pretrained(model_dir))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tok_per_sample = sum(r["tokens"] for r in metrics) / (len(metrics) * args.batch)
    fpt = model_flops_per_token(m, n_img, tok_per_sample)
    achieved = ours["tokens_per_s"] * fpt

    res = {
        "model": model_dir.name,
        "samples": args.n,
        "batch": args.batch,
        "ours_tokens_per_s": ours["tokens_per_s"],
        "baseline_tokens_per_s": base["tokens_per_s"],
        "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
        "baseline_padding": base["padding"],
        "ours_flops_per_s": achieved,
        "precision": precision,
        "matmul_peak_flops_per_s": peak,
        "mfu": achieved / peak if peak else None,
        "steps_ours": ours["steps"],
        "steps_baseline": base["steps"],
        "real_tokens_ours": ours["all_tokens"],
        "real_tokens_baseline": base["all_tokens"],
        "same_samples": same_samples,
        "same_batch_loss_hf": ref_loss,
        "same_batch_loss_ours": our_loss,
        "mean_train_loss_ours": ours["mean_loss"],
        "mean_train_loss_baseline": base["mean_loss"],
    }
    print(f"\n{'':28s}{'ours':>12s}{'baseline':>12s}")
    print(f"{'steps':28s}{ours['steps']:12d}{base['steps']:12d}")
    print(f"{'real tokens (all steps)':28s}{ours['all_tokens']:12d}{base['all_tokens']:12d}")
    print(
        f"{'real tokens/s':28s}{res['ours_tokens_per_s']:12.0f}{res['baseline_tokens_per_s']:12.0f}"
    )
    print(
        f"{'mean train loss (1 pass)':28s}{res['mean_train_loss_ours']:12.4f}{res['mean_train_loss_baseline']:12.4f}"
    )
    print(f"{'loss on one identical batch':28s}{our_loss:12.4f}{ref_loss:12.4f}")
    print(
        f"speedup {res['speedup']:.2f}x (medians of per-step tokens/s, {precision} both); "
        f"baseline padding {100 * base['padding']:.0f}%"
    )
    print(
        "same samples: "
        + (
            "yes (the baseline trains our steps' samples, in random batches)"
            if same_samples
            else "NO: our logged steps do not match the schedule the baseline reproduced; "
            "the two runs trained on different samples"
        )
    )
    if peak is None:
        print(
            f"ours: {achieved / 1e9:.1f} model GFLOP/s; no share of peak: this CPU emulates "
            "bf16, so its bf16 matmul 'peak' is no ceiling and was not measured"
        )
    else:
        print(
            f"ours: {achieved / 1e9:.1f} model GFLOP/s = {100 * res['mfu']:.1f}% of the measured "
            f"{precision} matmul peak "
            f"({peak / 1e9:.0f} GFLOP/s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if same_samples else 1


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "train_throughput")
