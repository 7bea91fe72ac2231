"""Batched generation engine: token ids and pixel tensors in, streamed text out. No HTTP here.

One background worker thread owns the model. Requests wait in a bounded queue; the worker takes as
many as fit in a batch, prefills them together (left-padded), then decodes one token per step for
the whole batch with a shared KV cache. Requests that arrive while a batch is running join it at the
next step: they are prefilled on their own and their cache is left-padded and concatenated onto the
running one (continuous batching). Finished or cancelled rows leave the batch at once, so a long
answer never holds short ones back.

Every request has its own sampling parameters (temperature, top_p, a seeded ``torch.Generator``,
stop strings, max_tokens) and its own event stream (a callback or a queue), so the HTTP layer,
the terminal chat and the benchmark all drive the same code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llavamed.errors import InputError, LlavamedError
from llavamed.model.checkpoint_format import CONVERT_ORIGINAL_HINT, is_original_llava_type
from llavamed.model.processing import known_token_id
from llavamed.utils.precision import model_dtype

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
# Longer image sides are shrunk before the processor pads to square (images.bound_long_side):
# far above any tower's input (224-448 px), so ordinary images reach the processor untouched.
MAX_IMAGE_SIDE = 2048
# The most pixels an image a user sends may decode to (the API's ServerSettings default too).
MAX_IMAGE_PIXELS = 40_000_000
# Temperatures at or below this decode greedily (argmax): dividing logits by ~0 overflows.
GREEDY_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes -2**63 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
# Put after the first character of a special token's text inside a message (see
# Engine.neutralise): the text still reads the same, but no longer tokenizes to the token.
ZERO_WIDTH_SPACE = "\u200b"


def load_user_image(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """An image a user handed over (a web upload, a chat ``/image``, an API request): decoded
    with a pixel cap, then its long side bounded as :meth:`Engine.prepare` bounds it, so a
    session that keeps its images keeps only what the model can use."""
    from llavamed.images import bound_long_side, load_image

    img = load_image(source, name=name, max_pixels=max_pixels)
    return bound_long_side(img, MAX_IMAGE_SIDE)


# --- public data types -----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError("temperature must be a finite number >= 0")
        # 0 is OpenAI's lower bound too: the nucleus is then the most probable token alone.
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            raise ValueError("top_p must be in [0, 1]")

    @property
    def deterministic(self) -> bool:
        """True when decoding takes no random draw: greedy (temperature 0, as :meth:`Engine`
        reads it), or top_p 0, whose nucleus is the most probable token alone. Every answer to
        one prompt is then the same, so n of them need decoding only once."""
        return self.temperature <= GREEDY_TEMPERATURE or self.top_p == 0

    def for_choice(self, index: int) -> SamplingParams:
        """The parameters of choice ``index`` of a request for several (OpenAI's ``n``).
        Without a seed every choice draws its own random seed. With one, choice ``i`` is seeded
        with ``seed + i`` (wrapping past 2**64 - 1, the largest seed ``torch.Generator``
        takes), as vLLM seeds the children of an ``n > 1`` request: choice 0 is the answer an
        ``n == 1`` request with that seed gets, the choices differ from one another, and the
        same request gives the same choices again."""
        if index < 0:
            raise ValueError("choice index must be >= 0")
        if self.seed is None or index == 0:
            return self
        seed = self.seed + index
        if seed > MAX_SEED:
            seed -= 2**64
        return replace(self, seed=seed)


@dataclass
class Prompt:
    """A tokenized prompt: ids with image tokens already expanded, and one pixel tensor row per
    image (in the order the image tokens appear)."""

    input_ids: list[int]
    pixel_values: Any = None  # torch.Tensor (n_images, 3, H, W) or None
    n_images: int = 0
    prefix: tuple | None = field(default=None, repr=False, compare=False)
    """(key, length) of the image prefix, filled in by the engine on first use."""


@dataclass
class EngineSettings:
    """Batching and queueing knobs."""

    max_batch_size: int = 8
    """Most requests decoded together."""
    max_queue: int = 64
    """Most requests waiting (not yet in a batch); beyond that ``submit`` raises QueueFull."""
    batch_wait_s: float = 0.01
    """How long an idle worker waits for company after the first request arrives."""
    join_running: bool = True
    """Let new requests join a running batch (continuous batching)."""
    min_join: int = 1
    """Refill a running batch only once this many slots are free, so joiners are prefilled
    together (prefilling one prompt at a time costs more per prompt). 1: refill at once, the
    lowest latency for serving; offline evaluation trades latency for throughput with more."""
    prefix_cache: int = 32
    """Image prefixes kept for reuse (LRU): the KV cache of a prompt up to its last image token,
    keyed by exactly those tokens and the image's pixels. A request that opens the same way (an
    evaluation's many questions about one image, a chat's follow-up turns) skips the vision tower
    and the image tokens' prefill. Each entry costs about 4 MB for SmolLM2-135M in fp32. 0: off."""


@dataclass
class Event:
    """One item of a request's stream. ``kind``: "text" (a delta), "done" or "error"."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class QueueFull(LlavamedError):
    """The request queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"request queue full; retry after {retry_after}s")


class EngineClosed(LlavamedError):
    pass


class GenerationError(LlavamedError):
    pass


def stream_delta(text: str, emitted: str, stops: Sequence[str], *, final: bool) -> tuple[str, bool]:
    """The text to send after ``emitted``, given the decode of every token so far, and whether a
    stop string ended the answer there.

    Until the answer is final, a tail that may still change is held back: every trailing U+FFFD
    (a byte-fallback tokenizer, as Llama's and Mistral's, spells a 3-4 byte character as single
    byte tokens, which decode to U+FFFD until the last one arrives) and any prefix of a stop
    string. Text once sent is never taken back; should a longer decode rewrite it anyway, only
    what lies beyond it is sent, so the rest of the answer still arrives."""
    stopped = False
    cut = min((j for j in (text.find(s) for s in stops if s) if j >= 0), default=-1)
    if cut >= 0:
        text, stopped = text[:cut], True
    elif not final:
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        text = text[: len(text) - hold]
    return text[len(emitted) :], stopped


class Handle:
    """A submitted request: cancel it, or read its events / final result."""

    def __init__(self, rid: int, prompt_tokens: int, on_event: Callable[[Event], None] | None):
        self.id = rid
        self.prompt_tokens = prompt_tokens
        self._cancel = threading.Event()
        self._events: queue.Queue[Event] | None = None
        if on_event is None:
            self._events = queue.Queue()
            on_event = self._events.put
        self._on_event = on_event

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit(self, ev: Event) -> None:
        try:
            self._on_event(ev)
        except Exception:  # a consumer that went away must not take the worker down
            log.debug("event consumer of request %d failed", self.id, exc_info=True)
            self._cancel.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until the terminal one ("done" or "error"); only without ``on_event``."""
        if self._events is None:
            raise RuntimeError("this handle delivers events to its callback")
        while True:
            ev = self._events.get(timeout=timeout)
            yield ev
            if ev.kind in ("done", "error"):
                return

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text deltas; raises GenerationError if the engine failed the request."""
        for ev in self.events(timeout):
            if ev.kind == "error":
                raise GenerationError(ev.error or "generation failed")
            if ev.text:
                yield ev.text

    def result(self, timeout: float | None = None) -> Completion:
        parts: list[str] = []
        for ev in self.events(timeout):
            if ev.kind == "error":
                raise GenerationError(ev.error or "generation failed")
            parts.append(ev.text)
            if ev.kind == "done":
                return Completion(
                    "".join(parts),
                    ev.finish_reason or "stop",
                    ev.prompt_tokens,
                    ev.completion_tokens,
                )
        raise GenerationError("event stream ended early")  # pragma: no cover


# --- model loading ---------------------------------------------------------------------------


def resolve_model_dir(model: str | Path) -> Path:
    """``"embedded"`` -> the cached SmolLM2-135M-Instruct folder; a training run's folder -> its
    ``checkpoint-final``; otherwise the folder itself."""
    if str(model) == EMBEDDED:
        from llavamed.model.embedded import embedded_lm_dir

        return embedded_lm_dir()
    from llavamed.model.checkpoint import resolve_checkpoint

    return resolve_checkpoint(model)


def is_llava_dir(path: str | Path) -> bool:
    """True for a llava checkpoint (vision tower + LM), False for a plain causal LM."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(Path(path) / "config.json", "unreadable model config", str(exc)) from exc
    if not isinstance(cfg, dict):
        raise InputError(Path(path) / "config.json", "unreadable model config", "not a JSON object")
    if is_original_llava_type(cfg.get("model_type")):
        # Not a causal LM either: the text-only path would fail on it with a vaguer reason.
        raise InputError(path, "not a llava checkpoint", CONVERT_ORIGINAL_HINT)
    return cfg.get("model_type") == "llava" or "vision_config" in cfg


# --- the engine ------------------------------------------------------------------------------


@dataclass
class _Row:
    handle: Handle
    prompt: Prompt
    params: SamplingParams
    gen: Any  # torch.Generator
    max_new: int
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    t_submit: float = 0.0


@dataclass
class _Batch:
    rows: list[_Row]
    cache: Any
    mask: Any  # (B, T) long
    pos: Any  # (B,) next position id
    last: Any = None  # (B,) last sampled token


class Engine:
    """Owns a model and a worker thread. Thread-safe: ``prepare`` and ``submit`` may be called
    from any thread."""

    def __init__(
        self,
        model,
        tokenizer,
        processor=None,
        *,
        settings: EngineSettings | None = None,
        name: str = "model",
        max_context: int | None = None,
    ):

        self.model = model.eval()
        self._kv_arg = kv_cache_argument(model)
        self.tokenizer = tokenizer
        self.processor = processor
        self.settings = settings or EngineSettings()
        self.name = name
        self.is_multimodal = processor is not None
        cfg = model.config
        text_cfg = getattr(cfg, "text_config", None) or cfg
        self.max_context = int(
            max_context or getattr(text_cfg, "max_position_embeddings", None) or 2048
        )
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self.eos_ids = self._eos_ids()
        # Tokens the model must never produce: image placeholders would ask for pixels we lack.
        self.banned_ids: list[int] = []
        image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        self.image_token_id = int(image_id) if self.is_multimodal and image_id is not None else None
        if self.image_token_id is not None:
            self.banned_ids.append(self.image_token_id)
        self._special_re = _special_token_pattern(tokenizer, processor)
        self.max_token_chars = _max_token_chars(tokenizer)
        self._prep_lock = (
            threading.Lock()
        )  # HF fast tokenizers are not safe to share across threads
        self._queue: queue.Queue[_Row] = queue.Queue(maxsize=self.settings.max_queue)
        self._ids = itertools.count(1)
        self._closing = threading.Event()
        self._merge_ok: bool | None = None
        # key -> per-layer (keys, values) of one image prefix; touched only by the worker thread
        self._prefixes: OrderedDict[bytes, tuple] = OrderedDict()
        self._prefix_ok: bool | None = None  # False once the model's cache can't be spliced
        self.stats = {
            "submitted": 0,
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "rejected": 0,
            "tokens": 0,
            "steps": 0,
            "prefills": 0,
            "max_batch": 0,
            "prefix_hits": 0,
            "prefix_misses": 0,
            "prefix_encoded": 0,
        }
        self._step_ema = 0.05
        self._thread = threading.Thread(target=self._loop, name="llavamed-engine", daemon=True)
        self._thread.start()

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_path(
        cls,
        model: str | Path,
        *,
        dtype: str | None = None,
        device: str = "cpu",
        settings: EngineSettings | None = None,
        name: str | None = None,
        pack_weights: bool = True,
    ) -> Engine:
        """Load a llava checkpoint (or a training run folder's ``checkpoint-final``, named after
        the run) or a plain causal LM (detected from config.json); ``"embedded"`` is the embedded
        SmolLM2-135M-Instruct. ``pack_weights`` prepacks the
        linear weights for CPU inference (:mod:`llavamed.model.cpu_packing`)."""
        path = resolve_model_dir(model)
        torch_dtype = model_dtype(dtype)
        if is_llava_dir(path):
            from llavamed.model import load_llava

            mdl, processor = load_llava(path, dtype=torch_dtype, device=device)
            tok = processor.tokenizer
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from llavamed.model.checkpoint_format import model_files, strict_from_pretrained

            with model_files(path):
                tok = AutoTokenizer.from_pretrained(path)
            if not getattr(tok, "chat_template", None):
                raise InputError(
                    path,
                    "tokenizer has no chat template",
                    "serve needs an instruction-tuned model with a chat template",
                )
            with model_files(path):
                mdl = strict_from_pretrained(AutoModelForCausalLM, path, dtype=torch_dtype)
                mdl = mdl.to(device)
            processor = None
        if pack_weights:
            from llavamed.model.cpu_packing import pack_linears

            batch = (settings or EngineSettings()).max_batch_size
            pack_linears(mdl, batch_hint=batch)
        from llavamed.model.checkpoint import checkpoint_name

        return cls(mdl, tok, processor, settings=settings, name=name or checkpoint_name(path))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        tok = self.tokenizer
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        # chatml turns end with <|im_end|> even where the tokenizer's eos is something else.
        for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = known_token_id(tok, t)
            if tid is not None:
                ids.add(tid)
        return ids

    # -- prompts ------------------------------------------------------------------------------

    def neutralise(self, text: str) -> str:
        """``text`` with every special or added token's spelling (``<image>``, ``<|im_end|>``,
        ``</s>``, ...) broken by a zero-width space after its first character, so a message
        that quotes one is read as text: a literal ``<image>`` was taken for an image
        placeholder (the processor refused the request, or paired it with the wrong image),
        and ``<|im_end|>`` let a user close their own turn and write the assistant's."""
        if self._special_re is None or not text:
            return text
        return self._special_re.sub(lambda m: m[0][0] + ZERO_WIDTH_SPACE + m[0][1:], text)

    def _neutralise_message(self, message: dict) -> dict:
        content = message.get("content")
        if isinstance(content, str):
            content = self.neutralise(content)
        elif isinstance(content, list):
            content = [
                {**part, "text": self.neutralise(part["text"])}
                if isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
                else part
                for part in content
            ]
        else:
            return message
        return {**message, "content": content}

    def prepare(self, messages: Sequence[dict], images: Sequence[Any] = ()) -> Prompt:
        """HF-style messages (structured content with ``{"type": "image"}`` parts for llava) and
        PIL images -> a Prompt, through the checkpoint's own chat template and processor.
        Special tokens spelled out in the messages' text are neutralised first
        (:meth:`neutralise`): only ``{"type": "image"}`` parts become image placeholders, and
        only the template opens and closes turns. The chat, the web UI and the HTTP API all
        come through here. Raises InputError for conversations the template or processor
        reject."""
        from llavamed.images import bound_long_side

        for i, m in enumerate(messages):
            for text in _texts(m.get("content")) if isinstance(m, dict) else ():
                if (why := invalid_unicode(text)) is not None:
                    # The tokenizer's own error names its argument types, not the text.
                    raise InputError(f"messages[{i}]", "text is not valid Unicode", why)
        messages = [self._neutralise_message(m) if isinstance(m, dict) else m for m in messages]
        # Requests come from anyone who can reach the server: bound what padding can allocate.
        images = [bound_long_side(img, MAX_IMAGE_SIDE) for img in images]
        with self._prep_lock:
            try:
                if self.is_multimodal:
                    text = self.processor.apply_chat_template(
                        list(messages), add_generation_prompt=True, tokenize=False
                    )
                    enc = self.processor(text=[text], images=images or None, return_tensors="pt")
                    ids = enc["input_ids"][0].tolist()
                    pix = enc.get("pixel_values") if images else None
                    return Prompt(ids, pix, len(images))
                if images:
                    raise InputError(
                        "messages", "images not supported", f"{self.name} is a text-only model"
                    )
                flat = [{"role": m["role"], "content": _flatten(m["content"])} for m in messages]
                text = self.tokenizer.apply_chat_template(
                    flat, add_generation_prompt=True, tokenize=False
                )
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                return Prompt(list(ids), None, 0)
            except InputError:
                raise
            except Exception as exc:  # jinja TemplateError, processor ValueError, ...
                raise InputError("messages", "prompt rejected", str(exc)[:300]) from exc

    def min_prompt_tokens(self, messages: Sequence[dict]) -> int:
        """A lower bound on the tokens of ``messages``' prompt, without tokenizing: no token
        stands for more than ``max_token_chars`` characters. Tokenizing is serialised (one
        tokenizer, one lock), and a 30 MB prompt took 45 s, during which no other request could
        be prepared; callers refuse such a prompt on this bound at once."""
        if not self.max_token_chars:
            return 0
        chars = sum(
            len(t) for m in messages if isinstance(m, dict) for t in _texts(m.get("content"))
        )
        return chars // self.max_token_chars

    def count_tokens(self, text: str) -> int:
        with self._prep_lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- submission ---------------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> Handle:
        """Queue a request; raises QueueFull when the queue is at capacity, InputError when the
        prompt leaves no room in the context window."""
        return self.submit_many(prompt, [params or SamplingParams()], [on_event])[0]

    def submit_many(
        self,
        prompt: Prompt,
        params: Sequence[SamplingParams],
        on_event: Sequence[Callable[[Event], None] | None] | None = None,
    ) -> list[Handle]:
        """Queue one generation of ``prompt`` per entry of ``params``, each with its own handle
        and event stream (``on_event[i]``, or the handle's queue), all or none: QueueFull when
        the queue has no room for every one of them. They enter the queue at once, so the
        worker takes them into the same batch (as many as it has room for; the rest join at
        the next steps) and decodes them side by side, and an image prompt runs the vision
        tower once for all of them (its prefix is shared). This is OpenAI's ``n``: pass
        ``[params.for_choice(i) for i in range(n)]``."""
        import torch

        if self._closing.is_set():
            raise EngineClosed("engine is shut down")
        params = list(params)
        callbacks = list(on_event) if on_event is not None else [None] * len(params)
        if not params or len(callbacks) != len(params):
            raise ValueError("submit_many needs one or more params, and one on_event for each")
        if 0 < self._queue.maxsize < len(params):  # could never be queued: not a busy queue
            raise ValueError(f"{len(params)} generations exceed the queue's {self._queue.maxsize}")
        n_prompt = len(prompt.input_ids)
        if n_prompt == 0:
            raise InputError("messages", "empty prompt")
        room = self.max_context - n_prompt
        if room < 1:
            raise InputError(
                "messages", "prompt too long", f"{n_prompt} tokens >= context {self.max_context}"
            )
        now = time.perf_counter()
        rows = []
        for p, callback in zip(params, callbacks, strict=True):
            gen = torch.Generator(device="cpu")
            gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            handle = Handle(next(self._ids), n_prompt, callback)
            rows.append(_Row(handle, prompt, p, gen, min(p.max_tokens, room), t_submit=now))
        while not self._put_all(rows):
            if not self._purge_cancelled():
                self.stats["rejected"] += len(rows)
                raise QueueFull(self.retry_after())
        self.stats["submitted"] += len(rows)
        return [r.handle for r in rows]

    def _put_all(self, rows: list[_Row]) -> bool:
        """Put every row in the queue, or none when there is no room for all of them."""
        q = self._queue
        with q.mutex:
            if self._room_locked() < len(rows):
                return False
            q.queue.extend(rows)
            q.unfinished_tasks += len(rows)
            q.not_empty.notify(len(rows))
        return True

    def _room_locked(self) -> int:
        """Free queue slots; the caller holds the queue's mutex."""
        q = self._queue
        return q.maxsize - len(q.queue) if q.maxsize > 0 else 2**31

    def check_capacity(self, n: int = 1) -> None:
        """Raise QueueFull now if ``n`` requests would be refused at submit: callers check
        before decoding a request's images (up to 40 MP each), which a full queue would throw
        away."""
        while True:
            with self._queue.mutex:
                room = self._room_locked()
            if room >= n:
                return
            if not self._purge_cancelled():
                self.stats["rejected"] += 1
                raise QueueFull(self.retry_after())

    def _purge_cancelled(self) -> int:
        """Take the queued requests whose client has left out of the queue, and say how many.
        A cancel only sets a flag that the worker sees when it takes the row; until then the row
        held its queue slot, so new clients got queue_full with nobody waiting."""
        with self._queue.mutex:
            dead = [r for r in self._queue.queue if r.handle.cancelled]
            for r in dead:
                self._queue.queue.remove(r)
            if dead:
                self._queue.not_full.notify(len(dead))
        for r in dead:
            self._drop_if_cancelled(r)
        return len(dead)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        return self.submit(prompt, params).result()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: queued requests x typical decode time."""
        waiting = self._queue.qsize()
        per_wave = self._step_ema * 128
        waves = waiting / max(1, self.settings.max_batch_size)
        return max(1, min(60, round(waves * per_wave)))

    def clear_prefix_cache(self) -> None:
        """Forget every cached image prefix (benchmarks time cold runs with this). A prefill
        already running keeps the entries it has taken."""
        self._prefixes = OrderedDict()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        self._closing.set()
        self._thread.join(timeout)
        while True:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            row.handle._emit(Event("error", error="engine shut down"))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker ------------------------------------------------------------------------------

    def _take(self, n: int, first_timeout: float | None) -> list[_Row]:
        rows: list[_Row] = []
        if n <= 0:
            return rows
        try:
            if first_timeout is None:
                rows.append(self._queue.get_nowait())
            else:
                rows.append(self._queue.get(timeout=first_timeout))
        except queue.Empty:
            return rows
        deadline = time.perf_counter() + (self.settings.batch_wait_s if first_timeout else 0)
        while len(rows) < n:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                time.sleep(min(left, 0.002))
        return rows

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            self._serve_forever()

    def _serve_forever(self) -> None:
        batch: _Batch | None = None
        while not self._closing.is_set():
            try:
                if batch is None:
                    new = self._take(self.settings.max_batch_size, first_timeout=0.1)
                elif self.settings.join_running and self._merge_ok is not False:
                    free = self.settings.max_batch_size - len(batch.rows)
                    new = self._take(free, None) if free >= self.settings.min_join else []
                else:
                    new = []
                new = [r for r in new if not self._drop_if_cancelled(r)]
                if new:
                    fresh = self._run_guarded(new, self._prefill)
                    if fresh is not None and fresh.rows:
                        if batch is None:
                            batch = fresh
                        else:  # a failed merge fails the joiners too, or they wait for ever
                            batch = self._run_guarded(
                                batch.rows + fresh.rows,
                                lambda _rows, a=batch, b=fresh: self._merge(a, b),
                            )
                if batch is not None:
                    batch = self._run_guarded(batch.rows, lambda _rows, b=batch: self._step(b))
                    if batch is not None and not batch.rows:
                        batch = None
            except Exception:  # never let the worker die; fail what it held
                log.exception("engine worker error")
                if batch is not None:
                    for r in batch.rows:
                        self._fail(r, "internal error")
                batch = None
        if batch is not None:
            for r in batch.rows:
                self._fail(r, "engine shut down")

    def _run_guarded(self, rows: list[_Row], fn):
        try:
            return fn(rows)
        except Exception as exc:
            log.exception("generation failed for %d request(s)", len(rows))
            for r in rows:
                self._fail(r, f"generation failed: {type(exc).__name__}")
            return None

    def _drop_if_cancelled(self, row: _Row) -> bool:
        if row.handle.cancelled:
            self.stats["cancelled"] += 1
            row.handle._emit(
                Event("done", finish_reason="cancelled", prompt_tokens=row.handle.prompt_tokens)
            )
            return True
        return False

    def _fail(self, row: _Row, msg: str) -> None:
        self.stats["failed"] += 1
        row.handle._emit(Event("error", error=msg))

    # -- model steps ------------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> _Batch:
        self.stats["prefills"] += 1
        if (
            self.settings.prefix_cache > 0
            and self._prefix_ok is not False
            and any(r.prompt.n_images for r in rows)
        ):
            spans = [self._image_prefix(r.prompt) for r in rows]
            if all(
                key is not None or not r.prompt.n_images
                for r, (key, _) in zip(rows, spans, strict=True)
            ):
                batch = self._prefill_sharing_prefixes(rows, spans)
                if batch is not None:
                    return batch
        return self._prefill_whole(rows)

    def _run_prompts(self, seqs: list[list[int]], pixel_values: list):
        """One left-padded forward over whole token sequences -> (output, mask)."""
        import torch

        ids, mask = self._left_pad(seqs)
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        if pixel_values:
            kwargs["pixel_values"] = torch.cat(pixel_values).to(self.device, self.dtype)
        return self.model(**kwargs), mask.to(self.device)

    def _prefill_whole(self, rows: list[_Row]) -> _Batch:
        """Prefill full prompts, left-padded into one batch."""
        out, mask = self._run_prompts(
            [r.prompt.input_ids for r in rows],
            [r.prompt.pixel_values for r in rows if r.prompt.pixel_values is not None],
        )
        batch = _Batch(list(rows), self._kv_of(out), mask, mask.sum(-1))
        if self._merge_ok is None:
            self._merge_ok = _cache_is_mergeable(batch.cache)
        self._advance(batch, out.logits[:, -1, :])
        return batch

    def _kv_of(self, out):
        """The KV cache a forward returned, under the name this transformers uses."""
        return out[self._kv_arg]

    def _left_pad(self, seqs: list[list[int]]):
        import torch

        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            if x:
                ids[i, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                mask[i, width - len(x) :] = 1
        return ids, mask

    def _image_prefix(self, prompt: Prompt) -> tuple[bytes | None, int]:
        """(key, length) of the prompt's opening up to and including its last image token;
        (None, 0) when it has no image or nothing would be left to prefill after it. Attention
        is causal, so identical opening tokens and pixels give an identical KV cache."""
        if prompt.prefix is None:
            prompt.prefix = self._hash_prefix(prompt)
        return prompt.prefix

    def _hash_prefix(self, prompt: Prompt) -> tuple[bytes | None, int]:
        import torch

        if not prompt.n_images or prompt.pixel_values is None or self.image_token_id is None:
            return None, 0
        ids = prompt.input_ids
        try:
            n = len(ids) - ids[::-1].index(self.image_token_id)
        except ValueError:
            return None, 0
        if n >= len(ids):
            return None, 0
        pix = prompt.pixel_values.detach().contiguous()
        h = hashlib.blake2b(digest_size=20)
        h.update(repr((str(pix.dtype), tuple(pix.shape))).encode())
        h.update(pix.reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(b"|")
        h.update(",".join(map(str, ids[:n])).encode())
        return h.digest(), n

    def _prefill_sharing_prefixes(self, rows: list[_Row], spans) -> _Batch | None:
        """Prefill rows whose image prefix is cached from that prefix (only the rest of the
        prompt runs), and the others whole; the whole pass also yields their prefixes for the
        cache, so a prompt seen once costs one forward, as without the cache. Queued requests'
        new images ride along in the whole pass. None: the model's cache type can't be spliced;
        the caller prefills every row whole."""
        import torch

        cached = self._prefixes  # one dict for the whole prefill, even if cleared meanwhile
        entries: dict[bytes, tuple] = {}  # prefixes the cached-prefix rows will use
        whole: list[int] = []
        from_prefix: list[int] = []
        fresh: set[bytes] = set()  # prefixes the whole pass encodes for a row of this prefill
        for i, (key, _) in enumerate(spans):
            if key is None:
                whole.append(i)
            elif key in cached or key in entries or key in fresh:
                if key in cached and key not in entries:
                    cached.move_to_end(key)
                    entries[key] = cached[key]
                self.stats["prefix_hits"] += 1
                from_prefix.append(i)
            else:
                self.stats["prefix_misses"] += 1
                fresh.add(key)
                whole.append(i)
        ahead = []
        if fresh:  # the vision tower runs anyway: a batch of images costs less per image
            room = min(
                self.settings.max_batch_size - len(fresh),  # images per vision-tower call
                self.settings.prefix_cache - len(entries) - len(fresh),
            )
            ahead = self._queued_prefixes(set(cached) | set(entries) | fresh, room)
        batches = []
        if whole or ahead:
            seqs = [rows[i].prompt.input_ids for i in whole] + [p.input_ids[:n] for p, n in ahead]
            pix = [rows[i].prompt.pixel_values for i in whole if rows[i].prompt.n_images]
            out, mask = self._run_prompts(seqs, pix + [p.pixel_values for p, _ in ahead])
            cache = self._kv_of(out)
            self._prefix_ok = _cache_is_mergeable(cache)
            if self._merge_ok is None:
                self._merge_ok = self._prefix_ok
            if not self._prefix_ok:
                log.info("prefix cache off: %s can't be spliced", type(cache).__name__)
                return None
            width = mask.shape[1]
            made = {}
            for j, i in enumerate(whole):
                key, n = spans[i]
                if key in fresh and key not in made:
                    start = width - len(seqs[j])  # the prefix opens the row's sequence
                    made[key] = _slice_kv(cache, j, start, n)
            for j, (p, n) in enumerate(ahead, start=len(whole)):
                made[p.prefix[0]] = _slice_kv(cache, j, width - n, n)
            self.stats["prefix_encoded"] += len(made)
            entries.update(made)
            cached.update(made)
            if whole:
                lens = torch.tensor([len(x) for x in seqs], device=self.device)
                b = _Batch([rows[i] for i in whole], cache, mask, lens)
                if ahead:  # drop the look-ahead sequences: they are not requests yet
                    b.rows = b.rows + [None] * len(ahead)
                    self._select(b, list(range(len(whole))))
                self._advance(b, out.logits[: len(whole), -1, :])
                batches.append(b)
        while len(cached) > self.settings.prefix_cache:
            cached.popitem(last=False)
        if from_prefix:
            batches.append(
                self._prefill_after_prefixes(
                    [rows[i] for i in from_prefix], [spans[i] for i in from_prefix], entries
                )
            )
        batch = None
        for b in batches:
            if b.rows:
                batch = b if batch is None else self._merge(batch, b)
        return batch if batch is not None else _Batch([], None, None, None)

    def _queued_prefixes(self, known: set, budget: int) -> list[tuple[Prompt, int]]:
        """Up to ``budget`` (prompt, prefix length) of queued requests whose image prefix is
        neither cached nor ``known``, one per distinct prefix."""
        if budget <= 0:
            return []
        with self._queue.mutex:  # no image encoded ahead for a client that has left
            pending = [r.prompt for r in self._queue.queue if not r.handle.cancelled]
        out = []
        for prompt in pending:
            key, n = self._image_prefix(prompt)
            if key is not None and key not in known:
                known.add(key)
                out.append((prompt, n))
                if len(out) >= budget:
                    break
        return out

    def _prefill_after_prefixes(self, rows: list[_Row], spans, entries: dict) -> _Batch:
        """Prefill the text after each row's cached image prefix. Rows sit as [prefix,
        left-padded to the longest][padding][rest of the prompt]; padding anywhere is masked,
        and position ids continue each row's own prefix."""
        import torch
        from transformers.cache_utils import DynamicCache

        some = entries[spans[0][0]]
        _, heads, _, dim = some[0][0].shape
        width_p = max(n for _, n in spans)
        b = len(rows)
        layers = []
        for li in range(len(some)):
            k = torch.zeros((b, heads, width_p, dim), dtype=some[0][0].dtype, device=self.device)
            v = torch.zeros_like(k)
            for i, (key, n) in enumerate(spans):
                k[i, :, width_p - n :] = entries[key][li][0][0]
                v[i, :, width_p - n :] = entries[key][li][1][0]
            layers.append((k, v))
        mask_p = torch.zeros((b, width_p), dtype=torch.long)
        for i, (_, n) in enumerate(spans):
            mask_p[i, width_p - n :] = 1
        rests = [r.prompt.input_ids[n:] for r, (_, n) in zip(rows, spans, strict=True)]
        ids, mask_s = self._left_pad(rests)
        width_s = ids.shape[1]
        position_ids = torch.zeros_like(ids)
        for i, ((_, n), rest) in enumerate(zip(spans, rests, strict=True)):
            position_ids[i, width_s - len(rest) :] = torch.arange(n, n + len(rest))
        mask = torch.cat([mask_p, mask_s], dim=1).to(self.device)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=position_ids.to(self.device),
            **{self._kv_arg: DynamicCache(layers)},
            use_cache=True,
            logits_to_keep=1,
        )
        lens = torch.tensor([len(r.prompt.input_ids) for r in rows], device=self.device)
        batch = _Batch(list(rows), self._kv_of(out), mask, lens)
        self._advance(batch, out.logits[:, -1, :])
        return batch

    def _step(self, batch: _Batch) -> _Batch:
        import torch

        keep = [i for i, r in enumerate(batch.rows) if not self._drop_if_cancelled(r)]
        if len(keep) != len(batch.rows):
            self._select(batch, keep)
        if not batch.rows:
            return batch
        t0 = time.perf_counter()
        batch.mask = torch.cat(
            [
                batch.mask,
                torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=self.device),
            ],
            dim=1,
        )
        out = self.model(
            input_ids=batch.last[:, None],
            attention_mask=batch.mask,
            position_ids=batch.pos[:, None],
            **{self._kv_arg: batch.cache},
            use_cache=True,
        )
        batch.cache = self._kv_of(out)
        batch.pos = batch.pos + 1
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch.rows))
        self._advance(batch, out.logits[:, -1, :])
        self._step_ema = 0.9 * self._step_ema + 0.1 * (time.perf_counter() - t0)
        return batch

    def _advance(self, batch: _Batch, logits) -> None:
        """Sample one token per row, stream its text, and drop rows that finished."""
        import torch

        logits = logits.float()
        if self.banned_ids:
            logits[:, self.banned_ids] = float("-inf")
        greedy = logits.argmax(-1)
        toks = []
        keep = []
        for i, row in enumerate(batch.rows):
            p = row.params
            tok = (
                int(greedy[i])
                if p.temperature <= GREEDY_TEMPERATURE
                else _sample(logits[i], p, row.gen)
            )
            toks.append(tok)
            if not self._accept(row, tok):
                keep.append(i)
        batch.last = torch.tensor(toks, dtype=torch.long, device=self.device)
        if len(keep) != len(batch.rows):
            self._select(batch, keep)

    def _accept(self, row: _Row, tok: int) -> bool:
        """Record ``tok`` for ``row``, emit new text; True when the row is finished."""
        if row.handle.cancelled:
            self._drop_if_cancelled(row)
            return True
        finish = None
        if tok in self.eos_ids:
            finish = "stop"
        else:
            row.ids.append(tok)
            self.stats["tokens"] += 1
            if len(row.ids) >= row.max_new:
                finish = "length"
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        delta, stopped = stream_delta(text, row.emitted, row.params.stop, final=finish is not None)
        if stopped:
            finish = "stop"
        row.emitted += delta
        if finish is None:
            if delta:
                row.handle._emit(Event("text", text=delta))
            return False
        self.stats["completed"] += 1
        row.handle._emit(
            Event(
                "done",
                text=delta,
                finish_reason=finish,
                prompt_tokens=row.handle.prompt_tokens,
                # The end-of-turn token was generated too (vLLM counts it, and bills it).
                completion_tokens=len(row.ids) + (tok in self.eos_ids),
            )
        )
        return True

    def _select(self, batch: _Batch, keep: list[int]) -> None:
        """Keep only rows ``keep`` and trim left padding no remaining row needs."""
        import torch

        batch.rows = [batch.rows[i] for i in keep]
        if not keep:
            batch.cache = None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = batch.mask[idx]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        if self._merge_ok:
            for layer in batch.cache.layers:
                layer.keys = layer.keys[idx, :, start:]
                layer.values = layer.values[idx, :, start:]
            batch.mask = mask[:, start:]
        else:
            batch.cache.batch_select_indices(idx)
            batch.mask = mask
        batch.pos = batch.pos[idx]
        if batch.last is not None and batch.last.shape[0] != len(keep):
            batch.last = batch.last[idx]

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """Concatenate two batches along the batch axis, left-padding the shorter cache."""
        import torch
        import torch.nn.functional as F

        ta, tb = a.mask.shape[1], b.mask.shape[1]
        width = max(ta, tb)

        def pad(x, t, dim):  # left-pad ``dim`` (2 for kv, 1 for the mask) to ``width``
            if t == width:
                return x
            pads = [0, 0] * (x.dim() - 1 - dim) + [width - t, 0]
            return F.pad(x, pads)

        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            la.keys = torch.cat([pad(la.keys, ta, 2), pad(lb.keys, tb, 2)])
            la.values = torch.cat([pad(la.values, ta, 2), pad(lb.values, tb, 2)])
        a.mask = torch.cat([pad(a.mask, ta, 1), pad(b.mask, tb, 1)])
        a.pos = torch.cat([a.pos, b.pos])
        a.last = torch.cat([a.last, b.last])
        a.rows = a.rows + b.rows
        return a


def kv_cache_argument(model) -> str:
    """The forward's KV-cache argument. transformers 5.x renamed ``past_key_values`` to ``cache``;
    the old name still works but logs a deprecation warning on every forward (a hundred lines in a
    quickstart) and goes away in 5.40. Read from the signature, so both sides of the rename work."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _slice_kv(cache, row: int, start: int, n: int) -> tuple:
    """Per-layer (keys, values) of positions ``start:start+n`` of one batch row; cloned, since a
    view would keep the whole batch's cache alive."""
    return tuple(
        (
            layer.keys[row : row + 1, :, start : start + n].clone(),
            layer.values[row : row + 1, :, start : start + n].clone(),
        )
        for layer in cache.layers
    )


def _cache_is_mergeable(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (
        type(cache) is DynamicCache
        and bool(layers)
        and all(type(layer) is DynamicLayer for layer in layers)
    )


def _sample(logits, p: SamplingParams, gen) -> int:
    import torch

    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p, and always the most probable token
        # (top_p == 0 would otherwise drop every token, and multinomial fail on all zeros)
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        drop[0] = False
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _special_token_pattern(tokenizer, processor=None) -> re.Pattern | None:
    """A regex matching the text of every special token and every markup-like added token
    (``<image>``, ``<|im_end|>``, ``<repo_name>``, ...), longest first. Added tokens that are
    whitespace runs or plain words are left out: they stand for the same text, not for
    structure, and breaking them would alter ordinary text."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    try:
        added = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without added-token bookkeeping
        added = {}
    for t in added:
        if isinstance(t, str) and not any(c.isspace() for c in t) and not t.isalnum():
            found.add(t)
    image_token = getattr(processor, "image_token", None)
    if isinstance(image_token, str):
        found.add(image_token)
    found = {t for t in found if isinstance(t, str) and len(t) >= 2}
    if not found:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)))


_SURROGATE = re.compile("[\ud800-\udfff]")


def invalid_unicode(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (and so cannot be tokenized), or None. A lone
    surrogate comes from JSON's ``\\ud800`` escapes or from a terminal whose bytes are not UTF-8
    (Python keeps each such byte as U+DC80..U+DCFF)."""
    m = _SURROGATE.search(text)
    if m is None:
        return None
    code = ord(m[0])
    if 0xDC80 <= code <= 0xDCFF:
        return f"byte 0x{code - 0xDC00:02X} at character {m.start()} is not UTF-8"
    return f"lone surrogate U+{code:04X} at character {m.start()}"


def _max_token_chars(tokenizer) -> int:
    """The longest vocabulary entry, in characters: byte-level vocabularies spell one byte per
    character and sentencepiece ones one character per character, so no token decodes to more
    characters than this (as long as the normalizer deletes none, as chat LMs' do not). 0 when
    the vocabulary cannot be read (no bound)."""
    try:
        vocab = tokenizer.get_vocab()
        return max((len(t) for t in vocab), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: no bound, no failure
        return 0


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    return []


def _flatten(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
