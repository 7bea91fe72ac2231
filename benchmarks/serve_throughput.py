"""Serving throughput: completions per second at concurrency C against one-at-a-time requests,
same server, same model, same prompts, in one run. Target: >= 3x at concurrency 8.

    .venv/bin/python benchmarks/serve_throughput.py                      # tiny random llava
    .venv/bin/python benchmarks/serve_throughput.py --model embedded     # SmolLM2-135M, text
    .venv/bin/python benchmarks/serve_throughput.py --model DIR --requests 48

Requests go through real HTTP (the server runs in a background thread on 127.0.0.1) with greedy
decoding and a fixed max_tokens. The phases alternate ``--repeats`` times, each starting with
an empty image-prefix cache (so neither reuses the other's vision work), and the speed-up is the
median of the per-repeat ratios. Each concurrent phase's answers are compared with the first sequential
phase's and the number that differ is printed (a speed-up must not come from decoding less; in
bf16, batch layout can change greedy answers).

A sequential request pays the engine's batching wait (10 ms for company, as a lone user of a
real server does), so each round also runs the sequential phase with that wait set to 0: the
table's ``sequential, no batching wait`` row, and the speed-up against it, is the baseline
without that handicap. Table cells are medians over the rounds (statistics.median), errors are
totals; the speed-up columns are medians of the per-round ratios, as in the headline. Prints a
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table  # noqa: E402

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
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (random tiny llava, built in a temp dir), 'embedded', or a DIR",
    )
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds of the phases")
    ap.add_argument(
        "--no-pack-weights",
        dest="pack_weights",
        action="store_false",
        help="serve the model as transformers loads it (default: prepacked linears, as serve)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if min(args.repeats, args.requests, args.concurrency, args.max_tokens) < 1:
        # --max-tokens 0: every request refused, a table of zeros and "nanx" speed-ups
        ap.error("--repeats, --requests, --concurrency and --max-tokens must be >= 1")

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
        wait = srv.engine.settings.batch_wait_s
        phases = (("seq", 1, wait), ("seq0", 1, 0.0), ("conc", args.concurrency, wait))
        rounds: list[dict[str, dict]] = []
        for _ in range(args.repeats):
            got = {}
            for key, c, batch_wait in phases:
                srv.engine.settings.batch_wait_s = batch_wait  # read by the worker per batch
                srv.engine.clear_prefix_cache()  # no phase reuses another's image prefixes
                got[key] = run_phase(url, reqs, c)
            srv.engine.settings.batch_wait_s = wait
            rounds.append(got)
    finally:
        srv.stop()
    reference = rounds[0]["seq"]["texts"]
    differ = {
        key: sum(
            a != b for rnd in rounds for a, b in zip(reference, rnd[key]["texts"], strict=True)
        )
        for key in ("seq0", "conc")
    }
    summary = {key: summarise([rnd[key] for rnd in rounds]) for key, _, _ in phases}

    def ratios(num: str, den: str) -> list[float]:
        return [
            rnd[num]["completions_per_s"] / rnd[den]["completions_per_s"]
            if rnd[den]["completions_per_s"]
            else float("nan")
            for rnd in rounds
        ]

    vs_seq = {key: ratios(key, "seq") for key, _, _ in phases}
    vs_seq0 = {key: ratios(key, "seq0") for key, _, _ in phases}
    speedup = statistics.median(vs_seq["conc"])
    speedup0 = statistics.median(vs_seq0["conc"])
    print(
        f"model={name} requests={args.requests} max_tokens={args.max_tokens} "
        f"dtype={args.dtype} packed={args.pack_weights} (greedy; HTTP on 127.0.0.1); "
        f"medians of {args.repeats} round(s)"
    )
    labels = {
        "seq": f"sequential (pays {1000 * wait:.0f} ms batching wait)",
        "seq0": "sequential, no batching wait",
        "conc": f"concurrency {args.concurrency}",
    }
    rows = []
    for key, _, _ in phases:
        r = summary[key]
        rows.append(
            [
                labels[key],
                f"{r['completions_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                "-" if r["p50_s"] is None else f"{r['p50_s']:.2f}",
                "-" if r["p95_s"] is None else f"{r['p95_s']:.2f}",
                r["errors"],
                f"{statistics.median(vs_seq[key]):.2f}x",
                f"{statistics.median(vs_seq0[key]):.2f}x",
            ]
        )
    print_table(
        [
            "mode",
            "compl/s",
            "tok/s",
            "p50 s",
            "p95 s",
            "errors",
            "speed-up vs sequential",
            "vs no-wait sequential",
        ],
        rows,
    )
    print(
        f"speedup: {speedup:.2f}x, median of {args.repeats} rounds "
        f"({', '.join(f'{x:.2f}' for x in vs_seq['conc'])}; target >= 3x) against sequential "
        f"requests that each pay the engine's {1000 * wait:.0f} ms batching wait; "
        f"{speedup0:.2f}x against sequential requests without it "
        f"({', '.join(f'{x:.2f}' for x in vs_seq0['conc'])}); "
        f"answers differing from the first sequential ones: {differ['conc']} of "
        f"{len(reqs) * args.repeats} (no-wait sequential: {differ['seq0']})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": name,
                    "rounds": args.repeats,
                    "batch_wait_s": wait,
                    "sequential": summary["seq"],
                    "sequential_no_wait": summary["seq0"],
                    "concurrent": summary["conc"],
                    "speedup": round(speedup, 2),
                    "speedups": [round(x, 3) for x in vs_seq["conc"]],
                    "speedup_vs_no_wait": round(speedup0, 2),
                    "speedups_vs_no_wait": [round(x, 3) for x in vs_seq0["conc"]],
                    "answers_differing": differ["conc"],
                    "answers_differing_no_wait": differ["seq0"],
                    "completions_per_s_by_round": {
                        out: [rnd[key]["completions_per_s"] for rnd in rounds]
                        for key, out in (
                            ("seq", "sequential"),
                            ("seq0", "sequential_no_wait"),
                            ("conc", "concurrent"),
                        )
                    },
                },
                indent=2,
            )
        )
    return 0 if all(summary[k]["errors"] == 0 for k in summary) else 1


def summarise(runs: list[dict]) -> dict:
    """One phase over the rounds: the median of each measure (statistics.median, so with an even
    number of rounds the mean of the middle two); errors are summed."""

    def med(key):
        vals = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(vals), 3) if vals else None

    return {
        "concurrency": runs[0]["concurrency"],
        "requests": runs[0]["requests"],
        "rounds": len(runs),
        "errors": sum(r["errors"] for r in runs),
        "seconds": med("seconds"),
        "completions_per_s": med("completions_per_s"),
        "tokens_per_s": med("tokens_per_s"),
        "completion_tokens": med("completion_tokens"),
        "p50_s": med("p50_s"),
        "p95_s": med("p95_s"),
    }


if __name__ == "__main__":
    from _common import run_script

    run_script(main, "serve_throughput")
