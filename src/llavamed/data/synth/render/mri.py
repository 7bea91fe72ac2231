"""Axial brain MRI. Tissue intensities follow the weighting: on T1 CSF is dark and white matter
brighter than grey; on T2 CSF is bright and white matter darker. Magnitude images carry Rician
noise and a smooth coil bias field. Patient left is image right (radiological convention)."""

from __future__ import annotations

import numpy as np

from llavamed.data.synth.attributes import MRIAttrs
from llavamed.data.synth.render.common import (
    Canvas,
    blur,
    ellipse,
    smooth_noise,
    soft_mask,
    to_gray_image,
)

# Tissue signal per weighting: (fat/scalp, bone, csf, grey, white, lesion core, edema, rim)
SIGNAL = {
    "T1": dict(
        fat=0.85,
        bone=0.06,
        marrow=0.55,
        csf=0.1,
        grey=0.42,
        white=0.62,
        core=0.2,
        edema=0.42,
        rim=0.95,
    ),
    "T2": dict(
        fat=0.6,
        bone=0.05,
        marrow=0.35,
        csf=0.95,
        grey=0.55,
        white=0.36,
        core=0.9,
        edema=0.7,
        rim=0.12,
    ),
}
CM = 0.8 / 15.0  # the head (~15 cm wide) spans ~0.8 short-side units


def render_mri(a: MRIAttrs, rng: np.random.Generator, c: Canvas):
    j = rng.uniform(-1, 1, size=10)
    gyri = smooth_noise(rng, c, 0.035)
    tex = smooth_noise(rng, c, 0.015)
    bias = smooth_noise(rng, c, 0.5)
    n1 = rng.standard_normal((c.h, c.w)).astype(np.float32)
    n2 = rng.standard_normal((c.h, c.w)).astype(np.float32)
    sig = SIGNAL[a.weighting]

    ru, rv = 0.34 + 0.015 * j[0], 0.43 + 0.015 * j[1]
    r_head = ellipse(c, 0, 0, ru, rv)
    img = np.zeros_like(c.u)

    def put(mask, value):
        nonlocal img
        img = img * (1 - mask) + value * mask

    put(soft_mask(r_head, 0.01), sig["fat"])  # scalp
    put(soft_mask(r_head / 0.94, 0.01), sig["bone"])  # outer table
    put(soft_mask(r_head / 0.92, 0.01), sig["marrow"])  # diploe
    put(soft_mask(r_head / 0.9, 0.01), sig["bone"])  # inner table
    put(soft_mask(r_head / 0.875, 0.01), sig["csf"])  # subarachnoid space
    brain_r = r_head / 0.85
    put(soft_mask(brain_r, 0.01), sig["grey"])
    # White matter core with a folded (gyral) border; sulci are thin CSF clefts in the cortex.
    wm_r = brain_r / (0.82 + 0.06 * gyri)
    put(soft_mask(wm_r, 0.05), sig["white"])
    sulci = (np.abs(gyri) < 0.12) & (brain_r < 0.97) & (wm_r > 1.0)
    put(sulci.astype(np.float32) * 0.8, sig["csf"])
    # Interhemispheric fissure and lateral ventricles (butterfly shape).
    fissure = soft_mask(np.abs(c.u) / 0.006, 0.5) * ((np.abs(c.v) > 0.22) & (brain_r < 1)).astype(
        np.float32
    )
    put(fissure, sig["csf"])
    vent = np.zeros_like(c.u)
    for sgn in (-1.0, 1.0):
        vent = np.maximum(
            vent, soft_mask(ellipse(c, sgn * 0.045, -0.03, 0.028, 0.13, sgn * 0.25), 0.1)
        )
    put(vent, sig["csf"])

    if a.lesion:
        sgn = 1.0 if a.hemisphere == "left" else -1.0
        cu, cv = sgn * (0.16 + 0.03 * j[2]), 0.12 * j[3]
        r = a.size_cm * CM / 2 * 1.2
        brain = soft_mask(brain_r / 0.97, 0.03)
        put(soft_mask(ellipse(c, cu, cv, r * 1.9, r * 1.7, j[4]), 0.3) * 0.8 * brain, sig["edema"])
        les = ellipse(c, cu, cv, r, r * (1 + 0.12 * j[5]), j[4])
        if a.ring_enhancement:
            put(soft_mask(les, 0.08), sig["rim"])
            put(soft_mask(les / 0.62, 0.12), sig["core"])
        else:
            put(
                soft_mask(les, 0.15),
                0.5 * (sig["core"] + sig["edema"]) if a.weighting == "T1" else sig["core"] * 0.9,
            )
        c.targets.append((cu, cv))

    img = img * (1 + 0.04 * tex * (img > 0.05))
    img = blur(img, 0.55 * c.s / 256) * (1 + 0.12 * bias)
    sigma = 0.025 + 0.008 * j[6]
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician magnitude noise
    return to_gray_image(img / (1.0 + 0.1 * (j[7] + 1)))
