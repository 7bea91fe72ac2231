"""Helpers shared by the serving tests."""

from __future__ import annotations

import time


def wait_until_running(engine, timeout: float = 2.0) -> None:
    """Return once the engine's worker has taken every queued request and prefilled one (so a
    test can fill the queue, or join the running batch, deterministically)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if engine.queue_depth == 0 and engine.stats["prefills"]:
            return
        time.sleep(0.01)
