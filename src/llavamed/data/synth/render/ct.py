"""Axial abdominal CT. The scene is built in Hounsfield units, then shown through a window
(level/width), which is what gives CT its look: fat dark grey, organs mid grey, bone and contrast
white, air black. Patient right is image left; anterior is up."""

from __future__ import annotations

import numpy as np

from llavamed.data.synth.attributes import CTAttrs
from llavamed.data.synth.render.common import (
    Canvas,
    blur,
    ellipse,
    smooth_noise,
    soft_mask,
    to_gray_image,
)

# Lesion centres (u, v) by organ and patient side.
LESION_SITES = {
    ("liver", "right"): (-0.2, -0.04),
    ("liver", "left"): (0.03, -0.13),
    ("kidney", "right"): (-0.17, 0.11),
    ("kidney", "left"): (0.17, 0.11),
}
CM = 0.9 / 34.0  # short-side units per cm: the body (~34 cm wide) spans ~0.9


def lesion_hu(organ: str, contrast: bool, density: str) -> float:
    """The lesion's attenuation, which the caption quotes too. A kidney lesion sits over the
    medulla; after contrast the medulla (90 HU) is darker than the cortex (182 HU), so a
    hypodense lesion is set against the medulla, or it would be brighter than what it covers."""
    enh = 1.0 if contrast else 0.0
    if organ == "liver":
        return 58 + 50 * enh + (-75.0 if density == "hypodense" else 75.0)
    if density == "hypodense":
        return (90.0 if contrast else 32.0) - 75.0
    return 32 + 150 * enh + (110.0 if contrast else 75.0)


def render_ct(a: CTAttrs, rng: np.random.Generator, c: Canvas):
    j = rng.uniform(-1, 1, size=12)
    tex = smooth_noise(rng, c, 0.02)
    bowel_tex = smooth_noise(rng, c, 0.06)
    grain = rng.standard_normal((c.h, c.w)).astype(np.float32)
    bowel = rng.uniform(-1, 1, size=(7, 3))

    enh = 1.0 if a.contrast else 0.0
    hu = np.full_like(c.u, -1000.0)
    # CT table under the patient.
    table = soft_mask(np.abs(c.v - 0.43) / 0.012, 0.4) * (np.abs(c.u) < 0.45)
    hu = np.maximum(hu, -1000 + 1200 * table)

    bru, brv = 0.44 + 0.02 * j[0], 0.34 + 0.02 * j[1]
    body = soft_mask(ellipse(c, 0, 0.04, bru, brv), 0.01)
    inner = soft_mask(ellipse(c, 0, 0.04, bru - 0.035 - 0.01 * j[2], brv - 0.035), 0.02)
    cavity = soft_mask(ellipse(c, 0, 0.03, bru - 0.065, brv - 0.07), 0.02)
    hu = hu * (1 - body) + (-100 + 15 * tex) * body  # subcutaneous fat
    hu = hu * (1 - inner) + 45 * inner  # abdominal wall muscle
    hu = hu * (1 - cavity) + (-90 + 10 * tex) * cavity  # intra-abdominal fat

    def put(mask, value):
        nonlocal hu
        hu = hu * (1 - mask) + value * mask

    # Bowel loops: fluid-filled or with gas, in the anterior abdomen.
    for bu, bv, br in bowel:
        m = soft_mask(ellipse(c, 0.22 * bu, -0.15 + 0.08 * bv, 0.035 + 0.01 * br, 0.03), 0.1)
        put(m * cavity, -600 + 300 * bowel_tex if br > 0.2 else 20 + 10 * bowel_tex)
    liver = (
        np.maximum(
            soft_mask(ellipse(c, -0.19, -0.03, 0.19, 0.2), 0.02),
            soft_mask(ellipse(c, 0.0, -0.13, 0.14, 0.08, 0.2), 0.03),
        )
        * cavity
    )
    put(liver, 58 + 50 * enh + 6 * tex)
    put(
        soft_mask(ellipse(c, 0.28, -0.02, 0.075, 0.12, -0.5), 0.03) * cavity,
        50 + 60 * enh + 6 * tex,
    )
    stomach = soft_mask(ellipse(c, 0.18, -0.17, 0.07, 0.05), 0.05) * cavity
    put(stomach, -950 + 30 * tex)
    for sgn in (-1.0, 1.0):
        kid = soft_mask(ellipse(c, sgn * 0.17, 0.11, 0.06, 0.085, sgn * 0.35), 0.04)
        put(kid, 32 + 150 * enh + 5 * tex)
        if a.contrast:  # corticomedullary phase: darker medulla inside the bright cortex
            put(soft_mask(ellipse(c, sgn * 0.165, 0.11, 0.03, 0.05, sgn * 0.35), 0.1), 90 + 5 * tex)
        put(soft_mask(ellipse(c, sgn * 0.075, 0.17, 0.04, 0.06), 0.05), 48)  # psoas
    put(soft_mask(ellipse(c, 0.025, 0.07, 0.024, 0.024), 0.1), 42 + 230 * enh)  # aorta
    put(soft_mask(ellipse(c, -0.04, 0.065, 0.026, 0.02), 0.1), 40 + 120 * enh)  # IVC
    put(soft_mask(ellipse(c, 0, 0.17, 0.065, 0.055), 0.05), 900)  # vertebral cortex
    put(soft_mask(ellipse(c, 0, 0.17, 0.053, 0.043), 0.05), 260 + 40 * tex)  # cancellous bone
    put(soft_mask(ellipse(c, 0, 0.26, 0.02, 0.05), 0.1), 700)  # spinous process
    put(soft_mask(ellipse(c, 0, 0.235, 0.022, 0.018), 0.1), 15)  # spinal canal

    if a.lesion:
        cu, cv = LESION_SITES[(a.organ, a.side)]
        cu += 0.015 * j[3]
        cv += 0.015 * j[4]
        r = a.size_cm * CM / 2 * 1.15
        les = soft_mask(ellipse(c, cu, cv, r * (1 + 0.1 * j[5]), r * (1 - 0.1 * j[5]), j[6]), 0.12)
        put(les, lesion_hu(a.organ, a.contrast, a.density) + 4 * tex)
        c.targets.append((cu, cv))

    hu = blur(hu, 0.6 * c.s / 256) + grain * (9 + 2 * j[7])
    level, width = (40.0, 400.0) if a.window == "soft tissue" else (60.0, 160.0)
    level += 5 * j[8]
    img = np.clip((hu - (level - width / 2)) / width, 0, 1)
    return to_gray_image(img)
