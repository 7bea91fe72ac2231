"""Answers per second: our batched evaluation path against one question at a time (the LLaVA-Med
reference loop), same model, same questions, same greedy settings, same dtype, in one run.

    python benchmarks/eval_throughput.py                       # fp32 and bf16, 3 repeats
    python benchmarks/eval_throughput.py --model DIR --n 64 --max-new-tokens 16 --threads 1

Modes, each timed on the same questions:

* ``one at a time``: HF ``generate`` per question — the reference loop, the baseline;
* ``static batch``: HF ``generate`` on left-padded batches of --batch-size (every row waits for
  the batch's longest answer);
* ``engine``: the serve Engine's continuous batching with --batch-size slots (a finished answer
  frees its slot at once; the next question joins), and its image-prefix cache (a question about
  an image already seen skips the vision tower and the image tokens' prefill);
* ``packed weights``: the same on a second copy of the model whose linear weights are prepacked
  for oneDNN (``llavamed.model.cpu_packing``). The packed engine is what ``llavamed eval vqa``
  runs by default; the packed one-at-a-time row separates the packing's share from batching's.

Ratios are against the reference loop (the model as transformers loads it) in the same dtype.
Each repeat runs the modes back to back, in an order rotated per repeat; the table gives medians over repeats (the machine may be shared). Without --model, a default
checkpoint (embedded SmolLM2-135M + the CPU ViT) is composed into --cache once. Questions are
VQA-RAD-style short questions about procedurally drawn images, --per-image questions per image,
listed image by image as the evaluation files list them. The public test splits ask several
questions about each image (SLAKE's English test split about 11, PathVQA's about 8, VQA-RAD's
about 2); --per-image 1 is the worst case for the prefix cache. Greedy answers should not depend
on batching: answers identical to the reference are counted, and so are the token ids each mode
generated in its first repeat (end-of-turn id included; counted from the ids, not the text), so a
speed-up that comes from decoding less shows.
"""

from __future__ import annotations

import argparse
import statistics
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


def load_questions(dataset: str, data: str, split: str, n: int):
    """The first ``n`` English questions of an evaluation set, in file order."""
    from llavamed.data.vqa import load_vqa
    from llavamed.images import load_image

    samples, _ = load_vqa(dataset, data, split=split, lang="en")
    samples = samples[:n]
    imgs = [load_image(s.image) for s in samples]
    per_image = len(samples) / max(1, len({s.image_key for s in samples}))
    source = f"{dataset} {split}, {per_image:.1f} questions per image"
    return imgs, [s.question for s in samples], source


def _timed(fn):
    # Process CPU time beside wall time: other jobs on a shared machine inflate wall time
    # unevenly between modes; CPU time shows the work each mode actually did.
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


class TokenCounter:
    """Counts the token ids each path really generates, per answer, where they are produced: the
    ids HF ``generate`` returns after the prompt (up to and including the first end-of-turn id;
    a finished row's padding after it is not generated), and the engine's own
    ``completion_tokens`` (its end-of-turn id included, as the API counts it). Decoding and
    re-tokenizing the answer text instead counts 0 for a model that emits only special tokens
    (skipped when decoding) and miscounts any text whose tokenization differs from the ids.

    Installed as thin wrappers on one generator's model and engine instance; the timed code
    paths are unchanged apart from one list append per answer."""

    def __init__(self, gen, ignore_eos: bool):
        self.counts: list[int] = []
        eos = gen.model.generation_config.eos_token_id
        eos = [] if eos is None or ignore_eos else [eos] if isinstance(eos, int) else list(eos)
        self.eos = {int(e) for e in eos}
        model_generate = gen.model.generate

        def generate(*a, **kw):
            out = model_generate(*a, **kw)
            new = out[:, kw["input_ids"].shape[1] :].tolist()
            for row in new:
                stop = next((k for k, t in enumerate(row) if t in self.eos), None)
                self.counts.append(len(row) if stop is None else stop + 1)
            return out

        gen.model.generate = generate
        eng = gen.engine()
        engine_submit = eng.submit

        def submit(prompt, params=None, on_event=None):
            def seen(ev):
                if ev.kind == "done":
                    self.counts.append(ev.completion_tokens)
                if on_event is not None:
                    on_event(ev)

            return engine_submit(prompt, params, on_event=seen)

        eng.submit = submit

    def take(self) -> list[int]:
        got, self.counts = self.counts, []
        return got


def bench_dtype(model_dir, dtype: str, args, imgs, qs) -> dict:
    import torch

    from llavamed.eval.vqa_runner import VQAGenerator

    def generator(pack: bool) -> VQAGenerator:
        return VQAGenerator(
            model_dir,
            dtype=getattr(torch, dtype),
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            ignore_eos=args.fixed_length,
            pack_weights=pack,
        )

    # The reference loop runs on the model exactly as transformers loads it; our path is what
    # `llavamed eval vqa` runs by default, on a second copy with prepacked linear weights.
    plain = generator(False)
    packed = generator(True) if args.pack else None
    if packed is not None and not packed.packed_linears:
        print(f"  [{dtype}] linear weights could not be packed here; packed rows dropped")
        packed.close()
        packed = None
    bs = args.batch_size

    def single(gen):
        return lambda: [gen.generate([im], [q])[0] for im, q in zip(imgs, qs, strict=True)]

    def static(gen):
        def run():
            out = []
            for i in range(0, len(qs), bs):
                out += gen.generate(imgs[i : i + bs], qs[i : i + bs])
            return out

        return run

    def engine(gen):
        def run():
            gen.engine().clear_prefix_cache()  # every repeat starts cold, as a fresh evaluation
            got = dict(gen.answer_stream(zip(range(len(qs)), imgs, qs, strict=True)))
            return [got[i] for i in range(len(qs))]

        return run

    modes = {
        "one at a time (reference loop)": single(plain),
        f"static batch {bs}": static(plain),
        f"engine, {bs} slots": engine(plain),
    }
    if packed is not None:
        modes["one at a time, packed weights"] = single(packed)
        modes[f"engine, {bs} slots, packed weights (eval vqa default)"] = engine(packed)
    gens = [g for g in (plain, packed) if g is not None]
    try:
        counters = [TokenCounter(gen, args.fixed_length) for gen in gens]
        for gen in gens:  # warm-up: allocator, oneDNN kernel selection, the worker thread
            gen.generate(imgs[:2], qs[:2])
            dict(gen.answer_stream(zip(range(2), imgs[:2], qs[:2], strict=True)))
        for c in counters:
            c.take()
        runs: dict[str, list] = {m: [] for m in modes}
        answers: dict[str, list[list[str]]] = {m: [] for m in modes}
        # Generated token ids per answer, per repeat (the engine's in completion order).
        token_counts: dict[str, list[list[int]]] = {m: [] for m in modes}
        names = list(modes)
        for r in range(args.repeats):
            # Rotated each repeat, so slow drift of a shared machine hits every mode alike.
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out, wall, cpu = _timed(modes[name])
                runs[name].append((wall, cpu))
                answers[name].append(out)
                token_counts[name].append([n for c in counters for n in c.take()])
                print(f"  [{dtype} repeat {r + 1}] {name}: {wall:.2f} s wall", flush=True)
        ref = answers[next(iter(modes))][0]
        n_tok = token_counts[next(iter(modes))][0]
        st = gens[-1].engine().stats
        prefix = (st["prefix_hits"], st["prefix_misses"])
    finally:
        for gen in gens:
            gen.close()
    rows = {}
    for name in modes:
        walls = [w for w, _ in runs[name]]
        cpus = [c for _, c in runs[name]]
        rows[name] = {
            "wall": statistics.median(walls),
            "cpu": statistics.median(cpus),
            "walls": walls,
            # the worst repeat: the engine's batch composition depends on thread timing
            "same": min(
                sum(a == b for a, b in zip(ref, out, strict=True)) for out in answers[name]
            ),
            # Token ids this mode generated (first repeat): where answers differ (bf16), a
            # speed-up may partly come from decoding less.
            "gen_tokens": sum(token_counts[name][0]),
        }
    return {"rows": rows, "n_tok": n_tok, "prefix": prefix}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint folder (default: compose the embedded one)"
    )
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "llavamed-bench-ckpt"))
    ap.add_argument("--n", type=int, default=32, help="questions (default 32)")
    ap.add_argument(
        "--per-image",
        type=int,
        default=4,
        help="questions asked about each image (default 4; 1 = no image shared)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="dtypes to measure, each against the reference loop in the same dtype",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are shown")
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
    ap.add_argument(
        "--dataset",
        default=None,
        choices=["vqa-rad", "slake", "pathvqa", "llava-med"],
        help="take the first --n questions of a real evaluation set instead (with --data; "
        "English, file order, so questions come image by image as in an evaluation)",
    )
    ap.add_argument("--data", default=None, help="the --dataset's path, as for 'eval vqa'")
    ap.add_argument("--split", default="test")
    ap.add_argument(
        "--no-pack",
        dest="pack",
        action="store_false",
        help="skip the packed-weight rows (oneDNN-prepacked linears, eval vqa's default)",
    )
    args = ap.parse_args()
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")  # torch.set_num_threads raised a RuntimeError
    if (args.dataset is None) != (args.data is None):
        ap.error("--dataset and --data go together")
    if min(args.n, args.repeats, args.batch_size, args.max_new_tokens) < 1:
        ap.error("--n, --repeats, --batch-size and --max-new-tokens must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    # The questions and a given --model are checked before a default model is composed, so a
    # wrong path is one line at once; a run folder stands for its checkpoint-final, as in serve.
    if args.dataset:
        imgs, qs, source = load_questions(args.dataset, args.data, args.split, args.n)
        if not qs:
            ap.error(f"--dataset {args.dataset}: no English questions in its {args.split} split")
        args.n = len(qs)
    else:
        k = max(1, args.per_image)
        distinct = make_images(-(-args.n // k))
        imgs = [distinct[i // k] for i in range(args.n)]
        qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.n)]
        source = f"drawn images, {k} questions per image"
    if args.model is not None:
        from llavamed.model.checkpoint import resolve_checkpoint

        model_dir = resolve_checkpoint(args.model)
    else:
        from llavamed.model.compose import ModelSpec, init_checkpoint

        model_dir = Path(args.cache)
        if not (model_dir / "config.json").exists():
            init_checkpoint(model_dir, ModelSpec())
    results = {dt: bench_dtype(model_dir, dt, args, imgs, qs) for dt in args.dtype}

    print(
        f"\nmodel: {model_dir}  questions: {args.n} ({source})  "
        f"max_new_tokens: {args.max_new_tokens}  "
        f"{'fixed length' if args.fixed_length else 'natural stopping'}  "
        f"torch threads: {torch.get_num_threads()}  repeats: {args.repeats} (medians)"
    )
    print(
        "| dtype | mode | wall s | answers/s | speed-up (wall) | speed-up (CPU s) "
        "| identical to reference (worst repeat) | token ids generated (1st repeat) |"
        "\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for dt, res in results.items():
        rows = res["rows"]
        ref = next(iter(rows.values()))
        for name, r in rows.items():
            print(
                f"| {dt} | {name} | {r['wall']:.2f} | {args.n / r['wall']:.3f} | "
                f"{ref['wall'] / r['wall']:.2f}x | {ref['cpu'] / r['cpu']:.2f}x | "
                f"{r['same']}/{args.n} | {r['gen_tokens']} |"
            )
    for dt, res in results.items():
        n_tok = res["n_tok"]
        walls = {k: " ".join(f"{w:.1f}" for w in r["walls"]) for k, r in res["rows"].items()}
        print(
            f"{dt}: reference answer length (generated token ids, end-of-turn included) "
            f"mean {np.mean(n_tok):.1f}, max {max(n_tok)}"
        )
        print(f"{dt}: wall s per repeat: {walls}")
        hits, misses = res["prefix"]
        print(f"{dt}: last engine's image-prefix cache: {hits} hits, {misses} misses (all repeats)")


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "eval_throughput")
