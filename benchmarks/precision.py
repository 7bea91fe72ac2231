"""bf16 autocast against fp32 on this CPU, and what ``precision: auto`` picks.

    python benchmarks/precision.py

Why: bf16 is the fast path only on CPUs that compute it in hardware (AVX512-BF16, AMX); on an
AVX2-only CPU PyTorch emulates it and it is many times slower than fp32. Every CPU recipe
defaults to ``precision: auto`` (``llavamed.utils.precision``), which decides from the CPU's
flags; this script measures both paths side by side in one process so the choice can be checked
on any machine. Rows: a dense matmul, and forward + backward of an 8-layer transformer of about
the width of the quickstart's LM (a proxy: ``nn.TransformerEncoderLayer`` with width 576, a ReLU
MLP of 1536 and 9 heads; SmolLM2 has a SwiGLU MLP, grouped K/V and a 49,152-word head) on
2 x 256 tokens. Printed: median seconds of each, bf16 time / fp32 time (a time ratio: above 1,
bf16 is slower; ``model_step.py`` prints the inverse, fp32 time / bf16 time, as "bf16 speed-up")
and the choice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_time, print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    if args.repeats < 1 or args.tokens < 1:
        ap.error("--repeats and --tokens must be >= 1")

    import torch

    from llavamed.utils.precision import cpu_has_fast_bf16, resolve_precision

    torch.manual_seed(0)
    a = torch.randn(1024, 1024)

    def matmul(dtype):
        x = a.to(dtype)
        return lambda: x @ x

    layer = torch.nn.TransformerEncoderLayer(576, 9, 1536, batch_first=True, norm_first=True)
    lm = torch.nn.TransformerEncoder(layer, 8, enable_nested_tensor=False)
    x = torch.randn(2, args.tokens, 576)

    def step(bf16: bool):
        def run():
            lm.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = lm(x)
            out.float().square().mean().backward()

        return run

    rows = []
    for name, fp32, bf16 in (
        ("matmul 1024x1024", matmul(torch.float32), matmul(torch.bfloat16)),
        (f"8-layer proxy transformer fwd+bwd, 2x{args.tokens} tokens", step(False), step(True)),
    ):
        t32 = median_time(fp32, args.repeats)
        t16 = median_time(bf16, args.repeats)
        rows.append([name, f"{t32:.4f}", f"{t16:.4f}", f"{t16 / t32:.2f}x"])
    print_table(["workload", "fp32 s", "bf16 s", "bf16 time / fp32 time (>1: bf16 slower)"], rows)
    print(f"medians of {args.repeats} repeat(s)")
    print(
        f"\nCPU computes bf16 natively: {cpu_has_fast_bf16()}; "
        f"precision: auto -> {resolve_precision('auto', 'cpu')}"
    )


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "precision")
