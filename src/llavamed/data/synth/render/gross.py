"""Gross pathology photograph: a sliced specimen on a surgical towel or board under uneven light,
with a coloured lesion on the cut surface and a ruler or a scale bar for size."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from llavamed.data.synth.attributes import GrossAttrs
from llavamed.data.synth.render.common import (
    Canvas,
    blur,
    ellipse,
    font,
    smooth_noise,
    soft_mask,
    to_rgb_image,
)

BACKGROUNDS = {"green": (0.2, 0.42, 0.3), "blue": (0.2, 0.32, 0.52), "black": (0.08, 0.08, 0.09)}
ORGAN_RGB = {
    "kidney": (0.58, 0.3, 0.24),
    "liver": (0.46, 0.22, 0.12),
    "lung": (0.74, 0.52, 0.52),
    "spleen": (0.42, 0.15, 0.24),
}
LESION_RGB = {"white": (0.93, 0.9, 0.82), "yellow": (0.9, 0.74, 0.25), "red": (0.45, 0.04, 0.07)}
CM = 0.055  # short-side units per centimetre


def _organ_mask(c: Canvas, organ: str, edge_noise: np.ndarray) -> np.ndarray:
    u, v = c.u, c.v + 0.06
    wob = 1 + 0.05 * edge_noise
    if organ == "kidney":
        r = np.sqrt((u / 0.31) ** 2 + (v / 0.19) ** 2) / wob
        notch = ellipse(c, 0, -0.06 - 0.19, 0.09, 0.08)
        return soft_mask(r, 0.03) * (1 - soft_mask(notch, 0.1))
    if organ == "liver":
        t = np.clip((u + 0.38) / 0.76, 0, 1)
        rv = 0.25 * (1.05 - 0.7 * t)
        r = np.sqrt((u / 0.38) ** 2 + ((v + 0.03 * t) / rv) ** 2) / wob
        return soft_mask(r, 0.03)
    if organ == "lung":
        t = np.clip((v + 0.3) / 0.55, 0, 1)
        ru = 0.26 * (0.35 + 0.65 * t)
        r = np.sqrt((u / ru) ** 2 + (v / 0.3) ** 2) / wob
        return soft_mask(r, 0.03)
    # spleen: a crescent
    outer = np.sqrt((u / 0.34) ** 2 + ((v - 0.02) / 0.17) ** 2) / wob
    inner = ellipse(c, 0, -0.06 - 0.14, 0.3, 0.12)
    return soft_mask(outer, 0.03) * (1 - soft_mask(inner, 0.08))


def render_gross(a: GrossAttrs, rng: np.random.Generator, c: Canvas):
    j = rng.uniform(-1, 1, size=12)
    light = smooth_noise(rng, c, 0.6)
    edge = smooth_noise(rng, c, 0.12)
    tex = smooth_noise(rng, c, 0.02)
    tex2 = smooth_noise(rng, c, 0.08)
    les_edge = smooth_noise(rng, c, 0.04)
    grain = rng.standard_normal((c.h, c.w, 3)).astype(np.float32)
    glints = rng.random((8, 2))

    bg = np.array(BACKGROUNDS[a.background], dtype=np.float32)
    weave = (
        0.04 * np.sin(c.u * c.s * 1.3) * np.sin(c.v * c.s * 1.3) if a.background != "black" else 0.0
    )
    rgb = bg * (1 + 0.12 * tex2 + weave)[..., None]
    organ = _organ_mask(c, a.organ, edge)
    shadow = blur(organ, 4 * c.s / 256)
    shadow = np.roll(np.roll(shadow, int(0.02 * c.s), 0), int(0.015 * c.s), 1)
    rgb *= (1 - 0.45 * shadow)[..., None]

    orgc = np.array(ORGAN_RGB[a.organ], dtype=np.float32) * (1 + 0.06 * j[0])
    surface = orgc * (1 + 0.13 * tex + 0.08 * tex2)[..., None]
    if a.organ == "kidney":  # paler cortex around darker medulla
        med = soft_mask(ellipse(c, 0, -0.05, 0.2, 0.1), 0.2)
        surface *= (1 - 0.22 * med)[..., None]
    rgb = rgb * (1 - organ[..., None]) + surface * organ[..., None]

    cu, cv = 0.1 * j[1] - (0.06 if a.organ == "liver" else 0.0), -0.06 + 0.04 * j[2]
    if a.organ == "spleen":  # centred in the crescent's band, not on the edge of its cut-out
        cv = 0.025 + 0.02 * j[2]
    r = a.size_cm * CM / 2
    lr = np.sqrt(((c.u - cu) / r) ** 2 + ((c.v - cv) / (r * (1 + 0.1 * j[3]))) ** 2) / (
        1 + 0.12 * les_edge
    )
    les = soft_mask(lr, 0.12) * np.clip(organ * 1.5, 0, 1)
    lc = np.array(LESION_RGB[a.lesion_color], dtype=np.float32)
    rgb = rgb * (1 - les[..., None]) + (lc * (1 + 0.1 * tex)[..., None]) * les[..., None]
    c.targets.append((cu, cv))

    # Moist surfaces glint; light falls off across the field.
    gl = Image.new("L", (c.w, c.h), 0)
    dg = ImageDraw.Draw(gl)
    for gx, gy in glints:
        x, y = c.px((gx - 0.5) * 0.5, (gy - 0.5) * 0.3 - 0.06)
        rx, ry = 0.01 * c.s, 0.005 * c.s
        dg.ellipse((x - rx, y - ry, x + rx, y + ry), fill=64)
    rgb = rgb + (np.asarray(gl, dtype=np.float32) / 255.0 * organ)[..., None]
    rgb = rgb * (1 + 0.15 * light + 0.1 * j[4])[..., None]
    rgb = rgb + grain * 0.015
    img = to_rgb_image(rgb)

    d = ImageDraw.Draw(img)
    cm_px = CM * c.s
    if a.scale == "ruler":
        x0, x1 = c.w * 0.5 - 0.42 * c.s, c.w * 0.5 + 0.42 * c.s
        y0 = c.h * 0.5 + 0.33 * c.s
        y1 = y0 + 0.085 * c.s
        d.rectangle((x0, y0, x1, y1), fill=(236, 232, 214))
        n = int((x1 - x0 - 4) / cm_px)
        f = font(0.035 * c.s)
        for i in range(n + 1):
            x = x0 + 4 + i * cm_px
            d.line((x, y0, x, y0 + 0.035 * c.s), fill=(20, 20, 20), width=max(1, int(c.s / 200)))
            if i < n:
                xh = x + cm_px / 2
                d.line((xh, y0, xh, y0 + 0.018 * c.s), fill=(20, 20, 20), width=1)
            if 0 < i < n and i % 2 == 0:
                d.text((x - 0.01 * c.s, y0 + 0.04 * c.s), str(i), fill=(20, 20, 20), font=f)
    else:
        length = 2 if j[5] > 0 else 1
        col = (250, 250, 250) if a.background == "black" or j[6] > 0 else (10, 10, 10)
        x1 = c.w - 0.06 * c.s
        x0 = x1 - length * cm_px
        y = c.h - 0.08 * c.s
        d.rectangle((x0, y, x1, y + 0.018 * c.s), fill=col)
        d.text((x0, y - 0.06 * c.s), f"{length} cm", fill=col, font=font(0.045 * c.s))
    return img
