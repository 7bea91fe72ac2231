"""``llavamed train CONFIG.yaml [key=value ...]``: one command for every training stage."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a stage (vision pretraining, alignment, instruction tuning, VQA fine-tuning) from a YAML config",
        description=(
            "Run the training stage a YAML config describes. The config's `stage:` decides what "
            "trains: vision (stage-0 contrastive pretraining), vision_vqa (stage-0b: the tower "
            "learns the yes/no questions of a VQA train split directly), align (projector), instruct "
            "(projector + LM), finetune (VQA). Dotted key=value overrides change any field, e.g. "
            "train.lr=1e-4 output.dir=runs/x data.sources.0.max_samples=100. Re-running the same "
            "command resumes from the newest checkpoint in output.dir; a finished run returns at "
            "once. Multi-process: `torchrun --nproc_per_node N -m llavamed train CONFIG ...` "
            "(see docs/training.md). Outputs: OUT/checkpoint-final/ (native llava), "
            "OUT/config.yaml, OUT/metrics.jsonl, OUT/loss.png, OUT/data_report.json."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config (configs/cpu/*.yaml, configs/llava_med/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults + overrides) and exit",
    )
    p.add_argument(
        "--list-keys",
        action="store_true",
        help="list every config key with its default and meaning, then exit",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    from llavamed.config import apply_overrides, describe, dump_yaml, load_config, load_raw
    from llavamed.errors import ConfigError

    if args.list_keys:
        for key, default, doc in describe():
            print(f"{key:34s} {default:>12s}  {doc}" if default else f"{key}:")
        return 0
    raw = load_raw(args.config)
    stage = apply_overrides(raw, args.overrides).get("stage")
    if stage == "vision":
        try:
            mod = importlib.import_module("llavamed.train.vision_pretrain")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("llavamed.train.vision_pretrain"):
                raise ConfigError(
                    "stage: vision needs llavamed.train.vision_pretrain (not installed in this build)"
                ) from exc
            raise
        res = mod.run_from_config(raw, list(args.overrides))
        if res is not None:
            print(f"wrote {getattr(res, 'final_checkpoint', res)}")
        return 0
    if stage == "vision_vqa":
        from llavamed.train.vision_vqa import run_from_config

        res = run_from_config(raw, list(args.overrides), progress=not args.no_progress)
        print(f"wrote {res.tower_dir}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    import os

    from llavamed.train import run_training

    res = run_training(cfg, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {res.final_checkpoint}")
    return 0
