"""How close a finished training run came to this machine's matmul peak, and the fewest seconds
its steps could take here.

    .venv/bin/python benchmarks/finetune_bound.py quickstart_out/finetune

Reads the run's ``config.yaml`` and ``metrics.jsonl`` (real tokens, supervised tokens and seconds
of every step) and counts the matmul FLOPs those steps needed: forward, activation gradients and
weight gradients of the LM's decoder layers for every real token, and the output head for every
supervised token. Attention scores, norms, the frozen vision tower and the optimizer are left
out, so the count is a floor. Against it: this machine's dense fp32/bf16 matmul peak, measured in
the same process (``_common.matmul_peak_flops``). Printed: the logged seconds, the achieved
FLOP/s and its share of the peak, and the floor (the counted FLOPs at the peak). Run it on the
machine that trained, while it is idle.

Why: a wall-time target is a FLOP budget. If a recipe's steps already run near the peak, only a
recipe with fewer FLOPs (fewer tokens, layers or epochs) can be faster on this CPU, and the floor
says by how much it would have to shrink.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import matmul_peak_flops, print_table  # noqa: E402


def layer_matmul_params(text_config) -> tuple[int, int]:
    """(matmul parameters of one decoder layer, hidden x vocab of the output head), counted on a
    model built on the meta device: 2-D weights only (norms and biases are not matmuls)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        lm = AutoModel.from_config(text_config)
    layer = sum(p.numel() for p in lm.layers[0].parameters() if p.dim() == 2)
    return layer, text_config.hidden_size * text_config.vocab_size


def step_flops(
    parts: set[str],
    frozen_lm_layers: int,
    layer: int,
    head: int,
    n_layers: int,
    tokens: int,
    supervised: int,
) -> float:
    """Matmul FLOPs of one optimizer step of plain forward + backward (2 per multiply-add) when
    ``parts`` train, the LM's embeddings and first ``frozen_lm_layers`` layers excepted."""
    lm_trains = "lm" in parts
    frozen = frozen_lm_layers if lm_trains else n_layers
    # Activation gradients flow down to the lowest trained parameter.
    lowest = 0 if parts & {"projector", "vision"} else frozen
    per_token = 2 * layer * (n_layers + (n_layers - lowest) + (n_layers - frozen))
    # The head (tied to the embeddings) gets a weight gradient unless the embeddings are frozen.
    per_supervised = 2 * head * (2 + (lm_trains and not frozen_lm_layers))
    return per_token * tokens + per_supervised * supervised


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path, help="a `llavamed train` output folder")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoConfig

    from llavamed.config import load_config
    from llavamed.errors import ConfigError, InputError, first_line
    from llavamed.utils.precision import cpu_has_fast_bf16

    # A folder that is not a finished run (a typo, a run still training, a checkpoint folder)
    # is one line naming what is missing, before the matmul peak's seconds are spent.
    needed = ("config.yaml", "metrics.jsonl", "checkpoint-final/config.json")
    missing = [n for n in needed if not (args.run / n).is_file()]
    if missing:
        raise InputError(
            args.run, "not a finished `llavamed train` output folder", f"no {', '.join(missing)}"
        )
    cfg = load_config(args.run / "config.yaml")
    t = cfg.train
    if t.lora is not None:
        raise ConfigError(
            f"{args.run}: a LoRA run has no LM weight gradients; this counts full fine-tuning"
        )
    if t.gradient_checkpointing:  # a floor still, but the share of the peak is understated
        print("note: gradient checkpointing recomputes each forward; it is not counted")
    if t.cache_frozen_layers and not t.freeze_from_epoch:
        raise ConfigError(
            f"{args.run}: steps from kept states skip layers; this counts plain forward + backward"
        )
    ckpt = args.run / "checkpoint-final"
    try:
        text_config = AutoConfig.from_pretrained(ckpt).text_config
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(ckpt, "not a llava checkpoint", first_line(exc)) from None
    layer, head = layer_matmul_params(text_config)
    n_layers = text_config.num_hidden_layers
    steps = [json.loads(line) for line in (args.run / "metrics.jsonl").open()]
    if not steps or len(steps) < steps[-1]["step"]:
        raise ConfigError(f"{args.run}/metrics.jsonl: log_every must be 1 to count every step")
    frozen = t.frozen_lm_layers
    if t.freeze_from_epoch:
        # Only the epochs before the freeze are plain steps of every configured part.
        steps = [s for s in steps if s["epoch"] <= t.freeze_from_epoch]
        frozen = 0
        print(f"counting the {len(steps)} steps before train.freeze_from_epoch")
    parts = set(cfg.trainable_parts())
    flops = sum(
        step_flops(parts, frozen, layer, head, n_layers, s["tokens"], s["supervised_tokens"])
        for s in steps
    )
    seconds = sum(s["step_time_s"] for s in steps)
    tokens = sum(s["tokens"] for s in steps)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    # The peak is measured here. An emulated bf16 peak (~100x under fp32 on AVX2) would put any
    # run "near the peak", so a bf16 run gets no share or floor on a CPU that emulates bf16.
    peak = None if dtype == torch.bfloat16 and not cpu_has_fast_bf16() else matmul_peak_flops(dtype)
    print(
        f"{args.run}: {len(steps)} steps, {tokens:,} real tokens, {n_layers} decoder layers of "
        f"{layer / 1e6:.2f}M matmul parameters, {cfg.train.precision}, "
        f"{torch.get_num_threads()} threads; {flops / 1e12:.1f} TFLOP counted"
    )
    rows = [
        [
            "logged steps",
            f"{seconds:.0f}",
            f"{tokens / seconds:.0f}",
            f"{flops / seconds / 1e9:.1f}",
            # Two significant digits, not two decimals: a small run against a large (AMX bf16)
            # peak read "0.00", as if it had done no work.
            "n/a" if peak is None else f"{flops / seconds / peak:.2g}",
        ]
    ]
    if peak is not None:
        rows.append(
            [
                "floor: counted FLOPs at the peak",
                f"{flops / peak:.0f}",
                f"{tokens * peak / flops:.0f}",
                f"{peak / 1e9:.1f}",
                "1.00",
            ]
        )
    print_table(["", "seconds", "tokens/s", "GFLOP/s", "of the matmul peak"], rows)
    if peak is None:
        print(
            "bf16 peak not measured: this CPU has no AVX512-BF16 or AMX, so its bf16 matmuls are "
            "emulated; run this on the machine that trained the run for the share and the floor"
        )
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "finetune_bound")
