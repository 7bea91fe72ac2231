"""Quickstart audit (2): a moved output folder's report, advice for a lost or damaged state."""

from __future__ import annotations

import json

from llavamed.quickstart import Pipeline, QuickstartOptions, build_report


def test_a_moved_output_folder_reports_its_own_paths_not_the_old_folders(tmp_path):
    """Stage info (stage 0's tower, each checkpoint) was kept with absolute paths: after
    `mv quickstart_out elsewhere` the skipped stages' lines in report.md and report.json named
    the old folder's checkpoints, gone once it was deleted."""

    def stages(out):
        def a():
            (out / "a").mkdir(exist_ok=True)
            (out / "a" / "tower.bin").write_bytes(b"w")
            return {"tower": str(out / "a" / "tower.bin"), "outside": "/elsewhere/x"}

        return [("stage0_vision", "a", a, {})]

    first = tmp_path / "first run"
    first.mkdir()
    opts = QuickstartOptions(out=first, size="tiny", progress=False)
    res = Pipeline(opts, stages(first)).run()
    assert res[0].info["tower"] == str(first / "a" / "tower.bin")
    moved = tmp_path / "moved"
    first.rename(moved)
    opts = QuickstartOptions(out=moved, size="tiny", progress=False)
    res = Pipeline(opts, stages(moved)).run()
    assert res[0].skipped
    assert res[0].info == {"tower": str(moved / "a" / "tower.bin"), "outside": "/elsewhere/x"}
    build_report(opts, res, 1.0)
    report = json.loads((moved / "report.json").read_text())
    assert report["stages"]["stage0_vision"]["tower"] == str(moved / "a" / "tower.bin")
    md = (moved / "report.md").read_text()
    assert str(moved / "a" / "tower.bin") in md and "first run" not in md
