"""Domain renderers: ground-truth attributes -> a PIL image that looks like its modality.

``render(domain, attrs, rng, size)`` is the public entry; ``render_with_targets`` also returns the
pixel centres of the drawn findings (used to place arrows on article figures).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from llavamed.data.synth.attributes import domain_of
from llavamed.data.synth.render.common import make_canvas
from llavamed.data.synth.render.ct import render_ct
from llavamed.data.synth.render.gross import render_gross
from llavamed.data.synth.render.histology import render_histology
from llavamed.data.synth.render.mri import render_mri
from llavamed.data.synth.render.xray import render_chest_xray

_RENDERERS = {
    "chest_xray": render_chest_xray,
    "ct_scan": render_ct,
    "mri": render_mri,
    "histology": render_histology,
    "gross": render_gross,
}


def render_with_targets(
    domain: str, attrs, rng: np.random.Generator, size: int = 256, aspect: float | None = None
) -> tuple[Image.Image, list[tuple[float, float]]]:
    if domain not in _RENDERERS:
        raise ValueError(f"unknown MedSynth domain {domain!r}")
    if domain_of(attrs) != domain:
        raise ValueError(f"attributes of type {type(attrs).__name__} do not belong to {domain!r}")
    canvas = make_canvas(rng, size, aspect)
    img = _RENDERERS[domain](attrs, rng, canvas)
    return img, [canvas.px(u, v) for u, v in canvas.targets]


def render(
    domain: str, attrs, rng: np.random.Generator, size: int = 256, aspect: float | None = None
) -> Image.Image:
    """Draw one image of ``domain`` showing ``attrs``. Its shorter side is about ``size`` px and,
    unless ``aspect`` (width / height) is given, its aspect ratio is drawn from ``rng``.
    Radiology domains return mode "L", histology and gross pathology "RGB"."""
    return render_with_targets(domain, attrs, rng, size, aspect)[0]
