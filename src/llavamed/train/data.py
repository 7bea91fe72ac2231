"""Training data: samples from LLaVA conversation JSON or VQA sets, a lazily-decoding dataset,
a padding collator and the length-grouped global-batch schedule.

Text is tokenized once, up front, so every sample's exact length is known (length grouping is
exact, and bad conversations are found before training starts). Images are decoded lazily, in
DataLoader workers. Every skipped sample is counted under a reason in the :class:`DataReport`
(``OUT/data_report.json``); nothing is dropped silently.
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavamed.config import DataConfig, DataSource
from llavamed.errors import ConfigError, InputError
from llavamed.model.processing import IGNORE_INDEX, encode_training_sample, num_image_tokens
from llavamed.model.templates import IMAGE_PLACEHOLDER, Message, conversation_to_messages
from llavamed.train.shared_prefix import PAD, pack_shared_prefix, position_ids
from llavamed.utils.io import parse_records, read_json

MAX_PRINTED = 5


@dataclass
class Sample:
    """One encoded training sample; the image is decoded later."""

    input_ids: list[int]
    labels: list[int]
    image: str | bytes | None
    source: str
    segment_ids: list[int] | None = None
    """Set for several questions sharing one image prefix (``llavamed.train.shared_prefix``)."""
    truncated: tuple[str, str] | None = None
    """``(reason, detail)`` when it was cut at ``data.max_length`` and kept; for the report."""

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What was loaded and what was skipped, per reason."""

    n_records: int = 0
    n_loaded: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)
    skipped_at_load: Counter = field(default_factory=Counter)
    """Samples whose image failed while training, per reason: each sample once, however many
    epochs met it (``failed_at_load``: sample index -> reason; ``load_failures``: every visit)."""
    failed_at_load: dict[int, str] = field(default_factory=dict)
    load_failures: int = 0
    examples: list[str] = field(default_factory=list)
    truncated: Counter = field(default_factory=Counter)
    """Samples cut at ``data.max_length`` and kept, per reason (``llavamed.model.processing``)."""
    truncated_examples: list[str] = field(default_factory=list)
    quiet: bool = False

    def add(self, err: InputError, at_load: bool = False) -> None:
        (self.skipped_at_load if at_load else self.skipped)[err.reason] += 1
        n = sum(self.skipped.values()) + sum(self.skipped_at_load.values())
        if len(self.examples) < 50:
            self.examples.append(str(err))
        if n <= MAX_PRINTED and not self.quiet:
            print(f"llavamed train: skipping {err}", file=sys.stderr)
        elif n == MAX_PRINTED + 1 and not self.quiet:
            print("llavamed train: more samples skipped; see data_report.json", file=sys.stderr)

    def add_load_failure(self, idx: int, reason: str, where: str) -> None:
        """A sample whose image failed to load while training: counted and named once, however
        many epochs meet it (3 epochs counted one corrupt image as 3)."""
        self.load_failures += 1
        if idx in self.failed_at_load:
            return
        self.failed_at_load[idx] = reason
        self.add(InputError(where, reason), at_load=True)

    def merge_load_failures(self, failed: dict[int, str], visits: int) -> None:
        """Fold another process's (or a checkpoint's) failures in, each sample once."""
        self.load_failures += visits
        for idx, reason in failed.items():
            if int(idx) not in self.failed_at_load:
                self.failed_at_load[int(idx)] = reason
                self.skipped_at_load[reason] += 1

    def add_truncated(self, where: str, reason: str, detail: str) -> None:
        """A sample kept after a cut at ``data.max_length``: counted, and named."""
        self.truncated[reason] += 1
        if len(self.truncated_examples) < 50:
            self.truncated_examples.append(f"{where}: {reason} ({detail})")

    def to_dict(self) -> dict:
        return {
            "n_records": self.n_records,
            "n_loaded": self.n_loaded,
            "per_source": dict(self.per_source),
            "skipped": dict(self.skipped),
            "skipped_while_training": dict(self.skipped_at_load),
            "skipped_while_training_visits": self.load_failures,
            "examples": list(self.examples),
            "truncated": dict(self.truncated),
            "truncated_examples": list(self.truncated_examples),
        }


# --- reading sources ---------------------------------------------------------------------------


def _llava_json_samples(src: DataSource, report: DataReport, encode) -> list[Sample]:
    path = Path(src.path)
    data = None  # a .jsonl file (one record per line, LLaVA-NeXT's form) is read line by line
    if path.suffix.lower() != ".jsonl":
        try:
            data = read_json(path)
        except InputError as err:
            if err.detail.startswith("Extra data"):  # e.g. one JSON object per line
                raise InputError(
                    path, err.reason, f"{err.detail}; one record per line? name the file .jsonl"
                ) from err
            raise
        if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
            data = [r for v in data.values() for r in v]  # {domain: [records]} shape
        if not isinstance(data, list):
            raise InputError(
                path, "expected a JSON list of LLaVA conversation records (or a .jsonl file)"
            )
    folder = Path(src.image_folder) if src.image_folder else path.parent

    def parse(rec: dict, where: str) -> Sample:
        if "id" in rec:
            where = f"{where} id={rec['id']}"
        conv = rec.get("conversations")
        if conv is None and "fig_caption" in rec:
            # data.path=corpus/figures.jsonl: every record was a "malformed conversation".
            raise InputError(
                where,
                "a figure record, not a conversation",
                "make training samples from figures with `llavamed data align` or `data instruct`",
            )
        if not isinstance(conv, list) or not conv:
            raise InputError(where, "malformed conversation", "no conversations list")
        image = rec.get("image")
        if isinstance(image, list):
            if len(image) != 1:
                raise InputError(
                    where, "image count mismatch", f"{len(image)} images; one supported"
                )
            image = image[0]
        if image is not None:
            if not isinstance(image, str) or not image:
                raise InputError(where, "malformed image field")
            ip = folder / image
            if not ip.is_file():
                raise InputError(where, "missing image", str(ip))
            image = str(ip)
        try:
            messages = conversation_to_messages(conv, where)
        except InputError as exc:
            raise InputError(
                where, "malformed conversation", f"{exc.reason} {exc.detail}".strip()
            ) from exc
        return encode(messages, image, where)

    if data is None:
        from llavamed.utils.io import iter_jsonl_numbered

        out: list[Sample] = []
        for line, rec in iter_jsonl_numbered(path, on_bad=_counted(report)):
            report.n_records += 1
            try:
                out.append(parse(rec, f"{path}:{line}"))
            except InputError as err:
                report.add(err)
        return out
    report.n_records += len(data)
    return parse_records(data, path, parse, report.add)


def _counted(report: DataReport):
    """``on_bad`` for a JSONL reader: a bad line is a record, counted and skipped."""

    def on_bad(err: InputError) -> None:
        report.n_records += 1
        report.add(err)

    return on_bad


def vqa_messages(
    question: str, answer: str, answer_type: str, closed_suffix: bool
) -> list[Message]:
    """A VQA pair as the single-turn conversation the eval runner prompts with: the image
    placeholder first, then the question (with the paper's closed suffix when asked)."""
    from llavamed.eval.vqa_runner import question_text

    # The runner's own question text, so training and evaluation prompts cannot drift.
    q = question_text(question, answer, answer_type, closed_suffix)
    return [Message("user", f"{IMAGE_PLACEHOLDER}\n{q}"), Message("assistant", answer)]


def _seeded_subset(items: list, n: int | None, seed: int) -> list:
    """``n`` of ``items`` chosen with ``seed``, in their original order (all when n is None)."""
    if n is None or len(items) <= n:
        return items
    return [items[k] for k in sorted(random.Random(seed).sample(range(len(items)), n))]


def _vqa_samples(src: DataSource, report: DataReport, encode, pack, seed: int) -> list[Sample]:
    from llavamed.data.vqa import load_vqa

    vqa, rep = load_vqa(
        src.dataset, src.path, split=src.split, lang=src.lang, images=src.image_folder
    )
    # max_samples counts questions, grouped or not: group_by_image packs several questions into
    # one sample, so a subset of packed samples would mean more questions with grouping on.
    vqa = _seeded_subset(vqa, src.max_samples, seed)
    report.n_records += rep.n_records
    for reason, n in rep.bad.items():
        report.skipped[reason] += n
    report.examples.extend(rep.examples[: max(0, 50 - len(report.examples))])
    if rep.bad and not report.quiet:
        print(f"llavamed train: {rep.summary()}", file=sys.stderr)
    out = []
    if src.group_by_image:
        for image, group in _group_by_image(vqa):
            where = f"{src.path} image={group[0].qid}.."
            encoded = []
            for s in group:  # a bad question is counted and skipped, not its whole image
                try:
                    encoded.append(
                        encode(
                            vqa_messages(s.question, s.answer, s.answer_type, src.closed_suffix),
                            image,
                            f"{src.path} qid={s.qid}",
                        )
                    )
                except InputError as err:
                    report.add(err)
            if not encoded:
                continue
            try:
                out.extend(pack(encoded, image, where))
            except InputError as err:
                report.add(err)
        return out
    for s in vqa:
        where = f"{src.path} qid={s.qid}"
        try:
            out.append(
                encode(
                    vqa_messages(s.question, s.answer, s.answer_type, src.closed_suffix),
                    s.image,
                    where,
                )
            )
        except InputError as err:
            report.add(err)
    return out


def _group_by_image(samples) -> list[tuple[object, list]]:
    """VQA samples grouped by their image (path, or bytes for parquet sets), in first-seen
    order; each group's questions keep the dataset's order."""
    import hashlib

    groups: dict[str, tuple[object, list]] = {}
    for s in samples:
        img = s.image
        key = hashlib.sha1(img).hexdigest() if isinstance(img, (bytes, bytearray)) else str(img)
        groups.setdefault(key, (img, []))[1].append(s)
    return list(groups.values())


def _source_key(src: DataSource, i: int, taken: dict) -> str:
    """The report's name of source ``i``: its path, with the split for a VQA set (SLAKE's train
    and validate splits share one folder), and its position when that is still taken."""
    key = src.path if src.format == "llava_json" else f"{src.path} (split {src.split})"
    return f"{key} (source {i + 1})" if key in taken else key


def min_image_length(processor, template: str, system: str | None = None) -> int:
    """The tokens a sample with an image spends up to the end of its image tokens, which sits in
    the first user turn with the image first (where a sample's image always is). It depends only
    on the template and the system message: ``system=None`` is a conversation without a system
    turn (every VQA sample and LLaVA JSON record without one), which the template opens with its
    own default (vicuna's is about 40 tokens; chatml and mistral have none)."""
    messages = [Message("user", IMAGE_PLACEHOLDER), Message("assistant", "yes")]
    if system is not None:
        messages.insert(0, Message("system", system))
    enc = encode_training_sample(messages, processor, template, num_images=1)
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    return max(i for i, t in enumerate(enc.input_ids) if t == image_token) + 1


def load_samples(
    cfg: DataConfig, processor, template: str, *, seed: int = 0, quiet: bool = False
) -> tuple[list[Sample], DataReport]:
    """Read and tokenize every source. Bad records are counted in the report and skipped."""
    report = DataReport(quiet=quiet)
    floors: dict[str | None, int] = {}  # measured at the first sample with an image of each kind

    def encode(messages, image, where) -> Sample:
        # Measured with the system message the template really puts in front (None: its own
        # default, as every sample without a system turn gets): measured with an empty one,
        # vicuna's floor was ~40 tokens short, so a max_length between the two passed here and
        # then skipped every sample as "truncation inside image tokens". For records with a
        # system turn of their own, the empty one is the floor none of them can go below.
        kind = "" if messages and messages[0].role == "system" else None
        if image is not None and kind not in floors:
            floors[kind] = min_image_length(processor, template, kind)
            if cfg.max_length <= floors[kind]:
                # A setting, not the data: every sample with an image would be skipped as
                # "truncation inside image tokens", then "no training samples left".
                raise ConfigError(
                    f"data.max_length={cfg.max_length} cannot hold an image: the {template} "
                    f"prompt up to the end of its {num_image_tokens(processor)} image tokens "
                    f"(system message included) is already {floors[kind]} tokens; raise "
                    "data.max_length (the question and answer come after them)"
                )
        enc = encode_training_sample(
            messages,
            processor,
            template,
            num_images=0 if image is None else 1,
            max_length=cfg.max_length,
            source=where,
        )
        cut = None
        if enc.truncated:
            cut = (enc.truncated, f"{enc.full_length} tokens > max_length {cfg.max_length}")
        return Sample(enc.input_ids, enc.labels, image, where, truncated=cut)

    def count_truncated(samples: list[Sample]) -> None:
        for s in samples:
            if s.truncated:
                report.add_truncated(s.source, *s.truncated)

    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)

    def pack(encoded: list[Sample], image, where) -> list[Sample]:
        first = encoded[0].input_ids
        after_image = max(i for i, t in enumerate(first) if t == image_token) + 1
        packed = pack_shared_prefix(
            [(s.input_ids, s.labels) for s in encoded],
            max_length=cfg.max_length,
            source=where,
            min_prefix=after_image,
        )
        count_truncated(encoded)  # each question once: packing merges them
        return [Sample(ids, labels, image, where, segs) for ids, labels, segs in packed]

    samples: list[Sample] = []
    for i, src in enumerate(cfg.sources):
        if src.format == "llava_json":
            got = _seeded_subset(
                _llava_json_samples(src, report, encode), src.max_samples, seed + i
            )
        else:
            got = _vqa_samples(src, report, encode, pack, seed + i)
        if src.format == "llava_json" or not src.group_by_image:  # (packed ones: in pack)
            count_truncated(got)  # the samples used (after max_samples), once each
        report.per_source[_source_key(src, i, report.per_source)] = len(got)
        samples.extend(got * src.repeat)
    report.n_loaded = len(samples)
    if report.truncated and not quiet:
        from llavamed.errors import format_counts

        print(
            f"llavamed train: kept {sum(report.truncated.values())} sample(s) cut at "
            f"data.max_length={cfg.max_length} ({format_counts(report.truncated)}); "
            "see data_report.json",
            file=sys.stderr,
        )
    return samples, report


# --- dataset and collator ----------------------------------------------------------------------


class TrainDataset:
    """Map-style dataset: tokens are ready, the image is decoded and preprocessed on access (in a
    DataLoader worker when ``num_workers > 0``). A corrupt image yields an error item that the
    collator drops and the trainer counts."""

    def __init__(self, samples: Sequence[Sample], image_processor):
        self.samples = samples
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        import torch

        s = self.samples[i]
        item: dict[str, Any] = {
            "idx": i,
            "input_ids": torch.tensor(s.input_ids),
            "labels": torch.tensor(s.labels),
        }
        if s.segment_ids is not None:
            item["segment_ids"] = torch.tensor(s.segment_ids)
        if s.image is not None:
            from llavamed.images import load_image

            try:
                name = s.source if isinstance(s.image, bytes) else str(s.image)
                img = load_image(s.image, name=name)
                item["pixel_values"] = self.image_processor(images=[img], return_tensors="pt")[
                    "pixel_values"
                ][0]
            except InputError as err:
                # The record, the file and the detail; the trainer adds the reason after them
                # (the whole error here printed it twice: "x.png: empty file: empty file").
                where = s.source if err.source == s.source else f"{s.source}: {err.source}"
                if err.detail:
                    where += f" ({err.detail})"
                return {"idx": i, "error": (err.reason, where)}
            except Exception as exc:  # a decoder bug must not kill a long run; it is counted
                return {
                    "idx": i,
                    "error": ("corrupt image", f"{s.source}: {type(exc).__name__}: {exc}"),
                }
        return item


class Collator:
    """Right-pads a micro-batch; pixel values are stacked for the samples that have an image."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        import torch

        good = [it for it in items if "error" not in it]
        bad = [(it["idx"], *it["error"]) for it in items if "error" in it]
        batch: dict[str, Any] = {"bad": bad, "n": len(good)}
        if not good:
            return batch
        L = max(len(it["input_ids"]) for it in good)
        n = len(good)
        ids = torch.full((n, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        for r, it in enumerate(good):
            k = len(it["input_ids"])
            ids[r, :k] = it["input_ids"]
            labels[r, :k] = it["labels"]
            mask[r, :k] = 1
        batch.update(
            input_ids=ids, labels=labels, attention_mask=mask, idx=[it["idx"] for it in good]
        )
        if any("segment_ids" in it for it in good):
            # Shared-prefix samples: explicit positions and segments (the model wrapper turns
            # them into a 4-D mask); a plain sample is all prefix, i.e. ordinary causal.
            segs = torch.full((n, L), PAD, dtype=torch.long)
            pos = torch.zeros((n, L), dtype=torch.long)
            for r, it in enumerate(good):
                k = len(it["input_ids"])
                seg = it.get("segment_ids")
                seg = torch.zeros(k, dtype=torch.long) if seg is None else seg
                segs[r, :k] = seg
                pos[r, :k] = torch.tensor(position_ids(seg.tolist()))
            batch.update(segment_ids=segs, position_ids=pos)
        pix = [it["pixel_values"] for it in good if "pixel_values" in it]
        if pix:
            batch["pixel_values"] = torch.stack(pix)
        return batch


# --- batch schedule ----------------------------------------------------------------------------


def data_fingerprint(samples: Sequence[Sample]) -> str:
    """A short id of the training data as tokenized: every sample's tokens and image reference.
    A checkpoint resumed on other data (the file edited, images that appeared or vanished since)
    would keep its learning-rate schedule and batch order for a sample count that no longer
    holds, so the trainer refuses it."""
    import hashlib
    from array import array

    h = hashlib.sha1(len(samples).to_bytes(8, "little"))
    for s in samples:
        h.update(array("q", s.input_ids).tobytes())
        img = s.image
        if isinstance(img, bytes):  # parquet images: their size and first bytes
            h.update(len(img).to_bytes(8, "little") + img[:64])
        elif img is not None:
            h.update(str(img).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def steps_per_epoch(n_samples: int, global_batch_size: int) -> int:
    return max(1, math.ceil(n_samples / global_batch_size))


def run_epoch_schedule(cfg, samples: Sequence[Sample], epoch: int) -> list[list[list[int]]]:
    """:func:`epoch_schedule` with a training config's batch settings: the steps a run with
    ``cfg`` takes in ``epoch`` over ``samples``."""
    t = cfg.train
    return epoch_schedule(
        [s.length for s in samples],
        [s.image is not None for s in samples],
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        seed=t.seed,
        epoch=epoch,
        grouped=cfg.data.batching == "length_grouped",
        megabatch=cfg.data.group_megabatch,
    )


def epoch_schedule(
    lengths: Sequence[int],
    has_image: Sequence[bool],
    *,
    global_batch_size: int,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    grouped: bool,
    megabatch: int = 32,
) -> list[list[list[int]]]:
    """The epoch's optimizer steps: ``steps[s]`` is the list of micro-batches (index lists) of
    step ``s``, ``global_batch_size / micro_batch_size`` of them.

    A pure function of (data lengths, seed, epoch, global batch size): a resumed run replays the
    same order, and any number of processes or micro-batch size sees the same global batches. The last global batch is filled up
    from the start of the permutation (as DistributedSampler does) so no sample is dropped.
    Length grouping (LLaVA's modality-aware grouping): shuffled samples are cut into megabatches
    of ``megabatch`` global batches, sorted by (modality, length) inside each and cut into global
    batches of neighbours, whose order is shuffled again; each global batch is cut (in length
    order) into micro-batches."""
    n = len(lengths)
    if n == 0:
        raise InputError("data", "no training samples left", "see data_report.json")
    rng = random.Random(seed * 1_000_003 + epoch)
    perm = list(range(n))
    rng.shuffle(perm)
    total = steps_per_epoch(n, global_batch_size) * global_batch_size
    while len(perm) < total:
        perm.extend(perm[: total - len(perm)])
    step_batches = [perm[k : k + global_batch_size] for k in range(0, total, global_batch_size)]
    if grouped:
        # Group at the global-batch level, so a global batch's members do not depend on how it
        # is cut into micro-batches (or processes): the loss is the same for any cut.
        size = global_batch_size * max(1, megabatch)
        step_batches = []
        for start in range(0, total, size):
            mb = sorted(
                perm[start : start + size], key=lambda i: (has_image[i], lengths[i]), reverse=True
            )
            chunk = [mb[k : k + global_batch_size] for k in range(0, len(mb), global_batch_size)]
            rng.shuffle(chunk)
            step_batches.extend(chunk)
    return [
        [g[k : k + micro_batch_size] for k in range(0, len(g), micro_batch_size)]
        for g in step_batches
    ]


def padding_fraction(steps: list[list[list[int]]], lengths: Sequence[int]) -> float:
    """Share of padded positions over the epoch (for reports and the benchmark)."""
    real = padded = 0
    for step in steps:
        for mb in step:
            L = max(lengths[i] for i in mb)
            padded += L * len(mb)
            real += sum(lengths[i] for i in mb)
    return 1 - real / padded if padded else 0.0
