"""Linear probes on frozen vision towers' patch tokens: which MedSynth attributes each tower's
tokens carry (``llavamed.eval.probes``; the probe table of stage 0's report, for any towers).

    .venv/bin/python benchmarks/probe_towers.py --tower random=cpu \\
        --tower stage0=OUT/stage0/vision_tower --tower stage0b=OUT/stage0b/vision_tower \\
        --images 300 --domains chest_xray ct_scan mri --out /tmp/probes.json

Every tower sees the same freshly rendered MedSynth images (``--seed``), so rows compare towers,
not samples. A preset name (``cpu``) is a randomly initialised tower. Prints the markdown table
and writes the full report as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    from llavamed.eval.probes import LABELS, probe_report, probe_table_md
    from llavamed.model.vision_tower import load_tower

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tower",
        action="append",
        required=True,
        metavar="NAME=VISION",
        help="a tower folder or preset, repeatable",
    )
    ap.add_argument("--images", type=int, default=300, help="images per domain (1/3 held out)")
    ap.add_argument("--domains", nargs="+", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--feature-layer", type=int, default=-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the report JSON here")
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")  # torch.set_num_threads raised a RuntimeError
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    towers = {}
    for spec in args.tower:
        name, sep, vision = spec.partition("=")
        if not sep or not name or not vision:
            ap.error(f"--tower wants NAME=VISION, got {spec!r}")
        towers[name] = load_tower(vision, seed=args.seed)
    sizes = {t.image_size for t in towers.values()}
    if len(sizes) != 1:
        ap.error(f"towers disagree on image size: {sorted(sizes)}")
    rep = probe_report(towers, args.feature_layer, args.domains, args.images, seed=args.seed)
    print(probe_table_md(rep))
    print("\nmean accuracy:", json.dumps(rep["summary"], indent=1), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "probe_towers")
