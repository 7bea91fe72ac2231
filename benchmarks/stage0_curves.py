"""Closed-question accuracy against CPU minutes: the same LLaVA recipe on different vision towers.

    .venv/bin/python benchmarks/stage0_curves.py --world OUT/world \\
        --tower random=cpu --tower stage0=OUT/stage0/vision_tower \\
        --tower stage0b=OUT/stage0b/vision_tower --steps 90 --eval-every 15 --out /tmp/curves

For each tower a LLaVA is composed (embedded SmolLM2 cut to --lm-layers, the tower, a fresh
projector) and trained on the world's VQA train splits (SLAKE + VQA-RAD, questions grouped per
image) with the real trainer; every --eval-every steps an ``on_step`` hook scores the SLAKE test
split's English yes/no questions by next-token logits (``llavamed.eval.closed_logits``) and
records the process CPU time spent training so far (evaluation excluded). A random preset tower
trains with the rest (it has nothing to keep); a folder tower is frozen, as the quickstart does.
Writes curves.json and curves.png, prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run_tower(name: str, vision: str, args) -> list[dict]:
    from llavamed.eval.closed_logits import closed_accuracy, prepare_closed
    from llavamed.eval.vqa_data import load_vqa
    from llavamed.model.compose import VISION_PRESETS
    from llavamed.train import run_training

    world = Path(args.world)
    test, _ = load_vqa("slake", world / "slake", split="test", lang="en")
    random_tower = vision in VISION_PRESETS
    cfg = {
        "stage": "finetune",
        "model": {
            "init": {
                "lm": "embedded",
                "lm_layers": args.lm_layers,
                "vision": vision,
                "template": "chatml",
                "seed": 0,
            }
        },
        "data": {
            "sources": [
                {
                    "format": "vqa",
                    "dataset": ds,
                    "path": str(world / folder),
                    "split": "train",
                    "group_by_image": True,
                }
                for ds, folder in (("slake", "slake"), ("vqa-rad", "vqa_rad"))
            ],
            "max_length": 320,
            "batching": args.batching,
        },
        "train": {
            "trainable": ["projector", "lm"] + (["vision"] if random_tower else []),
            "max_steps": args.steps,
            "global_batch_size": 16,
            "micro_batch_size": 16,
            "lr": args.lr,
            "lr_projector": args.lr_projector,
            "warmup_ratio": 0.03,
            "precision": "bf16",
            "seed": 0,
        },
        "output": {"dir": str(Path(args.out) / name), "save_every": 0},
    }
    points: list[dict] = []
    state = {"eval_cpu": 0.0, "data": None}
    cpu0 = time.process_time()

    def on_step(step, model, processor):
        if step % args.eval_every and step != args.steps:
            return None
        t = time.process_time()
        train_cpu_min = (
            t - cpu0 - state["eval_cpu"]
        ) / 60  # since the run started, model build included
        if state["data"] is None:
            state["data"] = prepare_closed(test, processor, limit=args.limit)
        acc = closed_accuracy(model, processor, state["data"])
        state["eval_cpu"] += time.process_time() - t
        points.append({"step": step, "cpu_min": round(train_cpu_min, 2), "closed_acc": acc})
        print(
            f"[{name}] step {step}: {train_cpu_min:.1f} CPU-min, closed acc {acc:.3f}", flush=True
        )
        return {"curve_closed_acc": acc}

    run_training(cfg, progress=not args.quiet, on_step=on_step)
    return points


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--world", required=True, help="a MedSynth world (llavamed synth --out)")
    ap.add_argument(
        "--tower",
        action="append",
        required=True,
        metavar="NAME=VISION",
        help="a vision preset (random) or tower folder; repeat",
    )
    ap.add_argument("--out", default="/tmp/llavamed-stage0-curves")
    ap.add_argument("--steps", type=int, default=90)
    ap.add_argument("--eval-every", type=int, default=15)
    ap.add_argument("--limit", type=int, default=300, help="yes/no test questions scored")
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr-projector", type=float, default=2e-3)
    ap.add_argument("--batching", default="random", choices=["random", "length_grouped"])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for spec in args.tower:
        name, _, vision = spec.partition("=")
        if not vision:
            sys.exit(f"--tower {spec!r}: expected NAME=VISION")
        curves[name] = run_tower(name, vision, args)
    (out / "curves.json").write_text(json.dumps(curves, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([p["cpu_min"] for p in pts], [p["closed_acc"] for p in pts], marker="o", label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("training CPU minutes (evaluation excluded)")
    ax.set_ylabel("closed accuracy (yes/no logits, SLAKE test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)

    steps = sorted({p["step"] for pts in curves.values() for p in pts})
    print("| step | " + " | ".join(f"{n} CPU-min | {n} acc" for n in curves) + " |")
    print("|---|" + "---|---|" * len(curves))
    for s in steps:
        cells = []
        for pts in curves.values():
            p = next((q for q in pts if q["step"] == s), None)
            cells += [f"{p['cpu_min']:.1f}", f"{p['closed_acc']:.3f}"] if p else ["", ""]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
