"""The async OpenAI-compatible chat client shared by ``data instruct`` and ``eval judge``.

It talks plain HTTP (httpx) to ``{base_url}/chat/completions`` so that the same code drives
OpenAI, Azure OpenAI, vLLM, SGLang, llama.cpp and ``llavamed serve``. What it adds over a bare
request, because a 60K-caption job must survive a flaky API without losing money or data:

* bounded concurrency (a semaphore held only while a request is in flight);
* retries with exponential backoff and jitter on 429, 408, 5xx, timeouts, connection resets,
  truncated or malformed bodies, honouring ``Retry-After`` / ``retry-after-ms``;
* no retries where none can help: OpenAI's 429 ``insufficient_quota`` (no credits left) stops
  the job like a 402; a URL without ``http://``, an invalid URL or a request httpx
  cannot send (a header such as the API key holding a newline) is fatal at once, and so is a
  server that refused, dropped or left unanswered ``max_silent_attempts`` attempts in a row
  with nothing answered for ``unreachable_after_s`` (a dead server, a wrong port or a hung
  backend would otherwise be retried figure after figure);
* client-side RPM and TPM token buckets;
* a per-request wall-clock timeout (covers slow-drip streams, not only idle sockets);
* a SQLite response cache keyed by (model, messages, sampling params incl. seed);
* token usage and cost totals with a small, overridable price table.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from llavamed.errors import LlavamedError
from llavamed.llm.cache import ResponseCache, cache_key
from llavamed.utils.io import without_lone_surrogates

# USD per 1M tokens (input, output): public list prices, early 2025. Matched by the longest
# model-name prefix. Unknown models (local servers) cost 0 and the report says the price is unknown.
# Prices change: pass --price-in/--price-out for anything that matters.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4-32k": (60.00, 120.00),
    "gpt-4": (30.00, 60.00),
    "gpt-35-turbo": (0.50, 1.50),
    "gpt-3.5-turbo": (0.50, 1.50),
}

# Average characters per token for English/biomedical prose with BPE tokenizers. Used only where a
# server returns no usage and for --dry-run estimates; always labelled as an estimate.
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4  # role and separators in chat templates

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
# Wrong key, no credits left (402), wrong endpoint or model: every request would fail.
FATAL_STATUS = {401, 402, 403, 404}
MODEL_REFUSAL = "model_refusal"  # a reply without text: content filter or an explicit refusal
# finish_reason values with which a reply whose content is null is a complete (empty) answer
FINISHED_WITHOUT_TEXT = {"stop", "length", "tool_calls", "function_call"}
# finish_reason values with which a reply is a failed generation whatever text came with it
# (OpenRouter's "error", vLLM's "abort"): retried like a 5xx, never cached as the model's answer.
FINISHED_BY_FAILURE = {"error", "abort"}


class LLMError(LlavamedError):
    """A request that failed. ``kind`` is countable (``http_400``, ``timeout``...); ``fatal``
    means the whole job should stop (bad key, URL or model name); ``retryable`` means the client
    gave up on a failure that may pass later (429, 5xx, timeouts), so a re-run should ask again."""

    def __init__(
        self,
        kind: str,
        detail: str = "",
        fatal: bool = False,
        attempts: int = 0,
        retryable: bool = False,
    ):
        self.kind = kind
        self.detail = detail
        self.fatal = fatal
        self.attempts = attempts
        self.retryable = retryable
        super().__init__(f"LLM request failed: {kind}" + (f" ({detail})" if detail else ""))

    @property
    def rejected(self) -> bool:
        """The server refused this very request (a non-retryable, non-fatal 4xx, or the model
        declined): retrying now gets the same answer, so a batch job records it and moves on.
        A 429 after the last retry is not rejected, only postponed."""
        if self.fatal or self.retryable:
            return False
        return self.kind.startswith("http_4") or self.kind == MODEL_REFUSAL


def estimate_tokens(obj: str | list[dict]) -> int:
    """Heuristic token count (~4 characters per token), no tokenizer download needed."""
    if isinstance(obj, str):
        return max(1, math.ceil(len(obj) / CHARS_PER_TOKEN))
    return sum(estimate_tokens(str(m.get("content", ""))) + TOKENS_PER_MESSAGE for m in obj) + 2


_THINK_OPEN = re.compile(r"^\s*<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """The answer without the reasoning a thinking model (Qwen3, DeepSeek-R1, QwQ) writes into
    ``content`` when the server has no reasoning parser: ``<think>...</think>answer``, or
    ``...</think>answer`` when the chat template opened the block. The judge read ``<think>`` as
    the line holding the scores, and self-instruct parsed "User:" drafts in the reasoning as
    turns. A block never closed (cut by max_tokens) leaves no answer at all."""
    close = _THINK_CLOSE.search(text)
    if close is not None and "<think>" not in text[close.end() :].lower():
        before = text[: close.start()]
        if _THINK_OPEN.match(before) or "<think>" not in before.lower():
            return text[close.end() :].lstrip()
    if close is None and _THINK_OPEN.match(text):
        return ""
    return text


def check_sampling(max_tokens: int, temperature: float) -> None:
    """Sampling options a job sends with every request: a value no server takes would otherwise
    be rejected figure after figure (and a negative --max-tokens made --dry-run's estimate
    negative)."""
    if max_tokens < 1:
        raise LlavamedError(f"--max-tokens must be >= 1 (got {max_tokens})")
    # NaN fails ">= 0"; inf passed it, and httpx refused to encode it: a ValueError traceback.
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise LlavamedError(f"--temperature must be a finite number >= 0 (got {temperature})")


def lookup_price(model: str) -> tuple[float, float] | None:
    name = model.lower().rsplit("/", 1)[-1]
    best = None
    for prefix, price in PRICES_PER_MTOK.items():
        if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, price)
    return best[1] if best else None


@dataclass
class ClientOptions:
    """How to reach the API and how hard to push it."""

    base_url: str
    """Server root including the API prefix, e.g. ``https://api.openai.com/v1`` or
    ``http://127.0.0.1:8000/v1``. ``/chat/completions`` is appended."""
    model: str
    """Model name sent in each request (the deployment name for Azure)."""
    api_key: str | None = None
    """Bearer token; None for local servers that need none."""
    api_version: str | None = None
    """Azure OpenAI: sent as ``?api-version=`` with an ``api-key`` header instead of Bearer."""
    concurrency: int = 8
    """Requests in flight at once."""
    rpm: float | None = None
    """Client-side requests-per-minute limit (None = unlimited)."""
    tpm: float | None = None
    """Client-side tokens-per-minute limit, charged with prompt estimate + max_tokens up front
    and corrected with the real usage afterwards (None = unlimited)."""
    rate_burst_s: float = 10.0
    """The RPM/TPM buckets hold this many seconds' worth of budget, so a job starts promptly but
    cannot dump a whole minute's quota in one burst."""
    timeout: float = 120.0
    """Wall-clock limit per request attempt, seconds."""
    max_retries: int = 6
    """Retries after the first attempt for retryable failures."""
    backoff_base: float = 1.0
    """First backoff delay (seconds); doubles per attempt, with jitter."""
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    """Cap on a server's Retry-After, so a bogus header can't park the job for a day."""
    max_silent_attempts: int = 10
    """Attempts in a row that got no answer (connection errors or timeouts), over all requests in
    flight, with no answer from the server in between, after which the server counts as
    unreachable and the job stops (fatal)..."""
    unreachable_after_s: float = 120.0
    """... once no answer has come for this long either, so a server that restarts (vLLM
    reloading, a proxy blip) is waited for while one that is not there stops the job."""
    cache_path: str | None = None
    """SQLite response cache file; None disables caching."""
    price_in: float | None = None
    """USD per 1M prompt tokens; default from the built-in table by model name."""
    price_out: float | None = None
    """USD per 1M completion tokens."""
    stream: bool = False
    """Use server-sent events; a stream that ends without ``[DONE]`` is retried as truncated."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra JSON fields for every request (e.g. vLLM's ``top_k``)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise LlavamedError("--concurrency must be >= 1")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and not v > 0:  # also NaN, which made the limit silently off
                raise LlavamedError(f"--{name} must be > 0 (got {v})")
        if not self.timeout > 0:  # also NaN: a traceback ("deadline must not be NaN") at once
            raise LlavamedError(f"--timeout must be > 0 (got {self.timeout})")
        if self.max_retries < 0:
            raise LlavamedError("--max-retries must be >= 0")
        for name in ("price_in", "price_out"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):  # inf: "Infinity" in JSON
                raise LlavamedError(f"--{name.replace('_', '-')} must be a finite number >= 0")
        if self.max_silent_attempts < 1:
            raise LlavamedError("max_silent_attempts must be >= 1")
        if self.unreachable_after_s < 0:
            raise LlavamedError("unreachable_after_s must be >= 0")

    def prices(self) -> tuple[float, float] | None:
        """(input, output) USD per 1M tokens: each given price overrides the table's price for
        the model, and only that one (--price-in alone made the output tokens free)."""
        table = lookup_price(self.model)
        if self.price_in is None and self.price_out is None:
            return table
        pin = self.price_in if self.price_in is not None else (table[0] if table else 0.0)
        pout = self.price_out if self.price_out is not None else (table[1] if table else 0.0)
        return (pin, pout)


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    attempts: int
    usage_estimated: bool = False
    cost_usd: float = 0.0


@dataclass
class ClientStats:
    """Running totals; ``as_dict`` is what reports embed."""

    calls: int = 0
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failure_reasons: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated_responses: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost_usd: float = 0.0
    cost_saved_usd: float = 0.0
    price_known: bool = True
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict:
        elapsed = time.monotonic() - self.started
        return {
            "calls": self.calls,
            "http_requests": self.requests,
            "cache_hits": self.cache_hits,
            "retries": self.retries,
            "retry_reasons": dict(self.retry_reasons),
            "failures": self.failures,
            "failure_reasons": dict(self.failure_reasons),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usage_estimated_responses": self.usage_estimated_responses,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "cost_saved_by_cache_usd": round(self.cost_saved_usd, 6),
            "price_known": self.price_known,
            "elapsed_s": round(elapsed, 3),
        }


class TokenBucket:
    """Leaky budget of ``per_minute`` units, holding at most ``burst_s`` seconds' worth."""

    def __init__(self, per_minute: float, burst_s: float = 10.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, n: float = 1.0) -> None:
        # A request bigger than the bucket would otherwise wait forever; it waits for a full one.
        n = min(float(n), self.capacity)
        async with self._lock:  # FIFO: waiters don't overtake each other
            while True:
                self._refill()
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)

    def adjust(self, n: float) -> None:
        """Charge (n > 0) or refund (n < 0) after the fact; the balance may go negative."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - n)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so retries from many
    concurrent workers spread out but never collapse to zero."""
    d = min(cap, base * (2**attempt))
    return d / 2 + rng.uniform(0, d / 2)


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str = "", retry_after: float | None = None):
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(kind)


def _extract_choice(data: Any) -> tuple[str, str | None, dict | None]:
    if not isinstance(data, dict):
        raise _Retryable("malformed_response", "body is not a JSON object")
    if "error" in data and "choices" not in data:
        raise _Retryable("error_body", str(data["error"])[:200])
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Retryable("malformed_response", "no choices")
    choice = choices[0]
    msg = choice.get("message")
    if not isinstance(msg, dict) and (msg is not None or "text" not in choice):
        # A message that is not an object, or a choice with neither message nor text: garbage,
        # not the model's empty answer (which would be cached and kept for good).
        raise _Retryable("malformed_response", "choice has no message object")
    msg = msg or {}
    if not isinstance(choice.get("finish_reason"), str | None):
        raise _Retryable("malformed_response", "finish_reason is not a string")
    content = msg.get("content")
    if content is None:
        content = choice.get("text")  # legacy completions shape some servers return
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts):
            content = "".join(texts)
    finish = choices[0].get("finish_reason")
    if finish in FINISHED_BY_FAILURE:
        raise _Retryable("generation_failed", f"finish_reason {finish!r}")
    refusal = msg.get("refusal")
    if content is None and (finish == "content_filter" or refusal):
        # An answer, not a glitch: asking again gets the same, and a re-run would pay for it again.
        raise LLMError(MODEL_REFUSAL, str(refusal or finish)[:200])
    if content is None and finish in FINISHED_WITHOUT_TEXT:
        # The model finished and wrote no text: a reasoning model that spent max_tokens thinking
        # ("length"), a tool call nobody offered, an immediate end. That is its answer (an empty
        # one); asking again would pay for the same again, max_retries times, on every re-run.
        content = ""
    if not isinstance(content, str):
        raise _Retryable("malformed_response", "choice has no text content")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    return content, choices[0].get("finish_reason"), usage


def _sendable(messages: list[dict]) -> list[dict]:
    """``messages`` as UTF-8 can carry them. A lone surrogate (text cut inside a UTF-16 pair, as
    a ``\\ud83d`` escape in a figures file decodes) raised UnicodeEncodeError out of the cache key
    and out of httpx, a traceback that stopped the job; it becomes U+FFFD. Text without one is
    returned as it is, so its cache key is unchanged."""
    return without_lone_surrogates(messages)


def _cached_result(hit: Any) -> ChatResult | None:
    """A cache row as a result, or None (a miss, asked again and overwritten) for a row that is
    not what :meth:`LLMClient.chat` writes: a damaged row raised AttributeError or TypeError out
    of the client and stopped the job. A row's text had its reasoning stripped before it was
    stored; stripping again cut an answer that itself holds ``</think>`` at that tag, so a
    re-run from the cache differed from the run that paid. Only rows from before the flag (which
    may hold the raw reply) are stripped here."""
    if not isinstance(hit, dict) or not isinstance(hit.get("text"), str):
        return None
    try:
        pt, ct = int(hit.get("prompt_tokens", 0)), int(hit.get("completion_tokens", 0))
    except (TypeError, ValueError, OverflowError):
        return None
    finish = hit.get("finish_reason")
    if not isinstance(finish, str | None):
        return None
    text = hit["text"] if hit.get("reasoning_stripped") else strip_reasoning(hit["text"])
    return ChatResult(
        text=text,
        finish_reason=finish,
        prompt_tokens=pt,
        completion_tokens=ct,
        cached=True,
        attempts=0,
        usage_estimated=bool(hit.get("usage_estimated")),
    )


def _error_code(text: str) -> str | None:
    """``error.code`` (else ``error.type``) of an OpenAI-style error body, or None."""
    try:
        err = json.loads(text).get("error")
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return None
    if not isinstance(err, dict):
        return None
    code = err.get("code") or err.get("type")
    return code if isinstance(code, str) else None


def _unsendable(url: str, exc: Exception) -> LLMError:
    """A request httpx cannot send at all: every retry, every figure would fail the same way."""
    if isinstance(exc, httpx.LocalProtocolError):
        # h11 quotes the offending header value, which may be the API key: never repeat it.
        detail = (
            f"{url}: the request cannot be sent (an illegal header value, e.g. an API key "
            "ending in a newline)"
        )
        return LLMError("invalid_request", detail, fatal=True)
    return LLMError("invalid_url", f"{url}: {exc}", fatal=True)


class LLMClient:
    """Use as ``async with LLMClient(opts) as client: r = await client.chat(messages)``."""

    def __init__(self, options: ClientOptions, *, seed: int | None = None):
        self.opts = options
        self.stats = ClientStats()
        prices = options.prices()
        self._prices = prices
        self.stats.price_known = prices is not None
        self._sem = asyncio.Semaphore(options.concurrency)
        self._rpm = TokenBucket(options.rpm, options.rate_burst_s) if options.rpm else None
        self._tpm = TokenBucket(options.tpm, options.rate_burst_s) if options.tpm else None
        self._cache = ResponseCache(options.cache_path) if options.cache_path else None
        self._rng = random.Random(seed)
        self._silent_attempts = 0  # in a row, over all requests: the circuit breaker
        self._last_answer = time.monotonic()  # the client's start counts as one
        url = options.base_url.rstrip("/")
        if not url.endswith("/chat/completions"):  # the endpoint given for the API root
            url += "/chat/completions"
        self._url = url
        self._params = {"api-version": options.api_version} if options.api_version else None
        # Two servers may serve different weights under one model name (a local vLLM and a
        # provider's "gpt-4o", two fine-tunes both called "llava"): the cache must not mix them.
        self._endpoint = url + (
            f"?api-version={options.api_version}" if options.api_version else ""
        )
        headers = {"Content-Type": "application/json"}
        if options.api_key:
            if options.api_version:
                headers["api-key"] = options.api_key
            else:
                headers["Authorization"] = f"Bearer {options.api_key}"
        key = options.api_key or ""
        bad = next((i for i, ch in enumerate(key) if ord(ch) > 126), None)
        if bad is not None:
            # httpx raised UnicodeEncodeError here. Never repeat the value: it is the key. (A
            # newline or other control character fails at the first request, naming the URL.)
            raise LLMError(
                "invalid_request",
                f"the API key holds a character no HTTP header can carry (character {bad + 1}: "
                "a pasted curly quote or non-breaking space?); check the variable --api-key-env "
                "names",
                fatal=True,
            )
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(options.timeout),
            limits=httpx.Limits(
                max_connections=options.concurrency,
                max_keepalive_connections=options.concurrency,
            ),
        )

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._cache is not None:
            self._cache.close()

    # -- public -----------------------------------------------------------------------------

    def sampling_params(
        self,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        variant: int = 0,
    ) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if temperature is not None:
            p["temperature"] = temperature
        if max_tokens is not None:
            p["max_tokens"] = max_tokens
        if top_p is not None:
            p["top_p"] = top_p
        if seed is not None:
            p["seed"] = seed + variant
        if self.opts.extra_body:
            p.update(self.opts.extra_body)
        return p

    def key_for(self, messages: list[dict], params: dict[str, Any], variant: int = 0) -> str:
        keyed = dict(params)
        if variant:
            keyed["_variant"] = variant  # a deliberate re-ask must not hit the cached answer
        return cache_key(self.opts.model, messages, keyed, endpoint=self._endpoint)

    def is_cached(self, messages: list[dict], params: dict[str, Any], variant: int = 0) -> bool:
        if self._cache is None:
            return False
        # As chat() reads it: a damaged row is asked again, so --dry-run counts it to be paid.
        key = self.key_for(_sendable(messages), params, variant)
        return _cached_result(self._cache.get(key)) is not None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        if self._prices is None:
            return 0.0
        pin, pout = self._prices
        return (prompt_tokens * pin + completion_tokens * pout) / 1e6

    async def chat(
        self,
        messages: list[dict],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        variant: int = 0,
        use_cache: bool = True,
    ) -> ChatResult:
        """One chat completion. Raises :class:`LLMError` once retries are exhausted or on a
        non-retryable status. ``variant`` > 0 asks again with a distinct cache key (and seed)."""
        self.stats.calls += 1
        messages = _sendable(messages)
        params = self.sampling_params(temperature, max_tokens, top_p, seed, variant)
        key = self.key_for(messages, params, variant)
        if use_cache and self._cache is not None:
            hit = _cached_result(self._cache.get(key))
            if hit is not None:
                self.stats.cache_hits += 1
                self.stats.cached_prompt_tokens += hit.prompt_tokens
                self.stats.cached_completion_tokens += hit.completion_tokens
                self.stats.cost_saved_usd += self.cost(hit.prompt_tokens, hit.completion_tokens)
                return hit
        payload = {"model": self.opts.model, "messages": messages, **params}
        est_prompt = estimate_tokens(messages)
        result = await self._request_with_retries(payload, est_prompt, max_tokens)
        if use_cache and self._cache is not None:
            self._cache.put(
                key,
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "usage_estimated": result.usage_estimated,
                    "reasoning_stripped": True,
                },
                model=self.opts.model,
            )
        return result

    # -- internals --------------------------------------------------------------------------

    async def _request_with_retries(
        self, payload: dict, est_prompt: int, max_tokens: int | None
    ) -> ChatResult:
        charge = est_prompt + (max_tokens or 256)
        attempt = 0
        while True:
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(charge)
            try:
                async with self._sem:
                    self.stats.requests += 1
                    text, finish, usage = await asyncio.wait_for(
                        self._one_request(payload), timeout=self.opts.timeout
                    )
            except _Retryable as exc:  # the server answered, if not usefully
                self._answered()
                kind, detail, retry_after = exc.kind, exc.detail, exc.retry_after
            except (asyncio.TimeoutError, httpx.TimeoutException):
                kind, detail, retry_after = "timeout", f">{self.opts.timeout:g}s", None
                # A server that takes connections and never answers (hung, or a dead backend
                # behind a proxy) is as gone as one that refuses them.
                self._check_reachable("timed out", detail, attempt)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.LocalProtocolError) as exc:
                raise self._give_up(_unsendable(self._url, exc), attempt) from None
            except httpx.RemoteProtocolError as exc:
                kind, detail, retry_after = "truncated_response", str(exc)[:200], None
            except httpx.DecodingError as exc:
                # A body its Content-Encoding does not decode (a proxy's broken gzip): not a
                # TransportError, so it escaped as a traceback that stopped the job.
                self._answered()
                kind, detail, retry_after = "malformed_response", str(exc)[:200], None
            except httpx.TransportError as exc:
                kind, detail, retry_after = "connection_error", type(exc).__name__, None
                self._check_reachable("failed to connect", detail, attempt)
            except LLMError as exc:  # an answer from the server, final
                self._answered()
                self._give_up(exc, attempt)
                raise
            else:
                self._answered()
                return self._account(text, finish, usage, est_prompt, charge, attempt + 1)
            if self._tpm is not None:
                self._tpm.adjust(-charge)  # nothing was generated; give the budget back
            if attempt >= self.opts.max_retries:
                raise self._give_up(LLMError(kind, detail, retryable=True), attempt)
            if retry_after is not None:
                delay = min(retry_after, self.opts.max_retry_after)
                delay += self._rng.uniform(0, 0.1 * delay + 0.01)
            else:
                delay = backoff_delay(
                    attempt, self.opts.backoff_base, self.opts.backoff_max, self._rng
                )
            self.stats.retries += 1
            self.stats.retry_reasons[kind] += 1
            attempt += 1
            await asyncio.sleep(delay)

    def _answered(self) -> None:
        self._silent_attempts = 0
        self._last_answer = time.monotonic()

    def _check_reachable(self, what: str, detail: str, attempt: int) -> None:
        """The circuit breaker: count an attempt that got no answer at all (connection refused
        or reset, or no reply within the timeout), and stop the job once
        ``max_silent_attempts`` of them came in a row and nothing has answered for
        ``unreachable_after_s`` either."""
        self._silent_attempts += 1
        silent_s = time.monotonic() - self._last_answer
        if (
            self._silent_attempts < self.opts.max_silent_attempts
            or silent_s < self.opts.unreachable_after_s
        ):
            return
        hint = "; if the server is only slow, raise --timeout" if what == "timed out" else ""
        raise self._give_up(
            LLMError(
                "server_unreachable",
                f"server unreachable at {self._url}: {self._silent_attempts} requests in a "
                f"row {what} ({detail}) and {silent_s:.0f} s without an answer{hint}",
                fatal=True,
            ),
            attempt,
        )

    def _give_up(self, exc: LLMError, attempt: int) -> LLMError:
        """Count a request's final failure (on its ``attempt``-th retry) and return the error."""
        exc.attempts = attempt + 1
        self.stats.failures += 1
        self.stats.failure_reasons[exc.kind] += 1
        return exc

    async def _one_request(self, payload: dict) -> tuple[str, str | None, dict | None]:
        if self.opts.stream:
            return await self._one_streamed(payload)
        resp = await self._http.post(self._url, json=payload, params=self._params)
        self._check_status(resp.status_code, resp.headers, resp.text)
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise _Retryable("malformed_response", f"invalid JSON: {exc}") from exc
        return _extract_choice(data)

    async def _one_streamed(self, payload: dict) -> tuple[str, str | None, dict | None]:
        body = {**payload, "stream": True}
        parts: list[str] = []
        refusal: list[str] = []
        finish = None
        usage = None
        done = False
        async with self._http.stream("POST", self._url, json=body, params=self._params) as resp:
            if resp.status_code != 200:
                await resp.aread()
                self._check_status(resp.status_code, resp.headers, resp.text)
            if resp.headers.get("content-type", "").startswith("application/json"):
                # A server (or proxy) that does not stream answers with a whole completion.
                await resp.aread()
                try:
                    data = json.loads(resp.text)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise _Retryable("malformed_response", f"invalid JSON: {exc}") from exc
                return _extract_choice(data)
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise _Retryable("malformed_response", "bad SSE chunk") from exc
                if not isinstance(chunk, dict):
                    raise _Retryable("malformed_response", "SSE chunk is not an object")
                if chunk.get("error"):  # servers report a mid-stream failure as a chunk
                    raise _Retryable("error_body", str(chunk["error"])[:200])
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                chunk_choices = chunk.get("choices") or []
                if not isinstance(chunk_choices, list) or not all(
                    isinstance(ch, dict)
                    and isinstance(ch.get("delta") or {}, dict)
                    and isinstance(ch.get("finish_reason"), str | None)
                    for ch in chunk_choices
                ):
                    # A garbled chunk raised AttributeError or TypeError out of the client: one
                    # bad reply stopped the whole job with a traceback instead of being retried.
                    raise _Retryable("malformed_response", "SSE chunk has malformed choices")
                for ch in chunk_choices:
                    delta = ch.get("delta") or {}
                    if isinstance(delta.get("content"), str):
                        parts.append(delta["content"])
                    if isinstance(delta.get("refusal"), str):
                        refusal.append(delta["refusal"])
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
        if not done:
            raise _Retryable("truncated_response", "stream ended without [DONE]")
        if finish in FINISHED_BY_FAILURE:
            raise _Retryable("generation_failed", f"finish_reason {finish!r}")
        if not parts and (refusal or finish == "content_filter"):
            # As in a whole reply: the model's answer, final, and not cached as an empty text.
            raise LLMError(MODEL_REFUSAL, ("".join(refusal) or finish)[:200])
        return "".join(parts), finish, usage

    def _check_status(self, status: int, headers: httpx.Headers, text: str) -> None:
        if status == 200:
            return
        detail = text[:300].replace("\n", " ")
        if status == 429 and _error_code(text) == "insufficient_quota":
            # OpenAI's "no credits left" comes as a 429, not a 402: no wait cures it, and
            # retrying it would spend the backoff on every figure of the job, for hours.
            raise LLMError(
                "insufficient_quota",
                f"{detail} (the account behind the API key has no credits left: add credits "
                "or use another key, then re-run)",
                fatal=True,
            )
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retryable(f"http_{status}", detail, parse_retry_after(headers))
        if 300 <= status < 400:
            # Not followed (a POST redirected may come back a GET), and every request would get
            # the same: the job stops at once instead of failing figure after figure.
            where = headers.get("location") or "an unnamed location"
            detail = f"{self._url} redirects to {where}; give the final API root as --base-url"
            raise LLMError(f"http_{status}", detail, fatal=True)
        if status in (401, 403) and not self.opts.api_key:
            detail += (
                " (no API key was sent: the variable --api-key-env names, OPENAI_API_KEY by "
                "default, is unset or empty)"
            )
        if status == 404 and not self.opts.api_version:
            root = self.opts.base_url.rstrip("/")
            if not root.endswith("/v1"):
                detail += f" (POST {self._url}: --base-url is the API root, usually ending in /v1)"
        raise LLMError(f"http_{status}", detail, fatal=status in FATAL_STATUS)

    def _account(
        self,
        text: str,
        finish: str | None,
        usage: dict | None,
        est_prompt: int,
        charge: int,
        attempts: int,
    ) -> ChatResult:
        # A reply holding a lone surrogate (a "\\ud83d" escape: half an emoji cut at max_tokens)
        # could be neither cached nor logged: UnicodeEncodeError stopped the job.
        text = without_lone_surrogates(text)
        estimated = False
        try:
            pt = int(usage["prompt_tokens"]) if usage else None
            ct = int(usage["completion_tokens"]) if usage else None
        except (KeyError, TypeError, ValueError, OverflowError):  # 1e400 is inf: OverflowError
            pt = ct = None
        if pt is None or ct is None or pt < 0 or ct < 0:
            pt, ct, estimated = est_prompt, estimate_tokens(text), True
            self.stats.usage_estimated_responses += 1
        if self._tpm is not None:
            self._tpm.adjust(pt + ct - charge)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        cost = self.cost(pt, ct)
        self.stats.cost_usd += cost
        return ChatResult(strip_reasoning(text), finish, pt, ct, False, attempts, estimated, cost)


async def for_each_concurrently(
    items: list, handle: Callable[[Any], Awaitable[None]], concurrency: int, after=None
) -> None:
    """Await ``handle(item)`` for every item, ``after()`` when each is done (a progress bar).

    Twice the client's concurrency in workers keeps every request slot busy while some workers
    wait out a backoff; the client's semaphore still caps the requests in flight. If one item
    raises, the other workers are cancelled before the error propagates, so nothing keeps
    writing after the caller has given up."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def worker() -> None:
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await handle(item)
            if after is not None:
                after()

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, min(len(items), 2 * concurrency)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
