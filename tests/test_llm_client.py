"""The shared OpenAI-compatible client against a real HTTP stub server with injected faults."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time

import httpx
import pytest

from llavamed.llm.cache import ResponseCache, cache_key
from llavamed.llm.client import (
    ClientOptions,
    LLMClient,
    LLMError,
    TokenBucket,
    backoff_delay,
    estimate_tokens,
    for_each_concurrently,
    lookup_price,
    parse_retry_after,
)
from openai_stub_server import StubServer

MSGS = [{"role": "user", "content": "Describe the chest X-ray."}]


@pytest.fixture
def stub():
    with StubServer() as srv:
        yield srv


def opts(srv: StubServer, **kw) -> ClientOptions:
    base = dict(base_url=srv.base_url, model="stub", backoff_base=0.01, backoff_max=0.05)
    base.update(kw)
    return ClientOptions(**base)


def run(coro):
    return asyncio.run(coro)


async def _chat(o: ClientOptions, messages=MSGS, n: int = 1, **kw):
    async with LLMClient(o, seed=0) as c:
        results = await asyncio.gather(*[c.chat(messages, **kw) for _ in range(n)])
        return c.stats, results


def test_plain_success_counts_usage_and_cost(stub):
    stats, [r] = run(_chat(opts(stub, price_in=1.0, price_out=2.0)))
    assert r.text.startswith("User:") and r.finish_reason == "stop"
    assert not r.cached and r.attempts == 1
    assert r.prompt_tokens > 0 and r.completion_tokens > 0
    assert stats.cost_usd == pytest.approx((r.prompt_tokens * 1 + r.completion_tokens * 2) / 1e6)
    assert stub.requests[0]["model"] == "stub"


@pytest.mark.parametrize(
    "fault",
    [
        "429",
        "429ms",
        "500",
        "503",
        "malformed",
        "nochoices",
        "truncated",
        "reset",
        "badgzip",
        "deepjson",
    ],  # fmt: skip
)
def test_retryable_faults_are_retried(stub, fault):
    stub.plan([fault, fault])
    stats, [r] = run(_chat(opts(stub)))
    assert r.attempts == 3 and stats.retries == 2 and stub.count == 3
    assert r.text.startswith("User:")
    assert sum(stats.retry_reasons.values()) == 2


def test_truncated_stream_is_retried_and_stream_text_assembled(stub):
    stub.plan(["truncated"])
    stats, [r] = run(_chat(opts(stub, stream=True)))
    assert stats.retry_reasons["truncated_response"] == 1
    assert r.text == stub.responder(stub.requests[-1])
    assert r.prompt_tokens > 0 and not r.usage_estimated


def test_an_error_chunk_mid_stream_is_retried_not_kept(stub):
    # The reply around the error chunk is incomplete: it must not be returned (or cached).
    stub.plan(["streamerror"])
    stats, [r] = run(_chat(opts(stub, stream=True)))
    assert stats.retry_reasons["error_body"] == 1 and r.attempts == 2
    assert r.text == stub.responder(stub.requests[-1])


def test_timeout_is_retried(stub):
    stub.hang_s = 1.0
    stub.plan(["hang"])
    t0 = time.monotonic()
    stats, [r] = run(_chat(opts(stub, timeout=0.3)))
    assert stats.retry_reasons["timeout"] == 1 and r.attempts == 2
    assert time.monotonic() - t0 < 1.0  # the timeout fired, we did not wait out the hang


def test_retry_after_is_honoured(stub):
    stub.retry_after = 0.5
    stub.plan(["429"])
    t0 = time.monotonic()
    run(_chat(opts(stub, backoff_base=0.001, backoff_max=0.001)))
    assert time.monotonic() - t0 >= 0.5


def test_retries_exhausted_raise(stub):
    stub.plan(["500"] * 10)
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub, max_retries=2)))
    assert ei.value.kind == "http_500" and ei.value.attempts == 3 and not ei.value.fatal
    assert stub.count == 3


def test_client_errors_not_retried(stub):
    stub.plan(["400"])
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub)))
    assert ei.value.kind == "http_400" and not ei.value.fatal and stub.count == 1
    stub.plan(["401"])
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub)))
    assert ei.value.fatal


@pytest.mark.parametrize("status", ["401", "402", "403", "404"])
def test_statuses_every_request_would_get_stop_the_job(stub, status):
    """A wrong key, an account out of credits (402), a wrong endpoint or model: fatal at once."""
    stub.plan([status])
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub)))
    assert ei.value.kind == f"http_{status}" and ei.value.fatal and not ei.value.rejected
    assert stub.count == 1


@pytest.mark.parametrize("stream", [False, True])
def test_openai_out_of_credits_429_stops_the_job_at_once(stub, stream):
    """OpenAI says "no credits left" with a 429 (insufficient_quota), not a 402: it was retried
    with backoff like a rate limit, max_retries times for every figure of the job."""
    stub.default = "quota"
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub, stream=stream, max_retries=3)))
    assert ei.value.kind == "insufficient_quota" and ei.value.fatal
    assert "no credits left" in str(ei.value) and stub.count == 1
    stub.default = "ok"
    stub.plan(["429"])  # a rate limit is still waited out
    _, [r] = run(_chat(opts(stub, stream=stream)))
    assert r.attempts == 2


@pytest.mark.parametrize(
    "url, key",
    [
        ("127.0.0.1:{port}/v1", None),  # no http:// (httpx.UnsupportedProtocol)
        ("ftp://127.0.0.1:{port}/v1", None),
        ("http://127.0.0.1:{port}:{port}/v1", None),  # httpx.InvalidURL
        ("http://127.0.0.1:{port}/v1", "sk-secret\n"),  # a key file's newline: LocalProtocolError
    ],
)
def test_a_request_that_can_never_be_sent_is_fatal_at_once(stub, url, key):
    url = url.format(port=stub.port)

    async def go():
        async with LLMClient(opts(stub, base_url=url, api_key=key, max_retries=50)) as c:
            with pytest.raises(LLMError) as ei:
                await asyncio.gather(*[c.chat(MSGS) for _ in range(3)])
            return ei.value, c.stats

    exc, stats = run(go())
    assert exc.fatal and exc.attempts == 1 and stats.retries == 0 and stub.count == 0
    assert url.rstrip("/") + "/chat/completions" in str(exc)
    assert "sk-secret" not in str(exc)  # the header value is the API key: never in a message


def _dead_url() -> str:
    with StubServer() as srv:
        url = srv.base_url
    return url  # nothing listens there any more: every connection is refused


def test_consecutive_connection_failures_across_requests_stop_the_job():
    url = _dead_url()

    async def go(wait=0.0):
        o = ClientOptions(base_url=url, model="m", backoff_base=0.01, backoff_max=0.02)
        o.max_retries = 1000  # without the breaker, each request retries a thousand times
        o.unreachable_after_s = wait
        async with LLMClient(o, seed=0) as c:
            with pytest.raises(LLMError) as ei:
                await asyncio.gather(*[c.chat(MSGS) for _ in range(4)])
            return ei.value, c.stats

    t0 = time.monotonic()
    exc, stats = run(go())
    assert exc.fatal and exc.kind == "server_unreachable"
    assert f"server unreachable at {url}/chat/completions: 10 requests in a row failed" in str(exc)
    assert 10 <= stats.requests <= 13 and time.monotonic() - t0 < 5
    # ... but only once no answer has come for unreachable_after_s either: a server that
    # restarts is waited for (the default is 120 s)
    t0 = time.monotonic()
    exc, stats = run(go(wait=0.8))
    assert exc.kind == "server_unreachable" and time.monotonic() - t0 >= 0.8
    assert stats.requests > 13


def test_a_server_that_never_answers_stops_the_job_like_a_dead_one(stub):
    """Timeouts did not count towards the breaker: a server that takes connections and never
    answers had every record retried to the end (7 attempts of --timeout each), record after
    record, for the whole job."""
    stub.hang_s = 3.0
    stub.default = "hang"

    async def go(**kw):
        o = opts(stub, timeout=0.1, max_retries=1000, unreachable_after_s=0.0, **kw)
        async with LLMClient(o, seed=0) as c:
            with pytest.raises(LLMError) as ei:
                await asyncio.gather(*[c.chat(MSGS) for _ in range(4)])
            return ei.value, c.stats

    exc, stats = run(go())
    assert exc.fatal and exc.kind == "server_unreachable"
    assert "10 requests in a row timed out (>0.1s)" in str(exc) and "raise --timeout" in str(exc)
    assert 10 <= stats.requests <= 13 and stats.retry_reasons["timeout"] >= 9
    # A slow server that still answers now and then keeps the job going: each answer resets
    # the count, so 9 timeouts over three requests, 3 between answers, never make 4 in a row.
    # (Another server: on a loaded machine the first part's last requests, sent before the
    # client gave up, reached the first one late and took entries of this plan.)
    with StubServer() as slow:
        slow.hang_s = 3.0
        slow.plan((["hang"] * 3 + ["ok"]) * 3)

        async def one_by_one():
            o = opts(
                slow, timeout=0.1, max_retries=20, unreachable_after_s=0.0, max_silent_attempts=4
            )
            async with LLMClient(o, seed=0) as c:
                return c.stats, [await c.chat(MSGS) for _ in range(3)]

        stats, results = run(one_by_one())
    assert [r.attempts for r in results] == [4, 4, 4] and stats.retry_reasons["timeout"] == 9


def test_missing_usage_is_estimated(stub):
    stub.plan(["nousage"])
    stats, [r] = run(_chat(opts(stub)))
    assert r.usage_estimated and stats.usage_estimated_responses == 1
    assert r.completion_tokens == estimate_tokens(r.text)


def test_cache_makes_rerun_free(stub, tmp_path):
    o = opts(stub, cache_path=str(tmp_path / "c.sqlite"), price_in=10, price_out=10)
    s1, [a] = run(_chat(o, temperature=0.7, seed=3))
    s2, [b] = run(_chat(o, temperature=0.7, seed=3))
    assert stub.count == 1 and b.cached and b.text == a.text
    assert s2.cache_hits == 1 and s2.requests == 0 and s2.cost_usd == 0
    assert s2.cost_saved_usd > 0
    # Any change in sampling params or a deliberate variant is a new request.
    run(_chat(o, temperature=0.7, seed=4))
    run(_chat(o, temperature=0.7, seed=3, variant=1))
    assert stub.count == 3


def test_cache_key_depends_on_everything():
    k = cache_key("m", MSGS, {"temperature": 0.7})
    assert k == cache_key("m", [dict(MSGS[0])], {"temperature": 0.7})
    assert k != cache_key("m2", MSGS, {"temperature": 0.7})
    assert k != cache_key("m", MSGS, {"temperature": 0.8})
    assert k != cache_key("m", [{"role": "user", "content": "x"}], {"temperature": 0.7})


def test_cache_survives_reopen(tmp_path):
    c = ResponseCache(tmp_path / "c.sqlite")
    c.put("k", {"text": "hi"})
    c.close()
    c2 = ResponseCache(tmp_path / "c.sqlite")
    assert c2.get("k") == {"text": "hi"} and "k" in c2 and len(c2) == 1 and c2.get("x") is None


def test_concurrency_is_bounded(stub):
    stub.latency = 0.1
    run(_chat(opts(stub, concurrency=3), n=9))
    assert stub.max_in_flight == 3


def test_rpm_limit_spaces_requests(stub):
    # 600 rpm = 10/s with a bucket of 1: 6 requests need >= 0.5 s.
    t0 = time.monotonic()
    run(_chat(opts(stub, rpm=600, rate_burst_s=0.1, concurrency=6), n=6))
    assert time.monotonic() - t0 >= 0.45


def test_tpm_limit_spaces_requests(stub):
    # Each request is charged ~prompt estimate + max_tokens (100); 6000 tpm = 100 tokens/s.
    t0 = time.monotonic()
    run(_chat(opts(stub, tpm=6000, rate_burst_s=1.0, concurrency=4), n=4, max_tokens=100))
    assert time.monotonic() - t0 >= 1.5


def test_token_bucket_maths():
    async def go():
        b = TokenBucket(per_minute=1200, burst_s=0.05)  # 20/s, capacity 1
        t0 = time.monotonic()
        for _ in range(5):
            await b.acquire(1)
        return time.monotonic() - t0

    assert run(go()) >= 0.18


def test_retry_after_parsing_and_backoff():
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    date = parse_retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert date == 0.0  # in the past
    import random

    rng = random.Random(0)
    for attempt in range(8):
        d = backoff_delay(attempt, 1.0, 10.0, rng)
        cap = min(10.0, 2**attempt)
        assert cap / 2 <= d <= cap


def test_price_lookup():
    assert lookup_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert lookup_price("gpt-4o") == (2.50, 10.00)
    assert lookup_price("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_azure_style_request(stub):
    o = opts(stub, api_key="k", api_version="2024-06-01")
    run(_chat(o))
    assert stub.count == 1  # the query string and api-key header are accepted


def test_a_price_given_alone_overrides_only_its_own():
    # --price-in alone made the output tokens free (and --price-out alone the prompt tokens).
    o = ClientOptions(base_url="http://x", model="gpt-4o", price_in=1.0)
    assert o.prices() == (1.0, 10.0)
    assert dataclasses.replace(o, price_in=None, price_out=3.0).prices() == (2.5, 3.0)
    assert ClientOptions(base_url="http://x", model="local", price_out=3.0).prices() == (0.0, 3.0)
    assert ClientOptions(base_url="http://x", model="local").prices() is None


def test_bad_options():
    from llavamed.errors import LlavamedError

    with pytest.raises(LlavamedError):
        ClientOptions(base_url="http://x", model="m", concurrency=0)
    # NaN passed "<= 0": --timeout nan was a traceback at the first request, --rpm/--tpm nan
    # turned the limit off without a word.
    for name in ("timeout", "rpm", "tpm"):
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(LlavamedError, match=f"--{name} must be > 0"):
                ClientOptions(base_url="http://x", model="m", **{name: bad})


def test_for_each_concurrently_bounds_workers_and_counts_progress():
    running, peak, done, ticks = 0, 0, [], []

    async def handle(item):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        done.append(item)

    run(
        for_each_concurrently(list(range(20)), handle, concurrency=3, after=lambda: ticks.append(1))
    )
    assert sorted(done) == list(range(20)) and len(ticks) == 20
    assert peak == 6  # two workers per request slot


def test_for_each_concurrently_cancels_the_rest_when_one_fails():
    started, finished = [], []

    async def handle(item):
        started.append(item)
        if item == 0:
            raise ValueError("record 0 is bad")
        await asyncio.sleep(10)
        finished.append(item)

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="record 0"):
        run(for_each_concurrently(list(range(8)), handle, concurrency=2))
    assert time.perf_counter() - t0 < 5 and finished == [] and len(started) == 4


@pytest.mark.parametrize(
    "shape, finish", [("nullcontent", "stop"), ("nulllength", "length"), ("toolcall", "tool_calls")]
)
def test_a_reply_that_finished_without_text_is_an_empty_answer_not_retried(stub, tmp_path, shape, finish):  # fmt: skip
    """content null with a finish_reason (a reasoning model that spent max_tokens thinking, a
    tool call nobody offered) is the model's answer: it was retried max_retries times, each paid
    for, and failed 'retryable' so that every re-run paid for it again."""
    stub.default = shape
    o = opts(stub, max_retries=3, cache_path=str(tmp_path / "c.sqlite"))
    stats, (r,) = run(_chat(o, max_tokens=50))
    assert (r.text, r.finish_reason) == ("", finish) and stub.count == 1 and stats.retries == 0
    stats, (r,) = run(_chat(o, max_tokens=50))
    assert r.cached and r.finish_reason == finish and stub.count == 1  # a re-run pays nothing


def test_content_parts_are_joined_and_a_glitch_shape_is_still_retried(stub):
    stub.plan(["parts"])
    stats, (r,) = run(_chat(opts(stub)))
    assert r.text.startswith("User: What does the image show?") and stats.retries == 0
    assert r.text.endswith("abnormal appearance in the image.")
    stub.plan(["emptychoices", "nochoices", "badjson", "ok"])
    stats, (r,) = run(_chat(opts(stub)))
    assert r.text and stats.retry_reasons["malformed_response"] == 3


def test_retry_after_as_an_http_date_is_honoured(stub):
    stub.retry_after = 2.0  # HTTP-dates have whole seconds: the wait is 1 to 2 s
    stub.plan(["retrydate", "ok"])
    t0 = time.monotonic()
    stats, _ = run(_chat(opts(stub)))
    assert stats.retry_reasons["http_429"] == 1 and 0.9 <= time.monotonic() - t0 < 5


def test_a_redirect_stops_the_job_naming_where_it_points(stub):
    """A 3xx was neither fatal nor retried: every figure failed on its own and the job ended
    with exit 3, to fail the same way on every re-run."""
    stub.default = "redirect"

    async def go():
        async with LLMClient(opts(stub)) as c:
            with pytest.raises(LLMError) as ei:
                await asyncio.gather(*[c.chat(MSGS) for _ in range(3)])
            return ei.value

    exc = run(go())
    assert exc.kind == "http_307" and exc.fatal and "/v2/chat/completions" in str(exc)


def test_base_url_without_v1_or_with_the_endpoint():
    with StubServer(strict_paths=True) as srv:  # like vLLM/OpenAI: only /v1/chat/completions
        root = srv.base_url[: -len("/v1")]
        with pytest.raises(LLMError) as ei:
            run(_chat(opts(srv, base_url=root)))
        assert ei.value.fatal and "usually ending in /v1" in str(ei.value)
        for url in (srv.base_url + "/chat/completions", srv.base_url + "/chat/completions/"):
            _, (r,) = run(_chat(opts(srv, base_url=url)))  # the endpoint given as the root
            assert r.text


def test_a_401_without_a_key_says_none_was_sent(stub):
    stub.default = "401"
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub)))
    assert ei.value.fatal and "no API key was sent" in str(ei.value)
    with pytest.raises(LLMError) as ei:
        run(_chat(opts(stub, api_key="sk-wrong")))
    assert "no API key was sent" not in str(ei.value)


def test_bad_retry_and_sampling_values_are_refused():
    from llavamed.errors import LlavamedError
    from llavamed.llm.client import check_sampling

    with pytest.raises(LlavamedError, match="--max-retries"):
        ClientOptions(base_url="http://x", model="m", max_retries=-1)
    with pytest.raises(LlavamedError, match="--price-out"):
        ClientOptions(base_url="http://x", model="m", price_out=-1.0)  # a negative cost
    for max_tokens, temperature in ((0, 0.7), (-5, 0.7), (10, -1.0), (10, float("nan"))):
        with pytest.raises(LlavamedError):
            check_sampling(max_tokens, temperature)
    check_sampling(1, 0.0)


def test_a_streamed_refusal_is_a_refusal_not_a_cached_empty_answer(stub, tmp_path):
    """Streamed, a refusal came back as text '' and was cached as a success; whole, it is a
    model_refusal that a batch job records once."""
    stub.default = "refusal"
    o = opts(stub, stream=True, cache_path=str(tmp_path / "c.sqlite"))
    with pytest.raises(LLMError) as ei:
        run(_chat(o))
    assert ei.value.kind == "model_refusal" and ei.value.rejected and stub.count == 1
    assert len(ResponseCache(tmp_path / "c.sqlite")) == 0


def test_a_server_that_does_not_stream_is_read_whole(stub):
    """A whole JSON completion in answer to stream=true was retried as a truncated stream."""
    stub.default = "nostream"
    stats, (r,) = run(_chat(opts(stub, stream=True)))
    assert r.text.startswith("User: What does the image show?") and stats.retries == 0


def test_an_unusable_cache_path_is_a_one_line_input_error(tmp_path):
    """A folder, another file (the figures given as --cache) or an impossible folder gave a
    sqlite3 traceback."""
    from llavamed.errors import InputError

    data = tmp_path / "figures.jsonl"
    data.write_text('{"pair_id": "p1"}\n')
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for path in (tmp_path, data, blocker / "sub" / "c.sqlite"):
        with pytest.raises(InputError, match="--cache") as ei:
            ResponseCache(path)
        assert str(ei.value).startswith(str(path))
    assert data.read_text() == '{"pair_id": "p1"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "figures.jsonl"]


def test_a_non_ascii_api_key_is_a_fatal_error_that_never_shows_the_key(stub):
    """A curly quote pasted with the key raised UnicodeEncodeError from inside httpx."""
    with pytest.raises(LLMError) as ei:
        LLMClient(opts(stub, api_key="sk-\u2019secretvalue"))
    assert ei.value.fatal and "character 4" in str(ei.value)
    assert "secretvalue" not in str(ei.value) and stub.count == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_generation_that_failed_midway_is_retried_and_never_cached(stub, tmp_path, stream):
    """finish_reason "error" (OpenRouter) or "abort" (vLLM) with part of the text: a failure of
    the server's, not the model's answer, so it is asked again and the half text never cached."""
    stub.plan(["failed", "ok"])
    cache = str(tmp_path / "c.sqlite")
    stats, [r] = run(_chat(opts(stub, cache_path=cache, stream=stream)))
    assert r.finish_reason == "stop" and stats.retries == 1 and stub.count == 2
    assert r.text == stub.responder({"messages": MSGS})
    stub.plan(["failed"] * 3)
    with pytest.raises(LLMError) as err:
        run(_chat(opts(stub, max_retries=2, stream=stream), messages=[MSGS[0] | {"content": "x"}]))
    assert err.value.kind == "generation_failed" and err.value.retryable
    assert "finish_reason 'error'" in str(err.value)
    # Nothing of the failed attempts was kept: the cache holds the one good reply.
    assert len(ResponseCache(cache)) == 1


def test_two_servers_with_one_model_name_do_not_share_cached_answers(tmp_path):
    """A local vLLM and a provider may both serve "llava"; their answers differ, so the cache
    keys on the endpoint too (the same server reached again still hits)."""
    cache = str(tmp_path / "c.sqlite")
    with StubServer() as a, StubServer() as b:
        a.responder = lambda body: "answer from A"
        b.responder = lambda body: "answer from B"
        _, [ra] = run(_chat(opts(a, cache_path=cache)))
        _, [rb] = run(_chat(opts(b, cache_path=cache)))
        _, [ra2] = run(_chat(opts(a, cache_path=cache, base_url=a.base_url + "/")))
    assert (ra.text, rb.text) == ("answer from A", "answer from B")
    assert not rb.cached and b.count == 1
    assert ra2.cached and ra2.text == "answer from A" and a.count == 1
    assert cache_key("m", MSGS, {}, endpoint="http://a/v1/chat/completions") != cache_key(
        "m", MSGS, {}, endpoint="http://b/v1/chat/completions"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_models_reasoning_is_not_part_of_its_answer(stub, tmp_path, stream):
    """Qwen3 / DeepSeek-R1 behind a server without a reasoning parser put ``<think>...</think>``
    in ``content``: the judge read "<think>" as its score line, self-instruct parsed the drafts
    in the reasoning as turns. Also when the template opened the block (only ``</think>``), and
    a block cut by max_tokens leaves no answer."""
    replies = iter(
        [
            "<think>\nUser: a draft? Assistant: a draft.\n</think>\n\n8 6\nWhy.",
            "The judge should compare. Assistant 1: 3 points.\n</think>\n8 6",
            "<think>\nStill thinking when max_tokens came",
        ]
    )
    stub.responder = lambda body: next(replies)
    o = opts(stub, stream=stream, cache_path=str(tmp_path / "c.sqlite"))
    for i, want in enumerate(["8 6\nWhy.", "8 6", ""]):
        _, [r] = run(_chat(o, messages=[{"role": "user", "content": f"q{i}"}]))
        assert r.text == want and not r.cached
        _, [again] = run(_chat(o, messages=[{"role": "user", "content": f"q{i}"}]))
        assert again.cached and again.text == want


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fault", ["garbled", "badfinish"])
def test_valid_json_in_the_wrong_shapes_is_retried_not_a_crash_or_an_empty_answer(
    stub, tmp_path, stream, fault
):
    # A message that was a string came back as an empty answer, cached for good; a finish_reason
    # that was a list, or a streamed chunk whose choices were a string, raised TypeError or
    # AttributeError out of the client and stopped the whole job with a traceback.
    stub.plan([fault])
    cache = str(tmp_path / "c.sqlite")
    stats, [r] = run(_chat(opts(stub, stream=stream, cache_path=cache)))
    assert r.text == stub.responder({"messages": MSGS}) and r.attempts == 2
    assert stats.retry_reasons == {"malformed_response": 1}
    stub.plan([fault, fault])
    with pytest.raises(LLMError) as e:
        run(_chat(opts(stub, stream=stream, max_retries=1), [{"role": "user", "content": "b"}]))
    assert e.value.kind == "malformed_response" and e.value.retryable


def test_a_cached_answer_is_the_answer_that_was_paid_for(stub, tmp_path):
    # The reasoning was stripped before the row was stored and again on every hit: an answer
    # that itself names the </think> tag came back from the cache cut at it.
    stub.responder = lambda body: "<think>plan</think>Answer: it ends at </think> in the text."
    o = opts(stub, cache_path=str(tmp_path / "c.sqlite"))
    _, [a] = run(_chat(o))
    _, [b] = run(_chat(o))
    assert a.text == "Answer: it ends at </think> in the text."
    assert b.cached and b.text == a.text and stub.count == 1
    # A row from before the flag may hold the raw reply: its reasoning is still dropped.
    cache = ResponseCache(tmp_path / "old.sqlite")
    key = cache_key("stub", MSGS, {}, endpoint=stub.base_url + "/chat/completions")
    cache.put(key, {"text": "<think>plan</think>Old answer.", "prompt_tokens": 1})
    cache.close()
    _, [c] = run(_chat(opts(stub, cache_path=str(tmp_path / "old.sqlite"))))
    assert c.cached and c.text == "Old answer."


@pytest.mark.parametrize(
    "row",
    [
        "[1]",
        '"text"',
        '{"text": "a", "prompt_tokens": null}',
        '{"text": "a", "finish_reason": [1]}',
        b"\xff",  # stored as bytes that are not UTF-8: UnicodeDecodeError out of the cache
        5,
    ],
)
def test_a_damaged_cache_row_is_a_miss_not_a_crash(stub, tmp_path, row):
    # Valid JSON that is not what the client stores raised AttributeError or TypeError out of
    # chat() and stopped the job; now it is asked again and the row overwritten.
    path = tmp_path / "c.sqlite"
    o = opts(stub, cache_path=str(path))
    _, [a] = run(_chat(o))
    db = sqlite3.connect(path)
    db.execute("UPDATE responses SET value = ?", (row,))
    db.commit()
    db.close()
    c = LLMClient(o)  # --dry-run's count: a damaged row is a request to pay for
    assert not c.is_cached(MSGS, c.sampling_params())
    run(c.aclose())
    stats, [b] = run(_chat(o))
    assert not b.cached and b.text == a.text and stats.cache_hits == 0 and stub.count == 2
    _, [c] = run(_chat(o))
    assert c.cached and c.text == a.text and stub.count == 2


def test_a_lone_surrogate_in_a_message_is_sent_as_a_replacement_character(stub, tmp_path):
    # A figures file's "\ud83d" escape (text cut inside a UTF-16 pair) decodes to a lone
    # surrogate: UnicodeEncodeError out of the cache key, and out of httpx without a cache.
    msgs = [{"role": "user", "content": "CT of the chest \ud83d with a nodule; é"}]
    for cache in (None, str(tmp_path / "c.sqlite")):
        _, [r] = run(_chat(opts(stub, cache_path=cache), messages=msgs))
        assert not r.cached
        assert (
            stub.requests[-1]["messages"][0]["content"] == "CT of the chest \ufffd with a nodule; é"
        )
    _, [again] = run(_chat(opts(stub, cache_path=str(tmp_path / "c.sqlite")), messages=msgs))
    assert again.cached and again.text == r.text and stub.count == 2
    # Text UTF-8 can carry keeps the key it had: existing caches still hit.
    c = LLMClient(opts(stub))
    ok = [{"role": "user", "content": "é ü 中文"}]
    assert c.key_for(ok, {}) == cache_key(
        "stub", ok, {}, endpoint=stub.base_url + "/chat/completions"
    )
    run(c.aclose())


def test_a_body_its_content_encoding_does_not_decode_is_retried_when_streaming_too(stub):
    # httpx.DecodingError is no TransportError: a proxy's broken gzip escaped as a traceback.
    stub.plan(["badgzip"])
    stats, [r] = run(_chat(opts(stub, stream=True)))
    assert r.attempts == 2 and stats.retry_reasons == {"malformed_response": 1}


def test_usage_counts_no_int_holds_or_below_zero_are_estimated(stub):
    # "prompt_tokens": 1e400 parsed as inf and int(inf) raised OverflowError out of the client;
    # a negative count went into the totals and the cost.
    stub.plan(["badusage"])
    stats, [r] = run(_chat(opts(stub, price_in=1.0, price_out=1.0)))
    assert r.usage_estimated and r.prompt_tokens > 0 and r.completion_tokens > 0
    assert stats.usage_estimated_responses == 1 and stats.cost_usd > 0


def test_an_api_key_pasted_with_surrounding_whitespace_is_sent_without_it(stub, monkeypatch):
    # "sk-abc " or "sk-abc\n" in the variable could not go into a header: the job stopped with
    # "the request cannot be sent"; a key of blanks only is no key.
    import argparse

    from llavamed.llm.args import add_client_arguments, client_options_from_args

    p = argparse.ArgumentParser()
    add_client_arguments(p)
    args = p.parse_args(["--base-url", stub.base_url, "--model", "stub", "--api-key-env", "K"])
    for value, sent in ((" sk-abc \n", "sk-abc"), ("  ", None)):
        monkeypatch.setenv("K", value)
        o = client_options_from_args(args, None)
        assert o.api_key == sent
    monkeypatch.setenv("K", "sk-abc \n")
    _, [r] = run(
        _chat(dataclasses.replace(client_options_from_args(args, None), backoff_base=0.01))
    )
    assert r.text.startswith("User:")


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_holding_a_lone_surrogate_is_cached_with_a_replacement_character(
    stub, tmp_path, stream
):
    # A "\ud83d" escape in the reply (half an emoji) could not be encoded for the cache or the
    # job's log: UnicodeEncodeError stopped the job.
    stub.plan(["surrogate"])
    o = opts(stub, stream=stream, cache_path=str(tmp_path / "c.sqlite"))
    _, [r] = run(_chat(o))
    assert r.text.endswith(" \ufffd") and r.text.startswith("User:")
    _, [again] = run(_chat(o))
    assert again.cached and again.text == r.text
