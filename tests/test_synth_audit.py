"""MedSynth audit regressions: a user's folder as --out, bad arguments caught before work, TIFF
figures byte-identical."""

from __future__ import annotations

import io

import pytest

from llavamed.cli import main
from llavamed.data.synth import generate_world
from llavamed.errors import ConfigError

TINY = ["--articles", "1", "--vqa-images", "22", "--image-size", "64", "--quiet", "--workers", "1"]


def test_a_users_folder_is_refused_not_overwritten(tmp_path):
    """`--out ~/data` holding the real SLAKE: its train.json was silently replaced."""
    out = tmp_path / "data"
    (out / "slake").mkdir(parents=True)
    (out / "slake" / "train.json").write_text('[{"real": 1}]')
    with pytest.raises(ConfigError, match="holds something else"):
        generate_world(out, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (out / "slake" / "train.json").read_text() == '[{"real": 1}]'
    assert sorted(p.name for p in out.rglob("*")) == ["slake", "train.json"]
    assert main(["synth", "--out", str(out), *TINY]) != 0
    assert (out / "slake" / "train.json").read_text() == '[{"real": 1}]'


def test_empty_folder_and_interrupted_world_are_still_accepted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_world(empty, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (empty / "manifest.json").is_file()
    (empty / "manifest.json").unlink()  # an interrupted run: the stamp is there, resume
    generate_world(empty, articles=1, image_size=64, progress=False, vqa_images=22)
    assert (empty / "manifest.json").is_file()


@pytest.mark.parametrize(
    "extra",
    [["--caption-pairs", "5", "--pairs-image-size", "10"], ["--contact-sheet", "{tmp}"]],
    ids=["pairs-image-size", "contact-sheet-folder"],
)
def test_bad_late_arguments_fail_before_the_world_is_generated(tmp_path, extra, capsys):
    out = tmp_path / "w"
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    assert main(["synth", "--out", str(out), *TINY, *extra]) != 0
    assert not out.exists()


def test_tiff_figures_are_byte_identical_from_one_save_to_the_next():
    """Pillow's libtiff writer left the pad byte after an odd-length strip uninitialised when
    saving into a BytesIO: the same figure gave different package bytes between runs."""
    import numpy as np
    from PIL import Image

    from llavamed.data.synth.articles import encode

    for k in range(6):
        rng = np.random.default_rng(k)
        img = Image.fromarray(rng.integers(0, 256, size=(96 + k, 181 + 2 * k, 3), dtype=np.uint8))
        seen = set()
        for j in range(40):
            # Churn the heap between saves, as rendering other figures does.
            junk = [bytearray(np.random.default_rng(j).bytes(int(n))) for n in (5000, 90000)]
            seen.add(encode(img, "tif"))
            del junk
        assert len(seen) == 1, (k, len(seen))
        data = seen.pop()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))
