"""Stage 0 on MedSynth: train the default CPU tower, then print the probe table (random vs
stage-0 tower, patch vs pooled readout) and held-out retrieval.

    .venv/bin/python benchmarks/stage0_probes.py --out /tmp/stage0_bench --pairs 2000 [key=value ...]

Pairs are rendered directly from MedSynth by ``llavamed.data.synth.pairs.write_caption_pairs``
(the quickstart's stage-0 pairs), so the benchmark does not depend on ingestion.
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
    ap.add_argument(
        "--out", default="/tmp/stage0_bench", help="pairs go to OUT/data, the run to OUT/run"
    )
    ap.add_argument("--pairs", type=int, default=2000, help="caption pairs to render")
    ap.add_argument("--chest-frac", type=float, default=0.2, help="share of chest X-rays")
    ap.add_argument("--workers", type=int, default=2, help="rendering processes")
    ap.add_argument("--only-data", action="store_true", help="render the pairs, train nothing")
    ap.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="stage-0 config overrides, as for `llavamed train` of a stage-0 config "
        "(e.g. time_budget_min=4)",
    )
    args = ap.parse_args()
    from llavamed.data.synth.pairs import write_caption_pairs
    from llavamed.train.vision_pretrain import make_config, run_from_config

    out = Path(args.out)
    # The overrides are checked before the pairs render (minutes for the default 2,000).
    make_config(
        {"data": str(out / "data" / "figures.jsonl"), "output_dir": str(out / "run")},
        args.overrides,
    )
    data = write_caption_pairs(
        out / "data", args.pairs, chest_frac=args.chest_frac, workers=args.workers
    )
    if args.only_data:
        return 0
    t = time.time()
    res = run_from_config({"data": str(data), "output_dir": str(out / "run")}, args.overrides)
    print(f"wall {time.time() - t:.1f}s; train {res.report['train_minutes']:.2f} min")
    print(json.dumps(res.report.get("retrieval"), indent=1))
    print((res.output_dir / "stage0_report.md").read_text())
    return 0


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "stage0_probes")
