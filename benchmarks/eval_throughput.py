"""Answers per second: batched generation (batch 8, left padding) against one question at a time
(the LLaVA-Med reference loop), same model, same questions, same greedy settings, in one run.

    python benchmarks/eval_throughput.py                       # embedded checkpoint, built once
    python benchmarks/eval_throughput.py --model DIR --n 64 --max-new-tokens 16

Without --model, a default checkpoint (embedded SmolLM2-135M + the CPU ViT) is composed into
--cache once. Questions are VQA-RAD-style short questions about procedurally drawn images; the
answers of both modes are compared, since greedy decoding should not depend on batching.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

QUESTIONS = [
    "Is there a pleural effusion?",
    "Which organ is shown in this image?",
    "Is the heart enlarged?",
    "What imaging modality was used?",
    "Where is the lesion located?",
    "Is this a normal study?",
    "How many nodules are visible?",
    "What abnormality is seen in the left lung?",
]


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    imgs = []
    for _ in range(n):
        base = rng.integers(20, 80)
        img = Image.new("RGB", (256, 256), (int(base),) * 3)
        d = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = (int(v) for v in rng.integers(30, 220, 3))
            r = r // 6
            d.ellipse(
                [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(100, 255, 3))
            )
        imgs.append(img)
    return imgs


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint folder (default: compose the embedded one)"
    )
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llavamed-bench-ckpt"))
    ap.add_argument("--n", type=int, default=32, help="questions (default 32)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--fixed-length",
        action="store_true",
        help="ignore EOS so every answer has max_new_tokens tokens (isolates batching "
        "from answer length; default: natural stopping, as in a real evaluation)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice). On a shared machine 1 "
        "avoids OpenMP spin-waiting on descheduled threads, which distorts both modes",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from llavamed.eval.vqa_runner import VQAGenerator

    model_dir = args.model
    if model_dir is None:
        from llavamed.model.compose import ModelSpec, init_checkpoint

        model_dir = Path(args.cache)
        if not (model_dir / "config.json").exists():
            init_checkpoint(model_dir, ModelSpec())
    gen = VQAGenerator(
        model_dir, dtype=getattr(torch, args.dtype), max_new_tokens=args.max_new_tokens
    )
    imgs = make_images(args.n)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.n)]
    if args.fixed_length:
        gen.model.generation_config.eos_token_id = None
    gen.generate(imgs[:2], qs[:2])  # warm-up (allocations, lazy init)

    # Wall time is the headline; process CPU time is printed beside it because other jobs on a
    # shared machine inflate wall time unevenly between the two phases.
    t0, c0 = time.perf_counter(), time.process_time()
    single = [gen.generate([im], [q])[0] for im, q in zip(imgs, qs, strict=True)]
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    batched = []
    for i in range(0, args.n, args.batch_size):
        batched += gen.generate(imgs[i : i + args.batch_size], qs[i : i + args.batch_size])
    t_batch, c_batch = time.perf_counter() - t0, time.process_time() - c0
    n_tok = [len(gen.processor.tokenizer(a)["input_ids"]) for a in single]

    same = sum(a == b for a, b in zip(single, batched, strict=True))
    print(
        f"model: {model_dir}  questions: {args.n}  max_new_tokens: {args.max_new_tokens}  "
        f"dtype: {args.dtype}  torch threads: {torch.get_num_threads()}"
    )
    print(f"answer length (tokens): mean {np.mean(n_tok):.1f}, max {max(n_tok)}")
    print(
        "| mode | wall s | answers/s (wall) | CPU s | answers per CPU-s |\n|---|---:|---:|---:|---:|"
    )
    print(
        f"| one at a time (reference loop) | {t_single:.2f} | {args.n / t_single:.3f} | "
        f"{c_single:.2f} | {args.n / c_single:.3f} |"
    )
    print(
        f"| batched (batch {args.batch_size}) | {t_batch:.2f} | {args.n / t_batch:.3f} | "
        f"{c_batch:.2f} | {args.n / c_batch:.3f} |"
    )
    print(
        f"speed-up: {t_single / t_batch:.2f}x wall, {c_single / c_batch:.2f}x CPU time; "
        f"identical answers: {same}/{args.n}"
    )


if __name__ == "__main__":
    main()
