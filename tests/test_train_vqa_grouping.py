"""group_by_image: an image's VQA questions share one image prefix in one sample. Its supervised
tokens are exactly that image's answers, the image tokens appear once, and each question's loss
equals the loss of its own single-turn sample (it cannot see the other questions)."""

from __future__ import annotations

from collections import defaultdict

import pytest
from transformers import AutoProcessor

from llavamed.config import DataConfig, DataSource
from llavamed.data.vqa import load_vqa
from llavamed.model.processing import IGNORE_INDEX
from llavamed.train.data import load_samples


def test_group_by_image_packs_questions_per_image(tmp_path, tiny_llava_dir):
    from llavamed.data.synth import generate_world

    world = tmp_path / "w"
    generate_world(world, articles=1, seed=3, image_size=64, progress=False, vqa_images=22)
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


def _world_samples(tmp_path, proc, **source):
    from llavamed.data.synth import generate_world

    world = tmp_path / "w"
    if not world.exists():
        generate_world(world, articles=1, seed=3, image_size=64, progress=False, vqa_images=22)
    src = dict(format="vqa", dataset="slake", path=str(world / "slake"), split="train")
    max_length = source.pop("_max", 2048)
    samples, rep = load_samples(
        DataConfig(sources=[DataSource(**src, **source)], max_length=max_length),
        proc,
        "chatml",
        quiet=True,
    )
    return samples, rep


def test_max_samples_counts_questions_with_or_without_grouping(tmp_path, tiny_llava_dir):
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)

    def supervised_answers(samples):
        # Each answer ends in one supervised <|im_end|>.
        end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return sum(
            1
            for s in samples
            for tid, lab in zip(s.input_ids, s.labels, strict=True)
            if lab != IGNORE_INDEX and tid == end
        )

    single, _ = _world_samples(tmp_path, proc, max_samples=5)
    grouped, _ = _world_samples(tmp_path, proc, max_samples=5, group_by_image=True)
    assert len(single) == 5
    assert supervised_answers(single) == supervised_answers(grouped) == 5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_questions_score_as_their_single_turn_samples(tmp_path, wide_llava_dir, attn):
    """Logit parity: the packed sample's summed loss is the sum of its questions' single-turn
    losses (same answers, same prompts), and the 4-D mask is what makes it so -- the same tokens
    under a plain causal mask (later questions see earlier answers) score differently."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from llavamed.train.data import Collator, TrainDataset
    from llavamed.train.trainer import _loss_module_cls

    proc = AutoProcessor.from_pretrained(wide_llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(wide_llava_dir).eval()
    model.set_attn_implementation(attn)  # eager gets an additive float mask, sdpa a boolean one
    loss_fn = _loss_module_cls()(model)
    single, _ = _world_samples(tmp_path, proc)
    grouped, _ = _world_samples(tmp_path, proc, group_by_image=True)
    sample = max(grouped, key=lambda s: max(s.segment_ids))
    n_q = max(sample.segment_ids)
    assert n_q >= 3
    mine = [s for s in single if s.image == sample.image]
    assert len(mine) == n_q
    collate = Collator(proc.tokenizer.pad_token_id)

    def loss(samples, plain=False):
        ds = TrainDataset(samples, proc.image_processor)
        b = collate([ds[i] for i in range(len(samples))])
        if plain:
            b.pop("segment_ids", None)
            b.pop("position_ids", None)
        kw = {k: v for k, v in b.items() if torch.is_tensor(v)}
        with torch.no_grad():
            return float(loss_fn(**kw))

    separate = sum(loss([s]) for s in mine)
    packed = loss([sample])
    assert abs(packed - separate) < 1e-4 * max(1.0, abs(separate))
    # Batched with padding (a shorter packed sample beside it) the result is the same.
    other = min(grouped, key=lambda s: s.length)
    assert abs(loss([sample, other]) - (packed + loss([other]))) < 1e-3 * max(1.0, packed)
    assert abs(loss([sample], plain=True) - separate) > 1e-3 * max(1.0, abs(separate))


def test_packing_splits_at_max_length_and_keeps_every_answer(tmp_path, tiny_llava_dir):
    proc = AutoProcessor.from_pretrained(tiny_llava_dir)
    whole, _ = _world_samples(tmp_path, proc, group_by_image=True)
    big = max(whole, key=lambda s: s.length)
    prefix = sum(1 for g in big.segment_ids if g == 0)
    limit = prefix + (big.length - prefix) // 2  # forces at least one split
    split, rep = _world_samples(tmp_path, proc, group_by_image=True, _max=limit)
    assert not rep.skipped
    assert max(s.length for s in split) <= limit
    assert len(split) > len(whole)

    def answers(samples):
        return sorted((str(s.image), t) for s in samples for t in s.labels if t != IGNORE_INDEX)

    assert answers(split) == answers(whole)


def test_shared_prefix_positions_and_mask_by_hand():
    import torch

    from llavamed.train.shared_prefix import attention_mask_4d, pack_shared_prefix, position_ids

    # Two questions: shared [1, 2, 3], tails [7, 8*] and [9, 5, 6*] (* supervised).
    a = ([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    b = ([1, 2, 3, 9, 5, 6], [-100, -100, -100, -100, -100, 6])
    [(ids, labels, segs)] = pack_shared_prefix([a, b], max_length=64, source="x", min_prefix=3)
    assert ids == [1, 2, 3, 7, 8, 9, 5, 6]
    assert labels == [-100, -100, -100, -100, 8, -100, -100, 6]
    assert segs == [0, 0, 0, 1, 1, 2, 2, 2]
    assert position_ids(segs) == [0, 1, 2, 3, 4, 3, 4, 5]
    m = attention_mask_4d(torch.tensor([segs + [-1]]))[0, 0].int().tolist()
    assert m[4] == [1, 1, 1, 1, 1, 0, 0, 0, 0]  # question 1 sees the prefix and itself
    assert m[7] == [1, 1, 1, 0, 0, 1, 1, 1, 0]  # question 2 never sees question 1
    assert m[8] == [1, 1, 1, 0, 0, 0, 0, 0, 1]  # padding: never an empty row; unread anyway


def test_a_repeated_question_is_answered_from_itself_not_from_the_previous_answer():
    from llavamed.train.shared_prefix import pack_shared_prefix

    # The same question twice (real sets repeat some): shared [1, 2, 3, 7], answers 8* and 9*.
    # The first token of a tail is predicted from the token before it in the packed sample, so a
    # tail starting with an answer would learn 9 as the continuation of answer 8.
    a = ([1, 2, 3, 7, 8], [-100, -100, -100, -100, 8])
    b = ([1, 2, 3, 7, 9], [-100, -100, -100, -100, 9])
    [(ids, labels, segs)] = pack_shared_prefix([a, b], max_length=64, source="x", min_prefix=3)
    assert ids == [1, 2, 3, 7, 8, 7, 9] and segs == [0, 0, 0, 1, 1, 2, 2]
    starts = [i for i, g in enumerate(segs) if g and (i == 0 or segs[i - 1] != g)]
    assert all(labels[i] == -100 for i in starts)
    assert [t for t in labels if t != -100] == [8, 9]


def test_questions_that_do_not_share_the_image_are_rejected():
    from llavamed.errors import InputError
    from llavamed.train.shared_prefix import pack_shared_prefix

    with pytest.raises(InputError, match="do not share the image prefix"):
        pack_shared_prefix(
            [([1, 2, 3, 4], [-100, -100, -100, 4]), ([1, 5, 3, 4], [-100, -100, -100, 4])],
            max_length=64,
            source="img7",
            min_prefix=3,
        )
