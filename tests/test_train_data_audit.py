"""Training data as real users hand it over: LLaVA conversation JSON with out-of-order turns,
truncation at data.max_length, and what data_report.json says about them."""

from __future__ import annotations

import json

from PIL import Image
from transformers import AutoProcessor

from llavamed.config import DataConfig, DataSource
from llavamed.train.data import load_samples


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def _load(tmp_path, recs, proc, max_length=256, quiet=True):
    Image.new("RGB", (20, 16), (90, 40, 10)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_length=max_length)
    return load_samples(cfg, proc, "chatml", quiet=quiet)


def test_out_of_order_turns_name_their_record_and_count_under_one_reason(
    tmp_path, tiny_llava_dir, capsys
):
    """A gpt turn first, or two human turns in a row, was reported as "<conversation>: turn 0 is
    'assistant', expected 'user'": no file, no record id, and one reason per turn position."""
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    recs = [
        {
            "id": "gpt-first",
            "image": "a.png",
            "conversations": _turns(("gpt", "Hi"), ("human", "<image>\nQ"), ("gpt", "A")),
        },
        {
            "id": "two-humans",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("human", "And?"), ("gpt", "A")),
        },
        {
            "id": "system-inside",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("system", "x"), ("gpt", "A")),
        },
        {
            "id": "ok",
            "image": "a.png",
            "conversations": _turns(("human", "<image>\nQ"), ("gpt", "A")),
        },
    ]
    samples, rep = _load(tmp_path, recs, proc, quiet=False)
    assert len(samples) == 1
    assert dict(rep.skipped) == {"turns out of order": 3}
    train = str(tmp_path / "train.json")
    assert rep.examples == [
        f"{train}[0] id=gpt-first: turns out of order (turn 0 is 'assistant', expected 'user')",
        f"{train}[1] id=two-humans: turns out of order (turn 1 is 'user', expected 'assistant')",
        f"{train}[2] id=system-inside: turns out of order "
        "(turn 1 is 'system', expected 'assistant')",
    ]
    err = capsys.readouterr().err
    assert "<conversation>" not in err and "id=gpt-first: turns out of order" in err
