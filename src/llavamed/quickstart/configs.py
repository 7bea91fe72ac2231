"""Every training stage's config for a preset, reading the quickstart's folder layout."""

from __future__ import annotations

from pathlib import Path

from llavamed.quickstart.presets import STAGE0B_ASPECT, SizePreset


def training_configs(
    p: SizePreset, out: Path, seed: int, given_tower: Path | None = None
) -> dict[str, dict]:
    """Every training stage's config (stage0, stage0b, stage1, stage2, finetune) for preset ``p``,
    reading the quickstart's folder layout under ``out``. ``configs/cpu/`` holds the ``small``
    preset's with ``out = runs/cpu`` (a test keeps them equal)."""
    corpus, world = out / "corpus", out / "world"
    pairs = out / "stage0_pairs" / "figures.jsonl"
    stage0_cfg = {
        "stage": "vision",
        "data": str(pairs if p.stage0_pairs else corpus / "figures.jsonl"),
        "output_dir": str(out / "stage0"),
        "vision": p.vision,
        "feature_layer": -2,
        # A fixed step count (so the schedule decays) with the time budget as a safety cap.
        "epochs": 1,
        "max_steps": p.stage0_steps,
        "time_budget_min": p.stage0_minutes,
        "batch_size": p.stage0_batch,
        "lr": 1e-3,
        "precision": "auto",
        "probe_images_per_domain": p.probe_images,
        "seed": seed,
    }
    stage0_tower = given_tower or out / "stage0" / "vision_tower"
    stage0b_cfg = {
        "stage": "vision_vqa",
        "sources": [
            {"dataset": "slake", "path": str(world / "slake"), "split": "train"},
            {"dataset": "vqa-rad", "path": str(world / "vqa_rad"), "split": "train"},
        ],
        "vision": str(stage0_tower),
        "output_dir": str(out / "stage0b"),
        "feature_layer": -2,
        "aspect": STAGE0B_ASPECT,
        "steps": p.stage0b_steps,
        "precision": "auto",
        "seed": seed,
    }
    tower = out / "stage0b" / "vision_tower" if p.stage0b_steps else stage0_tower
    common_train = {
        "precision": "auto",
        "global_batch_size": p.batch,
        "micro_batch_size": p.batch,
        "warmup_ratio": 0.03,
        "seed": seed,
    }
    stage1_cfg = {
        "stage": "align",
        "model": {
            "init": {
                "lm": "embedded",
                "lm_layers": p.lm_layers,
                "vision": str(tower),
                "template": "chatml",
                "seed": seed,
            }
        },
        "data": {"format": "llava_json", "path": str(corpus / "alignment.json"), "max_length": 256},
        "train": {
            **common_train,
            "trainable": ["projector"],
            "max_steps": p.stage1_steps,
            "lr": p.lr_stage1,
        },
        "output": {"dir": str(out / "stage1"), "save_every": 20},
    }
    stage2_cfg = {
        "stage": "instruct",
        "model": {"from": str(out / "stage1" / "checkpoint-final")},
        "data": {
            "sources": [
                {
                    "format": "llava_json",
                    "path": str(corpus / "instruct" / "instruct.json"),
                },
                {
                    "format": "llava_json",
                    "path": str(corpus / "alignment.json"),
                    "max_samples": 4 * p.instruct_samples,
                },
            ],
            "max_length": 384,
        },
        "train": {
            **common_train,
            "trainable": ["projector", "lm"],
            "epochs": p.stage2_epochs,
            "lr": 1e-4,
        },
        "output": {"dir": str(out / "stage2"), "save_every": 20},
    }
    finetune_cfg = {
        "stage": "finetune",
        "model": {"from": str(out / "stage2" / "checkpoint-final")},
        "data": {
            "sources": [
                {
                    "format": "vqa",
                    "dataset": "slake",
                    "path": str(world / "slake"),
                    "split": "train",
                    "group_by_image": True,
                },
                {
                    "format": "vqa",
                    "dataset": "vqa-rad",
                    "path": str(world / "vqa_rad"),
                    "split": "train",
                    "group_by_image": True,
                },
            ],
            "max_length": 320,
        },
        "train": {
            **common_train,
            # lr_vision_finetune == 0 keeps the (stage-0b) tower frozen.
            "trainable": ["projector", "lm"] + (["vision"] if p.lr_vision_finetune != 0 else []),
            "epochs": p.finetune_epochs,
            "lr": p.lr_finetune,
            "lr_projector": p.lr_projector_finetune,
            "lr_vision": p.lr_vision_finetune or None,
            # Packed questions need a 4-D mask, which CPU sdpa runs through its flash kernel;
            # eager attention was 1.12x faster per step in bf16 on AMX, 0.97x of sdpa in fp32 on a
            # Zen 1 CPU (benchmarks/packed_attention.py); kept, as the measured recipe used it.
            "attn_implementation": "eager",
            # Only where the preset asks: a new key would redo the fine-tuning of older folders.
            **({"compile": True} if p.compile_finetune else {}),
        },
        "output": {"dir": str(out / "finetune"), "save_every": 25},
    }
    return {
        "stage0": stage0_cfg,
        "stage0b": stage0b_cfg,
        "stage1": stage1_cfg,
        "stage2": stage2_cfg,
        "finetune": finetune_cfg,
    }
