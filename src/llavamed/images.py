"""Decode any image a biomedical user hands us into an RGB ``PIL.Image``.

One function, :func:`load_image`, serves ingestion, training, evaluation and serving, so a file
that decodes in one place decodes the same everywhere. Handles PNG, JPEG, TIFF, GIF (first frame),
RGBA/LA (composited on white, as figures are shown on a page), palette, CMYK, 16-bit and float
grayscale (min-max stretched), and DICOM (modality LUT, then the VOI LUT / window from the file,
MONOCHROME1 inverted, colour as pydicom decodes it (YBR comes back RGB), PALETTE COLOR through its
colour tables, only the middle frame of a multi-frame series decoded). ``max_pixels`` refuses
larger images; for rasters it cannot go above PIL's own 179 MP hard limit. Rasters are read only in
:data:`RASTER_FORMATS` (also BMP, WebP, JPEG 2000, PPM, AVIF): PostScript and Pillow's rarer
decoders are never run on untrusted bytes. Anything else raises one
:class:`~llavamed.errors.InputError` naming the file and a countable reason.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llavamed.errors import InputError

# ~180 MP, PIL's own hard limit (it only warns from 89 MP). A PMC figure larger than this is
# almost certainly corrupt or hostile.
DEFAULT_MAX_PIXELS = 178_956_970
DICOM_MAGIC_OFFSET = 128
# The raster formats figures, scans and uploads come in. Pillow otherwise identifies ~40 formats by
# their contents, whatever the file is called: a "fig1.jpg" that holds PostScript went to
# Ghostscript (run as a subprocess on untrusted input; its -dSAFER mode has had escapes), and
# rarely used decoders (FITS, SPIDER, QOI, ...) widened what untrusted bytes could reach.
RASTER_FORMATS = (
    "JPEG", "MPO", "PNG", "TIFF", "GIF", "BMP", "DIB", "WEBP", "JPEG2000", "PPM", "AVIF",
)  # fmt: skip


def _is_dicom(head: bytes) -> bool:
    return len(head) >= DICOM_MAGIC_OFFSET + 4 and head[128:132] == b"DICM"


def load_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Return ``source`` (a path or raw bytes) as an RGB image, or raise ``InputError``.

    ``name`` is what errors call the input (defaults to the path, or ``<bytes>``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or "<bytes>"
    else:
        label = name or str(source)
        path = Path(source)
        if path.exists() and not path.is_dir() and not path.is_file():
            # /dev/stdin waited for input a REPL itself was reading, /dev/zero read until memory
            # ran out, and a FIFO blocked until someone wrote to it.
            raise InputError(label, "not a regular file")
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise InputError(label, "file not found") from exc
        except IsADirectoryError as exc:
            raise InputError(label, "not a file") from exc
        except OSError as exc:
            raise InputError(label, "unreadable file", str(exc)) from exc
    if not data:
        raise InputError(label, "empty file")
    if _is_dicom(data[:132]):
        return _load_dicom(data, label, max_pixels)
    return _load_raster(data, label, max_pixels)


def bound_long_side(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` shrunk (aspect kept) so its longer side is at most ``max_side``; the same image
    when it already is. A pad-to-square processor pads at full resolution before it resizes, so
    its memory grows with the square of the longer side: a 16000x125 PNG of a few KB passes a
    pixel-count cap yet takes ~2 GB to pad. Vision towers see a few hundred pixels anyway."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0)


def _load_raster(data: bytes, label: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides below; PIL's warning fires at half its error limit
            # (89 MP), which made that the real cap whatever max_pixels said.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_formats())
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(label, "image too large", f"{w}x{h} > {max_pixels} pixels")
            img.seek(0)  # GIF/TIFF: first frame
            img.load()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:  # above PIL's own hard limit (179 MP)
        # PIL refuses it at open, naming its own limit; the one that applies here is ours.
        raise InputError(label, "image too large", f"> {max_pixels} pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        # pydicom files without the 128-byte preamble still parse as DICOM.
        dicom = _try_dicom_without_preamble(data, label, max_pixels)
        if dicom is not None:
            return dicom
        raise InputError(label, "not an image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(label, "corrupt image", str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise what they like on bad
        # bytes (the QOI plugin an IndexError); untrusted input must not become a crash or a 500
        raise InputError(label, "corrupt image", f"{type(exc).__name__}: {exc}") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost us the pixels
        pass
    return _to_rgb(img)


def _formats() -> list[str]:
    """:data:`RASTER_FORMATS` this Pillow build can open (AVIF needs its library)."""
    Image.init()
    return [f for f in RASTER_FORMATS if f in Image.OPEN]


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(img, dtype=np.float64))
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "CMYK":
        # PIL's CMYK->RGB is naive but matches what browsers show for untagged CMYK JPEGs; Adobe
        # CMYK JPEGs are stored inverted, which PIL already undoes on decode.
        return img.convert("RGB")
    return img.convert("RGB")


def _array_to_rgb(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> Image.Image:
    """Linearly map ``[lo, hi]`` (default: the array's 0.5/99.5 percentiles) to 0..255 grey."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        raise InputError("<array>", "corrupt image", "no finite pixel values")
    if lo is None or hi is None:
        lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((np.nan_to_num(arr, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    grey = (out * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


# The first data element of a DICOM stream without its preamble: group 0x0002 (file meta) or
# 0x0008 (identification; also old ACR-NEMA files), little or big endian.
_DICOM_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _try_dicom_without_preamble(data: bytes, label: str, max_pixels: int) -> Image.Image | None:
    if data[:2] not in _DICOM_FIRST_GROUPS:
        # pydicom's force=True reads anything: 12 MB of zeros took 5 s of CPU as empty elements
        # before it was refused, a stall for a server or web page handed a zero-filled upload.
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" not in ds:
            return None
    except Exception:
        return None
    return _dicom_to_image(ds, label, max_pixels)


def _load_dicom(data: bytes, label: str, max_pixels: int) -> Image.Image:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        has_pixels = "PixelData" in ds
    except Exception as exc:  # pydicom raises more than InvalidDicomError on damaged files
        # (BytesLengthException, NotImplementedError, ...): all of them are the file's fault.
        raise InputError(label, "corrupt DICOM", str(exc) or type(exc).__name__) from exc
    if not has_pixels:
        raise InputError(label, "DICOM without pixel data")
    return _dicom_to_image(ds, label, max_pixels)


def _dicom_to_image(ds, label: str, max_pixels: int) -> Image.Image:
    from pydicom.pixels import pixel_array

    try:  # elements are parsed when read, so a damaged tag fails here, not in dcmread
        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as exc:
        raise InputError(label, "corrupt DICOM", str(exc) or type(exc).__name__) from exc
    if rows * cols > max_pixels:
        raise InputError(label, "image too large", f"{cols}x{rows} > {max_pixels} pixels")
    try:
        # The middle slice, the most representative frame of a series, decoded alone (a
        # 1,000-slice CT is not decoded whole). pydicom already returns YBR colour as RGB.
        arr = pixel_array(ds, index=frames // 2 if frames > 1 else None)
    except Exception as exc:  # missing codec, truncated pixel data, ...
        raise InputError(label, "undecodable DICOM pixels", str(exc)) from exc
    try:
        return _dicom_pixels_to_image(ds, arr)
    except InputError:
        raise
    except Exception as exc:  # malformed LUT or window tags, ...
        raise InputError(label, "undecodable DICOM pixels", str(exc)) from exc


def _dicom_pixels_to_image(ds, arr: np.ndarray) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3 and arr.ndim == 3:
        return Image.fromarray(_to_uint8(arr, int(ds.get("BitsStored", 8) or 8)), mode="RGB")
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return Image.fromarray(_to_uint8(rgb, 8 * rgb.dtype.itemsize), mode="RGB")
    values = apply_modality_lut(arr, ds)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    # Anonymisers often blank the window tags: present but empty is no window.
    has_window = center is not None and width is not None and float(width) > 0
    has_voi_lut = "VOILUTSequence" in ds
    if has_window:
        c, w = float(center), float(width)
        img = _array_to_rgb(values, c - w / 2.0, c + w / 2.0)
    elif has_voi_lut:
        img = _array_to_rgb(apply_voi_lut(values, ds, index=0))
    else:
        img = _array_to_rgb(values)
    if photometric == "MONOCHROME1":
        img = ImageOps.invert(img)
    return img


def _to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of ``bits`` bits -> uint8 (8-bit data unchanged)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint8:
        return arr
    scale = 255.0 / float(2**bits - 1)
    return np.clip(arr.astype(np.float64) * scale + 0.5, 0, 255).astype(np.uint8)


def _first(value):
    try:
        return value[0]
    except (TypeError, IndexError):
        return value
