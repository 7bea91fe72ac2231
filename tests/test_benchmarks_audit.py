"""Benchmark scripts run end to end in their quickest mode (real subprocesses, real data) and
print both paths and their ratio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_ingest_benchmark_runs(tmp_path):
    """It asked MedSynth for 6 VQA images, below the 22 the generator accepts: it crashed before
    timing anything."""
    out = _run(
        "ingest.py", "--articles", "2", "--image-size", "64", "--repeats", "1",
        "--cache", str(tmp_path),
    )  # fmt: skip
    assert "speed-up 2 vs 1 workers" in out
