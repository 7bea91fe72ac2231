"""Read a checkpoint folder's weights whatever the shard layout: ``model.safetensors``,
``pytorch_model.bin``, their sharded ``*.index.json`` variants, or a single weights file."""

from __future__ import annotations

import json
from pathlib import Path

from llavamed.errors import InputError, first_line

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "open_clip_model.safetensors",
)
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _load_file(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch.load's message advises weights_only=False, which runs arbitrary code from an
        # untrusted file; keep only the first sentence, which says what failed.
        first = first_line(exc).split(". ")[0]
        raise InputError(path, "unreadable weights file", first) from exc
    # A training checkpoint (open_clip's) keeps its weights under "state_dict".
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    # A pickle holding a list, a number or other objects failed later with an AttributeError
    # ("'int' object has no attribute 'startswith'") deep in a converter.
    if not isinstance(sd, dict):
        raise InputError(path, "not a state dict", f"holds a {type(sd).__name__}")
    bad = next(
        (k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)),
        None,
    )
    if bad is not None:
        raise InputError(path, "not a state dict", f"{bad!r} is not a named tensor")
    return sd


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file) of a sharded checkpoint's index."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(index, "malformed index", first_line(exc)) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(index, "malformed index", "no weight_map object")
    bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise InputError(index, "malformed index", f"no shard file named for {bad[0]}")
    return weight_map


def load_state_dict(src: str | Path) -> dict:
    src = Path(src)
    if src.is_file():
        return _load_file(src)
    if not src.exists():  # said "no weights found (expected one of ...)" of a mistyped path
        raise InputError(src, "not found")
    for name in INDEX_FILES:
        index = src / name
        if index.exists():
            from tqdm import tqdm

            weight_map = _read_index(index)
            out: dict = {}
            found_in: dict[str, str] = {}  # key -> the shard it was read from
            shards = sorted(set(weight_map.values()))
            # A 7B checkpoint's shards take minutes to read: say so (tqdm honours TQDM_DISABLE,
            # which --no-progress/--quiet set).
            for shard in tqdm(shards, desc=f"reading {src.name}", unit="shard", leave=False):
                if not (src / shard).exists():
                    raise InputError(src / shard, "missing shard listed in " + name)
                tensors = _load_file(src / shard)
                # A key held by two shards (a stale shard from another save) has two values;
                # taking whichever shard sorts last would ignore the index silently.
                twice = sorted(k for k in tensors if k in found_in)
                if twice:
                    raise InputError(
                        index,
                        "a key is in more than one shard",
                        f"{twice[0]} in {found_in[twice[0]]} and {shard}"
                        + (f" (+{len(twice) - 1} more)" if len(twice) > 1 else ""),
                    )
                found_in.update(dict.fromkeys(tensors, shard))
                out.update(tensors)
            missing = set(weight_map) - set(out)
            if missing:
                raise InputError(
                    index, "index names keys absent from shards", ", ".join(sorted(missing)[:5])
                )
            return out
    for name in WEIGHT_FILES:
        if (src / name).exists():
            return _load_file(src / name)
    raise InputError(src, "no weights found", f"expected one of {WEIGHT_FILES + INDEX_FILES}")


def check_all_used(source_keys, used, where: str) -> None:
    unused = sorted(set(source_keys) - set(used))
    if unused:
        raise InputError(
            where,
            "unmapped source keys",
            ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""),
        )
