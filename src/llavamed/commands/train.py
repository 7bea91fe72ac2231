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
            "once (refused if the model.from weights it started from changed since). Multi-process: `torchrun --nproc_per_node N -m llavamed train CONFIG ...` "
            "(see docs/training.md). Outputs of align/instruct/finetune: OUT/checkpoint-final/ "
            "(native llava), OUT/config.yaml, OUT/metrics.jsonl, OUT/loss.png, "
            "OUT/data_report.json; of vision: OUT/vision_tower/, OUT/stage0_report.json/.md, "
            "OUT/stage0_log.jsonl, OUT/stage0_config.yaml; of vision_vqa: OUT/vision_tower/, "
            "OUT/vision_vqa_report.json/.md. OUT is output.dir (output_dir for the vision "
            "stages, whose keys are flat: lr=..., output_dir=...)."
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


def _tower_stage(stage: str | None):
    """(config class, make_config, to-plain-dict, run_from_config) for the stages that train the
    vision tower alone, whose configs are flat and have keys of their own; None for the LLaVA
    stages (align, instruct, finetune)."""
    from dataclasses import asdict

    if stage == "vision":
        from llavamed.train import vision_pretrain as m

        return m.VisionPretrainConfig, m.make_config, m.config_dict, m.run_from_config
    if stage == "vision_vqa":
        from llavamed.train import vision_vqa as m

        return m.VisionVQAConfig, m.make_config, asdict, m.run_from_config
    return None


def run(args) -> int:
    import yaml

    from llavamed.config import apply_overrides, describe, dump_yaml, load_config, load_raw

    raw = load_raw(args.config)
    tower = _tower_stage(apply_overrides(raw, args.overrides).get("stage"))
    if args.list_keys:
        for key, default, doc in describe(tower[0]) if tower else describe():
            print(f"{key:34s} {default:>12s}  {doc}" if default else f"{key}:")
        return 0
    if tower:
        _, make_config, plain, run_from_config = tower
        conf = make_config(raw, list(args.overrides))  # validates before anything is written
        if args.print_config:
            print(yaml.safe_dump(plain(conf), sort_keys=False), end="")
            return 0
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
