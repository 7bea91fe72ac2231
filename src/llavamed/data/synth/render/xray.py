"""Frontal chest radiograph. Brightness is attenuation: air black, soft tissue grey, bone and
metal white. Patient right is image left, as on a real PA film."""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from llavamed.data.synth.attributes import ChestXrayAttrs
from llavamed.data.synth.render.common import (
    Canvas,
    bezier,
    blur,
    ellipse,
    font,
    smooth_noise,
    soft_mask,
    stroke_mask,
    to_gray_image,
)


def side_sign(side: str | None) -> float:
    """u-direction of a patient side on a frontal film (patient right = image left)."""
    return -1.0 if side == "right" else 1.0


LOBE_V = {"upper": -0.15, "lower": 0.07}


def render_chest_xray(a: ChestXrayAttrs, rng: np.random.Generator, c: Canvas):
    # All random draws happen up front and in a fixed number, whatever the attributes.
    j = rng.uniform(-1, 1, size=16)
    tex_lung = smooth_noise(rng, c, 0.03)
    tex_cons = smooth_noise(rng, c, 0.05)
    tex_low = smooth_noise(rng, c, 0.4)
    grain = rng.standard_normal((c.h, c.w)).astype(np.float32)
    marker = rng.random()
    u, v = c.u, c.v

    # Body fills the film: chest wall with sloping shoulders, arms at the edges of wide films.
    au = np.abs(u)
    shoulder = 0.5 - 0.9 * np.clip(-0.36 - v, 0, None) ** 1.2
    torso = np.clip((shoulder + 0.02 * j[0] - au) / 0.03, 0, 1)
    neck = soft_mask(ellipse(c, 0, -0.6, 0.12, 0.3), 0.05)
    arms = np.clip((au - 0.53) / 0.03, 0, 1) * np.clip((0.75 - au) / 0.05, 0, 1) * (v > -0.4)
    body = np.maximum(np.maximum(torso, neck), arms)
    att = 0.05 + 0.42 * body + 0.06 * torso * np.clip(au - 0.36, 0, None) / 0.12

    # Lungs: ellipses cut by the hemidiaphragm domes (the right one a little higher).
    lungs = np.zeros_like(u)
    for sgn in (-1.0, 1.0):
        cu = sgn * (0.2 + 0.01 * j[1])
        lung = soft_mask(ellipse(c, cu, -0.04, 0.16, 0.36), 0.07)
        dome = 0.16 + 2.8 * (au - 0.2) ** 2 + (-0.025 if sgn < 0 else 0.0)
        lung *= np.clip((dome - v) / 0.02, 0, 1)
        lungs = np.maximum(lungs, lung)
    # Vascular markings fan out from the hila and fade towards the periphery.
    hil_d = np.sqrt((au - 0.09) ** 2 + (v + 0.03) ** 2)
    hilum = np.exp(-((hil_d / 0.07) ** 2))
    vessels = np.clip(tex_lung, 0, None) * np.exp(-hil_d / 0.18)
    lung_val = 0.14 + 0.05 * vessels + 0.02 * tex_lung + 0.14 * hilum
    att = att * (1 - lungs) + lung_val * lungs

    # Heart: the cardiothoracic ratio is the cardiomegaly cue (~0.4 normal, ~0.6 enlarged).
    hr = 0.205 if a.cardiomegaly else 0.125
    heart = soft_mask(ellipse(c, 0.045 + hr * 0.25, 0.13, hr, 0.12 + 0.2 * hr, -0.35), 0.04)
    heart *= np.clip((0.25 - v) / 0.02, 0, 1)  # cut by the diaphragm
    att = att * (1 - heart) + 0.55 * heart

    # Bones: spine with disc spaces, posterior ribs, clavicles.
    spine = soft_mask(np.abs(u) / 0.035, 0.2) * body
    att += spine * (0.07 + 0.03 * np.cos(v * 2 * np.pi / 0.055))
    ribs = np.zeros_like(u)
    x = au - 0.04
    rib_extent = np.clip((0.4 - au) / 0.03, 0, 1) * (au > 0.04)
    rib_base = -0.45 * x + 1.9 * x**2
    for k in range(10):  # posterior ribs: arcs rising from the spine, curving down laterally
        v0 = -0.4 + k * 0.066 + 0.005 * j[2]
        vc = v0 + rib_base
        band = np.clip(1 - ((v - vc) / 0.012) ** 2, 0, None) * rib_extent
        ribs = np.maximum(ribs, band)
    att += 0.075 * ribs * body
    for sgn in (-1.0, 1.0):
        clav = stroke_mask(c, [([(sgn * 0.05, -0.36), (sgn * 0.32, -0.43)], 0.03)])
        att += 0.13 * clav
    trachea = soft_mask(np.abs(u) / 0.028, 0.3) * (v < -0.1)
    att -= 0.12 * trachea * body

    # Findings inside the lungs.
    if a.consolidation:
        sg = side_sign(a.consolidation_side)
        cu, cv = sg * (0.2 + 0.02 * j[3]), LOBE_V[a.consolidation_lobe] + 0.02 * j[4]
        blob = np.exp(-(ellipse(c, cu, cv, 0.12, 0.1) ** 2) * 1.2) * (0.85 + 0.2 * tex_cons)
        att += 0.42 * np.clip(blob, 0, 1) * lungs
        c.targets.append((cu, cv))
    if a.nodule:
        sg = side_sign(a.nodule_side)
        cu, cv = sg * (0.2 + 0.03 * j[5]), LOBE_V[a.nodule_lobe] + 0.03 * j[6]
        r = a.nodule_size_mm / 330.0
        att += 0.38 * soft_mask(ellipse(c, cu, cv, r, r * (1 + 0.1 * j[7])), 0.18)
        c.targets.append((cu, cv))
    if a.effusion:
        sg = side_sign(a.effusion_side)
        level = 0.05 + 0.03 * j[8]
        meniscus = level - 0.9 * np.clip(np.abs(u) - 0.2, 0, None) * (u * sg > 0)
        fluid = np.clip((v - meniscus) / 0.03, 0, 1) * (u * sg > 0.02)
        fluid *= soft_mask(ellipse(c, sg * 0.2, 0.08, 0.2, 0.3), 0.05)
        # Fluid takes the place of aerated lung, and attenuation adds up along the ray: a nodule,
        # a consolidation or the heart border behind the fluid adds to it instead of vanishing
        # (it replaced them, hiding ~10% of same-side lower-lobe nodules). Outside the lung the
        # fluid matches soft tissue, so the hemidiaphragm's outline is lost as on a real film.
        att = att + (0.34 + 0.02 * tex_lung) * fluid * lungs
        c.targets.append((sg * 0.26, level + 0.12))

    # Devices: radio-opaque, drawn a few pixels wide so they survive a 128 px resize.
    lines: list = []
    if a.ett:
        tip = -0.17 + 0.02 * j[9]
        lines.append(([(0.0, -0.7), (0.0, tip)], 0.03))
    if a.central_line:
        sg = side_sign(a.central_line_side)
        lines.append(
            (bezier((sg * 0.36, -0.44), (sg * 0.1, -0.36 + 0.02 * j[10]), (-0.03, -0.04)), 0.022)
        )
    if a.pacemaker:
        gu, gv = 0.28 + 0.02 * j[11], -0.33 + 0.02 * j[12]
        lines.append((bezier((gu, gv), (0.12, -0.3), (0.02, 0.16)), 0.014))
        lines.append((bezier((gu, gv), (0.18, -0.1), (0.1, 0.1)), 0.014))
        lines.append(([(gu - 0.04, gv), (gu + 0.04, gv)], 0.075))
    if lines:
        metal = stroke_mask(c, lines)
        att = att + (1.0 - att) * 0.92 * metal

    # Film look: exposure gradient, slight unsharpness, quantum noise.
    att = att * (1 + 0.05 * tex_low)
    att = blur(att, 0.5 * c.s / 256)
    att = np.clip(att, 0, 1) ** (0.9 + 0.1 * j[13])
    att += grain * (0.018 + 0.006 * j[14])
    img = to_gray_image(att)
    if marker < 0.35:  # an "R" side marker on the patient's right, as technologists place it
        d = ImageDraw.Draw(img)
        d.text(
            (c.w * 0.5 - 0.44 * c.s, c.h * 0.5 - 0.3 * c.s), "R", fill=235, font=font(c.s * 0.07)
        )
    return img
