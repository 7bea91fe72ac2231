"""``llavamed eval vqa``: VQA-RAD, SLAKE, PathVQA or LLaVA-Med test.json with the paper's metric,
strict metrics, confidence intervals and image-reliance ablations."""

from __future__ import annotations

import argparse

from llavamed.commands import add_dtype_arg, add_pack_weights_arg, positive_int, seed_int

EPILOG = """\
outputs in --out: answers.jsonl (LLaVA-Med answers shape; resumable), answers.<ablation>.jsonl,
scores*.jsonl (per-question scores), report.md, report.json, report.png.

examples:
  llavamed eval vqa --model ckpt --dataset vqa-rad --data data/vqa_rad --out runs/rad
  llavamed eval vqa --model ckpt --dataset slake --data Slake1.0 --ablate blank --ablate shuffle
  llavamed eval vqa --model ckpt --dataset pathvqa --data pvqa/data --shard 0/4   # x4 processes,
  llavamed eval vqa --model ckpt --dataset pathvqa --data pvqa/data               # then merge
  llavamed eval vqa --model ckpt --dataset pathvqa --data pvqa --split val   # original release
"""


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    """--backend, shared by ``eval vqa`` and ``eval answer``."""
    p.add_argument(
        "--backend",
        default="engine",
        choices=["engine", "generate"],
        help="engine (default): continuous batching with --batch-size slots and a cache of image "
        "prefixes, so each image is encoded once for all its questions; generate: static "
        "batches through HF generate (the simple reference path). In float32 both give the same "
        "greedy answers",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "vqa",
        help="evaluate a checkpoint on VQA-RAD, SLAKE, PathVQA or LLaVA-Med's test.json",
        description=(
            "Generate answers greedily in batches (left padding, the checkpoint's own chat "
            "template), score them with the LLaVA-Med metric (closed: normalised substring; open: "
            "token recall) and strict metrics (yes/no parse, exact match, token F1, BLEU-1..4) "
            "with 95% bootstrap CIs per answer and question type, and write report.md/.json/.png "
            "with the paper's Table 4 numbers as reference rows. Re-running resumes."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="transformers-native LLaVA checkpoint folder, or a training run's folder (its "
        "checkpoint-final)",
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=["vqa-rad", "slake", "pathvqa", "llava-med"],
        help="the format of --data (llava-med: LLaVA-Med's test.json)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="vqa-rad: folder with 'VQA_RAD Dataset Public.json' + 'VQA_RAD Image Folder', the "
        "JSON, or parquet; slake: folder with <split>.json + imgs/; pathvqa: the original "
        "release's folder (qas/<split>/<split>_qa.pkl + images/<split>/, splits train/val/test), "
        "its qas/ folder or one <split>_qa.pkl (read as data only: a pickle naming any class or "
        "function is refused), or a parquet file or folder of <split>-*.parquet; llava-med: "
        "test.json",
    )
    p.add_argument(
        "--split",
        default="test",
        help="split to evaluate (default: test; 'all' for every split of VQA-RAD, SLAKE or "
        "PathVQA; 'val'/'validation' = validate; a split file given as --data must hold this "
        "split)",
    )
    p.add_argument(
        "--lang",
        default="en",
        choices=["en", "zh", "all"],
        help="SLAKE question language (default: en, as the paper)",
    )
    p.add_argument(
        "--images",
        default=None,
        help="llava-med: image folder (default: next to test.json); pathvqa pickles: the "
        "release's images/ folder (default: images/ beside qas/)",
    )
    p.add_argument("--out", default=None, help="output folder (default: eval_<dataset>_<split>)")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="questions decoded together (default: 8)"
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=64, help="answer length limit (default: 64)"
    )
    add_backend_arg(p)
    add_pack_weights_arg(p)
    p.add_argument(
        "--closed-suffix",
        action="store_true",
        help="append the paper's 'Please choose from the following two options: [yes, no]' to closed yes/no questions",
    )
    p.add_argument(
        "--ablate",
        action="append",
        choices=["blank", "noise", "shuffle"],
        default=None,
        help="also answer with the image replaced (black, noise, another question's image) and report the drop; repeatable",
    )
    p.add_argument(
        "--limit", type=positive_int, default=None, help="only the first N questions (quick runs)"
    )
    p.add_argument(
        "--shard",
        default=None,
        help="K/N: answer every N-th question from K (0-based), for parallel runs",
    )
    add_dtype_arg(p)
    p.add_argument(
        "--bootstrap",
        type=positive_int,
        default=1000,
        help="bootstrap resamples for CIs (default: 1000)",
    )
    p.add_argument(
        "--seed", type=seed_int, default=0, help="seed for CIs, noise and shuffle (default: 0)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    from llavamed.data.vqa import load_vqa
    from llavamed.errors import InputError, format_counts
    from llavamed.eval.report import write_report
    from llavamed.eval.vqa_runner import fmt_pct, run_vqa_eval
    from llavamed.model.checkpoint import resolve_checkpoint
    from llavamed.utils.io import require_writable
    from llavamed.utils.precision import model_dtype

    out = Path(args.out or f"eval_{args.dataset}_{args.split}")
    # Before the data and the model load: a folder that cannot be made (/proc/x, one under a
    # file) ended in a FileNotFoundError traceback at its mkdir once the data had loaded. The
    # answers already in --out are checked against this run later, with the data
    # (vqa_runner.check_before_loading), still before the model.
    require_writable(out, "--out", folder=True)
    samples, rep = load_vqa(
        args.dataset, args.data, split=args.split, lang=args.lang, images=args.images
    )
    print(rep.summary(), file=sys.stderr)
    if not samples:
        raise InputError(args.data, "no usable samples", f"split={args.split}")
    # A run folder means its checkpoint-final, as for train's model.from, serve, chat and web
    # (`--model runs/stage2` said "config.json missing"); answers name it as the direct path does.
    model = resolve_checkpoint(args.model)
    res = run_vqa_eval(
        model,
        samples,
        out,
        batch_size=args.batch_size,
        ablate=args.ablate,
        closed_suffix=args.closed_suffix,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        shard=args.shard,
        seed=args.seed,
        n_resamples=args.bootstrap,
        dtype=model_dtype(args.dtype),
        backend=args.backend,
        pack_weights=args.pack_weights,
        progress=not args.no_progress,
    )
    paths = write_report(res, out, args.dataset, rep.to_dict())
    ov = res["metrics"]["overall"]

    def g(k):
        return fmt_pct(ov[k]["mean"]) if k in ov else "–"

    print(
        f"{args.dataset}: LLaVA-Med metric open recall {g('llava_med_open_recall')}, closed acc "
        f"{g('llava_med_closed_acc')} | strict closed acc {g('strict_closed_acc')}, open exact "
        f"{g('open_exact_match')}, token F1 {g('token_f1')}"
    )
    for cond, ab in res["ablations"].items():
        d = ab["drop"].get("llava_med_closed_acc") or ab["drop"].get("token_f1")
        if d:
            print(
                f"  ablation {cond}: drop {fmt_pct(d['mean'])} [{fmt_pct(d['lo'])}, {fmt_pct(d['hi'])}]"
            )
    print(f"report: {paths['md']}")
    skipped = res["generation"]["image"]["skipped"]
    if skipped:
        reasons = format_counts(skipped)
        print(f"llavamed eval vqa: skipped questions: {reasons} (see the report)", file=sys.stderr)
    if not res["metrics"].get("n_answered"):
        raise InputError(args.data, "no question could be answered", "see the skipped counts above")
    return 0
