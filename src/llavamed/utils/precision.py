"""Pick bf16 or fp32 for the machine at hand (``precision: auto``).

Why: bf16 autocast is the fast path only where the hardware has bf16 arithmetic. On CPUs with
AVX512-BF16 or AMX it runs matmuls ~2-4x faster than fp32, but on an AVX2-only CPU PyTorch
emulates it and the same matmul is ~130x *slower* (a 1024x1024 matmul: 2.27 s against 0.017 s,
a training step of an 8-layer transformer ~19x; measured on an AVX2 AMD EPYC with ``benchmarks/precision.py``). A recipe that hard-codes bf16
therefore runs an hour-long quickstart on one laptop and a twenty-minute one on another, so
every stage that defaults to bf16 defaults to ``auto`` instead and resolves it here, once, and
saves the resolved value with its outputs.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from llavamed.errors import ConfigError

if TYPE_CHECKING:
    import torch

CHOICES = ("auto", "bf16", "fp32")

# Inference (chat, serve, web, eval) also takes fp16, for GPUs; the long torch names are
# accepted as spellings of the short ones, so every command reads the same vocabulary.
MODEL_DTYPES = ("fp32", "bf16", "fp16", "auto")
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 in hardware: AVX512-BF16 or AMX on x86 (PyTorch's own
    probes), the ``bf16`` feature on Arm (``/proc/cpuinfo``)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    # Arm exposes "bf16" in its Features line; x86 names it avx512_bf16 / amx_bf16 (probed above).
    return any(line.startswith("Features") and " bf16" in line for line in flags.splitlines())


def check_precision(name: str, key: str = "precision") -> None:
    """Raise ``ConfigError`` (naming ``key``) unless ``name`` is one of ``CHOICES``."""
    if name not in CHOICES:
        raise ConfigError(f"{key}={name!r}: choose one of {', '.join(CHOICES)}")


def resolve_precision(name: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where the device computes bf16 natively, else ``fp32``; ``bf16`` and
    ``fp32`` pass through. Raises ``ConfigError`` on anything else."""
    check_precision(name)
    if name != "auto":
        return name
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def torch_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a resolved precision."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def model_dtype(name: str | None) -> torch.dtype:
    """The weights dtype for inference: one of :data:`MODEL_DTYPES` (or a long torch name);
    ``None`` is fp32 and ``auto`` resolves as :func:`resolve_precision` does."""
    import torch

    short = DTYPE_ALIASES.get(name, name) if name is not None else "fp32"
    if short == "auto":
        return torch_dtype(resolve_precision("auto"))
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if short not in table:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(MODEL_DTYPES)}")
    return table[short]
