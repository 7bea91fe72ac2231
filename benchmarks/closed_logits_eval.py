"""Compare checkpoints on *every* closed yes/no test question, with and without the image.

    .venv/bin/python benchmarks/closed_logits_eval.py \\
        --test slake=OUT/world/slake --test vqa-rad=OUT/world/vqa_rad \\
        OUT_A/finetune/checkpoint-final OUT_B/finetune/checkpoint-final

The quickstart's report scores 208 closed questions (95% interval ±5-7 points), too few to tell
two recipes apart. This scores all of them by next-token logits (``llavamed.eval.closed_logits``:
"yes" vs "no", one forward pass, no generation), ±1.7-2.4 points (95%) on ~1,700 questions, and
the same questions with a blank image. Prints a markdown table: accuracy with its 95% interval,
and blank accuracy (%), per checkpoint and set. The interval is the report's: a bootstrap that
resamples images whole, since several questions about one image are not independent draws (on
the quickstart's sets it is as wide as a Wilson interval over questions; on sets with more
closed questions per image it is wider).

``--per-question FILE`` keeps the counts per question text, to see which findings a model misses;
``--split train --limit 800`` scores a random 800 of the training questions, to tell a model that
underfits its training set from one that memorises it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("models", nargs="+", help="native llava checkpoint folders")
    ap.add_argument("--test", action="append", required=True, metavar="DATASET=PATH")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score N yes/no questions per set, drawn at random (seed 0); for the train split",
    )
    ap.add_argument(
        "--per-question",
        metavar="JSON",
        default=None,
        help="also write {model: {set: {question: [n, correct, correct_blank]}}} here",
    )
    args = ap.parse_args()
    sets = []
    for spec in args.test:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--test: want DATASET=PATH, got {spec!r}")
        sets.append((name, path))
    from llavamed.errors import InputError

    # Before any checkpoint loads: a wrong test path failed only after the first model had.
    for path in [p for _, p in sets] + args.models:
        if not Path(path).exists():
            raise InputError(path, "no such file or folder")

    import random

    import torch

    from llavamed.data.vqa import load_vqa
    from llavamed.eval.closed_logits import prepare_closed, yes_no_predictions
    from llavamed.eval.metrics import bootstrap_ci
    from llavamed.model.checkpoint import load_llava

    if args.threads:
        torch.set_num_threads(args.threads)
    header = " | ".join(f"{n} (n) | {n} blank" for n, _ in sets)
    rows = [f"| model | {header} | seconds |", "|---" * (2 * len(sets) + 2) + "|"]
    per_question: dict = {}
    for ckpt in args.models:
        t0 = time.time()
        model, processor = load_llava(ckpt)
        cells = []
        for name, path in sets:
            samples, _ = load_vqa(name, path, split=args.split, lang="en")
            if args.limit is not None:
                # A random draw, not the first N: the splits are ordered by image.
                random.Random(0).shuffle(samples)
            data = prepare_closed(samples, processor, limit=args.limit)
            hits = {}
            table = per_question.setdefault(ckpt, {}).setdefault(name, {})
            for blank in (False, True):
                pred = yes_no_predictions(
                    model, processor, data, batch_size=args.batch_size, blank=blank
                )
                right = [p == y for p, y in zip(pred, data.is_yes, strict=True)]
                hits[blank] = right
                for q, ok in zip(data.questions, right, strict=True):
                    row = table.setdefault(q, [0, 0, 0])
                    row[0] += not blank
                    row[2 if blank else 1] += ok
            n = len(data.is_yes)
            lo, hi = bootstrap_ci([float(ok) for ok in hits[False]], clusters=data.image_keys)
            cells += [
                f"{100 * sum(hits[False]) / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({n})",
                f"{100 * sum(hits[True]) / n:.1f}",
            ]
        rows.append(f"| {ckpt} | {' | '.join(cells)} | {time.time() - t0:.0f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.per_question:
        Path(args.per_question).write_text(json.dumps(per_question, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import run_script

    run_script(main, "closed_logits_eval")
