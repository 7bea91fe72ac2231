"""``train.compile``: the LM's decoder layers compiled by ``torch.compile`` (Inductor).

Why the layers and not the whole model: between its matmuls a decoder layer runs a dozen small
memory-bound ops (RMSNorm in fp32, rotary embeddings, SiLU and the gate product, the autocast
casts and their gradients), each a pass over the activations; on a 2-core CPU they cost as much
as the matmuls. Inductor fuses them. The layers are alike, so one compiled graph serves all of
them; the embeddings, the vision tower, the projector and the packed 4-D mask stay eager, and
the per-step shapes (sequence lengths change with every length-grouped batch) are compiled as
dynamic once rather than once per length. Compiled in place (``nn.Module.compile``), so the
state dict keeps its keys and checkpoints load as before.
"""

from __future__ import annotations

import shutil

from llavamed.errors import ConfigError

# The single-process engine is what the tests run compiled. DDP wraps the compiled layers as
# they are (its gradient hooks sit on parameters, not modules), allowed though not run here.
# FSDP and DeepSpeed shard the layers' parameters themselves: refused rather than left to fail
# inside Inductor.
COMPILE_ENGINES = ("single", "ddp")

CPP_COMPILERS = ("g++", "c++", "clang++")


def have_cpp_compiler() -> bool:
    """Whether Inductor finds a C++ compiler for CPU code."""
    return any(shutil.which(c) for c in CPP_COMPILERS)


def check_can_compile(engine: str, device_type: str) -> None:
    """Refuse ``train.compile`` where it would fail at the first step, after the model has
    loaded and the data tokenized: another engine, or no C++ compiler for Inductor's CPU code."""
    if engine not in COMPILE_ENGINES:
        raise ConfigError(
            f"train.compile works with the {' and '.join(COMPILE_ENGINES)} engines, not "
            f"{engine}; unset it or use distributed.engine=ddp"
        )
    if device_type == "cpu" and not have_cpp_compiler():
        raise ConfigError(
            "train.compile: Inductor compiles C++ for the CPU and no C++ compiler (g++, c++ or "
            "clang++) is on PATH; install one (Debian: apt install g++) or unset train.compile"
        )


def compile_lm_layers(model) -> int:
    """Compile each decoder layer of the LLaVA model's LM in place; returns how many. Call it
    after LoRA and freezing, before the engine wraps the model."""
    layers = model.model.language_model.layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
