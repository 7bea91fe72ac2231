"""MedSynth packages -> ingest -> domains -> align, end to end, against the world's ground truth."""

import json

import pytest

from llavamed.cli import main
from llavamed.data.domains import evaluate_domains

synth = pytest.importorskip("llavamed.data.synth")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("medsynth")
    manifest = synth.generate_world(
        root / "world", articles=12, seed=7, image_size=64, workers=1, progress=False,
        vqa_images=22,
    )  # fmt: skip
    return root, manifest


def test_every_manifest_figure_is_ingested_with_its_domain(world):
    root, manifest = world
    out = root / "corpus"
    rc = main(["data", "ingest", str(root / "world" / "packages"), "--out", str(out),
               "--workers", "2", "--no-progress"])  # fmt: skip
    assert rc == 0
    recs = {}
    for line in (out / "figures.jsonl").read_text().splitlines():
        rec = json.loads(line)
        recs[rec["pair_id"]] = rec
    truth = [e for e in manifest["images"] if e["set"] == "pmc"]
    assert truth and {e["pair_id"] for e in truth} == set(recs)
    for e in truth:
        rec = recs[e["pair_id"]]
        assert (rec["pmcid"], rec["fig_id"]) == (e["pmcid"], e["fig_id"])
        assert (out / rec["image"]).is_file()
    assert any(r["in_text_mention"] for r in recs.values())
    gold = [
        {**recs[e["pair_id"]], "domain": [] if e["domain"] == "other" else [e["domain"]]}
        for e in truth
    ]
    result = evaluate_domains(gold)
    for domain, m in result["domains"].items():
        if m["support"]:
            assert m["precision"] >= 0.95 and m["recall"] >= 0.95, (domain, m)


def test_alignment_from_ingested_corpus_is_valid_llava_json(world):
    from llavamed.model.templates import conversation_to_messages

    root, _ = world
    figures = root / "corpus" / "figures.jsonl"
    if not figures.exists():
        pytest.skip("needs the ingest test's corpus")
    out = root / "train" / "alignment.json"
    assert main(["data", "align", "--figures", str(figures), "--out", str(out), "--seed", "1"]) == 0
    samples = json.loads(out.read_text())
    assert samples
    for s in samples:
        assert (out.parent / s["image"]).is_file()
        assert s["conversations"][0]["value"].count("<image>") == 1
        conversation_to_messages(s["conversations"], s["id"])  # what `llavamed train` parses


def test_sigkill_mid_run_then_resume(tmp_path):
    """A real kill -9 of `llavamed data ingest` with 2 workers, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    world = tmp_path / "world"
    manifest = synth.generate_world(
        world, articles=30, seed=3, image_size=64, workers=1, progress=False, vqa_images=22
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llavamed", "data", "ingest", str(world / "packages"),
           "--out", str(out), "--workers", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / ".done_packages.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if ledger.exists() and ledger.stat().st_size > 0:
            break
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    ids = [json.loads(line)["pair_id"] for line in (out / "figures.jsonl").read_text().splitlines()]
    truth = {e["pair_id"] for e in manifest["images"] if e["set"] == "pmc"}
    assert len(ids) == len(set(ids)) and set(ids) == truth
    assert {p.stem for p in (out / "images").glob("*.jpg")} == truth
