"""Terminal chat over the engine (in-process, no HTTP): multi-turn, streamed tokens, commands.

``ChatSession`` keeps the conversation (HF messages + images) and is what the web UI reuses;
``run_chat`` is the REPL.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llavamed.errors import InputError
from llavamed.serve.engine import Engine, SamplingParams

HELP = """commands:
  /image PATH   attach an image (PNG, JPEG, DICOM, ...) to your next message;
                a path with spaces may be quoted or escaped, as in a shell
  /reset        forget the conversation and any image
  /help         this text
  /quit         leave (Ctrl-D works too, and Ctrl-C twice at the prompt;
                Ctrl-C during an answer stops it)"""


@dataclass
class ChatSession:
    """One conversation with ``engine``. Images attach to the next user message."""

    engine: Engine
    params: SamplingParams = field(
        default_factory=lambda: SamplingParams(max_tokens=512, temperature=0.2)
    )
    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    pending_image: Any = None
    finish_reason: str | None = None
    """How the last answer ended: "stop", "length" (its max_tokens), "cancelled"."""
    cut_by_context: bool = False
    """True when the last answer's max_tokens was lowered to the room left in the context."""

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.pending_image = None

    def attach(self, image) -> None:
        """Attach a PIL image (or a path / bytes, decoded with ``load_image``) to the next turn."""
        if not self.engine.is_multimodal:
            raise InputError(
                "/image", "images not supported", f"{self.engine.name} is a text-only model"
            )
        if not hasattr(image, "size"):
            from llavamed.serve.engine import load_user_image

            image = load_user_image(image)  # (refuses a FIFO or a device: it would block)
        self.pending_image = image

    def ask(
        self,
        text: str,
        params: SamplingParams | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Stream the answer to ``text``; the exchange joins the history once it completes.
        ``cancelled()`` is polled between tokens; when it returns True generation stops."""
        content: list[dict] = []
        images = list(self.images)
        if self.pending_image is not None:
            content.append({"type": "image"})
            images.append(self.pending_image)
        content.append({"type": "text", "text": text})
        user = {"role": "user", "content": content}
        head = (
            [{"role": "system", "content": [{"type": "text", "text": self.system}]}]
            if self.system
            else []
        )
        too_long = InputError(
            "conversation",
            "too long for the model's context",
            "start a new conversation (/reset in chat, 'New conversation' on the web)",
        )
        conversation = head + self.messages + [user]
        if self.engine.min_prompt_tokens(conversation) >= self.engine.max_context:
            raise too_long  # known without tokenizing, which other web sessions would wait for
        prompt = self.engine.prepare(conversation, images)
        params = params or self.params
        room = self.engine.max_context - len(prompt.input_ids)
        if room < 1:
            raise too_long
        self.finish_reason, self.cut_by_context = None, params.max_tokens > room
        if params.max_tokens > room:
            params = SamplingParams(
                room, params.temperature, params.top_p, params.seed, params.stop
            )
        handle = self.engine.submit(prompt, params)
        parts: list[str] = []
        try:
            for ev in handle.events():
                if ev.kind == "error":
                    raise InputError("model", "generation failed", ev.error or "")
                if ev.kind == "done":
                    self.finish_reason = ev.finish_reason
                if ev.text:
                    parts.append(ev.text)
                    yield ev.text
                if cancelled is not None and cancelled():
                    handle.cancel()
        finally:
            handle.cancel()  # no-op once finished; stops work if the consumer quits early
        self.messages.append(user)
        self.messages.append(
            {"role": "assistant", "content": [{"type": "text", "text": "".join(parts)}]}
        )
        self.images = images
        self.pending_image = None


def image_path(arg: str) -> Path:
    """The file a ``/image`` argument names: the text as typed when such a file exists, else
    the one word a shell would make of it, so a path with spaces may be quoted
    (``'/scans/my scan.png'``) or escaped (``/scans/my\\ scan.png``) as in a terminal."""
    literal = Path(arg).expanduser()
    if literal.exists():
        return literal
    try:
        words = shlex.split(arg)
    except ValueError:  # an unclosed quote: the text as typed, which then is not found
        return literal
    return Path(words[0]).expanduser() if len(words) == 1 else literal


def run_chat(
    session: ChatSession,
    *,
    prompt: str | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> int:
    """Non-interactive with ``prompt`` (one streamed answer); otherwise a REPL on ``read``."""
    out = out or sys.stdout

    def answer(text: str, *, say_why_cut: bool = True) -> bool:
        """True when the answer completed; Ctrl-C stops it, and the exchange is not kept."""
        try:
            for delta in session.ask(text):
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped; this exchange is not kept in the conversation]\n")
            out.flush()
            return False
        if say_why_cut and session.finish_reason == "length":
            # An answer that ends mid-sentence looked like the model's own ending.
            out.write(
                " [cut: the conversation fills the model's context; /reset starts a new one]"
                if session.cut_by_context
                else f" [cut at {session.params.max_tokens} tokens: --max-tokens]"
            )
        out.write("\n")
        out.flush()
        return True

    if prompt is not None:  # stdout is the answer alone: scripts read it
        return 0 if answer(prompt, say_why_cut=False) else 130
    kind = "images + text" if session.engine.is_multimodal else "text only"
    out.write(f"llavamed chat with {session.engine.name} ({kind}). /help for commands.\n")
    interrupted = False  # the last read ended in Ctrl-C
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            # A Ctrl-C meant for an answer that had just ended reached the prompt and ended the
            # chat, conversation and all; as in Node's REPL, leaving takes a second one.
            if interrupted:
                out.write("\n")
                return 0
            interrupted = True
            out.write("\n(Ctrl-C again, Ctrl-D or /quit to leave)\n")
            continue
        except UnicodeDecodeError as exc:
            # A terminal (or pipe) whose bytes are not UTF-8, e.g. pasted Latin-1 text; it
            # ended the chat with a traceback, and the conversation with it.
            bad = exc.object[exc.start : exc.start + 1].hex().upper()
            out.write(
                f"error: your input is not {exc.encoding} text (byte 0x{bad}); "
                "check the terminal's encoding\n"
            )
            continue
        interrupted = False
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            cmd = cmd.lower()
            if cmd in ("/quit", "/exit", "/q"):
                return 0
            if cmd == "/reset":
                session.reset()
                out.write("(conversation cleared)\n")
            elif cmd == "/image":
                if not arg.strip():
                    out.write("usage: /image PATH\n")
                    continue
                path = image_path(arg.strip())
                try:
                    session.attach(path)
                    out.write(f"(image attached: {path}; it goes with your next message)\n")
                except InputError as exc:
                    out.write(f"error: {exc}\n")
            elif cmd == "/help":
                out.write(HELP + "\n")
            else:
                out.write(f"unknown command {cmd}; /help lists them\n")
            continue
        out.write("assistant> ")
        try:
            answer(line)
        except InputError as exc:
            out.write(f"error: {exc}\n")
