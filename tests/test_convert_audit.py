"""Checkpoint folders found damaged or incomplete: one-line errors naming the file."""

from __future__ import annotations

import re
import shutil

import pytest

from llavamed.errors import InputError


@pytest.mark.parametrize("text", ['{"format": "llavamed-native-llava/1", "templ', "[]"])
def test_damaged_checkpoint_metadata_names_the_file(tiny_llava_dir, tmp_path, text):
    """A cut llavamed.json raised a raw JSONDecodeError (a list: AttributeError on .get)."""
    from llavamed.model import checkpoint_template, read_meta

    ck = tmp_path / "ck"
    shutil.copytree(tiny_llava_dir, ck)
    assert read_meta(ck)["template"] == "chatml"
    (ck / "llavamed.json").write_text(text)
    error = rf"^{re.escape(str(ck / 'llavamed.json'))}: damaged checkpoint metadata \(.+\)$"
    with pytest.raises(InputError, match=error):
        checkpoint_template(ck)
    (ck / "llavamed.json").unlink()
    assert read_meta(ck) == {}  # anyone else's checkpoint
