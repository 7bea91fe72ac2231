"""Gradio web UI: upload an image (PNG, JPEG, DICOM, ...), chat over several turns, try example
images (pydicom's real CT/MR slices and MedSynth figures), tune sampling.

The UI talks to the engine in-process, so several browser sessions share its batching. Each
session's conversation lives in Gradio state as plain messages and PIL images.

Uploads and previews are patient images: :func:`launch` keeps Gradio's files in a private
folder of its own (mode 0700) unless ``GRADIO_TEMP_DIR`` is set, deletes files older than an
hour while it runs, and removes the folder when the app closes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from llavamed.errors import InputError, LlavamedError
from llavamed.serve.chat import ChatSession
from llavamed.serve.engine import Engine, SamplingParams, load_user_image

MEDSYNTH_EXAMPLES = ("chest_xray", "histology", "gross")
# Gradio's cache: every 10 minutes, delete its files that are more than an hour old.
DELETE_CACHE = (600, 3600)
# The command line's --seed range (commands.seed_int); -1 draws a random seed.
MAX_SEED = 2**32 - 1
# Largest upload (llavamed web --max-upload-mb). Gradio has no limit of its own: a file of
# several GB was written to disk, then read whole into memory to be decoded. Generous, because
# a multi-frame DICOM series is one file (only its middle frame is decoded).
MAX_UPLOAD_BYTES = 256 * 2**20


def example_images(out_dir: str | Path | None = None) -> list[Path]:
    """Example files for the UI: pydicom's bundled CT and MR test slices (real DICOM) and a few
    MedSynth renders (PNG, written once to ``out_dir``)."""
    out: list[Path] = []
    try:
        from pydicom.data import get_testdata_file

        for name in ("CT_small.dcm", "MR_small.dcm"):
            p = get_testdata_file(name)
            if p:
                out.append(Path(p))
    except Exception:  # pydicom's data folder is optional in some distributions
        pass
    out_dir = Path(out_dir or Path(tempfile.gettempdir()) / "llavamed-web-examples")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import numpy as np

        from llavamed.data.synth.attributes import sample_attributes
        from llavamed.data.synth.render import render

        for i, domain in enumerate(MEDSYNTH_EXAMPLES):
            p = out_dir / f"medsynth_{domain}.png"
            if not p.exists():
                rng = np.random.default_rng(1000 + i)
                img = render(domain, sample_attributes(domain, rng), rng, size=256)
                tmp = p.with_suffix(".tmp.png")
                img.save(tmp)
                os.replace(tmp, p)
            out.append(p)
    except ImportError:
        pass
    return out


def upload_warning(exc: InputError, limit: int = 200) -> str:
    """The warning for a rejected upload: the reason and, on one line and shortened, the detail
    that says what to do about it (the pixel limit, a missing DICOM codec)."""
    msg = f"cannot use this file: {exc.reason}"
    detail = " ".join(str(exc.detail or "").split())
    if len(detail) > limit:
        detail = detail[: limit - 1].rstrip() + "\u2026"
    return f"{msg} ({detail})" if detail else msg


def _mb(n: int) -> str:
    return f"{n / 2**20:.4g} MB"


def upload_too_large(path: str | os.PathLike, limit: int) -> str | None:
    """The warning for a file over ``limit`` bytes, or None: checked before the file is read."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return None  # load_user_image names what is wrong with it
    if size <= limit:
        return None
    return (
        f"cannot use this file: file too large ({_mb(size)} > {_mb(limit)}; "
        "llavamed web --max-upload-mb)"
    )


def seed_value(seed) -> int | None:
    """The Seed box's value as a sampling seed: None (random) for -1 or an empty box. Anything
    outside -1 .. 2**32-1 raises ValueError. Checked here as well as by the box's bounds, which
    only hold where gradio preprocesses the value: a seed past 2**64 reached torch.manual_seed,
    whose error showed as a bare "Error" and a server traceback."""
    if seed is None:
        return None
    try:
        n = int(seed)
        whole = n == seed
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or not -1 <= n <= MAX_SEED:
        raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED}, or -1 for random")
    return None if n == -1 else n


UNKEPT = " [stopped: not part of the conversation]"
# An answer cut short by an error: as a stopped one, it stays on the page but out of the model's
# conversation; the error itself is reported beside it.
FAILED = " [failed: not part of the conversation]"
MARKS = (UNKEPT, FAILED)


def _message_text(content) -> str:
    """A Chatbot message's text: gradio hands messages back with content as a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def mark_unkept(history: list, kept: int, mark: str = UNKEPT) -> list:
    """``history`` with every answer after its first ``kept`` (settled) messages marked as not
    part of the conversation (``mark``: stopped, or FAILED by an error mid-answer): such a turn
    stays on the page but never reaches the model's conversation, and the page showed it like
    any other, so the model's next answers seemed to ignore it. The terminal chat says so when
    it stops one. An answer already marked either way keeps its mark."""
    out = list(history)
    for i in range(max(kept, 0), len(out)):
        m = out[i]
        if isinstance(m, dict) and m.get("role") == "assistant":
            text = _message_text(m.get("content"))
            if not text.endswith(MARKS):
                out[i] = {"role": "assistant", "content": text + mark}
    return out


def kept_messages(conv: dict | None, history: list) -> int:
    """How many of the page's first messages are settled: the page as it stood when ``conv``
    last completed a turn (earlier stopped answers already marked). Those after it belong to
    turns that did not complete. None: a new conversation, nothing settled."""
    if conv is None:
        return 0
    return conv.get("shown", len(history))


def settle_pending(pending: dict | None, used: str | None) -> tuple[dict | None, None]:
    """After a turn: the upload it attached is now in the conversation, so it is no longer
    pending; an upload made while the answer streamed stays pending for the next question."""
    if pending and used and pending.get("id") == used:
        return None, None
    return pending, None


def build_app(
    engine: Engine,
    *,
    examples_dir: str | Path | None = None,
    default_params: SamplingParams | None = None,
    concurrency: int = 8,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
):
    """The ``gr.Blocks`` app for ``engine`` (not launched). Uploads over ``max_upload_bytes``
    are refused with a warning (and, once launched through :func:`launch`, by Gradio itself
    before they are stored)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    dp = default_params or SamplingParams(max_tokens=256, temperature=0.2)
    multimodal = engine.is_multimodal

    def on_upload(path):
        if not path:
            return None, None
        too_large = upload_too_large(path, max_upload_bytes)
        if too_large:
            gr.Warning(too_large)
            return None, None
        try:
            img = load_user_image(path, name=Path(path).name)
        except InputError as exc:
            # Cleared, not kept: the file box shows the rejected file, so an older image still
            # pending would go with the next question unseen.
            gr.Warning(upload_warning(exc))
            return None, None
        # An id, so the turn that attaches it clears exactly this upload (see settle_pending).
        return img, {"id": uuid.uuid4().hex, "image": img}

    # Each browser session's running answer -> its stop flag, set by the Stop button. Gradio
    # cancels the answer's event on its own schedule: the answer went on streaming for up to a
    # second after Stop, and its last update could wipe the mark on_stop had put on the page.
    answering: dict[str, threading.Event] = {}

    def respond(text, history, conv, pending, temperature, top_p, max_tokens, seed, request=None):
        """Streams (question, chatbot, conv, used). ``pending`` is read, never written: an image
        uploaded while this answer streams must survive it. ``used`` names the upload attached.
        An upload goes with one question only: ``conv`` remembers the ids of the uploads it
        holds, so a turn whose ``pending`` is one of them (an API client calling /respond
        alone, without the settle_pending step that follows in the browser) does not attach
        it again."""
        history = list(history or [])
        # Messages past conv["shown"] belong to turns that never completed (see mark_unkept).
        settled = kept_messages(conv, history)
        history = mark_unkept(history, settled)
        text = (text or "").strip()
        if not text:
            yield "", history, conv, None
            return
        conv = conv or {"messages": [], "images": [], "uploads": [], "shown": 0}
        attached = list(conv.get("uploads", ()))
        attach = pending if multimodal and pending and pending["id"] not in attached else None
        try:
            params = SamplingParams(
                max_tokens=int(max_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=seed_value(seed),
            )
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        session = ChatSession(
            engine,
            params=params,
            messages=list(conv["messages"]),
            images=list(conv["images"]),
            pending_image=attach["image"] if attach else None,
        )
        history = history + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": ""},
        ]
        answer = ""
        stop, key = threading.Event(), getattr(request, "session_hash", None)
        if key is not None:
            answering[key] = stop
        stream = session.ask(text)
        shown = False  # whether this turn has reached the page
        try:
            for delta in stream:
                if stop.is_set():
                    break
                answer += delta
                history[-1] = {"role": "assistant", "content": answer}
                shown = True
                yield "", history, conv, None
        except LlavamedError as exc:  # InputError; QueueFull, EngineClosed at submit
            if not shown:
                raise gr.Error(str(exc)) from None
            # Marked now, as Stop marks an answer: the page showed the partial answer like a
            # finished one until the next question was sent. Reported in a toast, not raised:
            # gradio covers the Chatbot of a failed event with an opaque "Error" box, which hid
            # the whole conversation, mark and all, until it was closed.
            gr.Warning(str(exc))
            yield "", mark_unkept(history, settled, FAILED), conv, None
            return
        finally:
            stream.close()  # stops the engine's generation (ChatSession.ask's finally)
            if key is not None and answering.get(key) is stop:
                del answering[key]
        if stop.is_set():  # Stop: the page keeps the answer, marked; conv does not
            yield "", mark_unkept(history, settled), conv, None
            return
        if not answer:
            history[-1] = {"role": "assistant", "content": "(empty answer)"}
        conv = {
            "messages": session.messages,
            "images": session.images,
            "uploads": attached + [attach["id"]] if attach else attached,
            "shown": len(history),
        }
        yield "", history, conv, attach["id"] if attach else None

    def clear():
        return [], None, None, None, None

    def on_stop(history, conv, request=None):
        """The stopped answer stays on the page, marked: it is not part of the conversation.
        The answer's own loop is told too, so no later update of it wipes the mark."""
        stop = answering.get(getattr(request, "session_hash", None))
        if stop is not None:
            stop.set()
        history = list(history or [])
        return mark_unkept(history, kept_messages(conv, history))

    # gradio hands a function its gr.Request by annotation; set as objects, since this module's
    # string annotations name gr, which only this function imports (unresolved, gradio would
    # silently pass nothing).
    respond.__annotations__ = {"request": gr.Request}
    on_stop.__annotations__ = {"request": gr.Request}

    with gr.Blocks(title="llavamed", delete_cache=DELETE_CACHE) as demo:
        kind = "image + text" if multimodal else "text only"
        gr.Markdown(
            f"## llavamed: biomedical visual chat\nModel **{engine.name}** ({kind}). "
            "Upload a PNG, JPEG or DICOM image, then ask about it. "
            "Research demo: not for clinical use."
        )
        conv = gr.State(None)
        pending = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                # Any file name: load_image tells formats apart by their contents, and DICOM
                # files often have no extension (IM000001) or a scanner's own (.IMA). A file
                # it can't read gets a warning naming why.
                upload = gr.File(
                    label="Image (PNG, JPEG, DICOM, TIFF, ...)",
                    type="filepath",
                    visible=multimodal,
                    elem_id="image-upload",
                )
                preview = gr.Image(
                    label="What the model sees",
                    type="pil",
                    interactive=False,
                    visible=multimodal,
                    height=260,
                    elem_id="image-preview",
                )
                examples = example_images(examples_dir) if multimodal else []
                if examples:
                    gr.Examples(
                        examples=[[str(p)] for p in examples],
                        inputs=[upload],
                        label="Example images (pydicom CT/MR, MedSynth)",
                    )
                with gr.Accordion("Sampling", open=False):
                    # The ranges hold the command line's values (a slider refuses a value
                    # outside its range on every Send).
                    temperature = gr.Slider(
                        0.0,
                        max(2.0, dp.temperature),
                        value=dp.temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                    )
                    top_p = gr.Slider(
                        min(0.05, dp.top_p), 1.0, value=dp.top_p, step=0.01, label="Top-p"
                    )
                    longest = engine.max_context - 1
                    max_tokens = gr.Slider(
                        1,
                        max(min(2048, longest), min(dp.max_tokens, longest)),
                        value=min(dp.max_tokens, longest),
                        step=1,
                        label="Max new tokens",
                    )
                    seed = gr.Number(
                        value=-1 if dp.seed is None else dp.seed,
                        precision=0,
                        minimum=-1,
                        maximum=MAX_SEED,
                        label="Seed (-1 = random)",
                    )
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
                question = gr.Textbox(
                    label="Your question",
                    placeholder="Ask about the image…",
                    lines=1,
                    elem_id="question",
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", elem_id="stop")
                    reset = gr.Button("New conversation", elem_id="reset")
        used = gr.State(None)
        upload.change(on_upload, [upload], [preview, pending])
        inputs = [question, chatbot, conv, pending, temperature, top_p, max_tokens, seed]
        # One event for Enter and Send: a second trigger while an answer runs is ignored rather
        # than starting a parallel turn from the same conversation (one of them would be lost).
        answer = gr.on(
            [send.click, question.submit],
            respond,
            inputs,
            [question, chatbot, conv, used],
            concurrency_limit=concurrency,
            trigger_mode="once",
        )
        answer.then(settle_pending, [pending, used], [pending, used])
        # Cancelling stops the engine's generation too (ChatSession.ask's finally). A stopped
        # turn never reaches conv, so its image stays pending for the next question, and its
        # answer is marked on the page as not part of the conversation (mark_unkept).
        stop.click(on_stop, [chatbot, conv], [chatbot], cancels=[answer])
        reset.click(clear, [], [chatbot, conv, pending, preview, upload], cancels=[answer])
    demo.queue(default_concurrency_limit=concurrency)
    return demo


class PrivateTempDir:
    """Gradio's file folder (uploads, previews, example copies) as a fresh folder only this user
    can read, made with ``tempfile.mkdtemp`` and named in ``GRADIO_TEMP_DIR``, which Gradio
    reads when it builds components and the app. Gradio's default is a shared
    ``/tmp/gradio`` with world-readable files that are never deleted. A ``GRADIO_TEMP_DIR`` the
    user set is left as it is (``path`` is None)."""

    def __init__(self):
        self.path: str | None = None
        if os.environ.get("GRADIO_TEMP_DIR"):
            return
        self.path = tempfile.mkdtemp(prefix="llavamed-web-")  # mode 0700
        os.environ["GRADIO_TEMP_DIR"] = self.path
        atexit.register(self.remove)

    def remove(self) -> None:
        """Delete the folder and unset ``GRADIO_TEMP_DIR`` again; idempotent."""
        path, self.path = self.path, None
        if path is None:
            return
        atexit.unregister(self.remove)
        if os.environ.get("GRADIO_TEMP_DIR") == path:
            del os.environ["GRADIO_TEMP_DIR"]
        shutil.rmtree(path, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def launch(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    block: bool = True,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    **kwargs: Any,
):
    """Build and launch the app; returns the Blocks (``demo.close()`` stops it). Uploads over
    ``max_upload_bytes`` are refused by Gradio while they arrive, naming the limit. Gradio's files
    go to a :class:`PrivateTempDir`, removed when the app closes: when a blocking launch
    returns (Ctrl-C, or SIGTERM, which is taken as Ctrl-C while it blocks), or on
    ``demo.close()``."""
    tmp = PrivateTempDir()
    on_term: Any = False  # SIGTERM's handler before launch; False: not replaced
    try:
        demo = build_app(engine, max_upload_bytes=max_upload_bytes, **kwargs)
        if block and threading.current_thread() is threading.main_thread():
            # Gradio stops its server cleanly on KeyboardInterrupt only; a service manager's
            # SIGTERM would end the process without removing the uploads.
            on_term = signal.signal(signal.SIGTERM, _interrupt)
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=not block,
            inbrowser=False,
            quiet=not block,
            max_file_size=max_upload_bytes,
        )
    except BaseException:
        tmp.remove()
        raise
    finally:
        if on_term is not False:
            signal.signal(signal.SIGTERM, on_term)
    if block:  # the server has stopped
        tmp.remove()
        return demo
    close = demo.close

    def close_and_remove(*args, **kw):
        try:
            return close(*args, **kw)
        finally:
            tmp.remove()

    demo.close = close_and_remove
    return demo
