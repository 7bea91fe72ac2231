"""Every benchmark script explains itself: ``--help`` exits 0 with a usage line, so a script left
as module-level code that reads ``sys.argv`` by position (and crashes on ``--help``) is caught."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help(script):
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])
    }
    proc = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]


def _docstring_opening(script: Path) -> str:
    """The first paragraph of the script's docstring: what it measures, against what."""
    import ast

    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return doc.strip().split("\n\n")[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help_says_what_it_measures(script):
    """stage0_probes.py's --help was a bare option list, and seven others showed only the
    docstring's first line, cut mid-sentence ("... against one-at-a-time requests,"; no word of
    the baseline or the ratio). Every --help now gives the docstring, its first paragraph whole."""
    first = _docstring_opening(script)
    assert first, f"{script.name} has no module docstring"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])
    }
    proc = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert " ".join(first.split()) in " ".join(proc.stdout.split()), proc.stdout[:800]


def _bad_args(tmp: Path) -> dict[str, list[str]]:
    missing = str(tmp / "missing")
    not_a_run = tmp / "not-a-run"  # a config but no metrics or checkpoint: not a finished run
    not_a_run.mkdir()
    (not_a_run / "config.yaml").write_text("stage: finetune\n")
    return {
        "finetune_bound missing folder": ["finetune_bound.py", missing],
        "finetune_bound unfinished run": ["finetune_bound.py", str(not_a_run)],
        "finetune_bound a file": ["finetune_bound.py", str(not_a_run / "config.yaml")],
        "eval_throughput --model": [
            "eval_throughput.py", "--model", missing, "--n", "1", "--repeats", "1",
            "--dtype", "float32", "--cache", str(tmp / "ckpt"),
        ],
        "eval_throughput --data": [
            "eval_throughput.py", "--dataset", "slake", "--data", missing, "--n", "1",
            "--cache", str(tmp / "ckpt"),
        ],
        "serve_throughput --model": ["serve_throughput.py", "--model", missing],
        "readout_trace --train": [
            "readout_trace.py", "--model", missing, "--train", f"slake={missing}",
            "--test", f"slake={missing}",
        ],
        "probe_towers --tower": ["probe_towers.py", "--tower", f"a={missing}", "--images", "3"],
        "stage0_curves --world": [
            "stage0_curves.py", "--world", missing, "--tower", "r=cpu", "--out", str(tmp / "o"),
        ],
        "closed_logits_eval model": [
            "closed_logits_eval.py", "--test", f"slake={tmp}", missing,
        ],
        "closed_logits_eval --test": [
            "closed_logits_eval.py", "--test", f"slake={missing}", missing,
        ],
    }  # fmt: skip


BAD_ARG_CASES = [
    "finetune_bound missing folder",
    "finetune_bound unfinished run",
    "finetune_bound a file",
    "eval_throughput --model",
    "eval_throughput --data",
    "serve_throughput --model",
    "readout_trace --train",
    "probe_towers --tower",
    "stage0_curves --world",
    "closed_logits_eval model",
    "closed_logits_eval --test",
]


@pytest.mark.parametrize("case", BAD_ARG_CASES)
def test_benchmark_bad_path_is_one_line(tmp_path, case):
    """A missing folder or a non-checkpoint ended every script but finetune_bound.py in a
    traceback (llavamed's InputError raised through main), and finetune_bound.py itself in one
    for a run without checkpoint-final/ (transformers' OSError) or metrics.jsonl. Now: exit 1
    and one line, '<script>: error: <path>: <what is wrong>'; eval_throughput checks its
    questions and --model before composing a default checkpoint."""
    script, *args = _bad_args(tmp_path)[case]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith(f"{script[:-3]}: error: "), proc.stderr
    assert str(tmp_path) in errors[0]
    assert not (tmp_path / "ckpt").exists()  # nothing composed before the check
