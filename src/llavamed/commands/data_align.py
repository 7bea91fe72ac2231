"""``llavamed data align``: the stage-1 concept-alignment set from figure records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llavamed.commands import positive_int, seed_int
from llavamed.data.align import CUTOFF_WORDS, PROMPT_POLICIES

DESCRIPTION = """\
Build the stage-1 (biomedical concept alignment) training set in LLaVA conversation JSON, the
shape of LLaVA-Med's llava_med_alignment_500k.json. Each figure with an image becomes one sample:
the human turn is one of the 27 description prompts (11 brief ones from the paper's Table 7, 16
detailed ones from Table 8) with <image> before or after it, the gpt turn is the caption.
As in the paper, a caption of fewer than 30 words (--cutoff-words) gets a brief prompt and a
longer one a detailed prompt; --prompts uniform draws from all 27 instead. Prompt choice and
<image> placement are seeded per figure (--seed).

Image paths are written relative to the folder of --out, so that folder is the image folder for
`llavamed train`. Figures without an image are skipped and counted; records of LLaVA-Med's
caption JSON, which carry no image field, name {pair_id}.jpg. Record image paths are read
relative to --image-folder (default: the folder of --figures), as LLaVA-Med's caption JSON and
its downloaded images usually live apart. No sample at all is an error."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align",
        help="stage-1 concept-alignment set (LLaVA conversation JSON) from figures",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--figures",
        required=True,
        type=Path,
        help="figures.jsonl, or LLaVA-Med's {domain: [records]} caption JSON",
    )
    p.add_argument("--out", required=True, type=Path, help="output JSON (a list of samples)")
    p.add_argument(
        "--image-folder",
        type=Path,
        metavar="DIR",
        help="folder the records' image paths are relative to (default: the folder of --figures)",
    )
    p.add_argument(
        "--max", dest="max_samples", type=positive_int, metavar="N", help="keep N samples"
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed for prompts and subsetting")
    p.add_argument(
        "--prompts",
        choices=PROMPT_POLICIES,
        default="by-length",
        help="by-length: brief prompts for short captions, detailed ones for long (the paper's "
        "rule, default); uniform: any of the 27",
    )
    p.add_argument(
        "--cutoff-words",
        type=positive_int,
        default=CUTOFF_WORDS,
        metavar="N",
        help=f"by-length: captions of fewer than N words get a brief prompt (default "
        f"{CUTOFF_WORDS}, the paper's)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavamed.data.align import build_alignment
    from llavamed.data.figures import iter_figures
    from llavamed.errors import LlavamedError
    from llavamed.llm.args import refuse_overwriting_inputs
    from llavamed.utils.io import atomic_write_json

    if not args.figures.exists():
        raise LlavamedError(f"{args.figures}: file not found")
    # --out naming --figures replaced the figures with the samples made from them.
    refuse_overwriting_inputs({"--figures": args.figures}, {"--out": args.out})
    image_root = args.figures.resolve().parent
    if args.image_folder is not None:
        if not args.image_folder.is_dir():
            raise LlavamedError(f"--image-folder {args.image_folder}: not a folder")
        image_root = args.image_folder.resolve()
    out_dir = args.out.resolve().parent
    samples, skipped = build_alignment(
        iter_figures(args.figures),
        image_root=image_root,
        out_dir=out_dir,
        max_samples=args.max_samples,
        seed=args.seed,
        prompts=args.prompts,
        cutoff_words=args.cutoff_words,
    )
    if not samples:  # an empty set would train stage 1 on nothing, and look like success
        why = f"skipped {json.dumps(skipped)}" if skipped else "it holds no records"
        raise LlavamedError(f"{args.figures}: no figure became an alignment sample ({why})")
    atomic_write_json(args.out, samples, indent=None)
    msg = f"{len(samples)} alignment samples -> {args.out}"
    if skipped:
        msg += f"; skipped {json.dumps(skipped)}"
    print(msg)
    return 0
