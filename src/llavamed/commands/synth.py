"""``llavamed synth``: generate the MedSynth world (PMC-style packages + VQA sets + manifest)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from llavamed.commands import int_at_least, non_negative_int, positive_int, seed_int

# Kept in sync with llavamed.data.synth.world (a test checks it); not imported here so that
# `llavamed --help` stays fast.
DEFAULT_ARTICLES = 150
DEFAULT_IMAGE_SIZE = 256
PAIRS_IMAGE_SIZE = 160  # llavamed.data.synth.pairs.PAIRS_IMAGE_SIZE

MIN_IMAGE_SIZE = 64  # the smallest image the renderers draw legibly


def _min_vqa_images() -> int:
    from llavamed.data.synth.world import min_vqa_images

    return min_vqa_images()


DESCRIPTION = """\
Generate MedSynth, a procedurally generated biomedical figure world with ground truth, in DIR:

  DIR/packages/<PMCID>.tar.gz        PMC OA-style packages: a JATS .nxml (pmid/pmcid, body text
                                     citing figures with <xref ref-type="fig">, <fig> elements
                                     with label, caption and <graphic xlink:href>) + the images
  DIR/vqa_rad/VQA_RAD Dataset Public.json and DIR/vqa_rad/VQA_RAD Image Folder/
                                     a VQA-RAD-shaped set (chest X-ray, CT, MRI)
  DIR/slake/{train,validate,test}.json and DIR/slake/imgs/xmlab<N>/source.jpg
                                     a SLAKE-shaped set (all five domains, ~18% Chinese questions)
  DIR/manifest.json                  seed, generator version, counts per domain and split, and
                                     the attribute ground truth of every image
  DIR/caption_pairs/figures.jsonl    with --caption-pairs N: N single-panel figure-caption pairs
                                     (+ images/) for stage-0 vision pretraining: pair_id, image
                                     and fig_caption as in an ingested figures.jsonl, domain as a
                                     name ("mri"), and the attributes

Images in five domains (chest X-ray, CT, brain MRI, H&E histology, gross pathology) are drawn
from explicit attributes; captions and every VQA answer derive from those attributes. The same
seed and arguments give byte-identical output for any --workers. Re-running into a DIR finished
by this generator version with the same arguments is a no-op; one made with other arguments or
another version (e.g. medsynth-1.0), or a non-empty folder that is no MedSynth world, is refused;
re-running after an interruption resumes."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate MedSynth: synthetic PMC-style articles and VQA sets with ground truth",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--articles",
        type=positive_int,
        default=DEFAULT_ARTICLES,
        metavar="N",
        help=f"number of PMC-style articles (1-4 figures each); the VQA sets get 10 images per "
        f"article unless --vqa-images is given (default: {DEFAULT_ARTICLES}, the quickstart size)",
    )
    p.add_argument(
        "--vqa-images",
        # The minimum is generate_world's (called only when the flag is given: --help stays fast).
        type=int_at_least(
            _min_vqa_images,
            ": with fewer, some split of VQA-RAD or SLAKE (train, validate, test) misses a "
            "domain or is empty",
        ),
        default=None,
        metavar="N",
        help="total VQA images, a third VQA-RAD and the rest SLAKE; at least 22, so that every "
        "split of both sets holds every domain (default: 10 x --articles, at least 22)",
    )
    p.add_argument(
        "--train-closed",
        type=positive_int,
        default=3,
        metavar="N",
        help="at most N closed (yes/no) questions per train-split image (default: 3, the real "
        "sets' shape). A larger N gives denser supervision; validation and test are unchanged",
    )
    p.add_argument("--seed", type=seed_int, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument(
        "--image-size",
        type=int_at_least(MIN_IMAGE_SIZE),
        default=DEFAULT_IMAGE_SIZE,
        metavar="PX",
        help=f"approximate short side of each image in pixels; aspect ratios vary around it "
        f"(at least {MIN_IMAGE_SIZE}; default: {DEFAULT_IMAGE_SIZE})",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="worker processes for rendering; 0 = one per CPU core (default: 0). The output does "
        "not depend on it",
    )
    p.add_argument(
        "--caption-pairs",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also render N single-panel figure-caption pairs into DIR/caption_pairs/ for stage 0 "
        "(`llavamed train configs/cpu/stage0_vision.yaml data=DIR/caption_pairs/figures.jsonl`); "
        "the quickstart uses 12000 (default: 0, none)",
    )
    p.add_argument(
        "--pairs-image-size",
        type=int_at_least(MIN_IMAGE_SIZE),
        default=PAIRS_IMAGE_SIZE,
        metavar="PX",
        help="approximate short side of each caption-pair image; --image-size is the world's "
        f"(at least {MIN_IMAGE_SIZE}; default: {PAIRS_IMAGE_SIZE}, the quickstart's stage-0 pairs)",
    )
    p.add_argument(
        "--contact-sheet",
        type=Path,
        metavar="PNG",
        help="also write a contact sheet PNG (samples per domain)",
    )
    # --no-progress as every other command spells it; --quiet, this command's old name, is kept
    # for the scripts that use it.
    p.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llavamed.data.synth import generate_world
    from llavamed.errors import ConfigError
    from llavamed.utils.io import require_writable

    # Before the world is generated (minutes at the quickstart's sizes): an output that cannot
    # be written (/proc/x, a path under a file, a read-only folder) failed at its first write.
    require_writable(args.out, "--out", folder=True)
    if args.contact_sheet is not None:
        if args.contact_sheet.is_dir():
            raise ConfigError(
                f"--contact-sheet {args.contact_sheet} is a folder: give a PNG file path"
            )
        require_writable(args.contact_sheet, "--contact-sheet")
    workers = args.workers or (os.cpu_count() or 1)
    m = generate_world(
        args.out,
        articles=args.articles,
        seed=args.seed,
        image_size=args.image_size,
        workers=workers,
        progress=not args.no_progress,
        vqa_images=args.vqa_images,
        train_closed=args.train_closed,
    )
    c = m["counts"]
    n_fig = sum(sum(s.values()) for s in c["pmc"]["figures"].values())
    rad_q = sum(v.get("CLOSED", 0) + v.get("OPEN", 0) for v in c["vqa_rad"]["questions"].values())
    slake_q = sum(v.get("CLOSED", 0) + v.get("OPEN", 0) for v in c["slake"]["questions"].values())
    print(
        f"MedSynth {m['generator_version']} seed {m['seed']} -> {args.out}: "
        f"{sum(c['pmc']['articles'].values())} articles / {n_fig} figures, "
        f"VQA-RAD {rad_q} QA, SLAKE {slake_q} QA"
    )
    if args.caption_pairs:
        from llavamed.data.synth.pairs import write_caption_pairs

        pairs = write_caption_pairs(
            args.out / "caption_pairs",
            args.caption_pairs,
            seed=args.seed,
            image_size=args.pairs_image_size,
            workers=workers,
            progress=not args.no_progress,
        )
        print(f"{args.caption_pairs} caption pairs -> {pairs}")
    if args.contact_sheet:
        from llavamed.data.synth.contact_sheet import contact_sheet
        from llavamed.utils.io import atomic_path

        with atomic_path(args.contact_sheet, suffix=".png") as tmp:
            contact_sheet(seed=args.seed, size=args.image_size).save(
                tmp, format="PNG", optimize=True
            )
        print(f"contact sheet -> {args.contact_sheet}")
    return 0
