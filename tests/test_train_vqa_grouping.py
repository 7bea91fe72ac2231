"""group_by_image: all of an image's VQA questions become one multi-turn sample whose supervised
tokens are exactly that image's answers, with the image placeholder only in the first turn."""

from __future__ import annotations

from collections import defaultdict

from transformers import AutoProcessor

from llavamed.config import DataConfig, DataSource
from llavamed.eval.vqa_data import load_vqa
from llavamed.model.processing import IGNORE_INDEX
from llavamed.train.data import load_samples


def test_group_by_image_packs_questions_per_image(tmp_path, tiny_llava_dir):
    from llavamed.data.synth import generate_world

    world = tmp_path / "w"
    generate_world(world, articles=1, seed=3, image_size=64, progress=False, vqa_images=12)
    vqa, _ = load_vqa("slake", world / "slake", split="train")
    by_image = defaultdict(list)
    for s in vqa:
        by_image[str(s.image)].append(s)
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    src = dict(format="vqa", dataset="slake", path=str(world / "slake"), split="train")
    single, _ = load_samples(
        DataConfig(sources=[DataSource(**src)], max_length=2048), proc, "chatml", quiet=True
    )
    grouped, rep = load_samples(
        DataConfig(sources=[DataSource(**src, group_by_image=True)], max_length=2048),
        proc,
        "chatml",
        quiet=True,
    )
    assert len(single) == len(vqa)
    assert len(grouped) == len(by_image) < len(single)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    n_img = sum(1 for t in single[0].input_ids if t == image_id)
    tok = proc.tokenizer
    for sample in grouped:
        qs = by_image[str(sample.image)]
        assert sum(1 for t in sample.input_ids if t == image_id) == n_img  # one image, once
        runs, cur = [], []
        for tid, lab in zip(sample.input_ids, sample.labels, strict=True):
            if lab != IGNORE_INDEX:
                cur.append(tid)
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        if cur:
            runs.append(tok.decode(cur))
        assert runs == [f"{s.answer}<|im_end|>" for s in qs]
    # Fewer tokens for the same supervision: the image is encoded once per image.
    assert sum(s.length for s in grouped) < sum(s.length for s in single)
