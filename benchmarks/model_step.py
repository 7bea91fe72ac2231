"""Forward+backward throughput of the embedded LLaVA (SmolLM2-135M + CPU ViT), fp32 vs bf16
autocast, at realistic lengths (64 image tokens + 64..256 text tokens), with achieved FLOP/s as
a fraction of this machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/model_step.py [--batch 4] [--repeats 3] [--lm-layers N]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import matmul_peak_flops, median_time, print_table  # noqa: E402


def train_flops_per_step(model, n_text: int, batch: int) -> float:
    """6 × (matmul parameters) × tokens for forward+backward, plus attention scores.

    Embedding lookups are not matmuls and are excluded; the (tied) LM head is a matmul over every
    position and is included; the vision tower runs over its patches (+CLS)."""
    cfg = model.config
    lm = model.model.language_model
    lm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    head = cfg.text_config.hidden_size * cfg.text_config.vocab_size
    vt = model.model.vision_tower
    v_params = sum(p.numel() for n, p in vt.named_parameters() if "embedding" not in n)
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    n_img = cfg.image_seq_length
    seq = n_img + n_text
    patches = n_img + 1
    flops = 6 * batch * (seq * (lm_params + head) + patches * v_params + n_img * proj)
    # Attention QK^T and AV: 2 matmuls × 2 FLOP × seq² × hidden per layer, ×3 for fwd+bwd.
    t = cfg.text_config
    flops += 3 * batch * 4 * seq * seq * t.num_attention_heads * t.head_dim * t.num_hidden_layers
    return float(flops)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--lm-layers", type=int, default=None, help="cut the LM (default: all 30 layers)"
    )
    ap.add_argument("--text-lengths", default="64,128,256")
    args = ap.parse_args()

    import torch

    from llavamed.model import ModelSpec, build

    model, _ = build(ModelSpec(lm="embedded", vision="cpu", lm_layers=args.lm_layers))
    model.train()
    image_id = model.config.image_token_id
    n_img = model.config.image_seq_length
    size = model.config.vision_config.image_size
    peak32 = matmul_peak_flops(torch.float32)
    peak16 = matmul_peak_flops(torch.bfloat16)
    rows = []
    for n_text in [int(x) for x in args.text_lengths.split(",")]:
        g = torch.Generator().manual_seed(0)
        text = torch.randint(10, 40000, (args.batch, n_text), generator=g)
        ids = torch.cat([torch.full((args.batch, n_img), image_id), text], dim=1)
        labels = ids.clone()
        labels[:, :n_img] = -100
        pixels = torch.randn(args.batch, 3, size, size, generator=g)
        flops = train_flops_per_step(model, n_text, args.batch)
        tokens = args.batch * (n_img + n_text)
        result = {}
        for name, ctx in (
            ("fp32", contextlib.nullcontext),
            ("bf16", lambda: torch.autocast("cpu", torch.bfloat16)),
        ):

            def step(ctx=ctx, ids=ids, pixels=pixels, labels=labels):
                with ctx():
                    loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            result[name] = median_time(step, args.repeats)
        rows.append(
            [
                f"{n_img}+{n_text}",
                f"{tokens / result['fp32']:.0f}",
                f"{tokens / result['bf16']:.0f}",
                f"{result['fp32'] / result['bf16']:.2f}x",
                f"{flops / result['fp32'] / 1e9:.0f} ({flops / result['fp32'] / peak32:.0%})",
                f"{flops / result['bf16'] / 1e9:.0f} ({flops / result['bf16'] / peak16:.0%})",
            ]
        )
    print(
        f"embedded LLaVA, batch {args.batch}, LM layers {model.config.text_config.num_hidden_layers}; "
        f"matmul peak fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s (best of 7)"
    )
    print_table(
        [
            "tokens (img+text)",
            "fp32 tok/s",
            "bf16 tok/s",
            "bf16/fp32",
            "fp32 GFLOP/s (of peak)",
            "bf16 GFLOP/s (of peak)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
