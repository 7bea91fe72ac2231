"""Stage 0 on MedSynth: train the default CPU tower, then print the probe table (random vs
stage-0 tower, patch vs pooled readout) and held-out retrieval.

    .venv/bin/python benchmarks/stage0_probes.py --out /tmp/stage0_bench --pairs 2000 [key=value ...]

Pairs are rendered directly from MedSynth (``sample_attributes`` + ``render`` + ``figure_caption``)
so the benchmark does not depend on ingestion; the quickstart feeds ingested ``figures.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def make_pairs(out: Path, n: int, seed: int = 0, size: int = 160, chest_frac: float = 0.2) -> Path:
    """Write ``figures.jsonl`` + ``images/`` with ``n`` single-panel MedSynth figures."""
    from tqdm import tqdm

    from llavamed.data.synth.attributes import DOMAINS, sample_attributes
    from llavamed.data.synth.captions import figure_caption
    from llavamed.data.synth.render import render
    from llavamed.utils.io import write_jsonl

    path = out / "figures.jsonl"
    if path.exists() and sum(1 for _ in open(path)) == n:
        return path
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    for i in tqdm(range(n), desc="render pairs", file=sys.stderr):
        others = [d for d in DOMAINS if d != "chest_xray"]
        d = "chest_xray" if rng.random() < chest_frac else others[int(rng.integers(len(others)))]
        a = sample_attributes(d, rng)
        img = render(d, a, rng, size=size)
        _, cap = figure_caption(d, [a], rng)
        name = f"images/synth_{i:05d}.png"
        img.save(out / name)
        recs.append({"pair_id": f"synth_{i:05d}", "fig_caption": cap, "image": name})
    write_jsonl(path, recs)
    return path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/stage0_bench")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--chest-frac", type=float, default=0.2, help="share of chest X-rays")
    ap.add_argument("--only-data", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from llavamed.train.vision_pretrain import run_from_config

    out = Path(args.out)
    data = make_pairs(out / "data", args.pairs, chest_frac=args.chest_frac)
    if args.only_data:
        return 0
    t = time.time()
    res = run_from_config({"data": str(data), "output_dir": str(out / "run")}, args.overrides)
    print(f"wall {time.time() - t:.1f}s; train {res.report['train_minutes']:.2f} min")
    print(json.dumps(res.report.get("retrieval"), indent=1))
    print((res.output_dir / "stage0_report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
