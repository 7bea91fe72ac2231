"""Forward+backward throughput of the embedded LLaVA (SmolLM2-135M + CPU ViT), fp32 vs bf16
autocast, at realistic lengths (64 image tokens + 64..256 text tokens), with achieved FLOP/s as
a fraction of this machine's matmul peak measured in the same run.

    .venv/bin/python benchmarks/model_step.py [--batch 4] [--repeats 3] [--lm-layers N]

"bf16 speed-up" is fp32 time / bf16 time (a throughput ratio: above 1, bf16 is faster). The bf16
matmul peak is measured only where the CPU computes bf16 natively (AVX512-BF16, AMX, Arm bf16;
``llavamed.utils.precision.cpu_has_fast_bf16``): elsewhere PyTorch emulates bf16, the 2048^3
peak matmuls alone take minutes and their rate is no ceiling (autocast keeps some work in fp32,
so the model "beat" it several times over), so the bf16 share of peak is left out
(``--bf16-peak`` measures it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import matmul_peak_flops, median_time, of_peak, print_table  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each measurement")
    ap.add_argument(
        "--lm-layers", type=int, default=None, help="cut the LM (default: all 30 layers)"
    )
    ap.add_argument("--text-lengths", default="64,128,256")
    ap.add_argument(
        "--bf16-peak",
        action="store_true",
        help="measure the bf16 matmul peak even where the CPU only emulates bf16 (minutes)",
    )
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.text_lengths.split(",")]
    except ValueError:
        ap.error(f"--text-lengths {args.text_lengths!r}: comma-separated integers")
    if args.repeats < 1 or args.batch < 1 or min(lengths) < 1 or args.warmup < 0:
        ap.error("--repeats, --batch and every --text-lengths value must be >= 1, --warmup >= 0")

    import torch

    from llavamed.model import ModelSpec, build
    from llavamed.utils.precision import cpu_has_fast_bf16

    native = cpu_has_fast_bf16()

    model, _ = build(ModelSpec(lm="embedded", vision="cpu", lm_layers=args.lm_layers))
    model.train()
    image_id = model.config.image_token_id
    n_img = model.config.image_seq_length
    size = model.config.vision_config.image_size
    peak32 = matmul_peak_flops(torch.float32)
    peak16 = matmul_peak_flops(torch.bfloat16) if native or args.bf16_peak else None
    rows = []
    for n_text in lengths:
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

            result[name] = median_time(step, args.repeats, args.warmup)
        rows.append(
            [
                f"{n_img}+{n_text}",
                f"{tokens / result['fp32']:.0f}",
                f"{tokens / result['bf16']:.0f}",
                f"{result['fp32'] / result['bf16']:.2f}x",
                f"{flops / result['fp32'] / 1e9:.1f} ({of_peak(flops / result['fp32'], peak32)})",
                f"{flops / result['bf16'] / 1e9:.1f} ({of_peak(flops / result['bf16'], peak16)})",
            ]
        )
    bf16_note = (
        f"bf16 {peak16 / 1e9:.1f} GFLOP/s"
        if peak16 is not None
        else "bf16 not measured (this CPU emulates bf16: no AVX512-BF16/AMX; --bf16-peak forces it)"
    )
    print(
        f"embedded LLaVA, batch {args.batch}, LM layers {model.config.text_config.num_hidden_layers}; "
        f"bf16 {'native' if native else 'EMULATED by PyTorch'} on this CPU; medians of "
        f"{args.repeats}; matmul peak (best of 7) fp32 {peak32 / 1e9:.1f} GFLOP/s, {bf16_note}"
    )
    print_table(
        [
            "tokens (img+text)",
            "fp32 tok/s",
            "bf16 tok/s",
            "bf16 speed-up (fp32 time / bf16 time)",
            "fp32 GFLOP/s (of peak)",
            "bf16 GFLOP/s (of peak)" if native else "bf16 GFLOP/s, emulated (of peak)",
        ],
        rows,
    )
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "model_step")
