"""Image decoding: every format users hand us, and one clear error for everything else."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavamed.errors import InputError
from llavamed.images import load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "GIF", "BMP"])
def test_common_formats_decode_to_rgb(fmt):
    img = Image.new("RGB", (40, 30), (200, 100, 50))
    out = load_image(_encode(img, fmt), name=f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (40, 30)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(_encode(img, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_and_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    first = load_image(buf.getvalue())
    ref = frames[0].convert("RGB").getpixel((0, 0))
    assert first.getpixel((0, 0)) == ref


def test_16bit_grayscale_is_stretched():
    arr = np.linspace(1000, 3000, 64 * 64, dtype=np.uint16).reshape(64, 64)
    out = np.asarray(load_image(_encode(Image.fromarray(arr), "PNG")))
    assert out.shape == (64, 64, 3)
    assert out.min() == 0 and out.max() == 255  # full contrast, not a black image


def test_cmyk_jpeg():
    img = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # pure red in CMYK
    r, g, b = load_image(_encode(img, "JPEG")).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty file"), (b"this is not an image at all", "not an image")],
)
def test_bad_bytes(data, reason):
    with pytest.raises(InputError, match=f"upload.png: {reason}"):
        load_image(data, name="upload.png")


def test_truncated_png(tmp_path):
    data = _encode(Image.new("RGB", (200, 200), (1, 2, 3)), "PNG")
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        load_image(p)
    assert str(p) in str(e.value) and e.value.reason in ("corrupt image", "not an image")


def test_a_decoder_that_raises_anything_else_is_an_input_error():
    """Pillow's QOI decoder raised IndexError on these 27 bytes, which the API answered with a
    500 (found by fuzzing 14 formats). QOI is no longer among the formats read at all."""
    data = bytes.fromhex("716f696600000010000000100301d7fdfdfdc70000000000000001")
    with pytest.raises(InputError, match=r"upload.png: not an image"):
        load_image(data, name="upload.png")


_EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n%%EndComments\n"
    b"newpath 0 0 moveto 64 48 lineto stroke\nshowpage\n%%EOF\n"
)


@pytest.mark.parametrize(
    "fmt,data",
    [
        ("EPS", _EPS),  # Pillow renders it by running Ghostscript
        ("SPIDER", None),
    ],
)
def test_only_raster_formats_are_decoded(fmt, data):
    """Pillow identifies ~40 formats by content whatever the file is called: a "fig1.jpg" holding
    PostScript went to Ghostscript ("Unable to locate Ghostscript" where it is not installed; run
    on untrusted input where it is). Such files are "not an image" and reach no decoder."""
    if data is None:
        buf = io.BytesIO()
        Image.new("F", (16, 16)).save(buf, format=fmt)
        data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would take it
    with pytest.raises(InputError, match="fig1.jpg: not an image"):
        load_image(data, name="fig1.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_image(tmp_path / "nope.jpg")


def test_decompression_bomb():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InputError, match="image too large"):
        load_image(data, name="bomb.png", max_pixels=1_000_000)


def test_max_pixels_is_the_cap_not_pils_warning_threshold(monkeypatch):
    # PIL warns from MAX_IMAGE_PIXELS (89 MP) and errors from twice that; turning the warning
    # into an error made 89 MP the cap whatever max_pixels said. Scaled down here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, format="PNG")  # 1,600 px: PIL only warns
    assert load_image(buf.getvalue()).size == (40, 40)
    with pytest.raises(InputError, match="image too large"):
        load_image(buf.getvalue(), max_pixels=1500)


def test_real_dicom_ct_and_mr():
    from pydicom.data import get_testdata_file

    ct = load_image(get_testdata_file("CT_small.dcm"))
    mr = load_image(get_testdata_file("MR_small.dcm"))
    for img in (ct, mr):
        a = np.asarray(img)
        assert img.mode == "RGB" and a.std() > 10  # windowed to visible contrast


def test_dicom_windowing_uses_window_tags(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window in HU
    p = tmp_path / "win.dcm"
    ds.save_as(p)
    narrow = np.asarray(load_image(p))
    ds.WindowCenter, ds.WindowWidth = 40, 4000
    ds.save_as(p)
    wide = np.asarray(load_image(p))
    assert narrow.std() > wide.std()  # a narrow window stretches contrast


def _dicom(tmp_path, pixels: np.ndarray, photometric: str, frames: int = 1, **tags):
    """A native (uncompressed) DICOM file of ``pixels`` (8- or 16-bit unsigned; with ``frames``
    > 1, a stack of that many frames along the first axis)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    frame_shape = pixels.shape[1:] if frames > 1 else pixels.shape
    ds.Rows, ds.Columns = frame_shape[:2]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if len(frame_shape) == 3 else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    bits = 8 * pixels.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path = tmp_path / f"{photometric.replace(' ', '_')}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_multiframe_takes_middle_frame(tmp_path):
    frames = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (0, 500, 1000)])
    frames[:, 0, 0] = 0
    frames[:, 0, 1] = 1000
    mid = np.asarray(load_image(_dicom(tmp_path, frames, "MONOCHROME2", frames=3)))[..., 0]
    assert 100 < mid[4, 4] < 160  # 500 on a 0..1000 scale


def test_dicom_colour_comes_out_in_its_own_colours(tmp_path):
    # pydicom returns YBR (ultrasound, endoscopy) already as RGB; converting it again shifted
    # every colour (a red 200,30,90 came out 147,255,28).
    from pydicom.pixels import apply_color_lut, convert_color_space

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 30, 90
    rgb[4:, :] = (20, 160, 240)
    ybr = _dicom(tmp_path, convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    got = np.asarray(load_image(ybr)).astype(int)
    assert np.abs(got - rgb).max() <= 2  # YCbCr rounding
    assert np.array_equal(np.asarray(load_image(_dicom(tmp_path, rgb, "RGB"))), rgb)

    # PALETTE COLOR: indices through the file's colour tables, not windowed as grey.
    lut = np.arange(256, dtype=np.uint16)
    tables = {"Red": lut * 257, "Green": (255 - lut) * 257, "Blue": np.zeros(256, np.uint16)}
    tags = {}
    for c, t in tables.items():
        tags[f"{c}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        tags[f"{c}PaletteColorLookupTableData"] = t.tobytes()
    idx = np.full((8, 8), 200, np.uint8)
    pal = _dicom(tmp_path, idx, "PALETTE COLOR", **tags)
    assert np.asarray(load_image(pal))[0, 0].tolist() == [200, 55, 0]
    import pydicom

    ds = pydicom.dcmread(pal)
    assert apply_color_lut(ds.pixel_array, ds)[0, 0].tolist() == [200 * 257, 55 * 257, 0]


def test_dicom_with_blank_window_tags_is_read_without_a_window(tmp_path):
    # Anonymisers blank Window Center/Width: present but empty, they crashed with a TypeError
    # that no caller counts (the chat REPL died, serve answered 500, eval aborted).
    grad = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    path = _dicom(tmp_path, grad, "MONOCHROME2", WindowCenter=None, WindowWidth=None)
    img = np.asarray(load_image(path))[..., 0]
    assert img[0, 0] < 10 and img[0, -1] > 245  # the full range, stretched
    # Malformed tags are the file's fault: a counted InputError, never another exception.
    bad = _dicom(tmp_path, grad, "PALETTE COLOR")  # a palette image without its tables
    with pytest.raises(InputError, match="undecodable DICOM"):
        load_image(bad)


def test_damaged_dicom_files_are_input_errors_never_other_exceptions():
    """Truncated and byte-flipped copies of a real CT: each one loads or is a counted InputError
    (pydicom raised BytesLengthException and NotImplementedError through, a 500 in serve)."""
    import random

    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rng = random.Random(0)
    trials = [data[:cut] for cut in range(132, len(data), 97)]
    for _ in range(300):
        b = bytearray(data)
        for _ in range(3):
            b[rng.randrange(132, 1200)] = rng.randrange(256)
        trials.append(bytes(b))
    errors = 0
    for t in trials:
        try:
            load_image(t, name="ct.dcm")
        except InputError as exc:
            assert "ct.dcm" in str(exc)
            errors += 1
    assert errors > 100  # most damaged copies are refused, by name


def test_dicom_without_pixels(tmp_path):
    from pydicom.data import get_testdata_file

    with pytest.raises(InputError, match="DICOM without pixel data"):
        load_image(get_testdata_file("rtplan.dcm"))


def test_dicom_without_its_preamble_is_read_and_zero_bytes_are_refused_at_once(monkeypatch):
    """Files without the 128-byte preamble are DICOM still; but trying every unidentified file
    as one (pydicom force=True) walked 12 MB of zeros as empty elements for 5 s of CPU."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    assert buf.getvalue()[128:132] != b"DICM"
    assert load_image(buf.getvalue(), name="bare.dcm").size == (128, 128)
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(1) or real(*a, **k))
    with pytest.raises(InputError, match=r"zeros\.bin: not an image"):
        load_image(b"\0" * (1 << 20), name="zeros.bin")
    assert reads == []  # never handed to the DICOM parser
    assert load_image(buf.getvalue(), name="bare.dcm").size == (128, 128) and reads == [1]


def test_an_image_over_pils_own_limit_names_the_limit_that_applies():
    """PIL refuses > 179 MP at open, and the message named its limit, not max_pixels."""
    data = _encode(Image.new("1", (15000, 15000)), "PNG")  # 225 MP, a few KB
    with pytest.raises(InputError, match=r"image too large \(> 40000 pixels"):
        load_image(data, name="huge.png", max_pixels=40_000)


def test_a_fifo_or_a_device_is_refused_not_read(tmp_path):
    """Every reader of image paths (chat's /image, eval, training data, ingest): a FIFO blocked
    until someone wrote to it and /dev/zero was read until memory ran out."""
    import os

    fifo = tmp_path / "scan.png"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero"):
        with pytest.raises(InputError, match="not a regular file"):
            load_image(path)
