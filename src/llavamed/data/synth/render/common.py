"""Small numpy/PIL building blocks shared by the domain renderers.

Geometry is expressed in units of the image's shorter side, centred on the image centre, so
anatomy keeps its proportions whatever the aspect ratio (wider images get more background).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Canvas:
    h: int
    w: int
    u: np.ndarray  # x in short-side units, 0 at the centre
    v: np.ndarray  # y in short-side units, 0 at the centre, down is positive
    s: int  # short side in pixels
    targets: list[tuple[float, float]] = field(default_factory=list)  # finding centres, (u, v)

    def px(self, u: float, v: float) -> tuple[float, float]:
        return (self.w / 2 + u * self.s, self.h / 2 + v * self.s)


def make_canvas(rng: np.random.Generator, size: int, aspect: float | None = None) -> Canvas:
    """A canvas whose shorter side is about ``size`` and whose aspect ratio varies."""
    if aspect is None:
        aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(1.4))))
    else:
        rng.uniform()  # keep the stream aligned with the random-aspect case
    short = max(32, int(round(size * rng.uniform(0.85, 1.0))))
    if aspect >= 1:
        h, w = short, int(round(short * aspect))
    else:
        w, h = short, int(round(short / aspect))
    s = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx + 0.5 - w / 2) / s
    v = (yy + 0.5 - h / 2) / s
    return Canvas(h=h, w=w, u=u, v=v, s=s)


def ellipse(
    c: Canvas, cu: float, cv: float, ru: float, rv: float, angle: float = 0.0
) -> np.ndarray:
    """Signed 'radius' of an (optionally rotated) ellipse: < 1 inside."""
    du, dv = c.u - cu, c.v - cv
    if angle:
        ca, sa = np.cos(angle), np.sin(angle)
        du, dv = du * ca + dv * sa, -du * sa + dv * ca
    return np.sqrt((du / ru) ** 2 + (dv / rv) ** 2)


def soft_mask(r: np.ndarray, edge: float = 0.04) -> np.ndarray:
    """1 inside (r < 1), 0 outside, with a smooth transition of relative width ``edge``."""
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0).astype(np.float32)


def smooth_noise(rng: np.random.Generator, c: Canvas, cell: float) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with feature size ``cell`` (short-side units)."""
    n = max(2, int(round(1.0 / cell)))
    gh = max(2, int(round(n * c.h / c.s)) + 2)
    gw = max(2, int(round(n * c.w / c.s)) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((c.w, c.h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array (PIL's blur does not take float images)."""
    if sigma <= 0.2:
        return a
    rad = max(1, int(3 * sigma))
    x = np.arange(-rad, rad + 1, dtype=np.float32)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    out = np.pad(a, ((0, 0), (rad, rad)), mode="edge")
    acc = np.zeros_like(a)
    for i, kv in enumerate(k):
        acc += kv * out[:, i : i + a.shape[1]]
    out = np.pad(acc, ((rad, rad), (0, 0)), mode="edge")
    acc = np.zeros_like(a)
    for i, kv in enumerate(k):
        acc += kv * out[i : i + a.shape[0], :]
    return acc


def stroke_mask(c: Canvas, polylines: list[tuple[list[tuple[float, float]], float]]) -> np.ndarray:
    """Rasterise polylines given in (u, v) units with widths in short-side units, antialiased by
    drawing at 2x and downsampling."""
    scale = 2
    img = Image.new("L", (c.w * scale, c.h * scale), 0)
    d = ImageDraw.Draw(img)
    for pts, width in polylines:
        xy = [(p[0] * scale, p[1] * scale) for p in (c.px(u, v) for u, v in pts)]
        wpx = max(1, int(round(width * c.s * scale)))
        d.line(xy, fill=255, width=wpx, joint="curve")
        r = wpx / 2
        for x, y in (xy[0], xy[-1]):
            d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    img = img.resize((c.w, c.h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def bezier(p0, p1, p2, n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)
    pts = [
        (
            float((1 - ti) ** 2 * p0[0] + 2 * (1 - ti) * ti * p1[0] + ti**2 * p2[0]),
            float((1 - ti) ** 2 * p0[1] + 2 * (1 - ti) * ti * p1[1] + ti**2 * p2[1]),
        )
        for ti in t
    ]
    return pts


def to_gray_image(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb_image(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def font(px: float) -> ImageFont.ImageFont:
    return _default_font(max(8, int(px)))


# Keyed by the whole pixel size, not by font()'s argument: renderers pass fractions of the
# canvas (0.035 * side), which would each load the same font again.
@functools.cache
def _default_font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()
