"""Gradio web UI: upload an image (PNG, JPEG, DICOM, ...), chat over several turns, try example
images (pydicom's real CT/MR slices and MedSynth figures), tune sampling.

The UI talks to the engine in-process, so several browser sessions share its batching. Each
session's conversation lives in Gradio state as plain messages and PIL images.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from llavamed.errors import InputError
from llavamed.serve.chat import ChatSession
from llavamed.serve.engine import Engine, SamplingParams

FILE_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".gif", ".bmp", ".webp"]
MEDSYNTH_EXAMPLES = ("chest_xray", "histology", "gross")


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


def build_app(
    engine: Engine,
    *,
    examples_dir: str | Path | None = None,
    default_params: SamplingParams | None = None,
    concurrency: int = 8,
):
    """The ``gr.Blocks`` app for ``engine`` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from llavamed.images import load_image

    dp = default_params or SamplingParams(max_tokens=256, temperature=0.2)
    multimodal = engine.is_multimodal

    def on_upload(path):
        if not path:
            return None, None
        try:
            img = load_image(path, name=Path(path).name)
        except InputError as exc:
            raise gr.Error(f"cannot use this file: {exc.reason}") from None
        return img, img

    def respond(text, history, conv, pending, temperature, top_p, max_tokens, seed):
        history = list(history or [])
        text = (text or "").strip()
        if not text:
            yield "", history, conv, pending
            return
        conv = conv or {"messages": [], "images": []}
        try:
            params = SamplingParams(
                max_tokens=int(max_tokens),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=None if seed is None or int(seed) < 0 else int(seed),
            )
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        session = ChatSession(
            engine,
            params=params,
            messages=list(conv["messages"]),
            images=list(conv["images"]),
            pending_image=pending if multimodal else None,
        )
        history = history + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": ""},
        ]
        answer = ""
        try:
            for delta in session.ask(text):
                answer += delta
                history[-1] = {"role": "assistant", "content": answer}
                yield "", history, conv, pending
        except InputError as exc:
            raise gr.Error(str(exc)) from None
        if not answer:
            history[-1] = {"role": "assistant", "content": "(empty answer)"}
        conv = {"messages": session.messages, "images": session.images}
        yield "", history, conv, None

    def clear():
        return [], None, None, None, None

    with gr.Blocks(title="llavamed") as demo:
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
                upload = gr.File(
                    label="Image (PNG, JPEG, DICOM)",
                    file_types=FILE_TYPES,
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
                    temperature = gr.Slider(
                        0.0, 2.0, value=dp.temperature, step=0.05, label="Temperature (0 = greedy)"
                    )
                    top_p = gr.Slider(0.05, 1.0, value=dp.top_p, step=0.05, label="Top-p")
                    max_tokens = gr.Slider(
                        1,
                        min(2048, engine.max_context - 1),
                        value=min(dp.max_tokens, engine.max_context - 1),
                        step=1,
                        label="Max new tokens",
                    )
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
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
                    reset = gr.Button("New conversation", elem_id="reset")
        upload.change(on_upload, [upload], [preview, pending])
        inputs = [question, chatbot, conv, pending, temperature, top_p, max_tokens, seed]
        outputs = [question, chatbot, conv, pending]
        send.click(respond, inputs, outputs, concurrency_limit=concurrency)
        question.submit(respond, inputs, outputs, concurrency_limit=concurrency)
        reset.click(clear, [], [chatbot, conv, pending, preview, upload])
    demo.queue(default_concurrency_limit=concurrency)
    return demo


def launch(
    engine: Engine, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True, **kwargs: Any
):
    """Build and launch the app; returns the Blocks (``demo.close()`` stops it)."""
    demo = build_app(engine, **kwargs)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        inbrowser=False,
        quiet=not block,
    )
    return demo
