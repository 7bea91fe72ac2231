"""Model side: composition, image/text processing, templates, checkpoint I/O and converters."""

from llavamed.model.checkpoint import checkpoint_template, load_llava, read_meta
from llavamed.model.compose import ModelSpec, build, init_checkpoint, save_checkpoint

__all__ = [
    "ModelSpec",
    "build",
    "checkpoint_template",
    "init_checkpoint",
    "load_llava",
    "read_meta",
    "save_checkpoint",
]
