"""Prompt assembly for self-instruct (DESIGN.md §4), from data files the user can override.

Messages: system rules; then per few-shot example a user turn holding the example's context and an
assistant turn holding its conversation as ``User: ...`` / ``Assistant: ...`` text; then the query
figure's context. The few-shot contexts are rendered with the same ``inline_mentions`` switch as the
query, so the examples always look like the request they precede.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llavamed.data.figures import mention_sentences
from llavamed.errors import InputError
from llavamed.utils.io import read_json

SYSTEM_FILE = "system_prompt.txt"
FEW_SHOT_FILE = "few_shot.json"


@dataclass(frozen=True)
class InstructPrompts:
    system: str
    few_shot: tuple[dict, ...]
    source: str


def _default_dir() -> Path:
    return Path(str(resources.files("llavamed") / "resources" / "instruct"))


def load_prompts(directory: str | os.PathLike | None = None) -> InstructPrompts:
    """Load the system prompt and few-shot examples; files missing from ``directory`` fall back
    to the packaged defaults, so a user can override just one of them."""
    default = _default_dir()
    user = Path(directory) if directory else None
    if user is not None and not user.is_dir():
        # A file given as --prompts was reported "not found": it is there, and not a folder.
        what = "is a file, not a folder" if user.exists() else "prompt folder not found"
        raise InputError(
            user, what, "--prompts takes the folder holding system_prompt.txt and/or few_shot.json"
        )

    def pick(name: str) -> Path:
        if user is not None and (user / name).exists():
            return user / name
        return default / name

    sys_path, fs_path = pick(SYSTEM_FILE), pick(FEW_SHOT_FILE)
    try:
        # utf-8-sig: a byte-order mark (a Windows editor's) went to the model as the prompt's
        # first character; text in another encoding, or a folder by that name, was a traceback.
        system = sys_path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise InputError(sys_path, "system prompt is not UTF-8 text", str(exc)) from None
    except OSError as exc:
        raise InputError(sys_path, "cannot read the system prompt", exc.strerror) from None
    if not system:
        raise InputError(sys_path, "empty system prompt")
    few = read_json(fs_path)
    if not isinstance(few, list):
        raise InputError(fs_path, "few-shot file must hold a JSON list")
    for i, ex in enumerate(few):
        _check_example(ex, f"{fs_path}[{i}]")
    return InstructPrompts(system=system, few_shot=tuple(few), source=f"{sys_path}, {fs_path}")


def _check_example(ex: object, where: str) -> None:
    """A few-shot example: ``fig_caption`` text and ``conversations``, a list of
    ``{"from": "human"|"gpt", "value": text}`` turns alternating from a human one, answered."""
    if not isinstance(ex, dict) or not ex.get("fig_caption") or not ex.get("conversations"):
        raise InputError(where, "few-shot example needs fig_caption and conversations")
    if not isinstance(ex["fig_caption"], str):
        raise InputError(where, "few-shot fig_caption must be a string")
    convs = ex["conversations"]
    if not isinstance(convs, list):
        raise InputError(
            where, "few-shot conversations must be a list of turns", type(convs).__name__
        )
    if len(convs) < 2 or len(convs) % 2:
        raise InputError(
            where, "few-shot conversation needs human/gpt turn pairs", f"{len(convs)} turns"
        )
    for j, turn in enumerate(convs):
        want = "gpt" if j % 2 else "human"
        at = f"{where}.conversations[{j}]"
        if not isinstance(turn, dict):
            raise InputError(at, "few-shot turn must be an object", type(turn).__name__)
        if turn.get("from") != want:
            raise InputError(
                at,
                "few-shot turns must alternate human/gpt, starting with human",
                f"from={turn.get('from')!r}, expected {want!r}",
            )
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise InputError(at, "few-shot turn needs a non-empty string value")


def build_context(record: dict, inline_mentions: bool) -> str:
    """``Figure Caption:\\n{label}: {caption}`` plus, if asked and present, ``Figure Context:``
    bullets - the paper's rendering, so prompts transfer between the reference and us."""
    caption = " ".join(str(record.get("fig_caption") or "").split())
    label = str(record.get("fig_label") or "").strip()
    text = f"Figure Caption:\n{label}: {caption}" if label else f"Figure Caption:\n{caption}"
    if inline_mentions:
        sents = mention_sentences(record)
        if sents:
            text += "\n\nFigure Context:\n\t- " + "\n\t- ".join(sents)
    return text


def conversation_to_text(conversations: list[dict]) -> str:
    return "\n\n".join(
        ("User: " if t.get("from") == "human" else "Assistant: ") + str(t.get("value", "")).strip()
        for t in conversations
    )


def build_messages(record: dict, prompts: InstructPrompts, inline_mentions: bool) -> list[dict]:
    messages = [{"role": "system", "content": prompts.system}]
    for ex in prompts.few_shot:
        messages.append({"role": "user", "content": build_context(ex, inline_mentions)})
        messages.append({"role": "assistant", "content": conversation_to_text(ex["conversations"])})
    messages.append({"role": "user", "content": build_context(record, inline_mentions)})
    return messages
