"""MedSynth: a procedurally generated biomedical figure world with ground truth.

Public API (names other parts of llavamed rely on):

- :func:`generate_world` — PMC OA-style packages, VQA-RAD/SLAKE-shaped sets and a manifest;
- :func:`sample_attributes` / :func:`render` — images with known attributes on the fly;
- :func:`questions_for` — every applicable VQA question (with its answer) for an image.
"""

from llavamed.data.synth.attributes import (
    DOMAINS,
    attrs_from_dict,
    attrs_to_dict,
    sample_attributes,
)
from llavamed.data.synth.render import render, render_with_targets
from llavamed.data.synth.vqa import questions_for
from llavamed.data.synth.world import (
    DEFAULT_ARTICLES,
    DEFAULT_IMAGE_SIZE,
    GENERATOR_VERSION,
    generate_world,
)

__all__ = [
    "DEFAULT_ARTICLES",
    "DEFAULT_IMAGE_SIZE",
    "DOMAINS",
    "GENERATOR_VERSION",
    "attrs_from_dict",
    "attrs_to_dict",
    "generate_world",
    "questions_for",
    "render",
    "render_with_targets",
    "sample_attributes",
]
