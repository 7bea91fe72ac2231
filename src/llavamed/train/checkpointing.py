"""Resume checkpoints: trainable weights, optimizer, scheduler, RNG and data position.

Layout: ``OUT/checkpoints/step-0000100/`` holding ``trainable.pt`` (trainable parameters only;
frozen ones are rebuilt from the config), ``optimizer.pt``, ``rng-rank{R}.pt`` and
``state.json`` (step, epoch, schedule position, tokens seen, world size, engine, and the images
skipped while training so far). A checkpoint is written into a
hidden temp folder and renamed into place, so a SIGKILL at any moment leaves either the previous
complete checkpoint or the new one, never a half-written one. The data position needs no sampler
state: the batch schedule is a pure function of (seed, epoch), so the step number is enough.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

from llavamed.errors import InputError, first_line

STATE = "state.json"
PREFIX = "step-"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"{PREFIX}{step:07d}"


def tmp_dir(out_dir: Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f".tmp-{PREFIX}{step:07d}"


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with ``state.json``), or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE).is_file())
    return done[-1] if done else None


def weights_fingerprint(model, samples: int = 64) -> str:
    """A short id of a model's weights as loaded: every tensor's name, shape, dtype and
    ``samples`` of its values spread over it. A run resumed on top of another ``model.from``
    (the checkpoint at that path trained again or replaced) would put its trained parts on
    frozen ones they never trained with; training changes nearly every value of a tensor it
    touches, so a few of each tell checkpoints apart at no real cost (milliseconds for a 7B)."""
    import hashlib

    import torch

    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                picked = flat[:: max(1, flat.numel() // samples)][:samples]
                h.update(picked.to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_WEIGHT_FILES = (".safetensors", ".bin", ".pt")


def files_fingerprint(folder: Path, samples: int = 64) -> str:
    """A short id of a checkpoint folder's weights as its files hold them, taken as
    :func:`weights_fingerprint` takes one of a loaded model (each tensor's name, shape, dtype and
    ``samples`` of its values spread over it) but read through a memory map without building the
    model: a few pages per tensor, milliseconds for a 7B. A finished run keeps this id of its
    ``model.from``, so a re-run tells whether the weights it started from have changed since
    without loading them. (Not equal to :func:`weights_fingerprint` of the same weights: the
    names on disk are not the model's.)"""
    import hashlib

    h = hashlib.sha1()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in _WEIGHT_FILES and p.is_file())
    for f in files:
        h.update(f"{f.name}|".encode())
        try:
            if f.suffix == ".safetensors":
                _hash_safetensors(f, h, samples)
            else:
                _hash_torch_file(f, h, samples)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise InputError(f, "unreadable weights file", _first_sentence(exc)) from exc
    return h.hexdigest()[:16]


def _picked(n: int, samples: int) -> range:
    return range(0, n, max(1, n // samples))[:samples]


def _hash_safetensors(f: Path, h, samples: int) -> None:
    """Sampled values of every tensor of a safetensors file, read at their byte offsets."""
    import numpy as np

    with f.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    data = np.memmap(f, dtype=np.uint8, mode="r") if f.stat().st_size > 8 + n else None
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        shape, (start, end) = tuple(info["shape"]), info["data_offsets"]
        h.update(f"{name}{shape}{info['dtype']};".encode())
        numel = math.prod(shape)
        if not numel or data is None:
            continue
        raw = data[8 + n + start : 8 + n + end]
        size = (end - start) // numel
        if size:  # whole elements; a sub-byte dtype is sampled byte by byte
            raw = raw.reshape(numel, size)
        else:
            numel = end - start
        h.update(raw[list(_picked(numel, samples))].tobytes())


def _hash_torch_file(f: Path, h, samples: int) -> None:
    """The same for a torch-pickled state dict (``pytorch_model.bin``), memory-mapped."""
    import torch

    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        sd = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise TypeError(f"not a state dict ({type(sd).__name__})")
    for name, t in sorted(sd.items()):
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
        flat = t.reshape(-1)
        if flat.numel():
            idx = torch.tensor(list(_picked(flat.numel(), samples)))
            h.update(flat[idx].contiguous().view(torch.uint8).numpy().tobytes())


def rng_state() -> dict:
    import numpy as np
    import torch

    st = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def begin(out_dir: Path, step: int) -> Path:
    """Create (or empty) the temp folder for checkpoint ``step``."""
    t = tmp_dir(out_dir, step)
    if t.exists():
        shutil.rmtree(t)
    t.mkdir(parents=True)
    return t


def write_rng(tmp: Path, rank: int) -> None:
    import torch

    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def commit(out_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write ``state.json`` last, rename the temp folder into place, prune old checkpoints."""
    tmp = tmp_dir(out_dir, step)
    (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    final = step_dir(out_dir, step)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune(out_dir, keep_last)
    return final


def prune(out_dir: Path, keep_last: int) -> None:
    root = checkpoint_root(out_dir)
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE).is_file())
    for p in done[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():  # temp folders of killed writers
        if p.name.startswith(".tmp-") and p.name != tmp_dir(out_dir, 0).name:
            step = int(p.name.rsplit("-", 1)[1])
            if done and step <= int(done[-1].name.rsplit("-", 1)[1]):
                shutil.rmtree(p, ignore_errors=True)


def _first_sentence(exc: BaseException) -> str:
    return first_line(exc).split(". ")[0][:160]


def damaged(path: Path, detail: str, way_on: str | None = None) -> InputError:
    """The error for a resume checkpoint that cannot be read (a file deleted or cut short, e.g.
    by a crash of the machine before the file system wrote it out): names the file and the way
    on (by default: delete its ``step-N`` folder), instead of a library's traceback."""
    if way_on is None:
        way_on = (
            f"Delete {path.parent} to resume from the checkpoint before it, or from step 0 if it "
            "was the only one"
        )
    return InputError(path, "damaged resume checkpoint", f"{detail}. {way_on}")


def read_state(ckpt: Path) -> dict:
    p = ckpt / STATE
    try:
        state = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(p, f"unreadable: {_first_sentence(exc)}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise damaged(p, "no step number in it")
    return state


def check_files(ckpt: Path, names: list[str]) -> None:
    """Each of ``names`` is in ``ckpt`` and not empty (the files a resume will read)."""
    for name in names:
        p = ckpt / name
        if not p.is_file():
            raise damaged(p, "file missing")
        if p.stat().st_size == 0:
            raise damaged(p, "empty file")


def load_file(path: Path, way_on: str | None = None):
    """``torch.load`` of a resume checkpoint's file; a cut-short file is a :func:`damaged` one."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError as exc:
        raise damaged(path, "file missing", way_on) from exc
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise damaged(path, f"unreadable: {_first_sentence(exc)}", way_on) from exc


def load_rng(ckpt: Path, rank: int, saved_world_size: int | None = None) -> None:
    """Restore this rank's RNG. A rank the saved run did not have (the run now has more
    processes) has no file and keeps its seed; a rank it had must find its file, or the resumed
    run would silently draw other dropout masks than the uninterrupted one."""
    p = ckpt / f"rng-rank{rank}.pt"
    if not p.exists():
        if saved_world_size is not None and rank < saved_world_size:
            raise damaged(p, "file missing")
        return
    set_rng_state(load_file(p))
