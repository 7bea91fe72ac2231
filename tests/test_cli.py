"""The command-line surface: every command's --help explains each option, and builds without
the heavy libraries (so --help is instant)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llavamed.cli import build_parser, main


def _all_parsers(parser: argparse.ArgumentParser, name: str = "llavamed"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _all_parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_no_empty_default_notes():
    parsers = dict(_all_parsers(build_parser()))
    assert {"llavamed quickstart", "llavamed data ingest", "llavamed eval vqa"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        # A default of None or False says nothing; printing it only adds noise.
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        # A help text that states its default is not followed by "(default: ...)" again.
        assert "(default: fp32)" not in text and "(default: engine)" not in text, name
    # Real defaults still show where the formatter adds them.
    assert "(default: quickstart_out)" in parsers["llavamed quickstart"].format_help()


def test_help_does_not_import_the_heavy_libraries():
    code = (
        "import sys; from llavamed.cli import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'transformers', 'gradio', 'fastapi', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cpu"


@pytest.mark.parametrize(
    ("config", "own_key", "foreign_key"),
    [
        ("stage0_vision.yaml", "text_trainable", "train.lr"),
        ("stage0b_vision_vqa.yaml", "readout", "train.lr"),
        ("stage2_instruct.yaml", "train.lr", "text_trainable"),
        # inside a list of sources and an optional section: listed too
        ("stage0b_vision_vqa.yaml", "sources.N.path", "train.lr"),
        ("finetune_vqa.yaml", "data.sources.N.group_by_image", "text_trainable"),
        ("finetune_vqa.yaml", "train.lora.r", "readout"),
    ],
)
def test_train_lists_the_keys_of_the_configs_own_stage(config, own_key, foreign_key, capsys):
    assert main(["train", str(CONFIGS / config), "--list-keys"]) == 0
    keys = {line.split()[0].rstrip(":") for line in capsys.readouterr().out.splitlines()}
    assert own_key in keys and foreign_key not in keys


@pytest.mark.parametrize("config", ["stage0_vision.yaml", "stage0b_vision_vqa.yaml"])
def test_train_print_config_resolves_a_tower_stage_without_training(config, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", str(CONFIGS / config), f"output_dir={out}", "seed=7", "--print-config"])
    assert rc == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["output_dir"] == str(out) and resolved["seed"] == 7
    assert not out.exists()  # nothing trained, nothing written
    # A key of another stage is a one-line config error, before anything runs.
    assert main(["train", str(CONFIGS / config), "train.lr=1", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "unknown" in err and "train" in err and len(err.strip().splitlines()) == 1


def test_train_overrides_may_follow_the_flags(capsys):
    # argparse ends a positional list at the first option; `CFG --print-config key=value` used
    # to fail with "unrecognized arguments".
    assert main(["train", str(CONFIGS / "tiny_smoke.yaml"), "--print-config", "train.lr=0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.5
    with pytest.raises(SystemExit):  # anything else left over is still an error
        main(["train", str(CONFIGS / "tiny_smoke.yaml"), "--print-config", "--bogus"])
    with pytest.raises(SystemExit):
        main(["chat", "--model", "x", "train.lr=0.5"])  # no overrides there


def test_serve_refuses_an_empty_api_key_before_loading_anything(tmp_path, capsys):
    # `--api-key "$KEY"` with KEY unset must not quietly serve without authentication.
    rc = main(["serve", "--model", str(tmp_path / "nowhere"), "--api-key", ""])
    err = capsys.readouterr().err
    assert rc == 1 and "--api-key: the key is empty" in err


def test_web_on_a_busy_port_fails_in_one_line_before_loading_the_model(tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The model path does not exist: reaching the load would give another error.
        rc = main(["web", "--model", str(tmp_path / "nowhere"), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 1 and f"--port {port}: cannot listen" in err


def test_an_output_on_a_read_only_filesystem_is_a_one_line_error_naming_it(
    readonly_disk, tmp_path, capsys
):
    """EROFS is an OSError but not a PermissionError: every command died with a traceback, and
    `model init` named its random temp folder instead of --out."""
    from pmc_fixtures import make_tarballs
    from train_helpers import make_bright_dark, tiny_config

    packages = make_tarballs(tmp_path / "src")
    data = make_bright_dark(tmp_path / "d", 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data, readonly_disk / "run", max_steps=1)))
    commands = {
        "synth": ["synth", "--out", str(readonly_disk / "w"), "--vqa-images", "22", "--quiet"],
        "ingest": ["data", "ingest", str(packages), "--out", str(readonly_disk / "c")],
        "model init": ["model", "init", "--out", str(readonly_disk / "m"), "--lm", "tiny"],
        "train": ["train", str(cfg)],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        target = argv[argv.index("--out") + 1] if "--out" in argv else str(readonly_disk / "run")
        # The path, then (for commands that check before their work) what could not be made.
        assert err[-1].startswith(f"llavamed: error: {target}:"), (name, err)
        assert ": Read-only file system" in err[-1], (name, err)
        assert not any("Traceback" in line for line in err), name


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `llavamed ... | head`: a broken pipe is an OSError (EPIPE), so the OSError clause caught
    # it first and re-raised it as a traceback; the quiet exit 141 was never reached.
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes a byte
    cmd = "from llavamed.cli import main; raise SystemExit(main())"
    args = ["train", str(CONFIGS / "stage1_alignment.yaml"), "--print-config"]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", cmd, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


def test_eval_commands_take_a_run_folder_as_serve_does(tiny_llava_dir, tmp_path, capsys):
    """`--model runs/x` means runs/x/checkpoint-final for serve, chat, web and train's model.from;
    eval vqa and eval answer said "config.json missing". A run folder's answers are the
    checkpoint's own: resuming through the direct path generates nothing new."""
    import shutil

    from eval_fixtures import qa50, vqa_rad

    run = tmp_path / "run"
    shutil.copytree(tiny_llava_dir, run / "checkpoint-final")
    data = vqa_rad(tmp_path)
    vqa = ["eval", "vqa", "--dataset", "vqa-rad", "--data", str(data), "--out"]
    vqa += [str(tmp_path / "ev"), "--limit", "2", "--max-new-tokens", "2", "--bootstrap", "10"]
    assert main([*vqa, "--model", str(run)]) == 0, capsys.readouterr().err
    q, img = qa50(tmp_path)
    answer = ["eval", "answer", "--questions", str(q), "--images", str(img)]
    answer += ["--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]
    assert main([*answer, "--model", str(run)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*vqa, "--model", str(run / "checkpoint-final")]) == 0
    assert main([*answer, "--model", str(run / "checkpoint-final")]) == 0
    assert "0 answered, 2 already done" in capsys.readouterr().err
    assert len((tmp_path / "ev" / "answers.jsonl").read_text().splitlines()) == 2
    # A folder that is neither says what it looked for.
    assert main([*answer, "--model", str(tmp_path / "nowhere")]) == 1
    assert "no config.json (and no checkpoint-final/ inside)" in capsys.readouterr().err
    # A run that has not finished, or its resume state, is named as such (as train's model.from
    # does): it was the same "not a checkpoint folder".
    unfinished = tmp_path / "stage2"
    (unfinished / "checkpoints" / "step-0000003").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("stage: instruct\n")
    for model in (unfinished, unfinished / "checkpoints" / "step-0000003"):
        assert main([*vqa, "--model", str(model)]) == 1
        err = capsys.readouterr().err
        assert "training run that has not finished" in err and "re-run its `llavamed train`" in err


def test_data_domains_refuses_a_file_without_captions_instead_of_erasing_its_labels(
    tmp_path, capsys
):
    """`data domains --in alignment.json --out alignment.json` (a LLaVA conversation list: no
    fig_caption) wrote every figure as "other" over its own labels, as JSONL over the JSON list."""
    import json

    mri = {"chest_xray": False, "mri": True, "histology": False, "gross": False, "ct_scan": False}
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]
    align = tmp_path / "alignment.json"
    align.write_text(json.dumps([{"id": "P_F1", "image": "a.jpg", "conversations": turns,
                                  "domain": mri}]))  # fmt: skip
    before = align.read_text()
    for tail in (["--out", str(align)], ["--eval"]):
        assert main(["data", "domains", "--in", str(align), *tail]) == 1
        assert "no record has a fig_caption" in capsys.readouterr().err
    assert align.read_text() == before
    # A figures file with one caption-less record still labels the others, and says so.
    figs = tmp_path / "figures.jsonl"
    recs = [{"pair_id": "P_F1", "fig_caption": "Axial T2-weighted MRI of the brain."},
            {"pair_id": "P_F2", "fig_caption": ""}]  # fmt: skip
    figs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["data", "domains", "--in", str(figs), "--out", str(figs)]) == 0
    assert "1 record(s) without a fig_caption" in capsys.readouterr().err
    labelled = [json.loads(line) for line in figs.read_text().splitlines()]
    assert labelled[0]["domain"]["mri"] and not any(labelled[1]["domain"].values())


def _llavamed(*args: str, **kw) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "llavamed", *args], capture_output=True, text=True, env=env, **kw
    )


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        (["data", "ingest", "pkgs", "--out", "x", "--bogus"], "llavamed data ingest"),
        (["quickstart", "--bogus"], "llavamed quickstart"),
        (["train", "cfg.yaml", "--bogus"], "llavamed train"),
        (["data", "--bogus"], "llavamed data"),
        (["--bogus"], "llavamed"),
    ],
)
def test_an_unknown_flag_shows_the_usage_of_the_command_it_was_given_to(argv, prog):
    """An unknown flag was reported by the top parser ("usage: llavamed [-h] [--version]
    COMMAND ...", "llavamed: error:"), not with the usage of the command that was mistyped."""
    out = _llavamed(*argv)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert lines[0].startswith(f"usage: {prog} [-h]")
    assert lines[-1] == f"{prog}: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("argv", [[], ["data"], ["eval"], ["model"], ["convert"]])
def test_a_missing_command_is_a_usage_error_on_stderr(argv):
    """`llavamed data` (no subcommand) exits 2, a usage error: its help goes to stderr, so
    `llavamed data > out` leaves no help text in `out`."""
    out = _llavamed(*argv)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"usage: {' '.join(['llavamed', *argv])} [-h]")


def test_library_log_lines_stay_off_stdout(tmp_path):
    """DeepSpeed, when installed, logs "[WARNING] ... Setting accelerator to CPU" through its own
    handler on stdout as transformers loads a model: `llavamed model init > out` had it in `out`."""
    out = _llavamed(
        "model", "init", "--out", str(tmp_path / "m"), "--lm", "tiny", "--vision", "tiny"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"wrote {tmp_path / 'm'}\n"


def test_ctrl_c_ends_the_progress_bar_before_its_one_line_message(tiny_llava_dir, tmp_path):
    """Ctrl-C in `eval vqa`, whose answer bar is closed only when garbage-collected, glued
    "llavamed: interrupted; ..." to the bar's last frame and then drew the bar again after it."""
    import re
    import signal

    world = tmp_path / "world"
    made = _llavamed("synth", "--out", str(world), "--articles", "1", "--vqa-images", "400",
                     "--image-size", "64", "--quiet")  # fmt: skip
    assert made.returncode == 0, made.stderr
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llavamed", "eval", "vqa", "--model", str(tiny_llava_dir),
           "--dataset", "vqa-rad", "--data", str(world / "vqa_rad"), "--out", str(tmp_path / "ev")]  # fmt: skip
    # SIG_DFL in the child, so Python raises KeyboardInterrupt even where SIGINT is ignored
    # (a background job of a non-interactive shell).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    err = b""
    # The bar has moved (answering is under way; not the instant tqdm draws it, in its __init__).
    while not re.search(rb"answers\[image\]: +\d+%\|[^|]*\| [1-9]", err):
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, err.decode(errors="replace")[-2000:]
        err += chunk
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=120)
    text = (err + rest).decode()
    assert proc.returncode == 130, text[-2000:]
    assert out == b"" and "Traceback" not in text
    assert text.endswith("\nllavamed: interrupted; re-run the same command to resume\n"), text[
        -300:
    ]


def test_eval_commands_take_no_progress_as_the_others_do(tiny_llava_dir, tmp_path, capsys):
    """quickstart, train, data ingest/instruct and eval judge take --no-progress; eval vqa and
    eval answer drew their bars with no way off (--no-progress was an unknown argument)."""
    from eval_fixtures import qa50, vqa_rad

    data = vqa_rad(tmp_path)
    vqa = ["eval", "vqa", "--dataset", "vqa-rad", "--data", str(data), "--model"]
    vqa += [str(tiny_llava_dir), "--out", str(tmp_path / "ev"), "--limit", "2"]
    vqa += ["--max-new-tokens", "2", "--bootstrap", "10", "--no-progress"]
    q, img = qa50(tmp_path)
    answer = ["eval", "answer", "--model", str(tiny_llava_dir), "--questions", str(q)]
    answer += ["--images", str(img), "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2"]
    for cmd in (vqa, [*answer, "--no-progress"]):
        assert main(cmd) == 0
        err = capsys.readouterr().err
        # Our own bars (unit "q"); the libraries' bars follow TQDM_DISABLE, which cli.main sets
        # for a new process (here tqdm was imported before it).
        assert "q/s]" not in err and "answers" not in err.replace("answered", ""), err
