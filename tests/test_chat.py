"""``llavamed chat``: the REPL, its commands, and the non-interactive path through the CLI."""

from __future__ import annotations

import io

import pytest

from llavamed.errors import InputError
from llavamed.serve.chat import ChatSession, run_chat
from llavamed.serve.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    eng = Engine.from_path(tiny_llava_dir)
    yield eng
    eng.close()


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    p = tmp_path / "x.png"
    Image.new("RGB", (30, 30), (0, 0, 255)).save(p)
    return p


def test_repl_commands_and_history(engine, png):
    session = ChatSession(engine, params=SamplingParams(max_tokens=3, temperature=0))
    script = iter(
        [
            f"/image {png}",
            "What is this?",
            "And now?",
            "/image /nonexistent.png",
            "/bogus",
            "/reset",
            "Fresh start",
            "/quit",
            "never read",
        ]
    )
    out = io.StringIO()
    assert run_chat(session, read=lambda _p: next(script), out=out) == 0
    text = out.getvalue()
    assert "image attached" in text and "file not found" in text and "unknown command" in text
    assert "conversation cleared" in text
    assert text.count("assistant> ") == 3
    # after /reset only the last exchange remains, without an image
    assert len(session.messages) == 2 and session.images == []
    assert next(script) == "never read"


def test_image_paths_with_spaces_may_be_quoted_or_escaped(tiny_llava_dir, tmp_path):
    """``/image '/scans/my scan.png'`` and ``/image /scans/my\\ scan.png`` were taken
    literally, quotes and backslash included: file not found. Through the real command and
    its terminal loop, reading stdin."""
    import os
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "my scans"
    folder.mkdir()
    scan = folder / "my scan.png"
    Image.new("RGB", (30, 30), (0, 0, 255)).save(scan)
    escaped = str(scan).replace(" ", "\\ ")
    lines = [f"/image '{scan}'", "What is it?", f"/image {escaped}", "And this?", f"/image {scan}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-m", "llavamed", "chat", "--model", str(tiny_llava_dir)]
        + ["--max-tokens", "2", "--temperature", "0"],
        input="\n".join(lines) + "\n/quit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(f"(image attached: {scan};") == 3, run.stdout
    assert "error" not in run.stdout and run.stdout.count("assistant> ") == 2


def test_history_grows_prompt_and_keeps_image(engine, png):
    session = ChatSession(engine, params=SamplingParams(max_tokens=2, temperature=0))
    session.attach(png)
    first = "".join(session.ask("Describe it."))
    assert len(session.images) == 1 and session.pending_image is None
    p1 = engine.prepare(
        session.messages + [{"role": "user", "content": [{"type": "text", "text": "More?"}]}],
        session.images,
    )
    assert p1.n_images == 1
    "".join(session.ask("More?"))
    assert session.messages[1]["content"][0]["text"] == first
    assert len(session.messages) == 4


@pytest.mark.parametrize("with_image", [False, True])
def test_a_question_quoting_the_image_tag_is_answered(engine, png, with_image):
    """The processor took a literal ``<image>`` in the question for the image placeholder:
    "Found 1 <image> tokens in the text but no images were passed"."""
    session = ChatSession(
        engine, params=SamplingParams(max_tokens=2, temperature=0), system="No <image> here."
    )
    if with_image:
        session.attach(png)
    out = io.StringIO()
    assert run_chat(session, prompt="What does the <image> tag do in HTML?", out=out) == 0
    assert len(session.messages) == 2 and len(session.images) == int(with_image)
    assert session.messages[0]["content"][-1]["text"] == "What does the <image> tag do in HTML?"


def test_text_only_refuses_images(tiny_lm_dir, png):
    eng = Engine.from_path(tiny_lm_dir)
    try:
        with pytest.raises(InputError, match="text-only"):
            ChatSession(eng).attach(png)
    finally:
        eng.close()


def test_cli_non_interactive_bf16(tiny_llava_dir, png, capsys):
    from llavamed.cli import main

    rc = main(
        [
            "chat",
            "--model",
            str(tiny_llava_dir),
            "--image",
            str(png),
            "--prompt",
            "What is it?",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--dtype",
            "bf16",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_bad_image_is_one_line_error(tiny_llava_dir, tmp_path, capsys):
    from llavamed.cli import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    rc = main(["chat", "--model", str(tiny_llava_dir), "--image", str(bad), "--prompt", "hi"])
    assert rc == 1
    assert "not an image" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "web"])
def test_cli_bad_sampling_value_is_a_config_error(command, tmp_path, capsys):
    """chat and web check their sampling options before loading any model."""
    from llavamed.cli import main

    # A usage error as the command line is read: the absent --model is never reached.
    with pytest.raises(SystemExit) as exc:
        main([command, "--model", str(tmp_path / "absent"), "--top-p", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"usage: llavamed {command} [-h]"), err
    assert err[-1] == (
        f"llavamed {command}: error: argument --top-p: 1.5 must be a finite number in [0, 1]"
    ), err


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_cli_temperature_that_is_not_a_number_fails_before_the_model_loads(value, tmp_path, capsys):
    """float() takes 'nan' and 'inf'; the model loaded, then torch raised a traceback."""
    from llavamed.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["chat", "--model", str(tmp_path / "absent"), "--temperature", value])
    assert exc.value.code == 2  # a usage error, before the (absent) model is looked at
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: llavamed chat [-h]"), err
    assert lines[-1] == (
        f"llavamed chat: error: argument --temperature: {value} must be a finite number >= 0"
    ), err


def test_ctrl_c_stops_an_answer_says_it_is_not_kept_and_exits_130(engine):
    class Interrupting(io.StringIO):
        """Ctrl-C arrives while the first token is written."""

        def write(self, s):
            if s and not s.startswith(" [stopped") and not getattr(self, "fired", False):
                self.fired = True
                raise KeyboardInterrupt
            return super().write(s)

    session = ChatSession(engine, params=SamplingParams(max_tokens=4, temperature=0))
    out = Interrupting()
    assert run_chat(session, prompt="Hello?", out=out) == 130
    assert "not kept in the conversation" in out.getvalue()
    assert session.messages == []  # as the message says
