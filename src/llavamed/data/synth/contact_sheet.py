"""Contact sheet of MedSynth: ``python -m llavamed.data.synth.contact_sheet OUT.png [--per-domain N]``.

One row per domain, N samples each, every tile labelled with its key attributes, so a reader sees
what the world looks like and that the findings are visible.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from llavamed.data.synth.attributes import DOMAINS, sample_attributes
from llavamed.data.synth.captions import short_label
from llavamed.data.synth.render import render
from llavamed.data.synth.render.common import font


def pad_square(img: Image.Image, tile: int) -> Image.Image:
    img = img.convert("RGB")
    side = max(img.size)
    sq = Image.new("RGB", (side, side), (0, 0, 0))
    sq.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return sq.resize((tile, tile), Image.BICUBIC)


def contact_sheet(
    per_domain: int = 4, seed: int = 0, size: int = 256, tile: int = 200
) -> Image.Image:
    label_h = 44
    sheet = Image.new("RGB", (per_domain * tile, len(DOMAINS) * (tile + label_h)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    f = font(11)
    for row, domain in enumerate(DOMAINS):
        for col in range(per_domain):
            rng = np.random.default_rng([seed, row, col])
            attrs = sample_attributes(domain, rng)
            img = render(domain, attrs, rng, size)
            y = row * (tile + label_h)
            sheet.paste(pad_square(img, tile), (col * tile, y))
            text = "\n".join(
                textwrap.fill(line, width=tile // 6)
                for line in short_label(domain, attrs).splitlines()
            )
            d.multiline_text(
                (col * tile + 3, y + tile + 1), text, fill=(0, 0, 0), font=f, spacing=1
            )
    return sheet


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} must be >= {low}")
        return n

    return parse


def main(argv: list[str] | None = None) -> int:
    from llavamed.commands import seed_int
    from llavamed.utils.io import atomic_path

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="PNG file to write")
    ap.add_argument(
        "--per-domain", type=_at_least(1), default=4, help="samples per domain (columns)"
    )
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--size", type=_at_least(64), default=256, help="render size (short side, px)")
    ap.add_argument("--tile", type=_at_least(16), default=200, help="tile size in the sheet (px)")
    args = ap.parse_args(argv)
    if Path(args.out).is_dir():
        ap.error(f"{args.out} is a folder: give a PNG file path")
    # Written to a temp name and renamed: an interrupted save left a truncated PNG in place.
    with atomic_path(args.out, suffix=".png") as tmp:
        contact_sheet(args.per_domain, args.seed, args.size, args.tile).save(
            tmp, format="PNG", optimize=True
        )
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
