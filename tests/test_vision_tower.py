"""The standalone vision tower's image geometry: stage 0's own pad-to-square path (a uint8 cache
of decoded images) against the LLaVA image processor every later stage and the saved tower use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from llavamed.model.processing import llava_image_processor
from llavamed.model.vision_tower import normalize_pixels, pad_to_square_uint8

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _both(img, size, mean, std):
    """(LLaVA processor, stage 0) pixel values of ``img``, in units of 1/255 before normalising."""
    llava = llava_image_processor(size, mean, std, pad=True)(images=[img], return_tensors="pt")
    ours = normalize_pixels(pad_to_square_uint8(img, size, mean).float()[None] / 255.0, mean, std)
    scale = torch.tensor(std).view(3, 1, 1) * 255
    return llava["pixel_values"][0] * scale, ours[0] * scale


@pytest.mark.parametrize("hw", [(24, 61), (61, 24), (41, 32), (300, 200)])
@pytest.mark.parametrize("size", [32, 224])
def test_stage0_pads_and_resizes_as_the_llava_processor(hw, size):
    # A mean whose 255 * m is a whole number, so both pick the same padding colour: the
    # placement of the image on the canvas, the resize and its interpolation must then agree
    # to the bit (an off-by-one centring or a bilinear resize changes thousands of values).
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    llava, ours = _both(img, size, [0.4, 0.2, 0.6], CLIP_STD)
    torch.testing.assert_close(ours, llava, rtol=0, atol=1e-3)


def test_with_clip_mean_only_the_padding_colour_differs_by_one_level():
    # Stage 0 pads with round(255 * mean) (123, 117, 104 for CLIP's mean), transformers'
    # LlavaImageProcessor with int(255 * mean) (122, 116, 104). Stage 0 keeps its rounding, so
    # its towers stay bit-identical to the ones already trained; the saved tower's processor (and
    # every later stage) pads one level darker in red and green, which bicubic resampling spreads
    # to at most 3 levels next to the image's edge and which the image itself never sees.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (24, 61, 3), dtype=np.uint8))
    llava, ours = _both(img, 224, CLIP_MEAN, CLIP_STD)
    diff = (llava - ours).abs()
    assert float(diff.max()) <= 3 + 1e-3
    # Blue's 255 * m (104.09) rounds and truncates alike: identical.
    assert float(diff[2].max()) < 1e-3
    # Away from the padding edge (bicubic reaches 2 source pixels, 2 * 224 / 61 output rows)
    # identical too: the image's own pixels are resampled alike.
    pad_top, scale = (61 - 24) // 2, 224 / 61
    edge_top, edge_bottom, reach = pad_top * scale, (pad_top + 24) * scale, 2 * scale
    middle = slice(math.ceil(edge_top + reach), math.floor(edge_bottom - reach))
    assert float(diff[:, middle].max()) < 1e-3
    # In the padding, red and green are one level apart.
    pad = diff[:2, : math.floor(edge_top - reach)]
    torch.testing.assert_close(pad, torch.ones_like(pad), rtol=0, atol=1e-3)
