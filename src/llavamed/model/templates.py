"""Conversation templates, rendered from typed messages with the supervised character spans.

Each template exists twice: a Python renderer (used to build training labels, because it knows
which characters are assistant content) and a Jinja chat template (saved in the checkpoint so plain
``processor.apply_chat_template`` renders the same string with no llavamed import). A golden test
pins both to the exact strings in DESIGN.md §4 and to each other.

Labels are never built by splitting a rendered string: :meth:`ChatTemplate.render` returns the
spans of assistant content (plus the assistant's end-of-turn marker) while it writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from llavamed.errors import InputError

IMAGE_PLACEHOLDER = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Rendered:
    text: str
    # Half-open character ranges of supervised text (assistant content + its end marker).
    supervised: tuple[tuple[int, int], ...] = field(default_factory=tuple)


def content_to_text(content: str | Sequence[dict]) -> str:
    """Flatten HF structured content (``{"type": "image"}``, ``{"type": "text"}``) to a string
    with ``<image>`` placeholders, parts joined by newlines (LLaVA's ``<image>\\nQ`` convention)."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif kind == "text":
            parts.append(part["text"])
        else:
            raise InputError("<message>", f"unsupported content part type {kind!r}")
    return "\n".join(parts)


def to_messages(raw: Sequence[dict]) -> list[Message]:
    """HF-style ``{"role", "content"}`` dicts to typed messages."""
    out = []
    for m in raw:
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise InputError("<message>", f"unknown role {role!r}")
        out.append(Message(role, content_to_text(m.get("content", ""))))
    return out


class _Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[tuple[int, int]] = []

    def add(self, s: str, supervised: bool = False) -> None:
        if supervised and s:
            self.spans.append((self.n, self.n + len(s)))
        self.parts.append(s)
        self.n += len(s)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), tuple(self.spans))


def _split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0].role == "system":
        return messages[0].content, list(messages[1:])
    return None, list(messages)


def _check_alternation(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise InputError("<conversation>", f"turn {i} is {m.role!r}, expected {want!r}")


@dataclass(frozen=True)
class ChatTemplate:
    """A named template. ``eos`` is the LM's end-of-sequence string (``</s>`` for Llama/Mistral
    tokenizers); chatml uses ``<|im_end|>`` regardless."""

    name: str
    add_bos: bool  # whether the tokenizer's BOS starts the sequence

    def render(
        self, messages: Sequence[Message], *, eos: str, add_generation_prompt: bool = False
    ) -> Rendered:
        system, turns = _split_system(messages)
        _check_alternation(turns)
        w = _Writer()
        if self.name == "mistral_instruct":
            for i, m in enumerate(turns):
                if m.role == "user":
                    content = m.content
                    if i == 0 and system:
                        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                    w.add(f"[INST] {content} [/INST]")
                else:
                    w.add(f" {m.content} {eos}", supervised=True)
        elif self.name == "vicuna_v1":
            w.add((VICUNA_SYSTEM if system is None else system) + " ")
            for m in turns:
                if m.role == "user":
                    w.add(f"USER: {m.content} ")
                else:
                    w.add("ASSISTANT:")
                    w.add(f" {m.content}{eos}", supervised=True)
            if add_generation_prompt:
                w.add("ASSISTANT:")
        elif self.name == "chatml":
            if system:
                w.add(f"<|im_start|>system\n{system}<|im_end|>\n")
            for m in turns:
                if m.role == "user":
                    w.add(f"<|im_start|>user\n{m.content}<|im_end|>\n")
                else:
                    w.add("<|im_start|>assistant\n")
                    w.add(f"{m.content}<|im_end|>", supervised=True)
                    w.add("\n")
            if add_generation_prompt:
                w.add("<|im_start|>assistant\n")
        else:  # pragma: no cover - guarded by get_template
            raise AssertionError(self.name)
        return w.done()

    def jinja(self, *, eos: str) -> str:
        """The equivalent HF chat template, with ``eos`` baked in (processors don't pass it)."""
        flatten = (
            "{%- macro text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
            "{%- for p in c -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
            "{%- if p['type'] == 'image' -%}<image>{%- elif p['type'] == 'text' -%}{{ p['text'] }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        )
        sys_split = (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = text(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
        )
        q = _jinja_literal
        if self.name == "mistral_instruct":
            body = (
                "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                "{%- if loop.first and system -%}"
                + q("[INST] <<SYS>>\n")
                + "{{ system }}"
                + q("\n<</SYS>>\n\n")
                + "{{ text(m['content']) }}"
                + q(" [/INST]")
                + "{%- else -%}"
                + q("[INST] ")
                + "{{ text(m['content']) }}"
                + q(" [/INST]")
                + "{%- endif -%}{%- elif m['role'] == 'assistant' -%}"
                + q(" ")
                + "{{ text(m['content']) }}"
                + q(f" {eos}")
                + "{%- else -%}"
                + _ROLE_ERROR
                + "{%- endif -%}{%- endfor -%}"
            )
        elif self.name == "vicuna_v1":
            body = (
                "{%- if system is none -%}"
                + q(VICUNA_SYSTEM)
                + "{%- else -%}{{ system }}{%- endif -%}"
                + q(" ")
                + "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
                + q("USER: ")
                + "{{ text(m['content']) }}"
                + q(" ")
                + "{%- elif m['role'] == 'assistant' -%}"
                + q("ASSISTANT: ")
                + "{{ text(m['content']) }}"
                + q(eos)
                + "{%- else -%}"
                + _ROLE_ERROR
                + "{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}" + q("ASSISTANT:") + "{%- endif -%}"
            )
        elif self.name == "chatml":
            body = (
                "{%- if system -%}"
                + q("<|im_start|>system\n")
                + "{{ system }}"
                + q("<|im_end|>\n")
                + "{%- endif -%}"
                "{%- for m in turns -%}"
                + q("<|im_start|>")
                + "{{ m['role'] }}"
                + q("\n")
                + "{{ text(m['content']) }}"
                + q("<|im_end|>\n")
                + "{%- endfor -%}"
                "{%- if add_generation_prompt -%}" + q("<|im_start|>assistant\n") + "{%- endif -%}"
            )
        else:  # pragma: no cover
            raise AssertionError(self.name)
        return flatten + sys_split + body


# Mistral and Vicuna prompts have user and assistant turns only, and a system prompt first: any
# other message (a later system turn, a tool result) was rendered as an assistant answer.
_ROLE_ERROR = (
    "{{ raise_exception('this template renders user and assistant turns after one leading "
    "system message; got a ' ~ m['role'] ~ ' message') }}"
)


def _jinja_literal(s: str) -> str:
    """A Jinja expression printing ``s`` verbatim (whitespace control can't eat it)."""
    import json

    return "{{ " + json.dumps(s) + " }}"


TEMPLATES: dict[str, ChatTemplate] = {
    "mistral_instruct": ChatTemplate("mistral_instruct", add_bos=True),
    "vicuna_v1": ChatTemplate("vicuna_v1", add_bos=True),
    "chatml": ChatTemplate("chatml", add_bos=False),
}


_EOS_SLOT = "@@llavamed-eos@@"


def template_of_jinja(chat_template: str | None) -> str | None:
    """The name of the template whose Jinja twin (for any end-of-sequence string) is
    ``chat_template``, or None: how a checkpoint saved without its template's name (one trained
    from a converted LLaVA-Med checkpoint, whose llavamed.json records no spec) is prompted."""
    import re

    if not isinstance(chat_template, str):
        return None
    for name, template in TEMPLATES.items():
        parts = template.jinja(eos=_EOS_SLOT).split(_EOS_SLOT)
        pattern = "(.+?)".join(re.escape(p) for p in parts)
        m = re.fullmatch(pattern, chat_template, flags=re.DOTALL)
        if m is not None and len(set(m.groups())) <= 1:
            return name
    return None


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InputError(
            "--template", f"unknown template {name!r}", f"choose from {sorted(TEMPLATES)}"
        ) from None


def conversation_to_messages(
    conversations: Sequence[dict], source: str = "<sample>"
) -> list[Message]:
    """LLaVA JSON turns (``{"from": "human"|"gpt", "value": ...}``) to typed messages."""
    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    }
    out = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise InputError(source, "malformed conversation turn", f"turn {i}")
        role = roles.get(str(turn["from"]).lower())
        if role is None:
            raise InputError(source, "unknown speaker", f"turn {i}: {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise InputError(source, "turn value is not a string", f"turn {i}")
        value = turn["value"]
        if role == "user" and IMAGE_PLACEHOLDER in value:
            # LLaVA's preprocess_multimodal moves the image to the front of its turn, so a
            # caption prompt written "Describe ...\n<image>" trains in the shape every prompt
            # at evaluation and serving has: "<image>\nDescribe ...".
            value = IMAGE_PLACEHOLDER + "\n" + value.replace(IMAGE_PLACEHOLDER, "").strip()
        elif role == "assistant":
            # An answer's leading whitespace would join the prompt's last "\n" in one BPE token
            # ("\n\n" -> "ĊĊ"): training would supervise a token holding prompt text, and the
            # prompt ids would differ from the ones evaluation and serving feed.
            value = value.lstrip()
        out.append(Message(role, value))
    return out
