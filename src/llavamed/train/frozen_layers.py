"""Reuse the frozen bottom of the LM across epochs (``train.cache_frozen_layers``).

Why: with ``train.frozen_lm_layers = N`` and the projector and tower frozen, nothing below decoder
layer N trains, so the hidden state entering layer N is the same for a sample in every epoch.
The first time a sample is seen its full forward runs and that hidden state is kept (a forward
pre-hook on layer N reads it; nothing in the LM is replaced). Every later visit starts at layer N
from the kept state: the tower, the projector, the embeddings and the bottom N layers are not run
again. With 8 layers and N = 6, a later visit costs about a quarter of the LM's forward and
backward work (``benchmarks/frozen_layers.py``: 3.5x faster steps than training projector + LM).

The kept states live in memory: ``sum(sample lengths) x hidden size`` floats (the quickstart's
fine-tuning set would take about 0.75 GB in fp32). The top is run by :func:`forward_from_layer`, which
follows the decoder loop of transformers' Llama-family models (rotary position embeddings, the
decoder layers, the final norm); a test holds its loss to the ordinary forward's.

Dropout below layer N would be sampled once and kept; the embedded LM has none.
"""

from __future__ import annotations

import contextlib

from llavamed.errors import ConfigError


def check_supported(llava, n_layers: int) -> None:
    """The LM must expose the Llama-family decoder loop that :func:`forward_from_layer` runs."""
    lm = llava.model.language_model
    missing = [a for a in ("layers", "norm", "rotary_emb") if not hasattr(lm, a)]
    if missing:
        raise ConfigError(
            f"train.cache_frozen_layers: {type(lm).__name__} has no {', '.join(missing)}; "
            "it works with Llama-family LMs (Llama, Mistral, Qwen2, SmolLM2); set it to false"
        )
    if not 0 < n_layers < len(lm.layers):
        raise ConfigError(
            f"train.cache_frozen_layers needs 0 < train.frozen_lm_layers < {len(lm.layers)}"
        )


def forward_from_layer(lm, hidden, start: int, attention_mask, position_ids):
    """The LM's last hidden state (after its final norm) from ``hidden``, the input of decoder
    layer ``start``. ``attention_mask`` is the 4-D mask the layers take (boolean for sdpa,
    additive for eager); ``position_ids`` is ``(B, L)``."""
    pos_emb = lm.rotary_emb(hidden, position_ids=position_ids)
    for layer in lm.layers[start:]:
        hidden = layer(
            hidden,
            attention_mask=attention_mask,
            position_embeddings=pos_emb,
            position_ids=position_ids,
        )
    return lm.norm(hidden)


class LayerInputCache:
    """Per-sample hidden states entering decoder layer ``n_layers``, keyed by dataset index."""

    def __init__(self, llava, n_layers: int):
        check_supported(llava, n_layers)
        self.lm = llava.model.language_model
        self.n_layers = n_layers
        self.states: dict[int, object] = {}
        self._captured = None

    def __len__(self) -> int:
        return len(self.states)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def has_all(self, idx) -> bool:
        return all(int(i) in self.states for i in idx)

    @contextlib.contextmanager
    def capture(self):
        """Around an ordinary forward: keeps the input of layer ``n_layers`` for :meth:`store`."""

        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self._captured = h.detach()

        handle = self.lm.layers[self.n_layers].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def store(self, idx, lengths) -> None:
        """Keep the captured rows of the last forward: row r holds sample ``idx[r]``, whose
        ``lengths[r]`` leading positions are real (the rest is padding)."""
        h = self._captured
        self._captured = None
        if h is None:
            raise RuntimeError("LayerInputCache.store without a captured forward")
        for r, (i, n) in enumerate(zip(idx, lengths, strict=True)):
            self.states[int(i)] = h[r, : int(n)].clone()

    def batch(self, idx, length: int):
        """``(B, length, hidden)`` right-padded with zeros (padding is masked out)."""

        rows = [self.states[int(i)] for i in idx]
        out = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
        for r, t in enumerate(rows):
            out[r, : t.shape[0]] = t
        return out
