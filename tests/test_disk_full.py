"""A full disk is reported as one clear error naming the folder, and leaves no half-written output.

The failures are real: writes to /dev/full fail in the kernel with ENOSPC, as on a full disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from llavamed.errors import StorageError
from llavamed.utils.io import atomic_dir, atomic_path, disk_full_error
from train_helpers import make_bright_dark, tiny_config

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full"),
    pytest.mark.usefixtures("one_thread"),
]


def _fill_the_disk() -> None:
    with open("/dev/full", "wb") as fh:
        fh.write(b"x" * 65536)
        fh.flush()


def test_atomic_writers_turn_enospc_into_a_storage_error(tmp_path):
    target = tmp_path / "out" / "report.json"
    with pytest.raises(StorageError, match="out of disk space") as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            _fill_the_disk()
    assert str(target.parent) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENOSPC
    assert list(target.parent.iterdir()) == []  # neither the output nor its temp file

    with pytest.raises(StorageError):
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "model.safetensors").write_bytes(b"partial")
            _fill_the_disk()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_other_failures_pass_through_unchanged(tmp_path):
    # Plenty of space here, so a RuntimeError is not blamed on the disk.
    assert disk_full_error(RuntimeError("shape mismatch"), tmp_path) is None
    assert disk_full_error(OSError(errno.EACCES, "denied"), tmp_path) is None
    assert disk_full_error(ValueError("x"), tmp_path) is None
    # A folder that does not exist yet is measured on its nearest existing parent.
    full = disk_full_error(OSError(errno.ENOSPC, "full"), tmp_path / "not" / "yet")
    assert isinstance(full, StorageError) and "not/yet" in str(full)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with atomic_path(tmp_path / "a.bin"):
            raise RuntimeError("shape mismatch")


def test_training_checkpoint_on_a_full_disk_stops_cleanly(tmp_path, monkeypatch):
    from llavamed.train import run_training
    from llavamed.train import trainer as T

    data = make_bright_dark(tmp_path / "data", 16)
    cfg = tiny_config(data, tmp_path / "run", max_steps=4)
    cfg["output"]["save_every"] = 2

    def save_then_fill(self, tmp: Path) -> None:
        (tmp / "model.pt").write_bytes(b"partial checkpoint")
        _fill_the_disk()

    monkeypatch.setattr(T.Engine, "save", save_then_fill)
    with pytest.raises(StorageError, match="out of disk space") as info:
        run_training(cfg, progress=False)
    assert str(tmp_path / "run") in str(info.value)
    assert "resumes from its last checkpoint" in str(info.value)
    # The half-written checkpoint folder was removed, and no checkpoint claims to be complete.
    ckpts = tmp_path / "run" / "checkpoints"
    assert list(ckpts.iterdir()) == []
    assert not (tmp_path / "run" / "checkpoint-final").exists()


def test_a_checkpoint_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk):
    """safetensors reports ENOSPC as its own SafetensorError ("... (os error 28)"): `model init`
    and every checkpoint save ended in that traceback instead of the out-of-disk-space message."""
    from llavamed.model.compose import ModelSpec, init_checkpoint

    with pytest.raises(StorageError, match="out of disk space"):
        init_checkpoint(small_disk / "tiny", ModelSpec(lm="tiny", vision="tiny"))
    assert list(small_disk.iterdir()) == []


def test_checkpoint_files_follow_the_umask(tiny_llava_dir):
    """safetensors creates its files 0600: a checkpoint on a shared filesystem was unreadable to
    other users (a serving account) while its other files followed the umask."""
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in Path(tiny_llava_dir).iterdir()}
    assert "model.safetensors" in modes and ".llavamed-writer-pid" not in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
