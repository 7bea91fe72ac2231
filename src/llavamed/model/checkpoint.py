"""Load native llava checkpoints (ours or anyone's) and read the llavamed metadata we save."""

from __future__ import annotations

import json
from pathlib import Path

from llavamed.errors import ConfigError, InputError, first_line
from llavamed.model.checkpoint_format import CHECKPOINT_META, model_files, strict_from_pretrained
from llavamed.model.compose import ModelSpec

FINAL = "checkpoint-final"
"""The folder a training run saves its finished model in."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder holding ``checkpoint-final``.

    A training run's folder that has no ``checkpoint-final`` yet (still running, or stopped)
    and its resume checkpoints (trainable weights and optimizer state, no model) are the likely
    mistakes when chaining stages by hand or evaluating a run: each is named as what it is."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / FINAL / "config.json").is_file():
        return p / FINAL
    if (p / FINAL).is_dir():
        # Said "no checkpoint-final/ inside" of a run folder that has one, damaged.
        raise InputError(p / FINAL, "not a checkpoint folder", "config.json missing")
    if p.is_dir():
        run = next((r for r in (p, p.parent, p.parent.parent) if _is_run(r)), None)
        if run is not None and (run / FINAL / "config.json").is_file():
            raise InputError(
                p, "the resume state of a training run, not a model", f"its model is {run / FINAL}"
            )
        if run is not None:
            what = "a training run" if run == p else "the resume state of a training run"
            raise InputError(
                p,
                f"{what} that has not finished",
                f"no {run / FINAL} yet; re-run its `llavamed train` command to finish it",
            )
    raise InputError(
        p, "not a checkpoint folder", "no config.json (and no checkpoint-final/ inside)"
    )


def _is_run(path: Path) -> bool:
    """A training run's output folder: ``config.yaml`` and what a run writes beside it."""
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("checkpoints", "metrics.jsonl", "data_report.json")
    )


def checkpoint_name(path: str | Path) -> str:
    """The name a model goes by: its run folder's for a ``checkpoint-final`` (``runs/stage2``
    is served as ``stage2``, not as ``checkpoint-final``). Relative paths count from the
    current folder: ``--model .`` inside a checkpoint was served under the empty name ``''``
    (and ``..`` as ``'..'``); symlinks keep their own name."""
    import os

    p = Path(os.path.abspath(path))
    return p.parent.name if p.name == FINAL else p.name


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_PROMPT_FILES = (
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)
"""Files that decide how a checkpoint is prompted and decoded, hashed whole: the same weights
under another chat template or stop ids give other answers."""


def checkpoint_fingerprint(path: str | Path) -> str:
    """A short id of a checkpoint's content: its config, the files that shape its prompts and
    decoding (chat template, tokenizer, processor, generation config) and, per weights file, the
    name, size and the first and last MiB. Two checkpoints both named ``checkpoint-final`` (or
    one retrained in place, or rebuilt with another template) differ here, so answers written by
    one are never resumed as the other's; a copy of a checkpoint keeps it. Reads at most 2 MiB
    per weights file."""
    import hashlib

    p = resolve_checkpoint(path)
    h = hashlib.sha1((p / "config.json").read_bytes())
    for name in _PROMPT_FILES:
        if (p / name).is_file():
            h.update(f"{name}:".encode() + hashlib.sha1((p / name).read_bytes()).digest())
    for f in sorted(x for x in p.iterdir() if x.suffix in _WEIGHT_SUFFIXES and x.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def read_meta(path: str | Path) -> dict:
    """The llavamed metadata saved with a checkpoint (``{}`` for anyone else's checkpoint); a
    damaged file is an :class:`InputError` naming it, not a raw JSONDecodeError."""
    p = Path(path) / CHECKPOINT_META
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(p, "damaged checkpoint metadata", first_line(exc)) from exc
    if not isinstance(meta, dict):
        raise InputError(p, "damaged checkpoint metadata", "not a JSON object")
    return meta


def checkpoint_spec(path: str | Path) -> ModelSpec | None:
    """The :class:`ModelSpec` a llavamed checkpoint was built from (``None`` for others), typed
    as a config is: an unknown key, a wrong type or a spec that is not an object is an
    :class:`InputError` naming ``llavamed.json``, not a TypeError from the constructor."""
    from llavamed.config import from_dict  # here: config imports the model package

    raw = read_meta(path).get("spec")
    if not raw:
        return None
    where = Path(path) / CHECKPOINT_META
    if not isinstance(raw, dict):
        raise InputError(where, "damaged checkpoint metadata", "spec is not a JSON object")
    try:
        return from_dict(ModelSpec, raw, prefix="spec")
    except ConfigError as exc:
        raise InputError(where, "damaged checkpoint metadata", str(exc)) from exc


def checkpoint_template(path: str | Path, default: str | None = None) -> str:
    """The conversation template a checkpoint was built with (from ``llavamed.json``, else
    recognised in its saved chat template: checkpoints trained from a converted one recorded
    none)."""
    from llavamed.model.templates import TEMPLATES

    saved = read_meta(path).get("template")
    if saved is not None and (not isinstance(saved, str) or saved not in TEMPLATES):
        # Passed on, every training sample was skipped as "--template: unknown template",
        # blamed on the data (and on a flag nobody gave) until none was left.
        raise InputError(
            Path(path) / CHECKPOINT_META,
            "unknown conversation template",
            f"template={saved!r}; choose from {', '.join(TEMPLATES)} (or set model.template)",
        )
    name = saved or _saved_template(path) or default
    if name is None:
        raise InputError(
            path,
            "unknown conversation template",
            "not a llavamed checkpoint; pass the template name explicitly",
        )
    return name


def _saved_template(path: str | Path) -> str | None:
    """The llavamed template whose Jinja the checkpoint in ``path`` saved, or None."""
    from llavamed.model.templates import template_of_jinja

    p = Path(path)
    text = None
    try:
        if (p / "chat_template.jinja").is_file():
            text = (p / "chat_template.jinja").read_text(encoding="utf-8")
        elif (p / "chat_template.json").is_file():
            text = json.loads((p / "chat_template.json").read_text(encoding="utf-8"))
            text = text.get("chat_template") if isinstance(text, dict) else None
    except (OSError, ValueError):
        return None
    return template_of_jinja(text)


def load_llava(path: str | Path, *, dtype=None, device: str = "cpu"):
    """``(LlavaForConditionalGeneration, processor)`` from a native checkpoint folder."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").exists():
        raise InputError(path, "not a checkpoint folder", "config.json missing")
    with model_files(path):
        model = strict_from_pretrained(
            LlavaForConditionalGeneration, path, dtype=dtype or torch.float32
        )
        processor = AutoProcessor.from_pretrained(path)
    model.to(device).eval()
    return model, processor
