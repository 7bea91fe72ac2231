"""Build small PMC OA packages (tarballs or unpacked folders) from the hand-written JATS files in
tests/data/pmc, with images in the formats PMC ships: JPEG, palette PNG, GIF, CMYK TIFF, 16-bit
PNG, grayscale TIFF."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data" / "pmc"


def noise_image(seed: int, size=(64, 48), mode="RGB") -> Image.Image:
    """Seeded random pixels in ``mode`` (RGB, L, P, CMYK or I;16), so each figure differs."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE)
    return img.convert(mode)


def encoded(img: Image.Image, fmt: str) -> bytes:
    """``img`` saved as ``fmt`` (JPEG, PNG, GIF, TIFF): a figure file's bytes in a package."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def article_files(pmcid: str) -> dict[str, bytes]:
    """File name -> bytes for one fixture article (its .nxml plus images and a PDF)."""
    files = {f"{pmcid}.nxml": (DATA / f"{pmcid}.nxml").read_bytes()}
    if pmcid == "PMC1000001":
        files.update(
            {
                "pmc-1000001-g001.jpg": encoded(noise_image(1), "JPEG"),
                "pmc-1000001-g001.gif": encoded(noise_image(101, (16, 12), "P"), "GIF"),  # preview
                "pmc-1000001-g002.jpg": encoded(noise_image(2, mode="L"), "JPEG"),
                "pmc-1000001-g003.png": encoded(noise_image(3, mode="P"), "PNG"),
                "pmc-1000001-g004.gif": encoded(noise_image(4, mode="P"), "GIF"),
                "pmc-1000001-g005.tif": encoded(noise_image(5, mode="CMYK"), "TIFF"),
                # g006.png is missing on purpose; g007 has no caption.
                "pmc-1000001-g007.jpg": encoded(noise_image(7), "JPEG"),
                "pmc-1000001-s002.jpg": encoded(noise_image(8), "JPEG"),
                "pmc-1000001.pdf": b"%PDF-1.4 not really a pdf",
            }
        )
    elif pmcid == "PMC1000002":
        files.update(
            {
                "brain-g1.png": encoded(noise_image(11, mode="I;16"), "PNG"),
                "brain-g2.tif": encoded(noise_image(12, mode="L"), "TIFF"),
                "brain-g3.png": encoded(noise_image(13), "PNG"),
            }
        )
    elif pmcid == "PMC1000003":
        files["kidney.jpg"] = encoded(noise_image(21), "JPEG")
    return files


def write_tar(path: Path, folder: str, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_dir(path: Path, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


FIXTURES = ("PMC1000001", "PMC1000002", "PMC1000003")


def make_tarballs(root: Path) -> Path:
    for pmcid in FIXTURES:
        write_tar(root / f"{pmcid}.tar.gz", pmcid, article_files(pmcid))
    return root


def make_unpacked(root: Path) -> Path:
    for pmcid in FIXTURES:
        write_dir(root / pmcid, article_files(pmcid))
    return root


# What the fixtures must produce: pair_id -> expected domain labels that are true.
EXPECTED = {
    "PMC1000001_F1": {"chest_xray"},
    "PMC1000001_F2": {"ct_scan"},
    "PMC1000001_F3": {"ct_scan"},
    "PMC1000001_F4": {"ct_scan"},
    "PMC1000001_F5": {"histology"},
    "PMC1000002_F1": {"mri"},
    "PMC1000002_F2": {"mri"},
    "PMC1000003_f1": {"gross"},
}
