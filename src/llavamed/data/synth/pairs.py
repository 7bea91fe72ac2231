"""Single-panel MedSynth figure–caption pairs: a PMC-15M stand-in for stage 0.

Stage 0 (vision pretraining, BiomedCLIP's recipe) wants many (image, caption) pairs. The
quickstart's PMC-style corpus holds a few hundred figures, most of them multi-panel; a tower
pretrained on 12,000 rendered single-panel pairs reads the local findings far better
(docs/stage0.md, run F). This module writes such pairs in the corpus's ``figures.jsonl`` shape,
so ``llavamed train`` stage 0 reads them like any ingested corpus.

Pair ``i`` draws its attributes, pixels and caption from three random streams seeded by
(seed, PAIRS_STREAM, i, part), so the output is byte-identical for any number of workers, and a
re-run renders only the images that are missing.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llavamed.data.synth.attributes import (
    DOMAINS,
    attrs_from_dict,
    attrs_to_dict,
    sample_attributes,
)
from llavamed.data.synth.captions import figure_caption
from llavamed.data.synth.render import render
from llavamed.data.synth.world import remove_stale_temps
from llavamed.errors import ConfigError
from llavamed.utils.io import atomic_write_bytes, atomic_write_json, read_json, write_jsonl

PAIRS_STREAM = 4  # distinct from the articles and VQA sets (a test checks it)
PAIRS_VERSION = "medsynth-pairs-1"
PAIRS_IMAGE_SIZE = 160
STAMP = ".caption-pairs-args.json"


def _plan(seed: int, index: int, chest_frac: float) -> dict:
    """Domain, attributes and caption of pair ``index`` (cheap; no pixels)."""
    rng = np.random.default_rng([seed, PAIRS_STREAM, index, 0])
    others = [d for d in DOMAINS if d != "chest_xray"]
    if rng.random() < chest_frac:
        domain = "chest_xray"
    else:
        domain = others[int(rng.integers(len(others)))]
    attrs = sample_attributes(domain, rng)
    _, caption = figure_caption(
        domain, [attrs], np.random.default_rng([seed, PAIRS_STREAM, index, 2])
    )
    return {
        "pair_id": f"synth_pair_{index:06d}",
        "image": f"images/{index // 1000:03d}/{index:06d}.jpg",
        "fig_caption": caption,
        "domain": domain,
        "attributes": attrs_to_dict(attrs),
    }


def _render(task: tuple) -> None:
    out, seed, index, size, rec = task
    path = Path(out) / rec["image"]
    if path.exists():  # deterministic: a file left by an earlier run is the same file
        return
    img = render(
        rec["domain"],
        attrs_from_dict(rec["domain"], rec["attributes"]),
        np.random.default_rng([seed, PAIRS_STREAM, index, 1]),
        size,
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    atomic_write_bytes(path, buf.getvalue(), fsync=False)


def write_caption_pairs(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    image_size: int = PAIRS_IMAGE_SIZE,
    chest_frac: float = 0.4,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write (or resume, or return the finished) ``out_dir/figures.jsonl`` with ``n`` pairs and
    their images under ``out_dir/images/``. Each record also carries the figure's domain and
    attribute ground truth. ``chest_frac`` is the share of chest X-rays (the rest is spread evenly
    over the other domains): the chest findings are the smallest and most numerous."""
    if n < 1:
        raise ConfigError("caption pairs: n must be >= 1")
    if image_size < 64:
        raise ConfigError("caption pairs: image_size must be >= 64 px")
    if not 0.0 <= chest_frac <= 1.0:
        raise ConfigError(f"caption pairs: chest_frac must be in [0, 1], got {chest_frac}")
    out = Path(out_dir)
    stamp = {
        "version": PAIRS_VERSION,
        "args": {"n": n, "seed": seed, "image_size": image_size, "chest_frac": chest_frac},
    }
    stamp_path, index_path = out / STAMP, out / "figures.jsonl"
    if stamp_path.exists() and read_json(stamp_path) != stamp:
        raise ConfigError(
            f"{out} already holds caption pairs made with {read_json(stamp_path)['args']}; "
            "choose another folder or delete it"
        )
    if index_path.exists() and stamp_path.exists():
        return index_path
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    atomic_write_json(stamp_path, stamp)
    records = [_plan(seed, i, chest_frac) for i in range(n)]
    tasks = [(str(out), seed, i, image_size, rec) for i, rec in enumerate(records)]
    bar = tqdm(total=n, desc="caption pairs", unit="img", disable=not progress, file=sys.stderr)
    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for _ in pool.imap_unordered(_render, tasks, chunksize=16):
                    bar.update()
        else:
            for t in tasks:
                _render(t)
                bar.update()
    finally:
        bar.close()
    # The index comes last, so its presence means every image is on disk.
    write_jsonl(index_path, records)
    return index_path
