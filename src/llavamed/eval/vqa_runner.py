"""Batched, deterministic VQA generation with resumable answers files, image ablations, sharding.

Entry points:

* :func:`evaluate_answers` — pure: samples + predictions -> metrics (no model involved).
* :func:`run_vqa_eval` — generate answers for samples with a checkpoint (resuming whatever an
  earlier or sharded run already wrote), optionally again with the image blanked, replaced by
  noise or swapped with another question's image, and return the metrics with the drop.

Answers files are LLaVA-Med's answers JSONL (``question_id, prompt, text, answer_id, model_id,
metadata``): ``answers.jsonl`` for the real image, ``answers.<ablation>.jsonl`` for ablations, and
``answers[.<ablation>].shard<K>-of-<N>.jsonl`` for shards. A later unsharded run reads all of
them, generates only what is missing, and scores the whole set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llavamed.data.vqa import VQASample
from llavamed.errors import InputError
from llavamed.eval import metrics as M
from llavamed.model.processing import generation_prompt, question_messages
from llavamed.utils.io import JsonlAppender

ABLATIONS = ("blank", "noise", "shuffle")
# The paper's suffix for closed yes/no questions (LLaVA-Med's "test_w_options" files).
CLOSED_SUFFIX = "Please choose from the following two options: [yes, no]"


# --- pure scoring ----------------------------------------------------------------------------


def _answers_map(answers: Mapping[str, str] | Iterable[dict]) -> dict[str, str]:
    if isinstance(answers, Mapping):  # None is a missing answer here too, not the word "None"
        return {str(k): str(v) for k, v in answers.items() if v is not None}
    out = {}
    for rec in answers:
        if rec.get("text") is not None:  # no text is a missing answer, not an empty one
            out[str(rec["question_id"])] = str(rec["text"])
    return out


def evaluate_answers(
    samples: Sequence[VQASample],
    answers: Mapping[str, str] | Iterable[dict],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    with_scores: bool = True,
) -> dict:
    """Score predictions against samples. Pure: no model, no files.

    ``answers`` maps question id -> predicted text, or is an iterable of answers records. A
    sample without an answer is counted in ``n_missing`` and left out of every mean (so a partial
    run is visible, never silently scored as wrong or right).

    Returns ``{"n_samples", "n_answered", "n_missing", "overall", "by_answer_type",
    "by_question_type", "scores"}`` where each aggregate maps metric -> {mean, lo, hi, n}
    (fractions; lo/hi the 95% bootstrap CI) and ``scores`` lists per-question scores.
    """
    preds = _answers_map(answers)
    scores = []
    for s in samples:
        if s.qid not in preds:
            continue
        sc = M.score_sample(preds[s.qid], s.answer, s.answer_type)
        scores.append(
            {
                "qid": s.qid,
                "image": s.image_key,  # the bootstrap resamples images, not questions
                "answer_type": s.answer_type,
                "question_type": s.question_type or "unspecified",
                "answer": s.answer,
                "prediction": preds[s.qid],
                **sc,
            }
        )

    def agg(rows):
        return M.aggregate(rows, n_resamples=n_resamples, seed=seed)

    by_at = {at: agg([r for r in scores if r["answer_type"] == at]) for at in ("closed", "open")}
    qtypes = sorted({r["question_type"] for r in scores})
    by_qt = {qt: agg([r for r in scores if r["question_type"] == qt]) for qt in qtypes}
    out = {
        "n_samples": len(samples),
        "n_answered": len(scores),
        "n_missing": len(samples) - len(scores),
        "n_closed": sum(1 for r in scores if r["answer_type"] == "closed"),
        "n_open": sum(1 for r in scores if r["answer_type"] == "open"),
        "overall": agg(scores),
        "by_answer_type": {k: v for k, v in by_at.items() if v},
        "by_question_type": by_qt,
    }
    if with_scores:
        out["scores"] = scores
    return out


def ablation_drop(
    clean: dict, ablated: dict, *, n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """Paired drop (clean - ablated) per metric over questions answered in both conditions.

    A model that uses the image loses accuracy when the image is taken away; a drop whose CI
    includes 0 means the answers don't depend on the image."""
    a = {r["qid"]: r for r in clean["scores"]}
    b = {r["qid"]: r for r in ablated["scores"]}
    common = [q for q in a if q in b]
    out = {}
    for key in M.METRICS:
        qs = [q for q in common if key in a[q] and key in b[q]]
        if qs:
            out[key] = M.paired_bootstrap_diff(
                [a[q][key] for q in qs],
                [b[q][key] for q in qs],
                n_resamples=n_resamples,
                seed=seed,
                clusters=[a[q].get("image", q) for q in qs],
            )
    return out


# --- image ablations ---------------------------------------------------------------------------


def blank_image(img: Image.Image) -> Image.Image:
    """A black image of the same size: no visual information at all."""
    return Image.new("RGB", img.size, (0, 0, 0))


def noise_image(img: Image.Image, seed: int) -> Image.Image:
    """Uniform RGB noise of the same size, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(img.size[1], img.size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def shuffle_map(samples: Sequence[VQASample], seed: int = 0) -> dict[str, str | bytes]:
    """image_key -> the image of a *different* image, a seeded derangement over distinct images.

    Computed over the full sample list (before --limit/--shard) so every shard agrees. Questions
    that share an image get the same replacement. With one distinct image nothing can change and
    the map is the identity."""
    src: dict[str, str | bytes] = {}
    for s in samples:
        src.setdefault(s.image_key, s.image)
    keys = sorted(src)
    if len(keys) < 2:
        return dict(src)
    order = np.random.default_rng(seed).permutation(len(keys))
    perm = [keys[i] for i in order]
    # Each image takes the next one's place in a random cycle: a derangement by construction.
    return {perm[i]: src[perm[(i + 1) % len(perm)]] for i in range(len(perm))}


def _qid_seed(qid: str, seed: int) -> int:
    return zlib.crc32(qid.encode("utf-8")) ^ seed


# --- generation ---------------------------------------------------------------------------


def _load_model(model_dir: str | Path, dtype: Any):
    from llavamed.model import load_llava

    return load_llava(model_dir, dtype=dtype)


BACKENDS = ("engine", "generate")


class VQAGenerator:
    """Greedy answers from a transformers-native LLaVA checkpoint.

    Prompts use the checkpoint's own chat template with one image placeholder before the
    question. Two ways to decode, both greedy:

    * :meth:`generate` — one static batch through HF ``generate`` (left-padded, every row runs
      until the longest answer ends). One question per call is the LLaVA-Med reference loop.
    * :meth:`answer_stream` — continuous batching through the serve :class:`Engine`: up to
      ``batch_size`` questions decode together, a finished answer frees its slot at once and the
      next question joins the running batch, so no batch waits for its longest answer.

    ``ignore_eos`` makes every answer run to ``max_new_tokens`` (benchmarks only).
    ``pack_weights`` prepacks the linear weights of a model loaded from ``model_dir`` for CPU
    inference (:mod:`llavamed.model.cpu_packing`); a model passed in is used as it is."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        model: Any = None,
        processor: Any = None,
        dtype: Any = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        ignore_eos: bool = False,
        pack_weights: bool = True,
    ):
        import torch

        self.packed_linears = 0
        if model is None or processor is None:
            if model_dir is None:
                raise ValueError("give model_dir or both model and processor")
            model, processor = _load_model(model_dir, dtype or torch.float32)
            if pack_weights:
                # Only a model loaded here: packing someone else's model would change it under them.
                from llavamed.model.cpu_packing import pack_linears

                self.packed_linears = pack_linears(model, batch_hint=batch_size)
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, int(batch_size))
        self.ignore_eos = ignore_eos
        # Joiners are prefilled together once half the slots are free: a lone prompt's prefill
        # costs ~35% more per prompt in bf16 on CPU, while a few idle slots cost little because a
        # decode step's time hardly depends on the number of rows.
        self.min_join = max(1, self.batch_size // 2)
        tok = processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.pad_token_id = tok.pad_token_id
        self.model_id = model_id_for(model_dir, model)
        self.model_fingerprint = model_fingerprint_for(model_dir)
        self.dtype = dtype_name(getattr(model, "dtype", None))
        self._engine = None

    def prompt(self, question: str) -> str:
        return generation_prompt(self.processor, question_messages(question))

    def generate(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[str]:
        import torch

        prompts = [self.prompt(q) for q in questions]
        inputs = self.processor(
            text=prompts, images=list(images), padding=True, return_tensors="pt"
        )
        extra = {}
        if self.ignore_eos:
            # generate() treats eos_token_id=None as "use the config's", so the config is
            # overridden by a copy instead.
            cfg = self.model.generation_config.to_dict()
            cfg["eos_token_id"] = None
            from transformers import GenerationConfig

            extra["generation_config"] = GenerationConfig(**cfg)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_token_id,
                **extra,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts]

    # -- continuous batching --------------------------------------------------------------

    def engine(self):
        """The serve Engine on this generator's model (started on first use)."""
        if self._engine is None:
            from llavamed.serve.engine import Engine, EngineSettings

            # The queue holds the look-ahead that answer_stream keeps submitted, so a freed
            # slot is refilled at the next decode step without waiting for this thread.
            settings = EngineSettings(
                max_batch_size=self.batch_size,
                max_queue=2 * self.batch_size + 1,
                batch_wait_s=0.005,
                min_join=self.min_join,
            )
            eng = Engine(self.model, self.processor.tokenizer, self.processor, settings=settings)
            if self.ignore_eos:
                eng.eos_ids = set()
            self._engine = eng
        return self._engine

    def close(self) -> None:
        """Stop the engine's worker thread, if one was started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def answer_stream(self, items: Iterable[tuple[Any, Image.Image, str]]) -> Iterable[tuple]:
        """``(key, image, question)`` items -> ``(key, answer)`` pairs in completion order.

        Items are drawn lazily: at most ``2 * batch_size`` are tokenized and waiting, so images
        are loaded only shortly before they are needed."""
        import queue as _queue

        from llavamed.serve.engine import GenerationError, Prompt, SamplingParams

        eng = self.engine()
        params = SamplingParams(max_tokens=self.max_new_tokens, temperature=0.0)
        done: _queue.Queue = _queue.Queue()
        parts: dict[int, list[str]] = {}
        keys: dict[int, Any] = {}
        it = iter(items)
        ids = itertools.count()
        exhausted = False
        look_ahead = 2 * self.batch_size
        while True:
            # Tokenize first, then submit in one burst, so an idle worker takes the whole burst
            # as one prefill instead of starting on the first question alone.
            burst = []
            while not exhausted and len(keys) + len(burst) < look_ahead:
                try:
                    key, image, question = next(it)
                except StopIteration:
                    exhausted = True
                    break
                enc = self.processor(
                    text=[self.prompt(question)], images=[image], return_tensors="pt"
                )
                burst.append((key, Prompt(enc["input_ids"][0].tolist(), enc["pixel_values"], 1)))
            for key, prompt in burst:
                slot = next(ids)
                parts[slot], keys[slot] = [], key
                eng.submit(prompt, params, on_event=lambda ev, s=slot: done.put((s, ev)))
            if not keys:
                return
            slot, ev = done.get()
            if ev.kind == "error":
                raise GenerationError(ev.error or "generation failed")
            parts[slot].append(ev.text)
            if ev.kind == "done":
                text = "".join(parts.pop(slot))
                yield keys.pop(slot), text.strip()


# --- the run ---------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """How answers are generated; these settings are recorded in every answers record and a
    resumed run must use the same ones."""

    batch_size: int = 8
    max_new_tokens: int = 64
    closed_suffix: bool = False
    seed: int = 0  # noise images and the shuffle derangement
    n_resamples: int = 1000  # bootstrap resamples for CIs
    backend: str = "engine"  # "engine": continuous batching; "generate": static HF batches


def answer_items(
    generator, items: Iterable[tuple[Any, Image.Image, str]], backend: str, batch_size: int
) -> Iterable[tuple[Any, str]]:
    """``(key, image, question)`` items -> ``(key, answer)`` pairs: "engine" streams them through
    ``generator.answer_stream`` (completion order); "generate", or a generator that only has
    ``generate``, answers static batches of ``batch_size`` (input order)."""
    if backend not in BACKENDS:
        raise InputError(backend, "unknown backend", f"choose from {', '.join(BACKENDS)}")
    if backend == "engine" and hasattr(generator, "answer_stream"):
        yield from generator.answer_stream(items)
        return
    it = iter(items)
    while chunk := list(itertools.islice(it, batch_size)):
        texts = generator.generate([im for _, im, _ in chunk], [q for _, _, q in chunk])
        yield from ((k, t) for (k, _, _), t in zip(chunk, texts, strict=True))


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` (0-based K) -> (K, N)."""
    if spec is None:
        return None
    if isinstance(spec, tuple):
        k, n = spec
    else:
        try:
            k, n = (int(x) for x in str(spec).split("/"))
        except ValueError as exc:
            raise InputError(spec, "bad --shard", "use K/N, e.g. 0/4") from exc
    if n < 1 or not 0 <= k < n:
        raise InputError(f"{k}/{n}", "bad --shard", "need 0 <= K < N")
    return k, n


def select(
    samples: Sequence[VQASample], limit: int | None = None, shard: tuple[int, int] | None = None
) -> list[VQASample]:
    """``--limit`` first (the first N samples), then ``--shard K/N`` (every N-th from K)."""
    out = list(samples[:limit] if limit is not None else samples)
    if shard is not None:
        k, n = shard
        out = out[k::n]
    return out


def answers_path(out_dir: Path, condition: str, shard: tuple[int, int] | None = None) -> Path:
    stem = "answers" if condition == "image" else f"answers.{condition}"
    if shard is not None:
        stem += f".shard{shard[0]}-of-{shard[1]}"
    return out_dir / f"{stem}.jsonl"


def read_answers(out_dir: Path, condition: str) -> dict[str, dict]:
    """All answers already written for ``condition``: the main file and every shard file."""
    main = answers_path(out_dir, condition)
    files = [main] if main.exists() else []
    files += sorted(out_dir.glob(f"{main.stem}.shard*-of-*.jsonl"))
    got: dict[str, dict] = {}
    for f in files:
        for rec in _complete_records(f):
            if "question_id" in rec and isinstance(rec.get("text"), str):
                got.setdefault(str(rec["question_id"]), rec)
    return got


def _complete_records(path: Path) -> Iterable[dict]:
    """The records of an answers file's complete lines. A last line without its newline is a
    write that a kill cut short (its writer's next run cuts it off): it is not read, even when
    it parses or stops inside a multi-byte character. Read as text, such a file failed as a
    whole ('not UTF-8 text'), so a merge could not read a killed shard's file."""
    data = path.read_bytes()
    for line in data[: data.rfind(b"\n") + 1].split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:  # a blank or damaged line (UnicodeDecodeError is a ValueError too)
            continue
        if isinstance(rec, dict):
            yield rec


def model_id_for(model_dir: str | Path | None, model: Any = None) -> str:
    """The ``model_id`` answers records carry: the checkpoint folder's name."""
    return Path(model_dir).name if model_dir is not None else type(model).__name__


def dtype_name(dtype: Any) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None stays None): the weights dtype answers records
    carry, since greedy answers in bf16 differ from fp32 ones."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def model_fingerprint_for(model_dir: str | Path | None) -> str | None:
    """The checkpoint's content id (None for a model given in memory): every run's model is a
    ``checkpoint-final``, so the name alone cannot tell two models' answers apart."""
    from llavamed.model.checkpoint import checkpoint_fingerprint

    return checkpoint_fingerprint(model_dir) if model_dir is not None else None


RESUME_KEYS = ("closed_suffix", "max_new_tokens", "condition", "model_id", "model", "seed", "dtype")
"""Answer settings a resumed run must share with the answers already written."""


def check_same_settings(records, meta: dict, where: Path) -> None:
    """Refuse to add answers to ones written with other settings (another model, suffix, length
    limit, noise seed): the report would score the mix under one name. Every record is checked:
    shard files are written by separate runs. Keys a record lacks (older files) are not
    compared, nor keys ``meta`` leaves unset."""
    for rec in records:
        old = rec.get("metadata") or {}
        for key in RESUME_KEYS:
            if key in old and meta.get(key) is not None and old[key] != meta[key]:
                raise InputError(
                    where,
                    "answers written with different settings",
                    f"{key}={old[key]!r} there, {meta[key]!r} now; use another --out",
                )


def _check_same_questions(
    samples: Sequence[VQASample], existing: Mapping[str, dict], closed_suffix: bool, where: Path
) -> None:
    """Refuse answers whose question id matches but whose prompt or image does not: datasets
    number their questions from 0 or 1, so another dataset (or test.json against
    test_w_options.json) in the same --out would otherwise be scored with the first one's
    answers, and "Is there a fracture?" is question 1 of more than one dataset."""
    for s in samples:
        rec = existing.get(s.qid)
        if rec is None:
            continue
        if "prompt" in rec and rec["prompt"] != _question_text(s, closed_suffix):
            raise InputError(
                where,
                f"answers written for other questions (question_id {s.qid})",
                f"{rec['prompt'][:80]!r} there, {s.question[:80]!r} now; use another --out",
            )
        image = (rec.get("metadata") or {}).get("image")  # (answers written before it: none)
        if image is not None and image != _image_name(s):
            raise InputError(
                where,
                f"answers written for another image (question_id {s.qid})",
                f"{str(image)[:80]!r} there, {_image_name(s)[:80]!r} now; use another --out",
            )


def _image_name(s: VQASample) -> str:
    """The image an answer was for, as the answers file records it: the file's name (a moved
    dataset keeps its answers), or the hash of an embedded image's bytes."""
    return s.image_key if isinstance(s.image, bytes) else Path(s.image).name


def question_text(question: str, answer: str, answer_type: str, closed_suffix: bool) -> str:
    """The question as the model is asked it: a closed yes/no question gets the paper's suffix
    when ``closed_suffix`` is on. VQA fine-tuning builds its prompts with this too (train/data.py
    ``vqa_messages``), so the questions it trains on are the ones evaluation asks."""
    if closed_suffix and answer_type == "closed" and M.is_yes_no(answer):
        return f"{question} {CLOSED_SUFFIX}"
    return question


def _question_text(s: VQASample, closed_suffix: bool) -> str:
    return question_text(s.question, s.answer, s.answer_type, closed_suffix)


def answer_settings(
    condition: str,
    opts: RunOptions,
    *,
    max_new_tokens: int,
    model_id: str,
    fingerprint: str | None,
    dtype: str | None,
) -> dict:
    """The settings every answers record of ``condition`` carries (and a resumed run must
    share: :data:`RESUME_KEYS`)."""
    meta = {
        "condition": condition,
        "closed_suffix": opts.closed_suffix,
        "max_new_tokens": max_new_tokens,
        "model_id": model_id,
        "model": fingerprint,
        "decoding": "greedy",
    }
    if condition in ("noise", "shuffle"):  # their images depend on the seed
        meta["seed"] = opts.seed
    if dtype is not None:  # bf16's greedy answers are not fp32's
        meta["dtype"] = dtype
    return meta


def check_can_write(path: str | Path) -> None:
    """Raise the OSError that writing ``path`` would raise (a read-only mount, a folder without
    write permission), naming ``path``: an existing file is opened for appending and closed
    unchanged; a folder, or the folder a new file would go in, gets a nameless temporary file.
    Answers are appended one at a time, so without this a run found out only at its first
    answer, after the model had loaded (minutes for a 7B on CPU). Leaves nothing behind."""
    import tempfile

    path = Path(path)
    try:
        if path.is_file():
            with open(path, "ab"):
                pass
        else:
            with tempfile.TemporaryFile(dir=path if path.is_dir() else path.parent):
                pass
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def check_before_loading(
    model_dir: str | Path | None,
    samples: Sequence[VQASample],
    out_dir: Path,
    conditions: Sequence[str],
    opts: RunOptions,
    shard: tuple[int, int] | None,
    *,
    model: Any = None,
    processor: Any = None,
    dtype: Any = None,
) -> None:
    """What a run would refuse once its model is loaded, checked before loading it: an output
    folder it cannot write, answers already there written with other settings (another model,
    dtype, length limit, suffix, seed) or for other questions. Generation checks the same again
    with the loaded model's own settings."""
    import torch

    check_can_write(out_dir)
    model_settings: dict = {}
    for cond in conditions:
        path = answers_path(out_dir, cond, shard)
        if path.exists():
            check_can_write(path)
        existing = read_answers(out_dir, cond)
        if not existing:
            continue
        if not model_settings:  # only with answers to compare: it reads the weights files
            model_settings = {
                "max_new_tokens": opts.max_new_tokens,
                "model_id": model_id_for(model_dir, model),
                "fingerprint": model_fingerprint_for(model_dir),
                # The weights dtype the generator will run in (a model passed in keeps its own).
                "dtype": dtype_name(
                    model.dtype
                    if model is not None and processor is not None
                    else dtype or torch.float32
                ),
            }
        check_same_settings(
            existing.values(), answer_settings(cond, opts, **model_settings), out_dir
        )
        _check_same_questions(samples, existing, opts.closed_suffix, out_dir)


def generate_answers(
    generator: VQAGenerator,
    samples: Sequence[VQASample],
    out_dir: str | Path,
    condition: str = "image",
    *,
    options: RunOptions | None = None,
    shard: tuple[int, int] | None = None,
    shuffle: Mapping[str, str | bytes] | None = None,
    progress: bool = True,
) -> dict:
    """Answer every sample not answered yet for ``condition``; append to the answers file.

    Returns ``{"answers": {qid: record}, "n_generated", "n_resumed", "seconds", "skipped"}``."""
    from tqdm import tqdm

    from llavamed.images import load_image

    opts = options or RunOptions()
    if condition != "image" and condition not in ABLATIONS:
        raise InputError(condition, "unknown ablation", f"choose from {', '.join(ABLATIONS)}")
    out_dir = Path(out_dir)
    meta_base = answer_settings(
        condition,
        opts,
        max_new_tokens=generator.max_new_tokens,
        model_id=generator.model_id,
        fingerprint=generator.model_fingerprint,
        dtype=getattr(generator, "dtype", None),
    )
    path = answers_path(out_dir, condition, shard)
    # Opened (which cuts a torn last line off) before reading: a record killed between its
    # closing brace and its newline parses, so it would be counted as answered here and then
    # cut off the file by the first append, leaving a report that scores an answer no file holds.
    log = JsonlAppender(path)
    existing = read_answers(out_dir, condition)
    check_same_settings(existing.values(), meta_base, out_dir)
    _check_same_questions(samples, existing, opts.closed_suffix, out_dir)
    todo = [s for s in samples if s.qid not in existing]
    n_resumed = len(samples) - len(todo)
    skipped: Counter = Counter()
    t0 = time.perf_counter()
    n_gen = 0
    bar = tqdm(
        total=len(todo),
        desc=f"answers[{condition}]",
        file=sys.stderr,
        disable=not progress or not todo,
        unit="q",
    )

    def loaded():
        """(sample, image, question) for every sample whose image loads; bad ones counted."""
        last: tuple = (None, None)  # evaluation files list questions image by image
        for s in todo:
            try:
                src = s.image
                if condition == "shuffle" and shuffle is not None:
                    src = shuffle.get(s.image_key, src)
                memo = src if isinstance(src, str | bytes) else str(src)
                if memo != last[0]:
                    last = (memo, load_image(src, name=f"{s.qid}:{s.image_key[:80]}"))
                img = last[1]
                if condition == "blank":
                    img = blank_image(img)
                elif condition == "noise":
                    img = noise_image(img, _qid_seed(s.qid, opts.seed))
            except InputError as err:
                skipped[err.reason] += 1
                bar.update(1)
                continue
            yield s, img, _question_text(s, opts.closed_suffix)

    def answered():
        """(sample, question, text) in the order the backend finishes them."""
        items = (((s, q), im, q) for s, im, q in loaded())
        for (s, q), text in answer_items(generator, items, opts.backend, opts.batch_size):
            yield s, q, text

    with log:
        for s, q, text in answered():
            rec = {
                "question_id": s.qid,
                "prompt": q,
                "text": text,
                # Deterministic id: the same question/condition/model gives the same id.
                "answer_id": hashlib.sha1(
                    f"{generator.model_id}|{condition}|{s.qid}".encode()
                ).hexdigest()[:22],
                "model_id": generator.model_id,
                "metadata": {
                    **meta_base,
                    "answer_type": s.answer_type,
                    "question_type": s.question_type,
                    "image": _image_name(s),
                },
            }
            log.append(rec)
            existing[s.qid] = rec
            n_gen += 1
            bar.update(1)
    bar.close()
    return {
        "answers": existing,
        "n_generated": n_gen,
        "n_resumed": n_resumed,
        "seconds": time.perf_counter() - t0,
        "skipped": dict(skipped),
    }


def run_vqa_eval(
    model_dir: str | Path | None,
    samples: Sequence[VQASample],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    ablate: str | Sequence[str] | None = None,
    closed_suffix: bool = False,
    max_new_tokens: int = 64,
    limit: int | None = None,
    shard: str | tuple[int, int] | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    dtype: Any = None,
    model: Any = None,
    processor: Any = None,
    progress: bool = True,
    backend: str = "engine",
    pack_weights: bool = True,
) -> dict:
    """Generate (resuming) and score answers for ``samples``; returns the metrics dict.

    ``ablate``: one of blank|noise|shuffle or a list; each re-runs with the image replaced and
    adds ``ablations[name] = {"metrics", "drop"}`` (paired drop, clean - ablated, with CIs).
    ``model``/``processor`` may be passed instead of ``model_dir`` (already loaded).
    ``backend``: ``engine`` (continuous batching, ``batch_size`` slots) or ``generate`` (static
    batches through HF ``generate``); both decode greedily.
    Per-question scores are written to ``out_dir/scores[.<ablation>].jsonl``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_t = parse_shard(shard)
    ablations = [ablate] if isinstance(ablate, str) else list(ablate or [])
    for a in ablations:
        if a not in ABLATIONS:
            raise InputError(a, "unknown ablation", f"choose from {', '.join(ABLATIONS)}")
    if backend not in BACKENDS:
        raise InputError(backend, "unknown backend", f"choose from {', '.join(BACKENDS)}")
    opts = RunOptions(batch_size, max_new_tokens, closed_suffix, seed, n_resamples, backend)
    shuffle = shuffle_map(samples, seed) if "shuffle" in ablations else None
    chosen = select(samples, limit, shard_t)
    check_before_loading(
        model_dir,
        chosen,
        out_dir,
        ["image", *ablations],
        opts,
        shard_t,
        model=model,
        processor=processor,
        dtype=dtype,
    )
    gen = VQAGenerator(
        model_dir,
        model=model,
        processor=processor,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        pack_weights=pack_weights,
    )
    try:
        return _run_conditions(
            gen,
            chosen,
            out_dir,
            ablations,
            opts,
            shard_t,
            shuffle,
            progress,
            model_dir=model_dir,
            limit=limit,
            n_available=len(samples),
        )
    finally:
        gen.close()


def _run_conditions(
    gen,
    chosen,
    out_dir,
    ablations,
    opts,
    shard_t,
    shuffle,
    progress,
    *,
    model_dir,
    limit,
    n_available: int,
) -> dict:
    from llavamed.utils.io import write_jsonl

    seed, n_resamples = opts.seed, opts.n_resamples

    result: dict[str, Any] = {
        "model_id": gen.model_id,
        "model_dir": str(model_dir) if model_dir is not None else None,
        "options": asdict(opts),
        "limit": limit,
        "n_available": n_available,  # questions before --limit/--shard: is the run partial?
        "shard": f"{shard_t[0]}/{shard_t[1]}" if shard_t else None,
        "splits": sorted({x.split for x in chosen}),
        "languages": sorted({x.lang for x in chosen}),
        "generation": {},
        "ablations": {},
    }
    evals = {}
    for cond in ["image", *ablations]:
        g = generate_answers(
            gen,
            chosen,
            out_dir,
            cond,
            options=opts,
            shard=shard_t,
            shuffle=shuffle,
            progress=progress,
        )
        answers = {q: r["text"] for q, r in g["answers"].items()}
        ev = evaluate_answers(chosen, answers, n_resamples=n_resamples, seed=seed)
        evals[cond] = ev
        suffix = "" if cond == "image" else f".{cond}"
        if shard_t:
            suffix += f".shard{shard_t[0]}-of-{shard_t[1]}"
        write_jsonl(out_dir / f"scores{suffix}.jsonl", ev["scores"])
        result["generation"][cond] = {
            "answers_file": str(answers_path(out_dir, cond, shard_t)),
            "n_generated": g["n_generated"],
            "n_resumed": g["n_resumed"],
            "seconds": round(g["seconds"], 3),
            "answers_per_s": round(g["n_generated"] / g["seconds"], 3)
            if g["n_generated"] and g["seconds"] > 0
            else None,
            "skipped": g["skipped"],
        }
    result["metrics"] = {k: v for k, v in evals["image"].items() if k != "scores"}
    for cond in ablations:
        result["ablations"][cond] = {
            "metrics": {k: v for k, v in evals[cond].items() if k != "scores"},
            "drop": ablation_drop(evals["image"], evals[cond], n_resamples=n_resamples, seed=seed),
        }
    return result


def fmt_pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"
