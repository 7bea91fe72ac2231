"""AdamW step of the quickstart's fine-tuning parameters: the trainer's fused kernel against
torch's default (per-parameter, one op per update term), same parameters, same gradients.

    python benchmarks/optimizer_step.py                 # embedded SmolLM2 cut to 8 layers
    python benchmarks/optimizer_step.py --lm-layers 30  # the whole LM

Fine-tuning trains the projector and the LM, tied 28M-entry embedding included, so on a CPU the
optimizer step is a fixed cost per step next to a few seconds of forward and backward. Both
optimizers get identical copies of the parameters and the same random gradients and step in
turn, which goes first alternating per step (so machine noise hits both alike). Printed: median
milliseconds per step, the speed-up over torch's default (its time / this time: above 1, faster),
and the largest weight difference between the two after all steps (float rounding only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--vision", default="cpu-p32")
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    if args.steps < 1:  # before building the model; an empty median was a traceback after it
        ap.error("--steps must be >= 1")

    import statistics

    import torch

    from llavamed.model import ModelSpec, build
    from llavamed.train.freeze import apply_trainable
    from llavamed.train.trainer import _fused_adamw

    model, _ = build(ModelSpec(lm="embedded", vision=args.vision, lm_layers=args.lm_layers))
    apply_trainable(model, ["projector", "lm"])
    ours = [p for p in model.parameters() if p.requires_grad]
    base = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    n = sum(p.numel() for p in ours)
    fused = _fused_adamw("single", ours)
    opt = {
        "ours (fused)": torch.optim.AdamW(ours, lr=1e-3, fused=fused),
        "torch default": torch.optim.AdamW(base, lr=1e-3),
    }
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in opt}
    for step in range(args.steps + 2):
        grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in ours]
        for p, q, g in zip(ours, base, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        order = list(opt) if step % 2 == 0 else list(opt)[::-1]
        for name in order:
            o = opt[name]
            t = time.perf_counter()
            o.step()
            if step >= 2:  # the first steps allocate the moment buffers
                times[name].append(time.perf_counter() - t)
    diff = max(
        float((p.detach() - q.detach()).abs().max()) for p, q in zip(ours, base, strict=True)
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{n / 1e6:.1f}M trainable parameters, {args.steps} steps, {torch.get_num_threads()} threads"
    )
    print_table(
        ["optimizer", "median ms/step", "speed-up vs default (default time / this time)"],
        [[k, f"{v * 1e3:.1f}", f"{med['torch default'] / v:.2f}x"] for k, v in med.items()],
    )
    print(f"largest weight difference after {args.steps + 2} steps: {diff:.2e}")


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "optimizer_step")
