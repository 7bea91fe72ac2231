"""MedSynth audit regressions: a user's folder as --out, bad arguments caught before work, TIFF
figures byte-identical."""

from __future__ import annotations

import io

import pytest

from llavamed.cli import main
from llavamed.data.synth import generate_world
from llavamed.errors import ConfigError

TINY = ["--articles", "1", "--vqa-images", "22", "--image-size", "64", "--quiet", "--workers", "1"]


def test_a_users_folder_is_refused_not_overwritten(tmp_path):
    """`--out ~/data` holding the real SLAKE: its train.json was silently replaced."""
    out = tmp_path / "data"
    (out / "slake").mkdir(parents=True)
    (out / "slake" / "train.json").write_text('[{"real": 1}]')
    with pytest.raises(ConfigError, match="holds something else"):
        generate_world(out, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (out / "slake" / "train.json").read_text() == '[{"real": 1}]'
    assert sorted(p.name for p in out.rglob("*")) == ["slake", "train.json"]
    assert main(["synth", "--out", str(out), *TINY]) != 0
    assert (out / "slake" / "train.json").read_text() == '[{"real": 1}]'


def test_empty_folder_and_interrupted_world_are_still_accepted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_world(empty, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (empty / "manifest.json").is_file()
    (empty / "manifest.json").unlink()  # an interrupted run: the stamp is there, resume
    generate_world(empty, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (empty / "manifest.json").is_file()


def _exit_code(argv):
    """main()'s exit status: argparse exits (2) on a bad flag, a failed run returns 1."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "extra,code,message",
    [
        # A range argparse checks: a usage error naming the flag and its bound.
        (
            ["--caption-pairs", "5", "--pairs-image-size", "10"],
            2,
            "llavamed synth: error: argument --pairs-image-size: 10 must be >= 64",
        ),
        (
            ["--contact-sheet", "{tmp}"],
            1,
            "llavamed: error: --contact-sheet {tmp} is a folder: give a PNG file path",
        ),
        # Its folder is a file: failed after the world with "notes.txt: File exists".
        (
            ["--contact-sheet", "{tmp}/notes.txt/sub/sheet.png"],
            1,
            "llavamed: error: {tmp}/notes.txt/sub/sheet.png: --contact-sheet cannot be written: "
            "{tmp}/notes.txt is a file, not a folder",
        ),
    ],
    ids=["pairs-image-size", "contact-sheet-folder", "contact-sheet-under-a-file"],
)
def test_bad_late_arguments_fail_before_the_world_is_generated(
    tmp_path, extra, code, message, capsys
):
    out = tmp_path / "w"
    (tmp_path / "notes.txt").write_text("mine")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert _exit_code(["synth", "--out", str(out), *TINY, *extra]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == message.replace("{tmp}", str(tmp_path)), err
    assert "Traceback" not in err
    assert not out.exists()


def test_tiff_figures_are_byte_identical_from_one_save_to_the_next():
    """Pillow's libtiff writer left the pad byte after an odd-length strip uninitialised when
    saving into a BytesIO: the same figure gave different package bytes between runs."""
    import numpy as np
    from PIL import Image

    from llavamed.data.synth.articles import encode

    for k in range(6):
        rng = np.random.default_rng(k)
        img = Image.fromarray(rng.integers(0, 256, size=(96 + k, 181 + 2 * k, 3), dtype=np.uint8))
        seen = set()
        for j in range(40):
            # Churn the heap between saves, as rendering other figures does.
            junk = [bytearray(np.random.default_rng(j).bytes(int(n))) for n in (5000, 90000)]
            seen.add(encode(img, "tif"))
            del junk
        assert len(seen) == 1, (k, len(seen))
        data = seen.pop()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))


def _tree(root):
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resume_removes_the_temp_files_a_killed_run_left(tmp_path):
    """A kill between a temp file's write and its rename left `.PMC….tar.gz.<rand>.tmp` in
    packages/ (and `.<n>.jpg.<rand>.tmp` among the caption pairs) for good."""
    from llavamed.data.synth.pairs import write_caption_pairs

    kw = dict(articles=2, image_size=64, progress=False, vqa_images=22, seed=5)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    generate_world(clean, **kw)
    write_caption_pairs(clean / "caption_pairs", 4, seed=5, image_size=64, progress=False)
    generate_world(resumed, **kw)
    write_caption_pairs(resumed / "caption_pairs", 4, seed=5, image_size=64, progress=False)
    # What a kill -9 mid-run leaves: no manifest or index, a half-written temp file beside them.
    (resumed / "manifest.json").unlink()
    (resumed / "caption_pairs" / "figures.jsonl").unlink()
    pkg = next((resumed / "packages").glob("*.tar.gz"))
    (pkg.parent / f".{pkg.name}.k3x9q1.tmp").write_bytes(pkg.read_bytes()[:100])
    pkg.unlink()
    img = next((resumed / "caption_pairs" / "images").rglob("*.jpg"))
    (img.parent / f".{img.name}.zz81a.tmp").write_bytes(b"\xff\xd8")
    img.unlink()
    generate_world(resumed, **kw)
    write_caption_pairs(resumed / "caption_pairs", 4, seed=5, image_size=64, progress=False)
    assert not list(resumed.rglob("*.tmp"))
    assert _tree(resumed) == _tree(clean)


def test_sigkill_mid_synth_then_resume_gives_the_clean_world(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--articles", "24", "--vqa-images", "40", "--image-size", "96", "--seed", "2",
            "--workers", "2", "--quiet"]  # fmt: skip
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "llavamed", "synth", *args]
    proc = subprocess.Popen([*cmd, "--out", str(killed)], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / "packages").glob("*.tar.gz"))) >= 3:
            break
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers, all at once
    proc.wait()
    assert not (killed / "manifest.json").exists(), "finished before the kill: enlarge the world"
    assert subprocess.run([*cmd, "--out", str(killed)], timeout=300).returncode == 0
    assert subprocess.run([*cmd, "--out", str(clean)], timeout=300).returncode == 0
    assert _tree(killed) == _tree(clean)


@pytest.mark.parametrize(
    "flag,value,bound",
    [("--vqa-images", "5", "22"), ("--image-size", "10", "64"), ("--train-closed", "0", "1")],
)
def test_a_bad_value_is_refused_naming_the_flag_the_user_typed(
    tmp_path, capsys, flag, value, bound
):
    """The refusal named generate_world's parameter ("vqa_images must be >= 22"). Now a usage
    error: argparse names the flag as typed, with the value and its bound."""
    out = tmp_path / "w"
    args = ["synth", "--out", str(out), "--articles", "1", "--quiet", "--workers", "1"]
    assert _exit_code([*args, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: llavamed synth [-h]"), err
    assert err[-1].startswith(f"llavamed synth: error: argument {flag}: {value} must be >= {bound}")
    assert not out.exists()


def test_out_naming_a_file_is_refused_as_a_file(tmp_path, capsys):
    """`--out notes.txt` failed with a bare "notes.txt: File exists" from mkdir."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["synth", "--out", str(out), *TINY]) != 0
    assert "is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--seed", "-1"], "--seed: -1 must be in 0 .. 2**32-1"),
        (["--per-domain", "0"], "--per-domain: 0 must be >= 1"),
        (["--size", "10"], "--size: 10 must be >= 64"),
    ],
)
def test_contact_sheet_script_refuses_bad_values_in_one_line(tmp_path, capsys, extra, message):
    """`python -m llavamed.data.synth.contact_sheet` died with a traceback (numpy's
    "expected non-negative integer", PIL's "cannot write empty image")."""
    from llavamed.data.synth.contact_sheet import main as sheet_main

    with pytest.raises(SystemExit) as exc:
        sheet_main([str(tmp_path / "s.png"), *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_script_writes_a_png_atomically_into_a_new_folder(tmp_path):
    from PIL import Image

    from llavamed.data.synth.contact_sheet import main as sheet_main

    out = tmp_path / "new" / "sheet.png"
    assert sheet_main([str(out), "--per-domain", "1", "--size", "64", "--tile", "32"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (32, 5 * (32 + 44))
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]
