"""H&E-stained section. Haematoxylin (nuclei) and eosin (cytoplasm, stroma) concentration maps are
turned into colour with the Beer-Lambert law and the Ruifrok-Johnston stain vectors, which is
what makes the purple-on-pink look of real slides."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from llavamed.data.synth.attributes import HistologyAttrs
from llavamed.data.synth.render.common import Canvas, blur, smooth_noise, to_rgb_image

H_VEC = np.array([0.65, 0.70, 0.29], dtype=np.float32)
E_VEC = np.array([0.07, 0.99, 0.11], dtype=np.float32)
MAG_SCALE = {100: 0.8, 200: 1.0, 400: 1.25}
MAX_NUCLEI = 700


def render_histology(a: HistologyAttrs, rng: np.random.Generator, c: Canvas):
    m = MAG_SCALE[a.magnification]
    area = c.w * c.h / c.s**2
    pos = rng.random((MAX_NUCLEI, 2)).astype(np.float32)
    shape = rng.uniform(-1, 1, (MAX_NUCLEI, 4)).astype(np.float32)
    glands = rng.random((5, 3)).astype(np.float32)
    clusters = rng.random((3, 2)).astype(np.float32)
    lymph = rng.standard_normal((3, 120, 2)).astype(np.float32)
    fiber = smooth_noise(rng, c, 0.025)
    fiber2 = smooth_noise(rng, c, 0.012)
    holes = smooth_noise(rng, c, 0.2)
    chroma = smooth_noise(rng, c, 0.006)
    grain = rng.standard_normal((c.h, c.w, 3)).astype(np.float32)
    stain_jitter = rng.uniform(-1, 1, 4)

    # Eosin: fibrous stroma with some empty (white) spaces.
    eos = 0.42 + 0.16 * fiber + 0.08 * fiber2
    eos = eos * np.clip((1.35 - holes) / 0.15, 0.05, 1)
    hem = Image.new("L", (c.w, c.h), 0)
    dh = ImageDraw.Draw(hem)
    eos_img = Image.new("L", (c.w, c.h), 0)
    de = ImageDraw.Draw(eos_img)
    lumen_img = Image.new("L", (c.w, c.h), 0)
    dl = ImageDraw.Draw(lumen_img)
    s = c.s

    atyp = a.nuclear_atypia
    # Nucleus outlines for every possible cell at once (vectorised: this is the hot loop).
    th = np.linspace(0, 2 * np.pi, 9, endpoint=False, dtype=np.float32)
    radius = s * m * (0.026 * (1 + 0.3 * shape[:, 0]) if atyp else 0.011 * (1 + 0.12 * shape[:, 0]))
    elong = 1 + (0.35 if atyp else 0.2) * np.abs(shape[:, 1])
    ang = shape[:, 2:3] * np.pi
    jag = 1 + (0.22 if atyp else 0.05) * np.sin(3 * th[None] + 7 * shape[:, 3:4])
    px_ = (radius * elong)[:, None] * np.cos(th)[None] * jag
    py_ = radius[:, None] * np.sin(th)[None] * jag
    outline_x = (px_ * np.cos(ang) - py_ * np.sin(ang)).tolist()
    outline_y = (px_ * np.sin(ang) + py_ * np.cos(ang)).tolist()
    gain = 1.25 if atyp else 1.0

    def nucleus(x: float, y: float, k: int, value: float) -> None:
        pts = [(x + dx, y + dy) for dx, dy in zip(outline_x[k], outline_y[k], strict=True)]
        dh.polygon(pts, fill=int(min(255, value * gain * 150)))

    k = 0
    gland_nuclei = []
    if a.gland_formation:
        for gi in range(3 + int(glands[4, 0] * 2.99)):
            gx, gy = glands[gi, 0] * c.w, glands[gi, 1] * c.h
            rl = s * (0.05 + 0.03 * glands[gi, 2])
            re = rl + s * 0.045
            de.ellipse((gx - re, gy - re * 0.85, gx + re, gy + re * 0.85), fill=190)
            dl.ellipse((gx - rl, gy - rl * 0.85, gx + rl, gy + rl * 0.85), fill=255)
            nn = int(2 * np.pi * (rl + s * 0.03) / (s * 0.02))
            for t in range(nn):
                th = 2 * np.pi * t / nn
                rr = rl + s * 0.03
                gland_nuclei.append((gx + rr * np.cos(th), gy + rr * 0.85 * np.sin(th)))
    for x, y in gland_nuclei:
        nucleus(x, y, k % MAX_NUCLEI, 0.95)
        k += 1
    # Stromal / tumour cell nuclei: the count is the cellularity cue. Atypical nuclei are about
    # five times larger, so the same count would cover ~80% of a highly cellular field and hide
    # the glands and lymphocytes; the count is scaled down to keep the field about half covered.
    density = (170 if a.cellularity == "low" else 620) * (0.45 if atyp else 1.0)
    n_cells = min(MAX_NUCLEI - 1, int(density * area / (m * m)))
    for i in range(n_cells):
        nucleus(float(pos[i, 0] * c.w), float(pos[i, 1] * c.h), i, 0.85 + 0.1 * float(shape[i, 3]))
    if a.inflammation:  # dense aggregates of small, dark, round lymphocytes
        for ci in range(2 + int(clusters[2, 0] > 0.5)):
            cx, cy = clusters[ci, 0] * c.w, clusters[ci, 1] * c.h
            for lx, ly in lymph[ci]:
                x, y = cx + lx * s * 0.06, cy + ly * s * 0.045
                r = s * 0.0085 * m
                dh.ellipse((x - r, y - r, x + r, y + r), fill=230)

    sigma = 0.5 * s / 256
    hmap = blur(np.asarray(hem, dtype=np.float32) / 150.0, sigma) * (1 + 0.25 * chroma)
    emap = np.asarray(eos_img, dtype=np.float32) / 255.0
    lumen = blur(np.asarray(lumen_img, dtype=np.float32) / 255.0, sigma)
    eos = np.maximum(eos, emap * (0.75 + 0.1 * fiber2)) * (1 - 0.95 * lumen)
    hmap = hmap * (1 - lumen)  # a gland lumen is empty space: no stromal nucleus shows through it
    hem_strength = 1.5 + 0.2 * stain_jitter[0]
    eos_strength = 0.95 + 0.2 * stain_jitter[1]
    od = hmap[..., None] * H_VEC * hem_strength + eos[..., None] * E_VEC * eos_strength
    od += 0.03 + 0.01 * stain_jitter[2]
    rgb = np.exp(-od) + grain * 0.012
    return to_rgb_image(rgb)
