"""Helpers shared by the serving tests."""

from __future__ import annotations

import base64
import io
import time


def png_url(size=(40, 30), color=(200, 20, 20)) -> str:
    """A solid-colour PNG as the data URL an OpenAI client sends."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_msg(url: str, text: str = "What does this image show?") -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ],
    }


def wait_until_running(engine, timeout: float = 2.0) -> None:
    """Return once the engine's worker has taken every queued request and prefilled one (so a
    test can fill the queue, or join the running batch, deterministically)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.queue_depth == 0 and engine.stats["prefills"]:
            return
        time.sleep(0.01)


def engine_failing_at_forward(model_dir, n: int, max_batch_size: int):
    """An engine on ``model_dir`` that never stops at EOS and whose ``n``-th model forward
    raises (an out-of-memory error mid-answer, as a real one would come)."""
    from llavamed.serve.engine import Engine, EngineSettings

    eng = Engine.from_path(model_dir, settings=EngineSettings(max_batch_size=max_batch_size))
    eng.eos_ids = set()
    forward, calls = eng.model.forward, [0]

    def fails_on_the_nth_forward(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("out of memory")
        return forward(*a, **k)

    eng.model.forward = fails_on_the_nth_forward
    return eng
