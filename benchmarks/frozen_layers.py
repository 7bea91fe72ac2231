"""Fine-tuning step with the LM's bottom layers frozen, and started from kept hidden states.

    python benchmarks/frozen_layers.py              # the quickstart's model: SmolLM2 cut to 8
                                                    # layers + the cpu-p32 tower (16 image tokens)
    python benchmarks/frozen_layers.py --frozen 4 6

Rows, all through the trainer's own loss module on identical packed batches shaped like
MedSynth's VQA fine-tuning (forward + backward + fused AdamW step, ``precision: auto``), the
variants interleaved step by step so machine noise hits them alike:

- ``projector + LM`` -- the baseline: the quickstart's fine-tuning before this option;
- ``frozen N`` -- ``train.frozen_lm_layers = N``, projector frozen: backward stops at layer N
  (a sample's first visit, and every visit without ``train.cache_frozen_layers``);
- ``frozen N, cached`` -- a later visit with ``train.cache_frozen_layers``: the step starts at
  layer N from the kept hidden states.

Printed: median seconds per step and the speed-up over the baseline, and what an epoch count
makes of them (the first epoch runs uncached, the others cached).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402
from packed_attention import check_batch_args, packed_batches, train_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--vision", default="cpu-p32")
    ap.add_argument("--frozen", type=int, nargs="+", default=[4, 6], help="frozen LM layers")
    ap.add_argument("--batch", type=int, default=16, help="packed samples per step")
    ap.add_argument("--questions", type=int, default=8, help="most questions per image")
    ap.add_argument("--header", type=int, default=4, help="chat-header tokens before the image")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--epochs", type=float, default=3.0, help="for the per-run estimate")
    ap.add_argument(
        "--attn",
        default="eager",
        choices=["eager", "sdpa"],
        help="the quickstart's fine-tuning uses eager",
    )
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llavamed-attn-bench"))
    args = ap.parse_args(argv)
    bad = [n for n in args.frozen if not 0 < n < args.lm_layers]
    if bad:  # before minutes of model set-up, not a traceback from the trainer's check
        ap.error(
            f"--frozen {bad}: each must be between 1 and --lm-layers - 1 ({args.lm_layers - 1})"
        )
    check_batch_args(ap, args)
    if args.epochs < 1:
        ap.error("--epochs must be >= 1 (the first runs uncached, the rest cached)")

    import torch

    from llavamed.model import ModelSpec, init_checkpoint, load_llava
    from llavamed.model.processing import num_image_tokens
    from llavamed.train.freeze import apply_trainable
    from llavamed.train.frozen_layers import LayerInputCache
    from llavamed.train.trainer import _loss_module_cls
    from llavamed.utils.precision import resolve_precision

    precision = resolve_precision("auto")
    torch.manual_seed(0)
    model_dir = Path(args.cache) / f"model-{args.lm_layers}-{args.vision}"
    if not (model_dir / "config.json").exists():
        init_checkpoint(model_dir, ModelSpec(lm_layers=args.lm_layers, vision=args.vision))

    variants = {"projector + LM": (0, False)}
    for n in args.frozen:
        variants[f"frozen {n}"] = (n, False)
        variants[f"frozen {n}, cached"] = (n, True)
    modules, optims = {}, {}
    for name, (n, cached) in variants.items():
        model, processor = load_llava(model_dir)
        model.set_attn_implementation(args.attn)
        parts = ["projector", "lm"] if n == 0 else ["lm"]
        apply_trainable(model, parts, frozen_lm_layers=n)
        model.train()
        mod = _loss_module_cls()(model)
        if cached:
            mod.layer_cache = LayerInputCache(model, n)
        modules[name] = mod
        optims[name] = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True
        )
    n_img = num_image_tokens(processor)
    batches, pixels = packed_batches(model.config, n_img, args)
    idx = list(range(args.batch))

    def step(name: str, batch, k: int) -> float:
        input_ids, labels, segs, pos = batch
        mod = modules[name]
        if mod.layer_cache is not None:
            # Every timed step is a later visit: fill the cache with this batch first (untimed),
            # as the first epoch does.
            mod.layer_cache.states.clear()
            with torch.no_grad(), mod.layer_cache.capture():
                mod.llava.model(
                    input_ids=input_ids,
                    attention_mask=(segs >= 0).long(),
                    pixel_values=pixels,
                    use_cache=False,
                )
            mod.layer_cache.store(idx, (segs >= 0).sum(1).tolist())
        return train_step(mod, optims[name], batch, pixels, bf16=precision == "bf16", idx=idx)[0]

    times: dict[str, list[float]] = {name: [] for name in variants}
    for name in variants:
        step(name, batches[0], 0)  # warm-up
    names = list(variants)
    for k, batch in enumerate(batches[1:]):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            times[name].append(step(name, batch, k))
        print(f"step {k + 1}/{args.steps}", file=sys.stderr)

    tokens = statistics.mean(int((b[2] >= 0).sum()) for b in batches[1:])
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med["projector + LM"]
    print(
        f"\nmodel: SmolLM2 cut to {args.lm_layers} layers + {args.vision} tower ({n_img} image "
        f"tokens), {args.attn} attention, {precision}; batch {args.batch} packed samples, "
        f"{tokens:.0f} real tokens per step; {args.steps} steps each (medians)\n"
    )
    rows = []
    for name in names:
        rows.append([name, f"{med[name]:.3f}", f"{base / med[name]:.2f}x"])
    print_table(["variant", "s / step", "speed-up"], rows)
    e = args.epochs
    print(f"\n{e:g} epochs (first uncached, the rest cached), relative to the baseline:")
    print_table(
        ["frozen layers", "run time", "speed-up"],
        [
            [
                n,
                f"{(med[f'frozen {n}'] + (e - 1) * med[f'frozen {n}, cached']) / (e * base):.2f}",
                f"{e * base / (med[f'frozen {n}'] + (e - 1) * med[f'frozen {n}, cached']):.2f}x",
            ]
            for n in args.frozen
        ],
    )
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "frozen_layers")
