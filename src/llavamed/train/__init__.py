"""Training: stage-1 alignment, stage-2 instruction tuning and VQA fine-tuning in one loop
(:mod:`llavamed.train.trainer`); stage-0 vision pretraining lives in ``vision_pretrain``."""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "run_training"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import llavamed.train` stays cheap for the CLI's --help.
    if name in __all__:
        from llavamed.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
