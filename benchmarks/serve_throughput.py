"""Serving throughput: completions per second at concurrency C against one-at-a-time requests,
same server, same model, same prompts, in one run. Target: >= 3x at concurrency 8.

    .venv/bin/python benchmarks/serve_throughput.py                      # tiny random llava
    .venv/bin/python benchmarks/serve_throughput.py --model embedded     # SmolLM2-135M, text
    .venv/bin/python benchmarks/serve_throughput.py --model DIR --requests 48

Requests go through real HTTP (the server runs in a background thread on 127.0.0.1) with greedy
decoding and a fixed max_tokens. The two phases alternate ``--repeats`` times, each starting with
an empty image-prefix cache (so neither reuses the other's vision work), and the speed-up is the
median of the per-repeat ratios. Each concurrent phase's answers are compared with the first sequential
phase's and the number that differ is printed (a speed-up must not come from decoding less; in
bf16, batch layout can change greedy answers). A sequential
request pays the engine's 10 ms wait for company, as a lone user of a real server does. Prints a
table and writes it as JSON with --json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

QUESTIONS = [
    "Describe the main finding in this image.",
    "Which imaging modality is this?",
    "Is there any abnormality? Answer briefly.",
    "What organ is shown?",
    "Summarise the key features a radiologist would report.",
    "Is the heart enlarged?",
    "Where is the lesion located?",
    "What stain was used for this section?",
]


def _png(i: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64 + 8 * i, 64), (30 * i % 255, 90, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_requests(n: int, model: str, multimodal: bool, max_tokens: int) -> list[dict]:
    reqs = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)] + (f" (case {i})" if i >= len(QUESTIONS) else "")
        content: list[dict] | str = q
        if multimodal:
            content = [
                {"type": "image_url", "image_url": {"url": _png(i % 8)}},
                {"type": "text", "text": q},
            ]
        reqs.append(
            {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return reqs


def run_phase(url: str, reqs: list[dict], concurrency: int) -> dict:
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency))
    lat: list[float] = []
    texts: list[str | None] = []
    tokens = 0
    errors = 0

    def one(body):
        t = time.perf_counter()
        r = client.post(url, json=body)
        return r, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for r, dt in pool.map(one, reqs):
            if r.status_code != 200:
                errors += 1
                texts.append(None)
                continue
            lat.append(dt)
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            texts.append(body["choices"][0]["message"]["content"])
    wall = time.perf_counter() - t0
    client.close()
    lat.sort()
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "errors": errors,
        "seconds": round(wall, 2),
        "completions_per_s": round(len(lat) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "texts": texts,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (random tiny llava, built in a temp dir), 'embedded', or a DIR",
    )
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of both phases")
    ap.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="serve the model as transformers loads it (default: prepacked linears, as serve)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    from llavamed.serve.api import serve_in_background
    from llavamed.serve.engine import EngineSettings

    model = args.model
    if model == "tiny":
        from llavamed.model.compose import ModelSpec, init_checkpoint

        model = init_checkpoint(
            Path(tempfile.mkdtemp()) / "tiny-llava",
            ModelSpec(lm="tiny", vision="tiny", template="chatml"),
        )
    srv = serve_in_background(
        model,
        dtype=args.dtype,
        pack_weights=args.pack_weights,
        max_completion_tokens=max(args.max_tokens, 1),
        engine_settings=EngineSettings(
            max_batch_size=args.concurrency, max_queue=max(64, args.requests)
        ),
    )
    try:
        name = srv.engine.name
        reqs = build_requests(args.requests, name, srv.engine.is_multimodal, args.max_tokens)
        url = srv.base_url + "/chat/completions"
        run_phase(url, reqs[:2], 1)  # warm-up: first-call allocations, tokenizer caches
        rounds = []
        for _ in range(args.repeats):
            pair = []
            for c in (1, args.concurrency):
                srv.engine.clear_prefix_cache()  # no phase reuses another's image prefixes
                pair.append(run_phase(url, reqs, c))
            rounds.append(tuple(pair))
    finally:
        srv.stop()
    reference = rounds[0][0]["texts"]
    differ = sum(
        a != b for _, conc in rounds for a, b in zip(reference, conc["texts"], strict=True)
    )
    ratios = [conc["completions_per_s"] / seq["completions_per_s"] for seq, conc in rounds]
    speedup = statistics.median(ratios)
    # The round whose ratio is the median stands for both phases in the table.
    seq, conc = rounds[ratios.index(sorted(ratios)[len(ratios) // 2])]
    for r in (seq, conc):
        r.pop("texts")
    print(
        f"model={name} requests={args.requests} max_tokens={args.max_tokens} "
        f"dtype={args.dtype} packed={args.pack_weights} (greedy; HTTP on 127.0.0.1)"
    )
    print(f"{'mode':<14}{'compl/s':>9}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'errors':>8}")
    for label, r in (("sequential", seq), (f"concurrency {args.concurrency}", conc)):
        print(
            f"{label:<14}{r['completions_per_s']:>9.2f}{r['tokens_per_s']:>9.1f}"
            f"{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}{r['errors']:>8}"
        )
    print(
        f"speedup: {speedup:.2f}x, median of {args.repeats} rounds "
        f"({', '.join(f'{x:.2f}' for x in ratios)}; target >= 3x); "
        f"answers differing from the sequential ones: {differ} of {len(reqs) * args.repeats}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": name,
                    "sequential": seq,
                    "concurrent": conc,
                    "speedup": round(speedup, 2),
                    "speedups": [round(x, 3) for x in ratios],
                    "answers_differing": differ,
                },
                indent=2,
            )
        )
    return 0 if seq["errors"] == conc["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
