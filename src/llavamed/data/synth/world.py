"""Build a whole MedSynth world: PMC-style packages, VQA-RAD- and SLAKE-shaped sets, a manifest.

Every item (article or VQA image) draws from its own random stream seeded by (seed, stream,
index), so the output is byte-identical for any number of worker processes. Cheap planning
(attributes, text, question choice) happens up front; rendering and encoding run in a process
pool and each file is written atomically as soon as it is ready. A re-run skips files that exist
(they are deterministic) and is a no-op once ``manifest.json`` has been written.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llavamed.data.synth.articles import build_article, manifest_entries, plan_article
from llavamed.data.synth.attributes import (
    DOMAINS,
    attrs_from_dict,
    attrs_to_dict,
    sample_attributes,
)
from llavamed.data.synth.render import render
from llavamed.data.synth.vqa import Balancer, questions_for, select_questions
from llavamed.errors import ConfigError
from llavamed.utils.io import atomic_write_bytes, atomic_write_json, read_json

GENERATOR_VERSION = "medsynth-1.1"
DEFAULT_ARTICLES = 150
DEFAULT_IMAGE_SIZE = 256
VQA_IMAGES_PER_ARTICLE = 10
ZH_SHARE = 0.18

VQA_RAD_DIR = "vqa_rad"
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
SETS = {
    # name: (stream id, domains, split fractions)
    "vqa_rad": (2, ("chest_xray", "ct_scan", "mri"), {"train": 0.8, "test": 0.2}),
    "slake": (3, DOMAINS, {"train": 0.7, "validate": 0.15, "test": 0.15}),
}
RAD_ORGAN = {"chest_xray": "CHEST", "ct_scan": "ABD", "mri": "HEAD"}
SLAKE_MODALITY = {
    "chest_xray": "X-Ray",
    "ct_scan": "CT",
    "mri": "MRI",
    "histology": "Histology",
    "gross": "Gross",
}
SLAKE_LOCATION = {"chest_xray": "Chest_lungs", "ct_scan": "Abdomen", "mri": "Brain"}


def remove_stale_temps(root: Path) -> int:
    """Delete the temp files (``.<name>.<random>.tmp``, see ``atomic_path``) that a killed run
    left in a generator's own output folder, before a resume: the rename never came, so nothing
    else would remove them. Returns how many were removed."""
    n = 0
    for p in root.rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _split_sizes(n: int, fractions: dict[str, float]) -> list[int]:
    """Images per split for a domain of ``n`` images: rounded fractions, the last split taking
    the rest. A domain with at least one image per split gives every split one: rounding alone
    left a 4-image SLAKE domain with no test image (0.7 * 4 and 0.15 * 4 round to 3 and 1)."""
    sizes = [int(round(f * n)) for f in list(fractions.values())[:-1]]
    sizes.append(n - sum(sizes))
    if n >= len(sizes):
        for k, size in enumerate(sizes):
            if size < 1:
                sizes[sizes.index(max(sizes))] -= 1 - size
                sizes[k] = 1
    return sizes


def _split_assignment(n: int, domains: list[str], fractions: dict[str, float], rng) -> list[str]:
    """Exact split sizes within each domain, so every split sees every domain."""
    out = [""] * n
    for d in sorted(set(domains)):
        idx = [i for i in range(n) if domains[i] == d]
        idx = [idx[i] for i in rng.permutation(len(idx))]
        start = 0
        for name, size in zip(fractions, _split_sizes(len(idx), fractions), strict=True):
            for i in idx[start : start + size]:
                out[i] = name
            start += size
    return out


def _rad_images(vqa_images: int) -> int:
    """How many of the VQA images go to VQA-RAD (a third); SLAKE gets the rest."""
    return max(3, vqa_images // 3)


def min_vqa_images() -> int:
    """The fewest VQA images that give every split of both sets an image of every domain."""
    (_, rad_domains, rad_splits), (_, slake_domains, slake_splits) = SETS["vqa_rad"], SETS["slake"]
    n = 1
    while _rad_images(n) < len(rad_domains) * len(rad_splits) or n - _rad_images(n) < len(
        slake_domains
    ) * len(slake_splits):
        n += 1
    return n


def _image_path(set_name: str, index: int) -> tuple[str, str]:
    """(name as the dataset records it, path relative to the world root)."""
    if set_name == "vqa_rad":
        name = f"synpic{100001 + index}.jpg"
        return name, f"{VQA_RAD_DIR}/{VQA_RAD_IMAGES}/{name}"
    name = f"xmlab{index}/source.jpg"
    return name, f"slake/imgs/{name}"


def plan_vqa(
    seed: int, set_name: str, n_images: int, train_closed: int = 3
) -> tuple[list[dict], list[dict]]:
    """(image entries with attributes and split, question records in the set's native shape).

    Every image gets up to 3 closed questions, as in the real sets; ``train_closed`` raises that
    for train-split images only (dense supervision: each training image then teaches most of its
    attributes, while validation and test keep the real sets' shape)."""
    stream, set_domains, fractions = SETS[set_name]
    rng = np.random.default_rng([seed, stream, 1 << 30])
    domains = [set_domains[i % len(set_domains)] for i in rng.permutation(n_images)]
    splits = _split_assignment(n_images, domains, fractions, rng)
    balancer = Balancer()
    images, records = [], []
    for i in range(n_images):
        dom = domains[i]
        attrs = sample_attributes(dom, np.random.default_rng([seed, stream, i, 0]))
        qrng = np.random.default_rng([seed, stream, i, 2])
        lang = "zh" if set_name == "slake" and qrng.random() < ZH_SHARE else "en"
        cands = questions_for(dom, attrs, qrng, lang=lang)
        chosen = select_questions(
            cands,
            qrng,
            balancer,
            splits[i],
            n_closed=train_closed if splits[i] == "train" else 3,
            n_open=2 + int(qrng.random() < 0.5),
        )
        name, rel = _image_path(set_name, i)
        images.append(
            {
                "set": set_name,
                "path": rel,
                "image_name": name,
                "index": i,
                "domain": dom,
                "split": splits[i],
                "attributes": attrs_to_dict(attrs),
            }
        )
        for q in chosen:
            records.append(
                _native_record(set_name, len(records), i, name, dom, attrs, splits[i], q)
            )
    return images, records


def _native_record(set_name, qid, index, name, domain, attrs, split, q) -> dict:
    if set_name == "vqa_rad":
        return {
            "qid": qid,
            "phrase_type": "test_freeform" if split == "test" else "freeform",
            "qid_linked_id": f"synpic{100001 + index}-{qid}",
            "image_case_url": f"medsynth://vqa_rad/{name}",
            "image_name": name,
            "image_organ": RAD_ORGAN[domain],
            "evaluation": "given",
            "question": q["question"],
            "question_rephrase": "NULL",
            "question_relation": "NULL",
            "question_frame": "NULL",
            "question_type": q["question_type"],
            "answer": q["answer"],
            "answer_type": q["answer_type"],
            "template": q["template"],
        }
    if domain in SLAKE_LOCATION:
        location = SLAKE_LOCATION[domain]
    else:
        location = (attrs.tissue if domain == "histology" else attrs.organ).capitalize()
    return {
        "img_id": index,
        "img_name": name,
        "question": q["question"],
        "answer": q["answer"],
        "q_lang": q["lang"],
        "location": location,
        "modality": SLAKE_MODALITY[domain],
        "answer_type": q["answer_type"],
        "base_type": "vqa",
        "content_type": q["content_type"],
        "triple": ["vhead", "_", "_"],
        "qid": qid,
        "template": q["template"],
    }


def _work(task: tuple) -> list[dict] | None:
    kind = task[0]
    if kind == "article":
        _, out, seed, index, size = task
        plan = plan_article(seed, index)
        path = Path(out) / "packages" / f"{plan.pmcid}.tar.gz"
        if not path.exists():
            atomic_write_bytes(path, build_article(plan, seed, size), fsync=False)
        return manifest_entries(plan)
    _, out, seed, stream, index, domain, attrs, size, rel = task
    path = Path(out) / rel
    if not path.exists():
        img = render(
            domain,
            attrs_from_dict(domain, attrs),
            np.random.default_rng([seed, stream, index, 1]),
            size,
        )
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        atomic_write_bytes(path, buf.getvalue(), fsync=False)
    return None


def _nested_counts(items: list[dict]) -> dict:
    out: dict = defaultdict(Counter)
    for it in items:
        out[it["domain"]][it["split"]] += 1
    return {d: dict(sorted(c.items())) for d, c in sorted(out.items())}


def generate_world(
    out_dir: str | os.PathLike,
    *,
    articles: int = DEFAULT_ARTICLES,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int = 1,
    progress: bool = True,
    vqa_images: int | None = None,
    train_closed: int = 3,
) -> dict:
    """Generate (or resume, or return the finished) MedSynth world in ``out_dir``; returns the
    manifest. ``vqa_images`` defaults to 10 per article (a third VQA-RAD, the rest SLAKE);
    ``train_closed`` is the most closed questions per train-split image (see :func:`plan_vqa`)."""
    if articles < 1:
        raise ConfigError("articles must be >= 1")
    if image_size < 64:
        raise ConfigError("image_size must be >= 64 px")
    if vqa_images is None:
        vqa_images = max(VQA_IMAGES_PER_ARTICLE * articles, min_vqa_images())
    if vqa_images < min_vqa_images():
        raise ConfigError(
            f"vqa_images must be >= {min_vqa_images()}: with fewer, some split of VQA-RAD or "
            "SLAKE (train, validate, test) misses a domain or is empty"
        )
    if train_closed < 1:
        raise ConfigError("train_closed must be >= 1")
    out = Path(out_dir)
    args = {"articles": articles, "seed": seed, "image_size": image_size, "vqa_images": vqa_images}
    if train_closed != 3:  # recorded only when set, so worlds made before the option still match
        args["train_closed"] = train_closed
    stamp = {"generator_version": GENERATOR_VERSION, "args": args}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: choose another --out")
    manifest_path, stamp_path = out / "manifest.json", out / ".medsynth-args.json"
    for p in (manifest_path, stamp_path):
        if p.exists():
            old = read_json(p)
            version = old.get("generator_version") if isinstance(old, dict) else None
            if not isinstance(version, str) or not version.startswith("medsynth-"):
                # Some other dataset's manifest.json (another tool's may well carry a
                # generator_version too): writing a world beside it would mix them, and calling
                # it a MedSynth world would invite deleting the user's data.
                raise ConfigError(
                    f"{p} is not a MedSynth manifest; {out} holds something else: "
                    "choose another --out"
                )
            if {k: old.get(k) for k in stamp} != stamp:
                raise ConfigError(
                    f"{out} already holds a MedSynth world made with {old.get('args')} "
                    f"({old.get('generator_version')}); choose another --out or delete it"
                )
    if manifest_path.exists():
        return read_json(manifest_path)
    if not stamp_path.exists() and out.is_dir() and any(out.iterdir()):
        # Neither a finished nor an interrupted world (the stamp is written before any file):
        # a user's folder. Writing into it would overwrite e.g. a real slake/train.json.
        raise ConfigError(
            f"{out} exists and holds something else (no MedSynth manifest): "
            "choose another --out or an empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    atomic_write_json(stamp_path, stamp)

    n_rad = _rad_images(vqa_images)
    plans = {
        name: plan_vqa(seed, name, n, train_closed)
        for name, n in (("vqa_rad", n_rad), ("slake", vqa_images - n_rad))
    }
    tasks: list[tuple] = [("article", str(out), seed, i, image_size) for i in range(articles)]
    for name, (images, _) in plans.items():
        stream = SETS[name][0]
        tasks += [
            (
                "vqa",
                str(out),
                seed,
                stream,
                im["index"],
                im["domain"],
                im["attributes"],
                image_size,
                im["path"],
            )
            for im in images
        ]

    figures: list[dict] = []
    bar = tqdm(
        total=len(tasks), desc="medsynth", unit="item", disable=not progress, file=sys.stderr
    )
    try:
        if workers > 1:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for res in pool.imap(_work, tasks, chunksize=4):
                    figures.extend(res or [])
                    bar.update()
        else:
            for t in tasks:
                figures.extend(_work(t) or [])
                bar.update()
    finally:
        bar.close()

    rad_images, rad_records = plans["vqa_rad"]
    atomic_write_json(out / VQA_RAD_DIR / VQA_RAD_JSON, rad_records)
    slake_images, slake_records = plans["slake"]
    for split in SETS["slake"][2]:
        atomic_write_json(
            out / "slake" / f"{split}.json",
            [r for r in slake_records if _slake_split(r, slake_images) == split],
        )

    article_splits = Counter()
    for f in figures:
        if f["fig_id"] == "F1":
            article_splits[f["split"]] += 1
    counts = {
        "pmc": {
            "articles": dict(sorted(article_splits.items())),
            "figures": _nested_counts(figures),
        },
        "vqa_rad": {
            "images": _nested_counts(rad_images),
            "questions": _question_counts(
                rad_records, lambda r: "test" if r["phrase_type"].startswith("test") else "train"
            ),
        },
        "slake": {
            "images": _nested_counts(slake_images),
            "questions": _question_counts(slake_records, lambda r: _slake_split(r, slake_images)),
        },
    }
    manifest = {
        "generator": "MedSynth",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "args": args,
        "domains": list(DOMAINS),
        "layout": {
            "packages": "packages/<PMCID>.tar.gz",
            "vqa_rad": f"{VQA_RAD_DIR}/{VQA_RAD_JSON}",
            "vqa_rad_images": f"{VQA_RAD_DIR}/{VQA_RAD_IMAGES}/",
            "slake": "slake/{train,validate,test}.json",
            "slake_images": "slake/imgs/",
        },
        "counts": counts,
        "images": figures + rad_images + slake_images,
    }
    atomic_write_json(manifest_path, manifest, indent=1)
    return manifest


def _slake_split(record: dict, images: list[dict]) -> str:
    return images[record["img_id"]]["split"]


def _question_counts(records: list[dict], split_of) -> dict:
    out: dict = defaultdict(Counter)
    for r in records:
        s = split_of(r)
        out[s][r["answer_type"]] += 1
        if r.get("q_lang") == "zh":
            out[s]["zh"] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}
