"""Packed fine-tuning step: ``sdpa`` against ``eager`` attention, same model, same batches.

    python benchmarks/packed_attention.py                   # the quickstart's shapes
    python benchmarks/packed_attention.py --vision cpu      # the 64-token tower

Fine-tuning with ``group_by_image`` packs an image's questions behind one shared prefix, so the
trainer hands the LM a 4-D attention mask (``llavamed.train.shared_prefix``). On CPUs PyTorch's
``scaled_dot_product_attention`` runs such a mask through its flash kernel, whose backward is
slow at these lengths (a few hundred tokens); transformers' ``eager`` attention is two batched
matmuls and a softmax. Both run here on identical packed batches shaped like MedSynth's (image
tokens + chat header as the prefix, several short question/answer tails), through the trainer's
own loss module, forward + backward + fused AdamW step (as the trainer's), in the precision the
trainer's ``precision: auto`` resolves to on this machine (fp32 on AVX2-only CPUs; ``--precision``
to force one), interleaved so that machine noise hits both alike. Defaults are the quickstart's
shapes (the cpu-p32 tower's 16 image tokens, a 4-token chat header). Printed: median seconds per
step for each, the ratio, and the loss of both on the first batch, which must agree (checked).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402


def packed_batch(n_image_tokens: int, image_token_id: int, vocab: int, args, rng: random.Random):
    """One padded batch of packed samples: ``(input_ids, labels, segment_ids, position_ids)``."""
    import torch

    from llavamed.train.shared_prefix import position_ids

    rows = []
    for _ in range(args.batch):
        header = [rng.randrange(vocab) for _ in range(args.header)]
        ids = header + [image_token_id] * n_image_tokens
        labels = [-100] * len(ids)
        segs = [0] * len(ids)
        # At least one question: a sample without one supervises nothing.
        for q in range(1, rng.randint(max(1, args.questions // 2), args.questions) + 1):
            n_q, n_a = rng.randint(8, 16), rng.randint(2, 6)
            ids += [rng.randrange(vocab) for _ in range(n_q + n_a)]
            labels += [-100] * n_q + ids[-n_a:]
            segs += [q] * (n_q + n_a)
        rows.append((ids, labels, segs))
    width = max(len(r[0]) for r in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    input_ids = torch.tensor([pad(r[0], 0) for r in rows])
    labels = torch.tensor([pad(r[1], -100) for r in rows])
    segment_ids = torch.tensor([pad(r[2], -1) for r in rows])
    pos = torch.tensor([pad(position_ids(r[2]), 0) for r in rows])
    return input_ids, labels, segment_ids, pos


def check_batch_args(ap, args) -> None:
    """Refuse shapes :func:`packed_batches` cannot build, before minutes of model set-up (they
    ended in a traceback after it: no steps to take a median of, an empty batch, no question)."""
    if min(args.steps, args.batch, args.questions) < 1 or args.header < 0:
        ap.error("--steps, --batch and --questions must be >= 1, --header >= 0")


def packed_batches(cfg, n_image_tokens: int, args):
    """``args.steps + 1`` packed batches (the first for warm-up) for a llava config, seeded, and
    one batch of random pixels."""
    import torch

    rng = random.Random(0)
    batches = [
        packed_batch(n_image_tokens, cfg.image_token_id, cfg.text_config.vocab_size, args, rng)
        for _ in range(args.steps + 1)
    ]
    size = cfg.vision_config.image_size
    return batches, torch.randn(args.batch, 3, size, size)


def train_step(module, optimizer, batch, pixels, *, bf16: bool, **extra) -> tuple[float, float]:
    """One timed forward + backward + optimizer step of the trainer's loss module on a
    :func:`packed_batch`: ``(seconds, mean loss per supervised token)``."""
    import torch

    input_ids, labels, segs, pos = batch
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = module(
            input_ids=input_ids,
            attention_mask=(segs >= 0).long(),
            labels=labels,
            pixel_values=pixels,
            segment_ids=segs,
            position_ids=pos,
            **extra,
        )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss.item() / int((labels[:, 1:] != -100).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--vision", default="cpu-p32", help="tower preset (the quickstart's)")
    ap.add_argument("--batch", type=int, default=16, help="packed samples per step")
    ap.add_argument("--questions", type=int, default=8, help="most questions per image")
    ap.add_argument("--header", type=int, default=4, help="chat-header tokens before the image")
    ap.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: what the trainer's precision: auto resolves to here",
    )
    ap.add_argument("--steps", type=int, default=8, help="timed steps per implementation")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llavamed-attn-bench"))
    args = ap.parse_args(argv)
    check_batch_args(ap, args)

    import torch

    from llavamed.model import ModelSpec, init_checkpoint, load_llava
    from llavamed.model.processing import num_image_tokens
    from llavamed.train.trainer import _loss_module_cls
    from llavamed.utils.precision import resolve_precision

    precision = resolve_precision(args.precision)
    torch.manual_seed(0)
    model_dir = Path(args.cache) / f"model-{args.lm_layers}-{args.vision}"
    if not (model_dir / "config.json").exists():
        init_checkpoint(model_dir, ModelSpec(lm_layers=args.lm_layers, vision=args.vision))
    n_img = None
    models, optims, losses = {}, {}, {}
    for impl in ("sdpa", "eager"):
        model, processor = load_llava(model_dir)
        n_img = num_image_tokens(processor)
        model.set_attn_implementation(impl)
        model.model.vision_tower.requires_grad_(False)
        model.train()
        models[impl] = _loss_module_cls()(model)
        optims[impl] = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True
        )
    batches, pixels = packed_batches(models["sdpa"].llava.config, n_img, args)

    def step(impl: str, batch) -> tuple[float, float]:
        return train_step(models[impl], optims[impl], batch, pixels, bf16=precision == "bf16")

    times: dict[str, list[float]] = {"sdpa": [], "eager": []}
    for impl in times:  # first batch: warm-up, and the loss both must agree on
        losses[impl] = step(impl, batches[0])[1]
    # The same model on the same batch: a speed-up must not come from computing something else.
    tol = 2e-2 if precision == "bf16" else 1e-4
    if abs(losses["sdpa"] - losses["eager"]) > tol * abs(losses["sdpa"]):
        raise SystemExit(f"first-batch losses differ: {losses}")
    for k, batch in enumerate(batches[1:]):
        order = ("sdpa", "eager") if k % 2 == 0 else ("eager", "sdpa")
        for impl in order:
            times[impl].append(step(impl, batch)[0])
        print(f"step {k + 1}/{args.steps}", file=sys.stderr)

    tokens = statistics.mean(int((b[2] >= 0).sum()) for b in batches[1:])
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    print(
        f"\nmodel: SmolLM2 cut to {args.lm_layers} layers + {args.vision} tower "
        f"({n_img} image tokens), {precision}; batch {args.batch} packed samples, "
        f"{tokens:.0f} real tokens per step; {args.steps} steps each (medians)\n"
    )
    print_table(
        ["attention", "s / step", "tokens / s", "speed-up vs sdpa", "first-batch loss"],
        [
            [
                impl,
                f"{med[impl]:.3f}",
                f"{tokens / med[impl]:.0f}",
                f"{med['sdpa'] / med[impl]:.2f}x",
                f"{losses[impl]:.4f}",
            ]
            for impl in ("sdpa", "eager")
        ],
    )
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "packed_attention")
