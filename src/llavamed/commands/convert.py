"""``llavamed convert``: foreign checkpoints to the transformers-native llava format."""

from __future__ import annotations

from llavamed.commands import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "llava-med",
        help="original LLaVA-Med v1.5 (LlavaMistralForCausalLM) -> native llava",
        description=(
            "Convert an original LLaVA-Med v1.5 checkpoint folder (model_type llava_mistral; "
            "safetensors or .bin, sharded or not) into transformers' native "
            "LlavaForConditionalGeneration format that transformers, vLLM and SGLang load. "
            "Every source key must map, or the conversion fails naming the keys. The tokenizer "
            "is read from SRC: tokenizer.json, or a SentencePiece tokenizer.model (needs "
            "'pip install sentencepiece protobuf')."
        ),
    )
    p.add_argument("src", help="original checkpoint folder")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument(
        "--vision-tower",
        default=None,
        help="local CLIP folder for the vision tower config (and weights when the "
        "checkpoint has none); default: mm_vision_tower if it names a local folder",
    )
    p.set_defaults(func=_run_llava_med)

    b = sub.add_parser(
        "biomedclip",
        help="open_clip BiomedCLIP vision tower -> transformers ViT folder",
        description=(
            "Convert BiomedCLIP's open_clip state dict (timm ViT-B/16 under visual.trunk.*, "
            "fused qkv) into a transformers ViTModel folder for 'llavamed model init --vision'. "
            "Needs neither open_clip nor timm. A LLaVA on this tower loads in transformers; "
            "vLLM's llava supports CLIP and SigLIP towers only."
        ),
    )
    b.add_argument("src", help="open_clip_pytorch_model.bin / .safetensors, or its folder")
    b.add_argument("dst", help="output vision tower folder")
    b.add_argument(
        "--num-heads",
        type=positive_int,
        default=None,
        help="attention heads (not stored in weights; default hidden/64 = 12 for ViT-B)",
    )
    b.set_defaults(func=_run_biomedclip)


def _run_llava_med(args) -> int:
    from llavamed.model.convert.llava_med import convert_llava_med

    out = convert_llava_med(args.src, args.dst, vision_tower=args.vision_tower)
    print(f"wrote {out}")
    return 0


def _run_biomedclip(args) -> int:
    from llavamed.model.convert.biomedclip import convert_biomedclip

    out = convert_biomedclip(args.src, args.dst, num_heads=args.num_heads)
    print(f"wrote {out}")
    return 0
