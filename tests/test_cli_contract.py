"""The command-line contract: a flag value out of range is a usage error (exit 2, the command's
usage line, the flag and its allowed range named), refused as the command line is read, before
any work; every command spells "no progress bars" --no-progress; and an output path that cannot
be written is one line naming it and the OS's reason, before any work, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llavamed.cli import main

LLM = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"]
SYNTH_TINY = ["--articles", "1", "--vqa-images", "22", "--image-size", "64", "--workers", "1"]


def _figures(tmp_path: Path) -> Path:
    figs = tmp_path / "figures.jsonl"
    figs.write_text(
        json.dumps({"pair_id": "a", "fig_caption": "Axial CT of the chest.", "image": "a.jpg"})
        + "\n"
    )
    return figs


# (command words, the rest of a valid command line, the bad flag and value, the range named).
# Every one of these exited 1 after parsing ("llavamed: error: --articles must be >= 1"), or
# later still (a --port out of range failed at bind time, a --top-p at the engine).
SYNTH = (["synth"], ["--out", "{tmp}/w"])
INSTRUCT = (["data", "instruct"], ["--figures", "{figs}", "--out", "{tmp}/o.json", *LLM])
JUDGE = (["eval", "judge"], ["--questions", "{figs}", "--answers", "{figs}", *LLM])
ALIGN = (["data", "align"], ["--figures", "{figs}", "--out", "{tmp}/a.json"])
INGEST = (["data", "ingest"], ["{tmp}", "--out", "{tmp}/c"])
SERVE = (["serve"], ["--model", "{tmp}/absent"])
WEB = (["web"], ["--model", "{tmp}/absent"])
CHAT = (["chat"], ["--model", "{tmp}/absent"])
FINITE_MIB = "a finite size in MiB of at least 1 byte"
RANGE_CASES = [
    (*SYNTH, ["--articles", "0"], ">= 1"),
    (*SYNTH, ["--image-size", "10"], ">= 64"),
    (*SYNTH, ["--vqa-images", "5"], ">= 22"),
    (*SYNTH, ["--train-closed", "0"], ">= 1"),
    (*SYNTH, ["--workers", "-1"], ">= 0"),
    (*SYNTH, ["--caption-pairs", "-1"], ">= 0"),
    (*SYNTH, ["--caption-pairs", "2", "--pairs-image-size", "10"], ">= 64"),
    (*INSTRUCT, ["--max-samples", "0"], ">= 1"),
    (*INSTRUCT, ["--few-shot", "-1"], ">= 0"),
    (*INSTRUCT, ["--min-turns", "0"], ">= 1"),
    (*INSTRUCT, ["--temperature", "inf"], "a finite number >= 0"),
    (*INSTRUCT, ["--max-tokens", "0"], ">= 1"),
    (*INSTRUCT, ["--concurrency", "0"], ">= 1"),
    (*INSTRUCT, ["--timeout", "nan"], "a finite number > 0"),
    (*INSTRUCT, ["--rpm", "0"], "a finite number > 0"),
    (*INSTRUCT, ["--tpm", "-1"], "a finite number > 0"),
    (*INSTRUCT, ["--max-retries", "-1"], ">= 0"),
    (*INSTRUCT, ["--price-in", "inf"], "a finite number >= 0"),
    (*INSTRUCT, ["--price-out", "-1"], "a finite number >= 0"),
    (*JUDGE, ["--max-tokens", "0"], ">= 1"),
    (*JUDGE, ["--temperature", "-1"], "a finite number >= 0"),
    (*JUDGE, ["--timeout", "0"], "a finite number > 0"),
    (*ALIGN, ["--max", "0"], ">= 1"),
    (*ALIGN, ["--cutoff-words", "0"], ">= 1"),
    (*INGEST, ["--workers", "0"], ">= 1"),
    (*INGEST, ["--min-size", "-1"], ">= 0"),
    (*INGEST, ["--max-side", "0"], ">= 1"),
    (*INGEST, ["--shard", "3/2"], "K must be in 0 .. 1"),
    (*INGEST, ["--shard", "2/0"], "N must be >= 1"),
    (*INGEST, ["--shard", "half"], "is not K/N"),
    # A range that depends on another flag, checked by the command: a usage error all the same.
    (*INGEST, ["--min-size", "32", "--max-side", "16"], "must be >= --min-size (32)"),
    (*SERVE, ["--max-batch-size", "0"], ">= 1"),
    (*SERVE, ["--max-queue", "0"], ">= 1"),
    (*SERVE, ["--max-tokens", "0"], ">= 1"),
    (*SERVE, ["--max-images", "0"], ">= 1"),
    (*SERVE, ["--prefix-cache", "-1"], ">= 0"),
    (*SERVE, ["--max-image-pixels", "0"], ">= 1"),
    (*SERVE, ["--max-prompt-tokens", "0"], ">= 1"),
    (*SERVE, ["--max-request-mb", "inf"], FINITE_MIB),
    (*SERVE, ["--max-image-mb", "1e-9"], FINITE_MIB),
    (*SERVE, ["--remote-timeout", "0"], "a finite number > 0"),
    (*SERVE, ["--port", "70000"], "in 0 .. 65535"),
    (*SERVE, ["--port", "-1"], "in 0 .. 65535"),
    (*WEB, ["--max-upload-mb", "nan"], FINITE_MIB),
    (*WEB, ["--port", "70000"], "in 1 .. 65535"),
    (*WEB, ["--temperature", "nan"], "a finite number >= 0"),
    (*CHAT, ["--temperature", "-1"], "a finite number >= 0"),
    (*CHAT, ["--top-p", "1.5"], "a finite number in [0, 1]"),
    (*CHAT, ["--max-tokens", "0"], ">= 1"),
    (["model", "init"], ["--out", "{tmp}/m", "--lm", "tiny"], ["--lm-layers", "0"], ">= 1"),
    (["convert", "biomedclip"], ["{tmp}/absent.bin", "{tmp}/t"], ["--num-heads", "0"], ">= 1"),
]


@pytest.mark.parametrize(
    ("words", "rest", "bad", "allowed"),
    RANGE_CASES,
    ids=[f"{' '.join(c[0])} {' '.join(c[2][-2:])}" for c in RANGE_CASES],
)
def test_a_value_out_of_range_is_a_usage_error_naming_the_flag_and_its_range(
    tmp_path, capsys, words, rest, bad, allowed
):
    figs = _figures(tmp_path)
    argv = [a.format(tmp=tmp_path, figs=figs) for a in [*words, *rest, *bad]]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    prog = "llavamed " + " ".join(words)
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"usage: {prog} [-h]"), err
    assert lines[-1].startswith(f"{prog}: error: argument {bad[-2]}: "), err
    assert allowed in lines[-1], err
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["data", "ingest", "{tmp}", "--out", "{tmp}/c", "--domains", "mri", "--no-domains"],
            "argument --domains: needs the domain classifier; drop --no-domains",
        ),
        (
            ["data", "domains", "--in", "{figs}"],
            "the following arguments are required: --out (unless --eval is given)",
        ),
    ],
    ids=["ingest --domains --no-domains", "domains without --out or --eval"],
)
def test_flags_that_cannot_go_together_are_a_usage_error(tmp_path, capsys, argv, message):
    """Found by the command rather than by argparse, and exited 1 as a failed run."""
    figs = _figures(tmp_path)
    argv = [a.format(tmp=tmp_path, figs=figs) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    prog = "llavamed " + " ".join(argv[:2])
    assert err[0].startswith(f"usage: {prog} [-h]") and err[-1] == f"{prog}: error: {message}"


def _llavamed(*args: str) -> subprocess.CompletedProcess:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("TQDM_DISABLE", None)
    return subprocess.run(
        [sys.executable, "-m", "llavamed", *args], capture_output=True, text=True, env=env
    )


def test_the_installed_command_exits_2_on_a_range_error(tmp_path):
    """The exit status a shell script sees, not only main()'s."""
    proc = _llavamed("synth", "--out", str(tmp_path / "w"), "--articles", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: llavamed synth [-h]")
    assert proc.stderr.splitlines()[-1] == (
        "llavamed synth: error: argument --articles: 0 must be >= 1"
    )
    assert not (tmp_path / "w").exists()


def test_argparse_types_take_the_ends_of_their_ranges():
    from llavamed.commands import finite_float, int_at_least, port_int, size_mib

    assert int_at_least(22)("22") == 22
    assert finite_float(0)("0") == 0.0 and finite_float(0, high=1)("1") == 1.0
    assert finite_float(0, above=True)("1e-9") == 1e-9
    assert size_mib(str(2**-20)) == 2**-20
    assert port_int("0") == 0 and port_int("65535") == 65535


# -- synth spells it --no-progress, as every other command does --------------------------------


def test_synth_takes_no_progress_and_still_takes_quiet(tmp_path):
    """`llavamed synth` alone said --quiet; scripts that use it keep working."""
    for flag in ("--no-progress", "--quiet"):
        out = tmp_path / flag.strip("-")
        proc = _llavamed("synth", "--out", str(out), *SYNTH_TINY, flag)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "%|" not in proc.stderr, (flag, proc.stderr)  # no tqdm bar
        assert (out / "manifest.json").is_file()
    # Without either, the bars are drawn: the flag is what turned them off.
    proc = _llavamed("synth", "--out", str(tmp_path / "bars"), *SYNTH_TINY)
    assert proc.returncode == 0 and "%|" in proc.stderr
    assert "--no-progress" in _llavamed("synth", "--help").stdout


def test_the_synth_docs_show_no_progress():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "medsynth.md").read_text()
    synopsis = doc[doc.index("llavamed synth --out DIR") :].split("```")[0]
    assert "[--no-progress]" in synopsis and "--quiet" not in synopsis


# -- an output that cannot be written: one line, before any work -------------------------------


def _proc_is_a_pseudo_fs() -> bool:
    return sys.platform.startswith("linux") and Path("/proc/self").is_dir()


def _bad_outputs(tmp_path: Path) -> dict[str, Path]:
    """Output folders that cannot be made or written, by kind."""
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    bad = {"under a file": afile / "sub"}
    if _proc_is_a_pseudo_fs():
        bad["under /proc"] = Path("/proc/llavamed-test/sub")
    if os.geteuid() != 0:  # root writes into a chmod 555 folder all the same
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        bad["read-only folder"] = locked / "sub"
    return bad


def _writers(tmp_path: Path, base: Path) -> dict[str, tuple[list[str], str]]:
    """Each command that writes outputs, with its output under ``base``; and the path the error
    must name."""
    from eval_fixtures import write_judge_inputs
    from pmc_fixtures import make_tarballs

    figs = _figures(tmp_path)
    pkgs = tmp_path / "pkgs"
    if not pkgs.exists():
        make_tarballs(pkgs)
    qs, ans = write_judge_inputs(tmp_path)
    src = tmp_path / "llava-med-src"  # enough of one for convert to reach its output check
    src.mkdir(exist_ok=True)
    (src / "config.json").write_text("{}")
    synth = ["synth", *SYNTH_TINY, "--no-progress"]
    return {
        "synth --out": ([*synth, "--out", str(base)], str(base)),
        "synth --contact-sheet": (
            [*synth, "--out", str(tmp_path / "w"), "--contact-sheet", str(base / "s.png")],
            str(base / "s.png"),
        ),
        "data ingest --out": (
            ["data", "ingest", str(pkgs), "--out", str(base), "--workers", "1", "--no-progress"],
            str(base),
        ),
        "data align --out": (
            ["data", "align", "--figures", str(figs), "--out", str(base / "a.json")],
            str(base / "a.json"),
        ),
        "data instruct --out": (
            ["data", "instruct", "--figures", str(figs), "--out", str(base / "o.json"), *LLM],
            str(base / "o.json"),
        ),
        "data instruct --report": (
            [
                "data",
                "instruct",
                "--figures",
                str(figs),
                "--out",
                str(tmp_path / "o.json"),
                "--report",
                str(base / "r.json"),
                *LLM,
            ],
            str(base / "r.json"),
        ),
        "data domains --out": (
            ["data", "domains", "--in", str(figs), "--out", str(base / "f.jsonl")],
            str(base / "f.jsonl"),
        ),
        "eval judge --out": (
            [
                "eval",
                "judge",
                "--questions",
                str(qs),
                "--answers",
                str(ans),
                "--out",
                str(base / "j.jsonl"),
                *LLM,
            ],
            str(base / "j.jsonl"),
        ),
        "model init --out": (
            ["model", "init", "--out", str(base), "--lm", "tiny", "--vision", "tiny"],
            str(base),
        ),
        "convert llava-med DST": (["convert", "llava-med", str(src), str(base)], str(base)),
        "convert biomedclip DST": (
            ["convert", "biomedclip", str(tmp_path / "open_clip_pytorch_model.bin"), str(base)],
            str(base),
        ),
    }


WRITERS = [
    "synth --out",
    "synth --contact-sheet",
    "data ingest --out",
    "data align --out",
    "data instruct --out",
    "data instruct --report",
    "data domains --out",
    "eval judge --out",
    "model init --out",
    "convert llava-med DST",
    "convert biomedclip DST",
]


def _refused_in_one_line(tmp_path, capsys, commands) -> None:
    """Each kind of bad output: exit 1 and one line, "llavamed: error: PATH: FLAG cannot be
    written: REASON", the OS's reason named; the user's file beside it untouched."""
    for kind, base in _bad_outputs(tmp_path).items():
        argv, named, flag = commands(base)
        capsys.readouterr()
        assert main(argv) == 1, (kind, capsys.readouterr().err)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], (kind, err)
        line = err[0]
        assert line.startswith(f"llavamed: error: {named}: "), (kind, line)
        assert f"{flag}cannot be written" in line, (kind, line)
        reason = {
            "under a file": f"{tmp_path / 'notes.txt'} is a file, not a folder",
            "under /proc": "cannot create /proc/llavamed-test: ",
            "read-only folder": "Permission denied",
        }[kind]
        assert reason in line, (kind, line)
        assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("writer", WRITERS)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, writer):
    """`data ingest --out /proc/x` (and align, domains, instruct, judge, synth, model init,
    convert) ended in a FileNotFoundError traceback, most after their work; a path under a
    file was "X: Not a directory" at the first write, after the work."""
    _refused_in_one_line(tmp_path, capsys, lambda base: (*_writers(tmp_path, base)[writer], ""))
    assert not (tmp_path / "w").exists()  # synth stopped before its world
    assert not (tmp_path / "o.json").exists()


def _vqa_rad(tmp_path: Path) -> Path:
    root = tmp_path / "vqa_rad"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (24, 24), (60, 20, 200)).save(root / "VQA_RAD Image Folder" / "i0.jpg")
    rec = {"qid": 0, "image_name": "i0.jpg", "question": "Is it?", "answer": "yes",
           "answer_type": "CLOSED", "question_type": "PRES", "phrase_type": "test_freeform"}  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps([rec]))
    return root


def _model_writers(tmp_path: Path, model: Path, writer: str):
    """A command that loads a model, as a function of its output's folder ``base``: (argv, the
    path the error must name, the flag or config key it must name)."""
    import yaml

    from eval_fixtures import qa50
    from train_helpers import make_bright_dark, tiny_config

    if writer == "eval vqa --out":
        data = _vqa_rad(tmp_path)
        return lambda base: (
            ["eval", "vqa", "--model", str(model), "--dataset", "vqa-rad", "--data", str(data),
             "--out", str(base), "--bootstrap", "10", "--no-progress"],
            str(base),
            "--out ",
        )  # fmt: skip
    if writer == "eval answer --out":
        questions, images = qa50(tmp_path)
        return lambda base: (
            ["eval", "answer", "--model", str(model), "--questions", str(questions),
             "--images", str(images), "--out", str(base / "a.jsonl"), "--max-new-tokens", "2",
             "--no-progress"],
            str(base / "a.jsonl"),
            "--out ",
        )  # fmt: skip
    if writer in ("train stage 0 output_dir", "train stage 0b output_dir"):
        from stage0_helpers import tiny_run, write_pairs
        from vqa_fixtures import make_vqa_rad, stage0b_cfg

        if writer == "train stage 0 output_dir":
            stage = {"stage": "vision", **tiny_run(write_pairs(tmp_path / "s0"), "unused")}
        else:
            stage = stage0b_cfg(make_vqa_rad(tmp_path / "rad", 8), "unused")
        cfg = tmp_path / "stage.yaml"
        cfg.write_text(yaml.safe_dump(stage))
        return lambda base: (
            ["train", str(cfg), f"output_dir={base}", "--no-progress"],
            str(base),
            "output_dir ",
        )
    assert writer == "train output.dir"
    cfg = tmp_path / "train.yaml"
    data = make_bright_dark(tmp_path / "train", 4)
    cfg.write_text(yaml.safe_dump(tiny_config(data, tmp_path / "run")))
    return lambda base: (
        ["train", str(cfg), f"output.dir={base}", "--no-progress"],
        str(base),
        "output.dir ",
    )


@pytest.mark.parametrize(
    "writer",
    [
        "eval vqa --out",
        "eval answer --out",
        "train output.dir",
        "train stage 0 output_dir",
        "train stage 0b output_dir",
    ],
)
def test_a_model_command_refuses_an_unwritable_output_before_loading_the_model(
    tiny_llava_dir, tmp_path, capsys, monkeypatch, writer
):
    """`eval vqa --out /proc/x` ended in a FileNotFoundError traceback at its folder's mkdir once
    the data had loaded, a path under a file in "X: Not a directory"; `train output.dir=/proc/x`
    in the same traceback, and stage 0 and 0b's `output_dir=/proc/x` at their out.mkdir;
    `eval answer --out /proc/x/a.jsonl` named the folder, not the flag."""
    from llavamed.eval import vqa_runner
    from llavamed.model import vision_tower
    from llavamed.train import trainer, vision_pretrain

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(vqa_runner, "_load_model", refuse)
    monkeypatch.setattr(trainer, "build_model", refuse)
    monkeypatch.setattr(vision_pretrain, "load_tower", refuse)  # stage 0 imports it by name
    monkeypatch.setattr(vision_tower, "load_tower", refuse)  # stage 0b imports it in the call
    _refused_in_one_line(tmp_path, capsys, _model_writers(tmp_path, tiny_llava_dir, writer))
    assert not (tmp_path / "run").exists()


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from llavamed.utils.io import unwritable_reason

    deep = tmp_path / "a" / "b" / "c"
    assert unwritable_reason(deep) is None
    assert sorted(tmp_path.iterdir()) == []  # the folders it made to try are gone again
    (tmp_path / "keep").mkdir()
    assert unwritable_reason(tmp_path / "keep") is None
    assert sorted((tmp_path / "keep").iterdir()) == []
    if _proc_is_a_pseudo_fs():
        reason = unwritable_reason("/proc/llavamed-test/x")
        assert reason is not None and reason.startswith("cannot create /proc/llavamed-test: ")


@pytest.mark.skipif(not _proc_is_a_pseudo_fs(), reason="needs /proc, a folder nothing is made in")
def test_the_shared_writers_refuse_a_folder_the_os_will_not_make_in_one_line(
    tiny_llava_dir, tmp_path
):
    """Callers that write without checking first (eval answer's answers log, called as a library:
    the command checks --out up front) ended in a FileNotFoundError traceback from the folder's
    mkdir."""
    from eval_fixtures import qa50
    from llavamed.errors import InputError
    from llavamed.eval.answer import answer_questions
    from llavamed.utils.io import JsonlAppender, atomic_write_json, exclusive_lock

    where = "/proc/llavamed-test/sub"
    why = "cannot create /proc/llavamed-test: No such file or directory"
    for write in (
        lambda: JsonlAppender(f"{where}/log.jsonl"),
        lambda: atomic_write_json(f"{where}/x.json", {}),
        lambda: exclusive_lock(f"{where}/.lock", "test").__enter__(),
    ):
        with pytest.raises(InputError, match=f"^{where}: cannot be written \\({why}\\)$"):
            write()
    q, img = qa50(tmp_path)
    with pytest.raises(InputError, match=f"^{where}: cannot be written \\({why}\\)$"):
        answer_questions(tiny_llava_dir, q, img, f"{where}/a.jsonl", progress=False)
