"""Checks of train and eval inputs: what must be refused, and refused before the slow part (the
model loading, the data tokenizing) instead of after it."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoProcessor

from llavamed.errors import ConfigError

# Shared 2-core machine: one intra-op thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- data.max_length and the image ------------------------------------------------------------


def _image_end(proc, template: str, messages) -> int:
    """Where the image tokens end in the encoded sample: the ground truth the check must match."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import IMAGE_PLACEHOLDER

    enc = encode_training_sample(messages, proc, template, num_images=1)
    image = proc.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return max(i for i, t in enumerate(enc.input_ids) if t == image) + 1


def _vicuna_load(tmp_path, proc, recs, max_length):
    from llavamed.config import DataConfig, DataSource
    from llavamed.train.data import load_samples

    Image.new("RGB", (20, 16), (90, 40, 10)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs))
    cfg = DataConfig(sources=[DataSource(path=str(path))], max_length=max_length)
    return load_samples(cfg, proc, "vicuna_v1", quiet=True)


def test_max_length_check_counts_the_templates_own_system_message(tmp_path, tiny_llava_dir):
    """The floor was measured with an empty system message: vicuna puts its ~40-token default in
    front of every sample that has none, so a max_length between the two passed the check, then
    skipped every sample as "truncation inside image tokens" and ended in "no training samples
    left" (the data blamed for a setting). The floor is now where the image really ends."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import Message
    from llavamed.train.data import vqa_messages

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    sample = vqa_messages("Is it bright?", "yes", "closed", False)
    real = _image_end(proc, "vicuna_v1", sample)
    empty = _image_end(proc, "vicuna_v1", [Message("system", ""), *sample])
    assert real > empty + 20  # the default system message's tokens
    recs = [
        {
            "id": f"img{i}",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs it bright?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
        for i in range(3)
    ]
    for max_length in (empty + 5, real):
        with pytest.raises(
            ConfigError,
            match=rf"data\.max_length={max_length} cannot hold an image: the vicuna_v1 prompt .*"
            rf"system message included\) is already {real} tokens",
        ):
            _vicuna_load(tmp_path, proc, recs, max_length)
    # Exact: one token more holds the image, and the answer's tokens decide the rest.
    with pytest.raises(Exception, match="no supervised tokens after truncation"):
        encode_training_sample(sample, proc, "vicuna_v1", num_images=1, max_length=real + 1)
    whole = len(encode_training_sample(sample, proc, "vicuna_v1", num_images=1).input_ids)
    samples, rep = _vicuna_load(tmp_path, proc, recs, whole)
    assert len(samples) == 3 and not rep.skipped and not rep.truncated


def test_a_record_with_its_own_system_turn_is_measured_as_it_is(tmp_path, tiny_llava_dir):
    """A record that brings a short system turn of its own does not get the template's default:
    a max_length below the default's floor still trains it (the check is exact, not a bound
    taken from another prompt), and one too short for any system message is still refused."""
    from llavamed.model.processing import encode_training_sample
    from llavamed.model.templates import Message
    from llavamed.train.data import vqa_messages

    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    sample = vqa_messages("Is it bright?", "yes", "closed", False)
    default = _image_end(proc, "vicuna_v1", sample)
    own = [Message("system", "Be brief."), *sample]
    whole = len(encode_training_sample(own, proc, "vicuna_v1", num_images=1).input_ids)
    empty = _image_end(proc, "vicuna_v1", [Message("system", ""), *sample])
    assert whole < default  # the whole sample fits below the default's floor
    recs = [
        {
            "id": "own-system",
            "image": "a.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<image>\nIs it bright?"},
                {"from": "gpt", "value": "yes"},
            ],
        }
    ]
    samples, rep = _vicuna_load(tmp_path, proc, recs, whole)
    assert len(samples) == 1 and not rep.skipped and not rep.truncated
    with pytest.raises(ConfigError, match=f"is already {empty} tokens"):
        _vicuna_load(tmp_path, proc, recs, empty)
