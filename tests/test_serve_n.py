"""OpenAI's ``n`` (several choices per request) against the real server on 127.0.0.1 (tiny random
llava), through the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llavamed.serve.api import serve_in_background  # noqa: E402
from llavamed.serve.engine import Engine, EngineSettings  # noqa: E402
from serve_helpers import engine_failing_at_forward, image_msg, png_url  # noqa: E402

BATCH = 4


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    eng = Engine.from_path(tiny_llava_dir, settings=EngineSettings(max_batch_size=BATCH))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    srv = serve_in_background(engine, max_completion_tokens=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def ask(**kw):
    """A request about a fresh image (a new color per call keeps the prefix cache out of it
    unless a test wants it)."""
    return dict(model="tiny-llava", messages=[image_msg(png_url(**kw))], max_tokens=6)


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)


def streamed(client, **kw) -> tuple[dict[int, str], dict[int, list], list]:
    """(text per index, finish_reasons per index in chunk order, all chunks) of a stream."""
    chunks = list(client.chat.completions.create(**kw, stream=True))
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            finishes.setdefault(ch.index, []).append(ch.finish_reason)
    return texts, finishes, chunks


def test_n2_greedy_gives_two_identical_choices_billed_twice(client):
    kw = ask(color=(10, 200, 30))
    one = client.chat.completions.create(**kw, temperature=0)
    two = client.chat.completions.create(**kw, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert [c.finish_reason for c in two.choices] == [one.choices[0].finish_reason] * 2
    # The prompt once, as OpenAI bills it; every choice's completion tokens.
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens


def test_n2_streams_each_choice_under_its_index_as_the_json_answer_has_it(client):
    kw = ask(color=(90, 20, 160)) | dict(n=2, temperature=1.5, seed=11)
    full = client.chat.completions.create(**kw)
    texts, finishes, chunks = streamed(client, **kw, stream_options={"include_usage": True})
    assert texts == {c.index: c.message.content for c in full.choices}
    for c in full.choices:
        # Each choice's last chunk, and only that one, carries its finish_reason.
        assert finishes[c.index][-1] == c.finish_reason
        assert all(f is None for f in finishes[c.index][:-1])
    assert all(len(c.choices) == 1 for c in chunks if c.choices)  # one choice per chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    # Each choice opens with its role, as OpenAI's first chunk of a choice does.
    first = {}
    for c in chunks:
        for ch in c.choices:
            first.setdefault(ch.index, ch.delta.role)
    assert first == {0: "assistant", 1: "assistant"}


def test_n3_sampled_with_a_seed_differs_between_choices_and_repeats_exactly(client):
    kw = ask(color=(200, 200, 20)) | dict(n=3, temperature=1.5, seed=1234, max_tokens=8)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) == 3, texts  # three draws, not one answer three times
    assert [c.message.content for c in again.choices] == texts
    assert [c.finish_reason for c in again.choices] == [c.finish_reason for c in first.choices]
    # The documented rule: choice i is the n=1 answer to the same request with seed + i.
    for i, text in enumerate(texts):
        alone = client.chat.completions.create(**(kw | dict(n=1, seed=1234 + i)))
        assert alone.choices[0].message.content == text


def test_each_choice_has_its_own_finish_reason(client):
    """A stop string ends some draws early and not others; each choice says how it ended."""
    base = ask(color=(30, 30, 30)) | dict(n=BATCH, temperature=2.0, max_tokens=4, stop=["e"])
    for seed in range(20):
        r = client.chat.completions.create(**base, seed=seed)
        reasons = [c.finish_reason for c in r.choices]
        if len(set(reasons)) > 1:
            break
    else:
        pytest.fail("no seed gave choices that ended differently")
    assert set(reasons) == {"stop", "length"}
    for c in r.choices:
        alone = client.chat.completions.create(**(base | dict(n=1, seed=seed + c.index)))
        assert alone.choices[0].finish_reason == c.finish_reason
        assert alone.choices[0].message.content == c.message.content
        assert "e" not in c.message.content
    assert r.usage.completion_tokens == sum(
        client.chat.completions.create(**(base | dict(n=1, seed=seed + i))).usage.completion_tokens
        for i in range(BATCH)
    )


def test_the_choices_are_decoded_together_and_see_the_image_once(engine, client):
    """The n generations go to the engine at once: one batch, one vision-tower pass."""
    engine.stats["max_batch"] = 0  # a running maximum: count this request's alone
    before = dict(engine.stats)
    r = client.chat.completions.create(**ask(color=(5, 99, 222)), n=BATCH, temperature=1, seed=3)
    assert len(r.choices) == BATCH
    stats = engine.stats
    assert stats["submitted"] - before["submitted"] == BATCH
    assert stats["max_batch"] == BATCH  # nothing else runs on this engine
    # Side by side: the prefill samples every choice's first token, then one step per token
    # for all of them (one at a time would take BATCH times as many).
    assert stats["steps"] - before["steps"] <= 5  # max_tokens 6
    assert stats["prefix_encoded"] - before["prefix_encoded"] == 1
    assert stats["prefix_hits"] - before["prefix_hits"] == BATCH - 1
    # Greedy choices are one answer: decoded once, given n times.
    before = stats["submitted"]
    r = client.chat.completions.create(**ask(color=(5, 99, 222)), n=BATCH, temperature=0)
    assert len(r.choices) == BATCH and engine.stats["submitted"] == before + 1


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "greater than or equal to 1"),
        (-2, "greater than or equal to 1"),
        (1.5, "valid integer"),
        (2.0, "valid integer"),
        ("2", "valid integer"),
        (True, "valid integer"),
        (BATCH + 1, f"n {BATCH + 1} exceeds the server limit {BATCH} "),
        (BATCH + 1, "--max-batch-size"),
        (10**30, f"exceeds the server limit {BATCH}"),
    ],
)
def test_n_out_of_range_or_not_a_whole_number_is_a_400_naming_n(server, n, words):
    r = post(server, ask() | {"n": n})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and words in err["message"], err


def test_n_is_bounded_by_the_queue_too(tiny_lm_dir):
    """n generations are queued at once: more than the queue holds could never be, and would
    be refused as busy for ever."""
    eng = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=8, max_queue=2))
    srv = serve_in_background(eng)
    try:
        body = {"model": "tiny-lm", "messages": [{"role": "user", "content": "hi"}]}
        r = post(srv, body | {"n": 3, "max_tokens": 2})
        msg = r.json()["error"]["message"]
        assert r.status_code == 400 and "server limit 2" in msg and "--max-queue" in msg
        r = post(srv, body | {"n": 2, "max_tokens": 2, "temperature": 1.0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        srv.stop()
        eng.close()


def test_a_failure_mid_stream_ends_every_choice_with_the_error_and_done(tiny_lm_dir):
    eng = engine_failing_at_forward(tiny_lm_dir, 4, max_batch_size=4)
    srv = serve_in_background(eng)
    try:
        body = {
            "model": "tiny-lm",
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 10,
            "stream": True,
            "n": 3,
            "temperature": 1.0,
        }
        with httpx.stream("POST", srv.base_url + "/chat/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200
        assert '"generation failed: RuntimeError"' in lines[-2] and lines[-1] == "data: [DONE]"
        indexes = {
            json.loads(line[6:])["choices"][0]["index"]
            for line in lines[:-2]
            if '"choices"' in line
        }
        assert indexes == {0, 1, 2}
        # The three rows failed together, none was left running. The first row's error can
        # reach the client (and end the stream) before the engine thread has failed the other
        # two, so wait for them rather than read the count at once (seen on a loaded machine).
        deadline = time.time() + 10
        while eng.stats["failed"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        assert eng.stats["failed"] == 3
    finally:
        srv.stop()
        eng.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_every_choice(tiny_lm_dir, stream):
    eng = Engine.from_path(tiny_lm_dir, settings=EngineSettings(max_batch_size=4))
    eng.eos_ids = set()  # the tiny LM would otherwise be free to stop early
    srv = serve_in_background(eng, max_completion_tokens=400)
    try:
        body = {
            "model": "tiny-lm",
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 400,
            "n": 3,
            "temperature": 1.0,
            "stream": stream,
        }
        with httpx.Client(timeout=30) as c:
            if stream:
                with c.stream("POST", srv.base_url + "/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data:") and '"content":""' not in line:
                            break
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post(srv.base_url + "/chat/completions", json=body, timeout=0.1)
        deadline = time.time() + 20
        while eng.stats["cancelled"] < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert eng.stats["cancelled"] == 3
        assert eng.stats["tokens"] < 3 * 400
    finally:
        srv.stop()
        eng.close()
