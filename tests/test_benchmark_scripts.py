"""Benchmark scripts run end to end in their quickest mode (real subprocesses, real data) and
print both paths and their ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_ingest_benchmark_prints_medians_of_interleaved_runs(tmp_path):
    """It printed only the best of --repeats runs (the README lists it among the scripts that
    print medians and also the best run), and ran all of one worker count's repeats before the
    other's. Now the worker counts alternate per repeat, the table has the median and the best,
    and the speed-up is given from both."""
    out = _run(
        "ingest.py", "--articles", "2", "--image-size", "64", "--repeats", "3",
        "--cache", str(tmp_path),
    )  # fmt: skip
    rows = _table(out, "figures/s (median)")
    assert [r[0] for r in rows] == ["1", "2"]
    for _, med, best, fps_med, fps_best, *_ in rows:
        assert float(best) <= float(med) and float(fps_best) >= float(fps_med)
    assert "median and best of 3 run(s)" in out
    assert "from the medians" in out and "from the best runs" in out


def test_instruct_throughput_runs_and_its_median_is_the_median():
    """With an even --repeats the 'median' column was the upper middle run: with 2, the best."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from instruct_throughput import best_and_median

    assert best_and_median([30.0, 40.0]) == (40.0, 35.0)
    assert best_and_median([4.0, 1.0, 3.0, 2.0]) == (4.0, 2.5)
    assert best_and_median([1.0, 3.0, 2.0]) == (3.0, 2.0)
    out = _run(
        "instruct_throughput.py", "--latency", "0.01", "--seconds", "0.2", "--concurrency", "1",
        "--repeats", "2",
    )  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith(("client ", "instruct "))]
    assert {r[0] for r in rows} == {"client", "instruct"}
    assert all(float(r[4]) <= float(r[3]) for r in rows)


def test_frozen_layers_refuses_an_impossible_frozen_count_up_front(tmp_path):
    """--frozen 0 (or >= --lm-layers) set up every model, then died in a ConfigError traceback."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    for bad in ("0", "8"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "frozen_layers.py"), "--frozen", bad,
             "--lm-layers", "8", "--cache", str(tmp_path)],
            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error: --frozen" in proc.stderr and "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())  # nothing built


def _table(out: str, header: str) -> list[list[str]]:
    """The rows (cells split on 2+ spaces) of the print_table table whose header holds ``header``."""
    import re

    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if header in line)
    width = len(re.split(r"\s{2,}", lines[start].strip()))
    rows = []
    for line in lines[start + 2 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != width:
            break
        rows.append(cells)
    return rows


def test_synth_speed_compares_workers_with_one_process_in_the_same_run():
    """It printed one timing per worker count, no baseline and no ratio, from a single run."""
    out = _run(
        "synth_speed.py", "--articles", "3", "--size", "64", "--workers", "2", "--repeats", "2",
        "--render-images", "2",
    )  # fmt: skip
    assert "medians of 2 repeat(s)" in out
    rows = _table(out, "speed-up vs 1 worker (wall)")
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][-1] == "1.00x (baseline)"
    wall1, wall2 = float(rows[0][2]), float(rows[1][2])
    assert abs(float(rows[1][-1].rstrip("x")) / (wall1 / wall2) - 1) < 0.1  # walls are rounded


def test_serve_throughput_table_and_headline_are_the_same_medians(tmp_path):
    """With an even --repeats the table printed the upper-middle round (the better one of 2) while
    the headline gave the true median; and the sequential baseline's 10 ms batching wait per
    request was not visible in the table. Now every cell is a median over the rounds, the
    speed-up column is the headline, and a no-wait sequential row stands beside it."""
    import statistics

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_throughput import summarise

    runs = [
        {"concurrency": 1, "requests": 4, "errors": 0, "seconds": s, "completions_per_s": c,
         "tokens_per_s": 10 * c, "completion_tokens": 16, "p50_s": 0.1, "p95_s": 0.2}
        for s, c in ((2.0, 2.0), (1.0, 4.0))
    ]  # fmt: skip
    assert summarise(runs)["completions_per_s"] == 3.0

    js = tmp_path / "serve.json"
    out = _run(
        "serve_throughput.py", "--requests", "4", "--concurrency", "2", "--max-tokens", "4",
        "--repeats", "2", "--json", str(js),
    )  # fmt: skip
    res = json.loads(js.read_text())
    by_round = res["completions_per_s_by_round"]
    rows = {r[0]: r for r in _table(out, "speed-up vs sequential")}
    assert set(rows) == {
        "sequential (pays 10 ms batching wait)",
        "sequential, no batching wait",
        "concurrency 2",
    }
    for label, key in (
        ("sequential (pays 10 ms batching wait)", "sequential"),
        ("sequential, no batching wait", "sequential_no_wait"),
        ("concurrency 2", "concurrent"),
    ):
        assert float(rows[label][1]) == pytest.approx(statistics.median(by_round[key]), abs=0.006)
    speedup = statistics.median(res["speedups"])
    assert res["speedup"] == pytest.approx(speedup, abs=0.006)
    assert rows["concurrency 2"][6] == f"{speedup:.2f}x"
    assert rows["concurrency 2"][7] == f"{res['speedup_vs_no_wait']:.2f}x"
    assert f"speedup: {speedup:.2f}x, median of 2 rounds" in out
    assert "without it" in out


def test_model_step_leaves_out_an_emulated_bf16_peak_and_names_its_ratio():
    """On a CPU without native bf16 it spent minutes on the emulated bf16 matmul peak, printed
    "bf16 0 GFLOP/s" and then "782% of peak"; and its "bf16/fp32" column was a speed-up where
    precision.py's is a time ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import of_peak
    from llavamed.utils.precision import cpu_has_fast_bf16

    assert of_peak(5e9, None) == of_peak(5e9, 0.0) == "n/a"
    assert of_peak(5e9, 1e10) == "50%"
    out = _run(
        "model_step.py", "--lm-layers", "1", "--batch", "1", "--repeats", "1", "--warmup", "0",
        "--text-lengths", "4",
    )  # fmt: skip
    (row,) = _table(out, "bf16 speed-up (fp32 time / bf16 time)")
    fp32_tok, bf16_tok, speedup = float(row[1]), float(row[2]), float(row[3].rstrip("x"))
    assert speedup == pytest.approx(bf16_tok / fp32_tok, rel=0.1, abs=0.02)
    assert row[4].endswith("%)")
    if cpu_has_fast_bf16():
        assert row[5].endswith("%)") and "not measured" not in out
    else:
        assert row[5].endswith("(n/a)")
        assert "bf16 not measured" in out and "GFLOP/s, emulated" in out


def test_precision_names_its_ratio_a_time_ratio():
    """Its "bf16/fp32" column was bf16 time / fp32 time, model_step.py's the inverse."""
    out = _run("precision.py", "--repeats", "1", "--tokens", "4")
    rows = _table(out, "bf16 time / fp32 time (>1: bf16 slower)")
    assert len(rows) == 2
    for _, t32, t16, ratio in rows:
        assert float(ratio.rstrip("x")) == pytest.approx(float(t16) / float(t32), rel=0.05)


def test_train_throughput_caps_both_paths_to_the_same_samples(tmp_path):
    """With --max-steps K ours trained its first K length-grouped batches and the baseline the
    first K random ones: different samples (7 of 24 shared with 64 samples, batch 8, K 3)."""
    js = tmp_path / "train.json"
    out = _run(
        "train_throughput.py", "--n", "16", "--batch", "4", "--lm", "tiny", "--vision",
        "tiny", "--max-steps", "2", "--cache", str(tmp_path / "cache"), "--json", str(js),
    )  # fmt: skip
    res = json.loads(js.read_text())
    assert res["same_samples"] is True
    assert res["steps_ours"] == res["steps_baseline"] == 2
    assert res["real_tokens_ours"] == res["real_tokens_baseline"] > 0
    assert "same samples: yes" in out


def test_eval_throughput_counts_generated_token_ids_not_retokenized_text(tmp_path):
    """'tokens generated' re-tokenized the decoded answers: a model that emits only special
    tokens (skipped when decoding) showed 0 for every mode."""
    from safetensors.torch import load_file, save_file

    from llavamed.model.compose import ModelSpec, init_checkpoint

    # A run folder stands for its checkpoint-final (it was "not a checkpoint folder").
    ckpt = init_checkpoint(
        tmp_path / "run" / "checkpoint-final",
        ModelSpec(lm="tiny", vision="tiny", template="chatml"),
    )
    weights = Path(ckpt) / "model.safetensors"
    sd = load_file(weights)
    (norm,) = [k for k in sd if k.endswith("language_model.model.norm.weight")]
    sd[norm].zero_()  # every logit 0: greedy picks id 0, <|endoftext|>: special, not the eos
    save_file(sd, weights, metadata={"format": "pt"})
    out = _run(
        "eval_throughput.py", "--model", str(tmp_path / "run"), "--n", "4", "--per-image", "2",
        "--batch-size", "2", "--max-new-tokens", "5", "--dtype", "float32", "--repeats", "1",
    )  # fmt: skip
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| float32 |")]
    assert len(rows) == 5  # reference, static, engine, and the two packed rows
    for r in rows:
        assert r[-1].rstrip(" |") == "20", r  # 4 answers x 5 ids, none of them text
    assert "mean 5.0, max 5" in out


def test_eval_throughput_refuses_zero_repeats_up_front(tmp_path):
    """--repeats 0 loaded the model twice, timed nothing and died in an IndexError."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_throughput.py"), "--repeats", "0",
         "--cache", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()  # nothing built


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetune_bound_sets_a_run_against_a_peak_it_computes_natively(
    tmp_path, tiny_llava_dir, precision
):
    """A bf16 run was set against this CPU's bf16 peak even where bf16 is emulated (~100x under
    fp32): any run looked near the peak, and its floor was hours long. Without native bf16 the
    share and the floor are "not measured" now; fp32 runs get both."""
    import shutil

    import yaml

    from llavamed.utils.precision import cpu_has_fast_bf16

    run = tmp_path / "run"
    shutil.copytree(tiny_llava_dir, run / "checkpoint-final")
    raw = yaml.safe_load((ROOT / "configs/cpu/finetune_vqa.yaml").read_text())
    raw["model"]["from"] = str(run / "checkpoint-final")
    raw["train"]["precision"] = precision
    raw["output"]["dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    steps = [
        {"step": i + 1, "epoch": 0, "tokens": 1000, "supervised_tokens": 100, "step_time_s": 0.5}
        for i in range(4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    out = _run("finetune_bound.py", str(run))
    import re

    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    (logged,) = [r for r in rows if r[0] == "logged steps"]
    floor = [r for r in rows if r[0].startswith("floor:")]
    assert float(logged[2]) == 2000  # 4,000 tokens in 2 s
    if precision == "bf16" and not cpu_has_fast_bf16():
        assert logged[-1] == "n/a" and floor == []
        assert "bf16 peak not measured" in out
    else:
        assert 0 < float(logged[-1]) and floor[0][-1] == "1.00"
        assert "not measured" not in out


def test_packed_batches_give_every_sample_a_question():
    """With --questions 1 a sample drew randint(0, 1) questions: some supervised nothing, and a
    batch of such samples divided its loss by zero supervised tokens."""
    import argparse
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from packed_attention import packed_batch

    args = argparse.Namespace(batch=64, header=4, questions=1)
    _, labels, segs, _ = packed_batch(16, 5, 1000, args, random.Random(0))
    assert bool(((labels != -100).sum(1) > 0).all())
    assert int(segs.max()) == 1


@pytest.mark.parametrize(
    "script,args",
    [
        ("instruct_throughput.py", ["--repeats", "0"]),
        ("instruct_throughput.py", ["--latency", "0"]),
        ("serve_throughput.py", ["--max-tokens", "0"]),
        ("frozen_layers.py", ["--attn", "bogus"]),
        ("stage0_curves.py", ["--world", "W", "--tower", "r=tiny", "--eval-every", "0"]),
        ("packed_attention.py", ["--steps", "0"]),
        ("packed_attention.py", ["--questions", "0"]),
        ("frozen_layers.py", ["--batch", "0"]),
        ("frozen_layers.py", ["--epochs", "0"]),
        ("optimizer_step.py", ["--steps", "0"]),
    ],
    ids=lambda x: x if isinstance(x, str) else " ".join(x),
)
def test_benchmarks_refuse_impossible_settings_as_usage_errors(tmp_path, script, args):
    """instruct_throughput: --repeats 0 died in max() of nothing, --latency 0 in a division by
    zero; serve_throughput --max-tokens 0 had every request refused and printed "nanx"
    speed-ups; frozen_layers --attn bogus set up the models, then a transformers ValueError;
    stage0_curves --eval-every 0 built the model, then a ZeroDivisionError at step 1. The step
    benchmarks' empty shapes likewise died after the set-up: --steps 0 in a StatisticsError (no
    median of nothing), --batch 0 in a ValueError, --questions 0 and frozen_layers' --epochs 0
    in a ZeroDivisionError."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    args = [str(tmp_path / "missing") if a == "W" else a for a in args]
    if script in ("frozen_layers.py", "packed_attention.py"):
        args += ["--cache", str(tmp_path / "cache")]
    if script == "stage0_curves.py":
        args += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_optimizer_step_names_its_ratio_and_compares_the_same_update():
    """Its ratio column was headed "vs default" beside model_step's and precision.py's ratios,
    which are explicit about their direction; and the fused optimizer always stepped first."""
    out = _run("optimizer_step.py", "--lm-layers", "1", "--steps", "3")
    rows = {r[0]: r for r in _table(out, "speed-up vs default (default time / this time)")}
    assert set(rows) == {"ours (fused)", "torch default"}
    ours, default = float(rows["ours (fused)"][1]), float(rows["torch default"][1])
    assert float(rows["ours (fused)"][2].rstrip("x")) == pytest.approx(default / ours, rel=0.05)
    assert rows["torch default"][2] == "1.00x"
    diff = float(out.split("largest weight difference after 5 steps: ")[1].split()[0])
    assert diff < 1e-5  # the same update, up to float rounding


@pytest.mark.parametrize(
    "script,args",
    [
        ("eval_throughput.py", ["--threads", "-1"]),
        ("probe_towers.py", ["--tower", "a=tiny", "--threads", "-1"]),
        ("readout_trace.py", ["--model", "M", "--train", "a=b", "--test", "a=b", "--threads", "0"]),
    ],
    ids=lambda x: x if isinstance(x, str) else " ".join(x),
)
def test_benchmarks_refuse_a_thread_count_below_one(tmp_path, script, args):
    """--threads -1 ended in torch's RuntimeError traceback ("set_num_threads expects a positive
    integer") after the towers were built; --threads 0 was silently torch's default."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    cache = ["--cache", str(tmp_path / "cache")] if script == "eval_throughput.py" else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, *cache],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --threads must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_stage0_probes_checks_its_overrides_before_rendering_pairs(tmp_path):
    """A misspelt override failed only after the pairs had rendered (minutes by default)."""
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "stage0_probes.py"), "--out", str(out),
         "--pairs", "4", "--workers", "1", "bogus_key=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "stage0_probes: error: " in proc.stderr and "bogus_key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "data").exists()
