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

With ``--curriculum QS_DIR`` each tower instead goes through a finished quickstart's own stages,
in order and with their resolved configs (``QS_DIR/{stage1,stage2,finetune}/config.yaml``): stage-1
alignment, stage-2 instruction tuning, then VQA fine-tuning, each phase starting from the previous
phase's checkpoint. Only the tower differs (``model.init.vision`` of stage 1); it stays frozen
throughout, as in the quickstart. The curve is scored in every phase and CPU minutes accumulate
across phases, so the stage-1/2 part of the curve is there too.

    .venv/bin/python benchmarks/stage0_curves.py --world OUT/world --curriculum OUT \
        --tower random=cpu --tower stage0=OUT/stage0/vision_tower \
        --tower stage0b=OUT/stage0b/vision_tower --eval-every 30 --out /tmp/curves-curriculum
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def run_tower(name: str, vision: str, args) -> list[dict]:
    from llavamed.data.vqa import load_vqa
    from llavamed.eval.closed_logits import closed_accuracy, prepare_closed
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
            # bf16 where the CPU computes it, fp32 where bf16 is emulated (AVX2-only CPUs).
            "precision": "auto",
            # As the quickstart: eager runs the packed samples' 4-D mask faster than CPU sdpa.
            "attn_implementation": "eager",
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


CURRICULUM = ("stage1", "stage2", "finetune")


def run_curriculum(name: str, vision: str, args) -> list[dict]:
    """The quickstart's stages 1, 2 and fine-tuning on ``vision``, scored along the way."""
    import yaml

    from llavamed.data.vqa import load_vqa
    from llavamed.eval.closed_logits import closed_accuracy, prepare_closed
    from llavamed.train import run_training

    qs = Path(args.curriculum)
    test, _ = load_vqa("slake", Path(args.world) / "slake", split="test", lang="en")
    points: list[dict] = []
    state = {"eval_cpu": 0.0, "data": None, "last": None, "scored": -1}
    cpu0 = time.process_time()

    def score(phase, step, model, processor):
        t = time.process_time()
        train_cpu_min = (t - cpu0 - state["eval_cpu"]) / 60
        if state["data"] is None:
            state["data"] = prepare_closed(test, processor, limit=args.limit)
        acc = closed_accuracy(model, processor, state["data"])
        state["eval_cpu"] += time.process_time() - t
        state["scored"] = step
        points.append(
            {"phase": phase, "step": step, "cpu_min": round(train_cpu_min, 2), "closed_acc": acc}
        )
        print(
            f"[{name}] {phase} step {step}: {train_cpu_min:.1f} CPU-min, acc {acc:.3f}", flush=True
        )
        return acc

    previous = None
    for phase in CURRICULUM:
        cfg = yaml.safe_load((qs / phase / "config.yaml").read_text())
        if previous is None:
            cfg["model"]["init"]["vision"] = vision
        else:
            cfg["model"]["from"] = str(previous)
        cfg["output"]["dir"] = str(Path(args.out) / name / phase)
        cfg["output"]["save_every"] = 0
        if phase == "finetune" and args.finetune_steps:
            # The schedule then decays over these steps, not over the quickstart's epochs.
            cfg["train"].pop("epochs", None)
            cfg["train"]["max_steps"] = args.finetune_steps
        state["scored"] = -1

        def on_step(step, model, processor, phase=phase):
            state["last"] = (step, model, processor)
            if step % args.eval_every == 0:
                return {"curve_closed_acc": score(phase, step, model, processor)}
            return None

        run_training(cfg, progress=not args.quiet, on_step=on_step)
        step, model, processor = state["last"]
        if state["scored"] != step:  # every phase's last step is on the curve
            score(phase, step, model, processor)
        state["last"] = None
        previous = Path(cfg["output"]["dir"]) / "checkpoint-final"
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
    ap.add_argument(
        "--curriculum",
        metavar="QS_DIR",
        default=None,
        help="a finished quickstart's output folder: run its stage 1, stage 2 and fine-tuning "
        "configs on each tower instead of the single VQA stage",
    )
    ap.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        metavar="N",
        help="with --curriculum: stop fine-tuning after N steps, its schedule decaying over them "
        "(default: the quickstart's epochs)",
    )
    ap.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="LABEL=CURVES_JSON:NAME",
        help="also plot and tabulate curve NAME of an earlier run's curves.json as LABEL, without "
        "training it again (only meaningful for a run with the same world and settings); repeat",
    )
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if min(args.steps, args.eval_every, args.lm_layers) < 1 or args.limit < 1:
        # --eval-every 0 died in a ZeroDivisionError at the first step, after the model's set-up
        ap.error("--steps, --eval-every, --limit and --lm-layers must be >= 1")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        ap.error("--finetune-steps must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for spec in args.include:
        label, _, ref = spec.partition("=")
        path, _, name = ref.rpartition(":")
        earlier = json.loads(Path(path).read_text()) if path else {}
        if name not in earlier:
            sys.exit(f"--include {spec!r}: no curve {name!r} in {path or '(no file)'}")
        curves[label] = earlier[name]
    for spec in args.tower:
        name, _, vision = spec.partition("=")
        if not vision:
            sys.exit(f"--tower {spec!r}: expected NAME=VISION")
        run = run_curriculum if args.curriculum else run_tower
        curves[name] = run(name, vision, args)
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

    phases = list(dict.fromkeys(p.get("phase", "") for pts in curves.values() for p in pts))
    keys = [
        (ph, st)
        for ph in phases
        for st in sorted(
            {p["step"] for pts in curves.values() for p in pts if p.get("phase", "") == ph}
        )
    ]
    print("| phase | step | " + " | ".join(f"{n} CPU-min | {n} acc" for n in curves) + " |")
    print("|---|---|" + "---|---|" * len(curves))
    for ph, st in keys:
        cells = []
        for pts in curves.values():
            p = next((q for q in pts if q.get("phase", "") == ph and q["step"] == st), None)
            cells += [f"{p['cpu_min']:.1f}", f"{p['closed_acc']:.3f}"] if p else ["", ""]
        print(f"| {ph or '-'} | {st} | " + " | ".join(cells) + " |")
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "stage0_curves")
