"""Bounded load test: 200 requests at concurrency 16 against the real server (tiny random llava,
half of them with an image, some streamed). No 5xx allowed; p50/p95 latency are reported."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time

import pytest

httpx = pytest.importorskip("httpx")

from llavamed.serve.api import serve_in_background  # noqa: E402
from llavamed.serve.engine import Engine, EngineSettings  # noqa: E402

N_REQUESTS = 200
CONCURRENCY = 16


def _png(i: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40 + i % 7, 40), (i * 37 % 255, 80, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(i: int) -> dict:
    text = f"Question {i}: is there a lesion?"
    content = (
        [{"type": "image_url", "image_url": {"url": _png(i)}}, {"type": "text", "text": text}]
        if i % 2
        else text
    )
    return {
        "model": "tiny-llava",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4 + i % 9,
        "temperature": 0.7,
        "seed": i,
        "stream": i % 4 == 0,
    }


async def _drive(url: str) -> tuple[list[float], dict[int, int], float]:
    sem = asyncio.Semaphore(CONCURRENCY)
    lat: list[float] = []
    codes: dict[int, int] = {}
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int):
            async with sem:
                t = time.perf_counter()
                body = _body(i)
                if body["stream"]:
                    async with client.stream("POST", url, json=body) as r:
                        lines = [ln async for ln in r.aiter_lines() if ln.startswith("data:")]
                        if r.status_code == 200:
                            assert lines[-1] == "data: [DONE]"
                            assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"]
                else:
                    r = await client.post(url, json=body)
                    if r.status_code == 200:
                        assert r.json()["usage"]["completion_tokens"] <= body["max_tokens"]
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(N_REQUESTS)])
        wall = time.perf_counter() - t0
    return lat, codes, wall


def test_load_200_requests_at_concurrency_16(tiny_llava_dir, record_property, capsys):
    eng = Engine.from_path(tiny_llava_dir, settings=EngineSettings(max_batch_size=8, max_queue=64))
    srv = serve_in_background(eng, max_completion_tokens=32)
    try:
        lat, codes, wall = asyncio.run(_drive(srv.base_url + "/chat/completions"))
    finally:
        srv.stop()
        eng.close()
    lat.sort()
    p50 = statistics.median(lat)
    p95 = lat[int(0.95 * len(lat)) - 1]
    record_property("p50_s", round(p50, 3))
    record_property("p95_s", round(p95, 3))
    with capsys.disabled():
        print(
            f"\nload: {N_REQUESTS} requests, concurrency {CONCURRENCY}: {wall:.1f}s, "
            f"p50 {p50:.3f}s, p95 {p95:.3f}s, statuses {codes}, "
            f"max batch {eng.stats['max_batch']}"
        )
    assert sum(codes.values()) == N_REQUESTS
    assert not any(code >= 500 for code in codes), codes
    assert codes.get(200) == N_REQUESTS  # the queue (64) holds all 16 in flight: no 503 either
    assert eng.stats["max_batch"] >= 4
