import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llavamed.cli import main
from llavamed.data.figures import DOMAINS
from llavamed.data.pmc import sources
from llavamed.data.pmc.ingest import IngestOptions, ingest
from llavamed.data.pmc.sources import discover, parse_shard, select_shard
from llavamed.errors import InputError
from pmc_fixtures import (
    EXPECTED,
    article_files,
    make_tarballs,
    make_unpacked,
    write_dir,
    write_tar,
)

RECORD_KEYS = {
    "pair_id", "pmid", "pmcid", "fig_id", "fig_label", "fig_caption", "graphic_ref", "image",
    "in_text_mention", "domain",
}  # fmt: skip


def _records(out):
    return [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]


def _report(out):
    return json.loads((out / "ingest_report.json").read_text())


def test_tarballs_end_to_end(tmp_path):
    src = make_tarballs(tmp_path / "src")
    report = ingest([src], tmp_path / "out")
    recs = {r["pair_id"]: r for r in _records(tmp_path / "out")}
    assert set(recs) == set(EXPECTED)
    for pid, rec in recs.items():
        assert RECORD_KEYS <= set(rec)
        assert set(rec["domain"]) == set(DOMAINS)
        assert {d for d, v in rec["domain"].items() if v} == EXPECTED[pid], pid
        assert rec["image"] == f"images/{pid}.jpg"
        with Image.open(tmp_path / "out" / rec["image"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)
    f1 = recs["PMC1000001_F1"]
    assert (f1["pmid"], f1["pmcid"], f1["fig_id"], f1["fig_label"]) == (
        "31000001", "PMC1000001", "F1", "Figure 1",
    )  # fmt: skip
    assert f1["in_text_mention"] == [
        {"tokens": "The admission chest radiograph showed a right upper lobe opacity (Fig. 1)."}
    ]
    assert recs["PMC1000001_F5"]["fig_label"] is None  # no <label>: kept, label null
    assert report["figures_written"] == 8
    assert report["reasons"] == {
        "malformed XML recovered": 1,
        "skipped: image missing": 1,
        "skipped: no caption": 1,
        "skipped: supplementary figure": 1,
        "skipped: table figure": 1,
    }
    assert not list((tmp_path / "out").rglob("*.nxml"))  # nothing extracted


def test_tarballs_are_read_as_streams(tmp_path, monkeypatch):
    src = make_tarballs(tmp_path / "src")
    modes = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        modes.append(kwargs.get("mode", args[1] if len(args) > 1 else "r"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(sources.tarfile, "open", spy)
    ingest([src], tmp_path / "out")
    assert modes == ["r|*"] * 3


def test_unpacked_folders_give_the_same_records(tmp_path):
    ingest([make_tarballs(tmp_path / "tars")], tmp_path / "a")
    ingest([make_unpacked(tmp_path / "dirs")], tmp_path / "b")

    def strip(recs):
        return sorted(({k: v for k, v in r.items() if k != "source"} for r in recs),
                      key=lambda r: r["pair_id"])  # fmt: skip

    assert strip(_records(tmp_path / "a")) == strip(_records(tmp_path / "b"))


def test_keep_missing_images(tmp_path):
    src = make_tarballs(tmp_path / "src")
    report = ingest([src], tmp_path / "out", IngestOptions(keep_missing_images=True))
    recs = {r["pair_id"]: r for r in _records(tmp_path / "out")}
    assert recs["PMC1000001_F6"]["image"] is None
    assert recs["PMC1000001_F6"]["domain"]["gross"]
    assert report["reasons"]["kept without image"] == 1


def test_rerun_is_idempotent_and_crash_resumes(tmp_path):
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    ingest([src], out)
    first = (out / "figures.jsonl").read_text()
    again = ingest([src], out)
    assert again["last_run"]["packages_processed"] == 0
    assert (out / "figures.jsonl").read_text() == first
    # Simulate a SIGKILL in the middle of PMC1000002: its ledger line never got written, one of
    # its records did, and a torn half line follows.
    ledger = out / ".done_packages.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(line for line in lines if "PMC1000002" not in line))
    recs = first.splitlines(keepends=True)
    kept = [r for r in recs if "PMC1000002_F2" not in r]
    (out / "figures.jsonl").write_text("".join(kept) + '{"pair_id": "PMC1000002_F2", "pmi')
    report = ingest([src], out)
    assert report["last_run"]["packages_processed"] == 1
    pids = [r["pair_id"] for r in _records(out)]
    assert len(pids) == len(set(pids)) == 8
    assert report["figures_written"] == 8
    assert "skipped: duplicate pair_id" not in report["reasons"]


def test_broken_inputs_are_counted_and_the_run_goes_on(tmp_path):
    src = make_tarballs(tmp_path / "src")
    good = (src / "PMC1000001.tar.gz").read_bytes()
    (src / "PMC2000001.tar.gz").write_bytes(good[: len(good) // 2])  # truncated download
    (src / "PMC2000002.tar.gz").write_bytes(b"this is not gzip at all")
    files = article_files("PMC1000003")
    files["kidney.jpg"] = b"\xff\xd8\xff\xe0 truncated jpeg"
    write_tar(src / "PMC2000003.tar.gz", "PMC1000003", files)
    report = ingest([src], tmp_path / "out")
    reasons = report["reasons"]
    assert reasons["corrupt or truncated tarball"] == 1
    assert reasons["corrupt tarball"] == 1
    assert reasons["skipped: corrupt image"] == 1
    assert report["packages_done"] == 6
    assert {r["pair_id"] for r in _records(tmp_path / "out")} == set(EXPECTED)


def test_duplicate_and_tiny_images(tmp_path):
    from pmc_fixtures import encoded, noise_image

    src = tmp_path / "src"
    files = article_files("PMC1000002")
    files["brain-g2.tif"] = files["brain-g1.png"]  # the same picture twice
    write_tar(src / "PMC1000002.tar.gz", "PMC1000002", files)
    files = article_files("PMC1000003")
    files["kidney.jpg"] = encoded(noise_image(5, size=(20, 200)), "JPEG")
    write_tar(src / "PMC1000003.tar.gz", "PMC1000003", files)
    report = ingest([src], tmp_path / "out", IngestOptions(min_image_size=24))
    assert report["reasons"]["skipped: duplicate image"] == 1
    assert report["reasons"]["skipped: tiny image"] == 1
    assert [r["pair_id"] for r in _records(tmp_path / "out")] == ["PMC1000002_F1"]


def test_shards_partition_the_packages(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        write_tar(src / f"PMC3{i:06d}.tar.gz", f"PMC3{i:06d}", {"a.nxml": b"<article/>"})
    packages = discover([src])
    parts = [select_shard(packages, k, 3) for k in range(3)]
    keys = [p.key for part in parts for p in part]
    assert sorted(keys) == sorted(p.key for p in packages) and len(set(keys)) == 12
    assert all(parts)  # a hash split, not everything in one shard
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_parallel_workers_match_single_process(tmp_path):
    src = make_tarballs(tmp_path / "src")
    ingest([src], tmp_path / "one", workers=1)
    ingest([src], tmp_path / "two", workers=2)
    assert (tmp_path / "one" / "figures.jsonl").read_text() == (
        tmp_path / "two" / "figures.jsonl"
    ).read_text()


def test_cli_domain_filter_and_shard(tmp_path, capsys):
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    rc = main(["data", "ingest", str(src), "--out", str(out), "--domains", "chest_xray,mri",
               "--workers", "1", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert {r["pair_id"] for r in _records(out)} == {
        "PMC1000001_F1", "PMC1000002_F1", "PMC1000002_F2",
    }  # fmt: skip
    assert _report(out)["reasons"]["skipped: domain not selected"] == 6
    assert "figures written" in capsys.readouterr().out
    shard_out = tmp_path / "shards"
    total = 0
    for k in range(2):
        assert main(["data", "ingest", str(src), "--out", str(shard_out / str(k)),
                     "--shard", f"{k}/2", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
        total += len(_records(shard_out / str(k)))
    assert total == len(EXPECTED)
    assert main(["data", "ingest", str(tmp_path / "nope"), "--out", str(out)]) == 1


def test_second_writer_is_refused(tmp_path):
    import subprocess
    import sys

    from llavamed.data.pmc.ingest import IngestWriter

    w = IngestWriter(tmp_path / "out")
    try:
        code = (
            "import sys; from llavamed.data.pmc.ingest import IngestWriter\n"
            "try: IngestWriter(sys.argv[1])\n"
            "except Exception as e: print(e); sys.exit(3)"
        )
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")],
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 3 and "another ingest" in res.stdout
    finally:
        w.close()
    w = IngestWriter(tmp_path / "out")  # released on close
    w.close()


def test_changed_package_is_redone(tmp_path):
    src = tmp_path / "src"
    files = article_files("PMC1000001")
    del files["pmc-1000001-g002.jpg"]
    write_tar(src / "PMC1000001.tar.gz", "PMC1000001", files)
    first = ingest([src], tmp_path / "out")
    assert first["figures_written"] == 4
    shutil.rmtree(src)
    make_tarballs(src)  # the complete download replaces the partial one
    report = ingest([src], tmp_path / "out")
    assert report["figures_written"] == 8
    assert "skipped: duplicate pair_id" not in report["reasons"]


def test_a_folder_package_whose_images_arrive_later_is_redone(tmp_path):
    """A folder's own size does not change when files land in it: it was skipped as done."""
    from pmc_fixtures import write_dir

    src = tmp_path / "src"
    files = article_files("PMC1000001")
    late = files.pop("pmc-1000001-g002.jpg")
    write_dir(src / "PMC1000001", files)
    first = ingest([src], tmp_path / "out")
    assert first["figures_written"] == 4
    (src / "PMC1000001" / "pmc-1000001-g002.jpg").write_bytes(late)  # the download completes
    report = ingest([src], tmp_path / "out")
    assert report["figures_written"] == 5
    assert "skipped: duplicate pair_id" not in report["reasons"]
    again = ingest([src], tmp_path / "out")  # unchanged now: skipped as done
    assert again["last_run"]["packages_skipped_as_done"] == 1


def test_a_subfolder_inside_an_article_folder_keeps_the_article_together(tmp_path):
    """Hand-made tarballs nest ("PMC1/thumbs/"): a member there did not end the article."""
    files = article_files("PMC1000001")
    flat = ingest([write_tar(tmp_path / "a" / "p.tar.gz", "PMC1000001", files)], tmp_path / "o1")
    nxml = next(k for k in files if k.endswith(".nxml"))
    nested = {nxml: files[nxml], "thumbs/preview.gif": files["pmc-1000001-g001.gif"]}
    nested |= {k: v for k, v in files.items() if k != nxml}
    got = ingest([write_tar(tmp_path / "b" / "p.tar.gz", "PMC1000001", nested)], tmp_path / "o2")
    assert got["figures_written"] == flat["figures_written"] > 0
    assert got["reasons"] == flat["reasons"]


def _tiny_article(pmcid: str) -> bytes:
    return (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        f'<article-id pub-id-type="pmc">{pmcid}</article-id></article-meta></front><body><sec>'
        '<fig id="F1"><label>Figure 1</label><caption><p>Axial CT of the abdomen.</p></caption>'
        '<graphic xlink:href="fig1"/></fig></sec></body></article>'
    ).encode()


def _png(colour, size=(64, 48)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_article_folders_under_a_parent_folder_keep_their_own_images(tmp_path):
    """bundle/index.xml, then bundle/PMC1/ and bundle/PMC2/, both with a fig1.png: each article
    gets its own fig1, whichever order the tarball lists them in; a thumbs/ preview named like the
    figure never replaces it."""
    red, blue = (200, 0, 0), (0, 0, 200)
    members = {
        "bundle/index.xml": b"<index><entry>PMC1</entry></index>",
        "bundle/PMC1/fig1.png": _png(red),  # read before its article's XML
        "bundle/PMC1/thumbs/fig1.png": _png((0, 200, 0), (8, 6)),
        "bundle/PMC1/a.nxml": _tiny_article("PMC1"),
        "bundle/PMC2/b.nxml": _tiny_article("PMC2"),
        "bundle/PMC2/thumbs/fig1.png": _png((0, 200, 0), (8, 6)),
        "bundle/PMC2/fig1.png": _png(blue),
    }
    _assert_own_images(tmp_path, members, {"PMC1": red, "PMC2": blue})


def _tar_of(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _assert_own_images(tmp_path, members: dict[str, bytes], colours: dict[str, tuple]) -> None:
    """Ingest a tarball of ``members`` (in that order); each article's one figure must be the
    64x48 image of its colour."""
    tar = _tar_of(tmp_path / "src" / "bundle.tar.gz", members)
    report = ingest([tar], tmp_path / "out")
    recs = {r["pmcid"]: r for r in _records(tmp_path / "out")}
    assert set(recs) == set(colours) and report["figures_written"] == len(colours), report
    for pmcid, colour in colours.items():
        with Image.open(tmp_path / "out" / recs[pmcid]["image"]) as im:
            pixel = im.convert("RGB").getpixel((5, 5))  # written as JPEG: near, not equal
            assert (
                im.size == (64, 48)
                and max(abs(a - b) for a, b in zip(pixel, colour, strict=True)) < 8
            )


def test_subfolder_images_listed_before_their_articles_xml_are_kept(tmp_path):
    """A streamed tarball may list "PMC1/figs/fig1.png" before "PMC1/a.nxml": reaching the
    article's folder from its subfolder did not mean a new article. Sibling subfolders (figs/,
    thumbs/) before the XML, and a second article laid out the same way, keep their own."""
    red, blue = (200, 0, 0), (0, 0, 200)
    members = {
        "PMC1/figs/fig1.png": _png(red),
        "PMC1/thumbs/preview.png": _png((0, 200, 0), (8, 6)),
        "PMC1/a.nxml": _tiny_article("PMC1"),
        "PMC2/figs/fig1.png": _png(blue),
        "PMC2/b.nxml": _tiny_article("PMC2"),
    }
    _assert_own_images(tmp_path, members, {"PMC1": red, "PMC2": blue})


def _crash_on_1000002(pkg, opts):
    import os

    from llavamed.data.pmc.ingest import PackageResult

    if "PMC1000002" in pkg.key:
        os._exit(1)  # what a segfaulting decoder looks like from the parent
    return PackageResult(key=pkg.key)


def test_a_worker_crash_costs_one_package(tmp_path, monkeypatch):
    from llavamed.data.pmc import ingest as ingest_mod

    src = make_tarballs(tmp_path / "src")
    for i in range(4):
        write_tar(src / f"PMC4{i:06d}.tar.gz", f"PMC4{i:06d}", {"a.nxml": b"<article/>"})
    monkeypatch.setattr(ingest_mod, "process_package", _crash_on_1000002)
    report = ingest([src], tmp_path / "out", workers=2)
    assert report["packages_done"] == 7
    assert report["reasons"] == {"package crashed a worker": 1}


def test_a_record_kept_without_image_gets_its_image_when_the_download_completes(tmp_path):
    from pmc_fixtures import write_dir

    src, out = tmp_path / "src", tmp_path / "out"
    opts = IngestOptions(keep_missing_images=True)
    files = article_files("PMC1000001")
    late = files.pop("pmc-1000001-g002.jpg")
    write_dir(src / "PMC1000001", files)
    first = ingest([src], out, opts)
    assert {r["pair_id"]: r["image"] for r in _records(out)}["PMC1000001_F2"] is None
    assert first["figures_written"] == 6  # F1-F6, F2 and F6 without image
    (src / "PMC1000001" / "pmc-1000001-g002.jpg").write_bytes(late)  # the download completes
    report = ingest([src], out, opts)
    recs = _records(out)
    pids = [r["pair_id"] for r in recs]
    assert len(pids) == len(set(pids)) == 6  # superseded, not duplicated
    f2 = next(r for r in recs if r["pair_id"] == "PMC1000001_F2")
    assert f2["image"] == "images/PMC1000001_F2.jpg" and (out / f2["image"]).is_file()
    assert f2["image_sha1"] and f2["width"] == 64
    assert report["figures_written"] == 6
    assert report["reasons"]["kept without image"] == 1  # F6 only, now
    assert "skipped: duplicate pair_id" not in report["reasons"]
    # A kill after the new record was appended, before the rewrite: both lines are there. The
    # next writer keeps the one with the image.
    lines = (out / "figures.jsonl").read_text().splitlines(keepends=True)
    stale = json.dumps({**f2, "image": None, "image_sha1": None}) + "\n"
    (out / "figures.jsonl").write_text(stale + "".join(lines))
    again = ingest([src], out, opts)
    assert again["last_run"]["packages_processed"] == 0
    assert (out / "figures.jsonl").read_text() == "".join(lines)


def test_a_folder_package_reads_each_article_when_it_is_reached(tmp_path, monkeypatch):
    # A bulk folder holds thousands of articles: they must not all be read up front.
    from pathlib import Path

    from pmc_fixtures import DATA, write_dir

    nxml = (DATA / "PMC1000003.nxml").read_bytes()
    write_dir(tmp_path / "bulk", {f"PMC{2000000 + i}.xml": nxml for i in range(20)})
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    [pkg] = discover([tmp_path / "bulk"])
    notes = []
    articles = sources.iter_articles(pkg, notes)
    first = next(articles)
    assert first.name == "PMC2000000.xml" and first.xml == nxml
    assert reads == ["PMC2000000.xml"]
    assert len(list(articles)) == 19 and len(reads) == 20 and notes == []


def test_cli_fails_when_no_package_gives_a_figure(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    good = (make_tarballs(tmp_path / "good") / "PMC1000001.tar.gz").read_bytes()
    (src / "PMC2000001.tar.gz").write_bytes(good[:200])  # truncated before the first article
    (src / "PMC2000002.tar.gz").write_bytes(b"this is not gzip at all")
    argv = ["data", "ingest", str(src), "--out", str(tmp_path / "out"), "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no figures written" in err and "2 package(s)" in err
    assert main(argv) == 0  # nothing new to do: not a failure


def test_an_article_at_the_top_of_a_tarball_keeps_the_images_of_its_subfolders(tmp_path):
    files = article_files("PMC1000003")
    got = {}
    for layout, prefix in (("top", ""), ("folder", "P/")):
        tar = tmp_path / layout / "p.tar.gz"
        tar.parent.mkdir()
        with tarfile.open(tar, "w:gz") as tf:
            for name, data in (
                ("PMC1000003.nxml", files["PMC1000003.nxml"]),
                ("figs/kidney.jpg", files["kidney.jpg"]),
            ):
                info = tarfile.TarInfo(prefix + name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        got[layout] = ingest([tar], tmp_path / f"out_{layout}")
        assert [r["pair_id"] for r in _records(tmp_path / f"out_{layout}")] == ["PMC1000003_f1"]
    assert got["top"]["reasons"] == got["folder"]["reasons"]
    assert "skipped: image missing" not in got["top"]["reasons"]


def test_a_figure_id_too_long_for_a_file_name_is_cut_and_hashed(tmp_path):
    """images/<pair_id>.jpg: a 300-character fig id made a file name over 255 bytes, and the
    OSError (File name too long) killed the whole run, again on every re-run."""
    long_a, long_b = "F" * 299 + "a", "F" * 299 + "b"
    xml = _tiny_article("PMC9").replace(b'id="F1"', f'id="{long_a}"'.encode())
    xml = xml.replace(
        b"</sec>",
        f'<fig id="{long_b}"><label>Figure 2</label><caption><p>Axial CT.</p></caption>'
        '<graphic xlink:href="fig2"/></fig></sec>'.encode(),
    )
    src = tmp_path / "src" / "PMC9"
    src.mkdir(parents=True)
    (src / "PMC9.nxml").write_bytes(xml)
    (src / "fig1.png").write_bytes(_png((200, 0, 0)))
    (src / "fig2.png").write_bytes(_png((0, 0, 200)))
    report = ingest([tmp_path / "src"], tmp_path / "out")
    recs = _records(tmp_path / "out")
    assert report["figures_written"] == 2 and len({r["pair_id"] for r in recs}) == 2
    for rec in recs:
        assert len(rec["pair_id"]) <= 200 and rec["pair_id"].startswith("PMC9_FFFF")
        assert rec["fig_id"] in (long_a, long_b)
        assert (tmp_path / "out" / rec["image"]).is_file()
    assert ingest([tmp_path / "src"], tmp_path / "out2")["figures_written"] == 2
    assert _records(tmp_path / "out2") == recs  # the same ids on every run


def test_a_bad_size_option_is_refused_before_any_package_is_marked_done(tmp_path, capsys):
    """--max-side -5 failed every image in the workers ("package error: ValueError"), and the
    ledger then held every package as done: the corrected re-run wrote nothing."""
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    base = ["data", "ingest", str(src), "--out", str(out), "--workers", "1", "--no-progress"]
    # Usage errors (exit 2): argparse's range checks, and run()'s check of --max-side against
    # --min-size (32 by default), both before the ledger is opened.
    usage = "llavamed data ingest: error: argument "
    for bad, message in (
        (["--max-side", "-5"], usage + "--max-side: -5 must be >= 1"),
        (["--min-size", "-1"], usage + "--min-size: -1 must be >= 0"),
        (["--max-side", "16"], usage + "--max-side: 16 must be >= --min-size (32): "),
    ):
        with pytest.raises(SystemExit) as exc:
            main([*base, *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("usage: llavamed data ingest [-h]"), err
        assert err[-1].startswith(message), err
        assert not (out / ".done_packages.jsonl").exists()
    assert main(base) == 0
    assert _report(out)["figures_written"] == len(EXPECTED)


def test_a_rerun_with_other_options_is_refused(tmp_path, capsys):
    """Packages done are skipped whatever the options: a re-run asking for other domains into the
    same folder wrote nothing and exited 0, as if there were no such figures."""
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    base = ["data", "ingest", str(src), "--out", str(out), "--no-progress"]
    assert main([*base, "--domains", "chest_xray", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--domains", "mri"]) == 1
    err = capsys.readouterr().err
    assert "was built with other options" in err and "--domains" in err and "mri" in err
    assert main([*base, "--keep-missing-images", "--domains", "chest_xray"]) == 1
    assert "--keep-missing-images" in capsys.readouterr().err
    # The same options resume, whatever the worker count; their order does not matter.
    ingest([src], out, IngestOptions(keep_domains=("chest_xray",)), workers=2)
    assert {r["pair_id"] for r in _records(out)} == {"PMC1000001_F1"}
    # The lock is released after a refusal: the folder is usable again.
    with pytest.raises(InputError, match="other options"):
        ingest([src], out)
    assert main([*base, "--domains", "chest_xray"]) == 0


def test_temp_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    """A SIGKILL in the middle of an atomic write leaves its temp file (images/.<pair_id>.jpg.
    XXXX.tmp, .figures.jsonl.XXXX.tmp); nothing removed them, run after run."""
    import subprocess
    import sys

    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    ingest([src], out)
    kill_mid_write = (
        "import os, signal, sys\n"
        "from llavamed.utils.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    for target in (out / "images" / "PMC1000002_F1.jpg", out / "figures.jsonl"):
        res = subprocess.run([sys.executable, "-c", kill_mid_write, str(target)])
        assert res.returncode == -9
    (out / "images" / "notes.tmp").write_text("the user's")  # not ours: kept
    assert len(list(out.rglob(".*.tmp"))) == 2
    report = ingest([src], out)
    assert list(out.rglob(".*.tmp")) == []
    assert (out / "images" / "notes.tmp").exists()
    assert report["figures_written"] == len(EXPECTED) == len(_records(out))
    assert len(list((out / "images").glob("*.jpg"))) == len(EXPECTED)


def test_an_unpacked_tarball_keeps_the_images_of_its_subfolders(tmp_path):
    """PMC1/PMC1.nxml with its images in PMC1/figs/: read as a tarball, the article kept them;
    unpacked with tar xzf, the same article lost them ("image missing"). A subfolder with an
    article of its own keeps its images, and an image arriving in figs/ redoes the package."""
    from pmc_fixtures import write_dir

    files = article_files("PMC1000003")
    nested = {"PMC1000003.nxml": files["PMC1000003.nxml"], "figs/kidney.jpg": files["kidney.jpg"]}
    tar = write_tar(tmp_path / "tars" / "p.tar.gz", "PMC1000003", nested)
    from_tar = ingest([tar], tmp_path / "out_tar")
    folder = tmp_path / "dirs" / "PMC1000003"
    (folder / "figs").mkdir(parents=True)
    write_dir(folder, nested)
    other = _tiny_article("PMC5").replace(b"fig1", b"kidney")  # its own kidney image, in a
    write_dir(folder / "figs" / "PMC5", {"a.nxml": other})  # subfolder of figs/: none here
    from_dir = ingest([tmp_path / "dirs"], tmp_path / "out_dir")
    assert [r["pair_id"] for r in _records(tmp_path / "out_tar")] == ["PMC1000003_f1"]
    assert [r["pair_id"] for r in _records(tmp_path / "out_dir")] == ["PMC1000003_f1"]
    # PMC5's image is missing, not PMC1000003's (whose XML is malformed on purpose)
    assert from_dir["reasons"] == {**from_tar["reasons"], "skipped: image missing": 1}
    assert "skipped: image missing" not in from_tar["reasons"]
    [rec_dir], [rec_tar] = _records(tmp_path / "out_dir"), _records(tmp_path / "out_tar")
    assert rec_dir["image_sha1"] == rec_tar["image_sha1"]
    (folder / "figs" / "PMC5" / "kidney.png").write_bytes(_png((0, 0, 200)))
    again = ingest([tmp_path / "dirs"], tmp_path / "out_dir")
    assert again["last_run"]["packages_processed"] == 1  # PMC5's folder only
    (folder / "figs" / "extra.png").write_bytes(_png((0, 200, 0)))  # arrives in figs/
    assert ingest([tmp_path / "dirs"], tmp_path / "out_dir")["last_run"]["packages_processed"] == 1


def test_a_dangling_symlink_among_the_packages_is_counted_not_fatal(tmp_path):
    """A package that is listed but cannot be stat'ed (a dangling symlink, a file a downloader
    renamed meanwhile) stopped discovery, and the whole run, with a FileNotFoundError."""
    src = make_tarballs(tmp_path / "src")
    (src / "PMC1000003.tar.gz").rename(tmp_path / "PMC1000003.tar.gz")
    (src / "PMC1000003.tar.gz").symlink_to(tmp_path / "elsewhere" / "PMC1000003.tar.gz")
    report = ingest([src], tmp_path / "out")
    assert report["reasons"]["unreadable package file"] == 1
    assert report["packages_done"] == 3
    assert "PMC1000003_f1" not in {r["pair_id"] for r in _records(tmp_path / "out")}
    (tmp_path / "elsewhere").mkdir()  # the link's target arrives: the package is done again
    (tmp_path / "PMC1000003.tar.gz").rename(tmp_path / "elsewhere" / "PMC1000003.tar.gz")
    report = ingest([src], tmp_path / "out")
    assert report["last_run"]["packages_processed"] == 1
    assert {r["pair_id"] for r in _records(tmp_path / "out")} == set(EXPECTED)


def test_every_article_of_an_articleset_file_is_ingested(tmp_path):
    """The articles after the first of a <pmc-articleset> were counted but never read."""
    from pmc_fixtures import encoded, noise_image, write_dir

    one = (
        '<article article-type="{kind}"><front><article-meta>'
        '<article-id pub-id-type="pmc">{i}</article-id></article-meta></front><body>'
        '<fig id="F1"><label>Figure 1</label><caption><p>Axial CT of the chest, case {i}.</p>'
        '</caption><graphic href="g{i}"/></fig></body></article>'
    )
    kinds = {1: "research-article", 2: "retraction", 3: "case-report"}
    xml = "<pmc-articleset>" + "".join(one.format(i=i, kind=k) for i, k in kinds.items())
    files = {"set.xml": (xml + "</pmc-articleset>").encode()}
    files.update({f"g{i}.jpg": encoded(noise_image(40 + i), "JPEG") for i in kinds})
    write_dir(tmp_path / "src" / "set", files)
    report = ingest([tmp_path / "src"], tmp_path / "out")
    assert [(r["pair_id"], r["image"]) for r in _records(tmp_path / "out")] == [
        ("PMC1_F1", "images/PMC1_F1.jpg"),
        ("PMC3_F1", "images/PMC3_F1.jpg"),
    ]
    assert report["articles"] == 3 and report["figures_written"] == 2
    assert report["reasons"]["article: notice article"] == 1


def test_a_package_filled_in_at_the_same_size_is_redone_and_a_copied_one_is_not(tmp_path):
    """Downloaders that preallocate (aria2) leave a file of its full size before its bytes: the
    ledger compared sizes only, so the completed download was skipped as done for good."""
    import os

    real = write_tar(tmp_path / "full.tar.gz", "PMC1000002", article_files("PMC1000002"))
    data = real.read_bytes()
    pkg = tmp_path / "src" / "PMC1000002.tar.gz"
    pkg.parent.mkdir()
    pkg.write_bytes(b"\0" * len(data))
    first = ingest([tmp_path / "src"], tmp_path / "out")
    assert first["figures_written"] == 0
    pkg.write_bytes(data)
    os.utime(pkg, (pkg.stat().st_atime, pkg.stat().st_mtime + 5))
    second = ingest([tmp_path / "src"], tmp_path / "out")
    assert second["last_run"]["packages_processed"] == 1 and second["figures_written"] == 2
    # Copied elsewhere (a new mtime, the same bytes): done, and no longer hashed on later runs.
    os.utime(pkg, (pkg.stat().st_atime, pkg.stat().st_mtime + 60))
    third = ingest([tmp_path / "src"], tmp_path / "out")
    assert third["last_run"]["packages_skipped_as_done"] == 1
    assert third["figures_written"] == 2
    ledger = [
        json.loads(x) for x in (tmp_path / "out" / ".done_packages.jsonl").read_text().splitlines()
    ]
    assert (
        ledger[-1]["mtime"] == pkg.stat().st_mtime and ledger[-1]["digest"] == ledger[-2]["digest"]
    )


def test_a_redone_package_replaces_its_old_records(tmp_path):
    """A new version of an article (caption corrected, a figure withdrawn) kept the old captions:
    the new records were skipped as duplicate pair_ids, and the withdrawn figure stayed."""
    files = article_files("PMC1000002")
    write_tar(tmp_path / "src" / "PMC1000002.tar.gz", "PMC1000002", files)
    out = tmp_path / "out"
    ingest([tmp_path / "src"], out)
    before = {r["pair_id"]: r["fig_caption"] for r in _records(out)}
    assert len(before) == 2 and (out / "images" / "PMC1000002_F2.jpg").exists()
    nxml = files["PMC1000002.nxml"]
    nxml = nxml.replace(b"FLAIR image, sagittal plane.", b"FLAIR image, coronal plane (corrected).")
    files["PMC1000002.nxml"] = nxml
    (first_fig,) = [k for k in before if k != "PMC1000002_F2"]
    del files["brain-g1.png"]  # the first figure's image withdrawn: its record must go too
    write_tar(tmp_path / "src" / "PMC1000002.tar.gz", "PMC1000002", files)
    report = ingest([tmp_path / "src"], out)
    after = {r["pair_id"]: r["fig_caption"] for r in _records(out)}
    assert after == {"PMC1000002_F2": "FLAIR image, coronal plane (corrected)."}
    assert not (out / "images" / f"{first_fig}.jpg").exists()
    assert report["figures_written"] == 1
    assert "skipped: duplicate pair_id" not in report["reasons"]
    assert "skipped: duplicate image" not in report["reasons"]


def test_a_folder_given_as_dot_is_keyed_by_its_name(tmp_path, monkeypatch, capsys):
    """`llavamed data ingest . --out ...` from inside the download folder keyed its packages
    "/PMC1000001.tar.gz", the same command with the folder's path "src/PMC1000001.tar.gz": a
    re-run redid every package, found every figure a duplicate and exited 1; shards differed."""
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    monkeypatch.chdir(src)
    assert main(["data", "ingest", ".", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert [p.key for p in discover(["."])] == [p.key for p in discover([src])]
    monkeypatch.chdir(tmp_path)
    assert main(["data", "ingest", str(src), "--out", str(out), "--no-progress"]) == 0
    report = _report(out)
    assert report["last_run"]["packages_skipped_as_done"] == 3
    assert report["packages_done"] == 3 and "skipped: duplicate pair_id" not in report["reasons"]
    monkeypatch.chdir(src)
    assert [p.key for p in discover([".."])][0].startswith(f"{tmp_path.name}/src/")


def _sparse_tar(path, members, big_name, big_size):
    """An uncompressed tarball with ``members`` and one member of ``big_size`` zero bytes, written
    sparse (a hole), so the test costs no disk."""
    with open(path, "wb") as f:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.PAX_FORMAT))
            f.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        info = tarfile.TarInfo(big_name)
        info.size = big_size
        f.write(info.tobuf(format=tarfile.PAX_FORMAT))
        f.seek(big_size + (-big_size % tarfile.BLOCKSIZE), io.SEEK_CUR)
        f.write(b"\0" * tarfile.BLOCKSIZE * 2)


def test_an_image_file_too_large_to_be_a_figure_is_not_read(tmp_path):
    """Members were read whole into memory: a 4 MB tar.gz holding 800 MB of zeros named g1.tif
    took 1.6 GB of RAM per worker before the decoder refused it. A file over the limit is now
    counted "image too large" unread, in a tarball and in a folder."""
    import resource

    from llavamed.data.pmc.sources import MAX_FILE_BYTES

    files = article_files("PMC1000003")  # one figure: kidney.jpg
    big = MAX_FILE_BYTES + 1
    (tmp_path / "src").mkdir()
    _sparse_tar(
        tmp_path / "src" / "PMC1000003.tar",
        [("PMC1000003/PMC1000003.nxml", files["PMC1000003.nxml"])],
        "PMC1000003/kidney.jpg",
        big,
    )
    folder = write_dir(tmp_path / "dirs" / "PMC1000003", {"a.nxml": files["PMC1000003.nxml"]})
    with open(folder / "kidney.jpg", "wb") as f:
        f.truncate(big)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for src, out in ((tmp_path / "src", "out_tar"), (tmp_path / "dirs", "out_dir")):
        report = ingest([src], tmp_path / out, workers=1)
        reasons = {k: v for k, v in report["reasons"].items() if k != "malformed XML recovered"}
        assert reasons == {"skipped: image too large": 1}, src
        assert report["figures_written"] == 0
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kb < 200_000, grown_kb


def test_a_dicom_graphic_is_ingested(tmp_path):
    """llavamed.images reads DICOM, but ingest only looked at raster suffixes: a figure whose
    graphic is "ct1.dcm" (or "ct2" with ct2.dcm beside it) was counted "image missing"."""
    from pydicom.data import get_testdata_file

    dcm = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    xml = (
        b'<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        b'<article-id pub-id-type="pmc">8000001</article-id></article-meta></front><body>'
        b'<fig id="F1"><label>Figure 1</label><caption><p>Axial CT of the abdomen.</p>'
        b'</caption><graphic xlink:href="ct1.dcm"/></fig>'
        b'<fig id="F2"><label>Figure 2</label><caption><p>Axial CT, lung window.</p>'
        b'</caption><graphic xlink:href="ct2"/></fig></body></article>'
    )
    write_tar(tmp_path / "src" / "PMC8000001.tar.gz", "PMC8000001", {"a.nxml": xml, "ct1.dcm": dcm})
    write_dir(tmp_path / "dirs" / "PMC8000001", {"a.nxml": xml, "ct2.dcm": dcm})
    for src, out, fig_id in (("src", "o1", "F1"), ("dirs", "o2", "F2")):
        report = ingest([tmp_path / src], tmp_path / out, workers=1)
        assert report["figures_written"] == 1, report["reasons"]
        (rec,) = _records(tmp_path / out)
        assert rec["fig_id"] == fig_id and rec["domain"]["ct_scan"]
        with Image.open(tmp_path / out / rec["image"]) as im:
            assert im.mode == "RGB" and im.size == (128, 128)


def test_the_report_counts_the_records_the_file_holds(tmp_path):
    """A record kept without its image (package a) and completed by another package (b) stayed
    counted by a; when a's download completed and a was redone, its count went and the report
    said 0 figures for a file holding 1."""
    files = article_files("PMC1000003")
    no_image = {"PMC1000003.nxml": files["PMC1000003.nxml"]}
    src = tmp_path / "src"
    write_tar(src / "a.tar.gz", "A", no_image)
    write_tar(src / "b.tar.gz", "B", files)
    opts = IngestOptions(keep_missing_images=True)
    out = tmp_path / "out"
    assert ingest([src], out, opts)["figures_written"] == len(_records(out)) == 1
    write_tar(src / "a.tar.gz", "A", files)  # a's download completed
    report = ingest([src], out, opts)
    assert report["last_run"]["packages_processed"] == 1
    (rec,) = _records(out)
    assert rec["source"] == "src/b.tar.gz" and rec["image"] is not None
    assert report["figures_written"] == 1


def test_cli_rerun_of_a_moved_source_folder_is_not_a_failure(tmp_path, capsys):
    """Packages found under a new path have new keys and are done again; every figure is already
    in the corpus, and the run said "no figures written" and exited 1 as if all were corrupt."""
    make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["data", "ingest", "--out", str(out), "--workers", "1", "--no-progress"]
    assert main([*argv, str(tmp_path / "src")]) == 0
    (tmp_path / "src").rename(tmp_path / "downloads")
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "downloads")]) == 0
    captured = capsys.readouterr()
    assert "already in" in captured.out and "no figures written" not in captured.err
    assert len(_records(out)) == len(EXPECTED)


def test_macos_appledouble_files_are_not_packages_or_articles(tmp_path):
    """macOS writes "._name" files (a download's quarantine flag and other extended attributes)
    beside files copied to other disks and into the tarballs it makes; they were counted as a
    corrupt tarball and as malformed XML articles."""
    import struct

    apple = struct.pack(">II", 0x00051607, 0x00020000) + b"Mac OS X        " + b"\0" * 64
    files = article_files("PMC1000003")
    src = tmp_path / "src"
    write_tar(src / "PMC1000003.tar.gz", "PMC1000003", {"._PMC1000003.nxml": apple, **files})
    (src / "._PMC1000003.tar.gz").write_bytes(apple)
    folder = write_dir(src / "unpacked" / "PMC1000003", {"a.nxml": files["PMC1000003.nxml"]})
    (folder / "._a.nxml").write_bytes(apple)
    report = ingest([src], tmp_path / "out", workers=1)
    assert report["packages_done"] == 2 and report["articles"] == 2
    assert report["reasons"] == {"malformed XML recovered": 2, "skipped: image missing": 1}


def test_an_image_wider_than_jpeg_allows_is_downscaled_not_a_package_error(tmp_path):
    """JPEG stops at 65,500 pixels a side: a 70,000 x 40 strip raised OSError at save, counted
    "package error: OSError", and the package's other figures were lost."""
    buf = io.BytesIO()
    Image.new("L", (70000, 40), 128).save(buf, format="PNG")
    files = article_files("PMC1000002")  # figures brain-g1.png, brain-g2.tif (and a table)
    files["brain-g1.png"] = buf.getvalue()
    write_tar(tmp_path / "src" / "PMC1000002.tar.gz", "PMC1000002", files)
    report = ingest([tmp_path / "src"], tmp_path / "out", workers=1)
    assert report["figures_written"] == 2
    assert not [r for r in report["reasons"] if "error" in r or "image" in r], report["reasons"]
    wide = next(r for r in _records(tmp_path / "out") if r["graphic_ref"].startswith("brain-g1"))
    assert (wide["width"], wide["height"]) == (65500, 37)


def test_a_package_with_a_file_it_could_not_read_is_read_again_by_the_next_run(
    tmp_path, monkeypatch
):
    """A package counted 'unreadable XML file' (permissions, an I/O error) was recorded as
    done: its size and mtime do not change when its permissions are fixed, so every re-run
    skipped it and its figures stayed missing for good. (Root reads any file, so the refusal
    is the OS call's, for that one file.)"""
    import pathlib

    src = make_unpacked(tmp_path / "src")
    xml = src / "PMC1000002" / "PMC1000002.nxml"
    real_read = pathlib.Path.read_bytes

    def denied(self):
        if self == xml:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    out = tmp_path / "out"
    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    first = ingest([src], out, workers=1)
    monkeypatch.setattr(pathlib.Path, "read_bytes", real_read)
    assert first["reasons"].get("unreadable XML file") == 1
    assert not any(r["pair_id"].startswith("PMC1000002") for r in _records(out))
    again = ingest([src], out, workers=1)
    assert again["last_run"]["packages_processed"] == 1
    assert "unreadable XML file" not in again["reasons"]
    pids = [r["pair_id"] for r in _records(out)]
    assert len(pids) == len(set(pids)) == 8
    assert ingest([src], out, workers=1)["last_run"]["packages_processed"] == 0  # done now


def _jats(pmcid: str, body: str) -> bytes:
    return (
        '<?xml version="1.0"?><article xmlns:xlink="http://www.w3.org/1999/xlink"><front>'
        f'<article-meta><article-id pub-id-type="pmc">{pmcid}</article-id></article-meta>'
        f"</front><body>{body}</body></article>"
    ).encode()


def test_a_fig_group_whose_image_sits_on_the_group_is_one_figure(tmp_path):
    """JATS lets a <fig-group> carry the <graphic> itself, its member <fig>s only panel captions
    (or no members at all): the figure was skipped as "no graphic" per member, and a group
    without members vanished uncounted. A group whose members have images stays per member."""
    from pmc_fixtures import encoded, noise_image

    body = (
        '<p>The CT (<xref ref-type="fig" rid="G1">Figure 1</xref>) shows a mass. The axial '
        'view (<xref ref-type="fig" rid="F1a">Figure 1A</xref>) shows its margin.</p>'
        '<fig-group id="G1"><label>Figure 1</label><caption><p>Chest CT of the mass.</p>'
        '</caption><fig id="F1a"><label>A</label><caption><p>Axial view.</p></caption></fig>'
        '<fig id="F1b"><label>B</label><caption><p>Coronal view.</p></caption></fig>'
        '<graphic xlink:href="g1"/></fig-group>'
        '<fig-group id="G2"><label>Figure 2</label><caption><p>Brain MRI, T2.</p></caption>'
        '<graphic xlink:href="g2"/></fig-group>'
        '<fig-group id="G3"><label>Figure 3</label><caption><p>Histology.</p></caption>'
        '<fig id="F3a"><label>A</label><caption><p>Low power.</p></caption>'
        '<graphic xlink:href="g3a"/></fig><graphic xlink:href="g3"/></fig-group>'
    )
    files = {"PMC7/PMC7.nxml": _jats("PMC7", body)}
    for i, name in enumerate(("g1", "g2", "g3", "g3a")):
        files[f"PMC7/{name}.jpg"] = encoded(noise_image(60 + i), "JPEG")
    src = _tar_of(tmp_path / "src" / "PMC7.tar.gz", files).parent
    report = ingest([src], tmp_path / "out")
    got = {r["pair_id"]: r for r in _records(tmp_path / "out")}
    assert list(got) == ["PMC7_G1", "PMC7_G2", "PMC7_F3a"]
    g1 = got["PMC7_G1"]
    assert (g1["fig_label"], g1["graphic_ref"], g1["image"]) == (
        "Figure 1", "g1", "images/PMC7_G1.jpg"
    )  # fmt: skip
    assert g1["fig_caption"] == "Chest CT of the mass. (A) Axial view. (B) Coronal view."
    assert [m["tokens"] for m in g1["in_text_mention"]] == [
        "The CT (Figure 1) shows a mass.",
        "The axial view (Figure 1A) shows its margin.",
    ]
    assert (got["PMC7_G2"]["fig_caption"], got["PMC7_G2"]["graphic_ref"]) == (
        "Brain MRI, T2.",
        "g2",
    )
    # Members with images of their own: unchanged, the group's caption leading each member's.
    assert (got["PMC7_F3a"]["fig_caption"], got["PMC7_F3a"]["graphic_ref"]) == (
        "Histology. Low power.", "g3a"
    )  # fmt: skip
    assert "skipped: no graphic" not in report["reasons"]


def test_a_citation_of_an_id_two_figures_share_goes_to_the_one_it_names(tmp_path):
    """Two <fig id="F1"> in one article (invalid, but it occurs): every citation of F1 went to
    the first figure, so "the histology (Figure 2)" became a mention of the chest X-ray and the
    histology figure had none. The citation's number picks the figure; a citation naming no
    number goes to each figure with the id, counted."""
    from pmc_fixtures import encoded, noise_image

    body = (
        '<p>The X-ray is clear (<xref ref-type="fig" rid="F1">Figure 1</xref>).</p>'
        '<p>The histology shows tumour (<xref ref-type="fig" rid="F1">Figure 2</xref>).</p>'
        '<p>See the images (<xref ref-type="fig" rid="F1">here</xref>).</p>'
        '<fig id="F1"><label>Figure 1</label><caption><p>Chest X-ray.</p></caption>'
        '<graphic xlink:href="a"/></fig>'
        '<fig id="F1"><label>Figure 2</label><caption><p>Histology, H&amp;E.</p></caption>'
        '<graphic xlink:href="b"/></fig>'
    )
    files = {"PMC8/PMC8.nxml": _jats("PMC8", body)}
    files.update(
        {
            "PMC8/a.jpg": encoded(noise_image(70), "JPEG"),
            "PMC8/b.jpg": encoded(noise_image(71), "JPEG"),
        }
    )
    report = ingest([_tar_of(tmp_path / "src" / "PMC8.tar.gz", files)], tmp_path / "out")
    got = {
        r["pair_id"]: [m["tokens"] for m in r["in_text_mention"]]
        for r in _records(tmp_path / "out")
    }
    assert got == {
        "PMC8_F1": ["The X-ray is clear (Figure 1).", "See the images (here)."],
        "PMC8_F1_2": ["The histology shows tumour (Figure 2).", "See the images (here)."],
    }
    assert report["reasons"]["duplicate figure id"] == 1
    assert report["reasons"]["ambiguous citation of a duplicate figure id"] == 1


def test_links_inside_a_tarball_are_read_and_links_out_of_it_refused(tmp_path):
    """Hard and symbolic link members were skipped, so a figure whose file was a link to
    another member of the archive was counted "image missing". A hard link, or a relative
    symlink that stays inside the archive (its target read before or after it, in the same
    article folder or an earlier one), reads as its target; a link that is absolute or climbs
    out of the archive is refused, counted, and never followed."""
    from pmc_fixtures import encoded, noise_image

    figs = "".join(
        f'<fig id="F{i}"><label>Figure {i}</label><caption><p>Chest X-ray, case {i}.</p>'
        f'</caption><graphic xlink:href="g{i}"/></fig>'
        for i in range(1, 8)
    )
    one = '<fig id="F1"><label>Figure 1</label><caption><p>CT.</p></caption><graphic xlink:href="c1"/></fig>'
    image = {i: encoded(noise_image(80 + i), "JPEG") for i in range(5)}
    links = {
        "PMC9/g1.jpg": (tarfile.LNKTYPE, "PMC9/orig/h1.jpg"),  # hard link, target read before
        "PMC9/g2.jpg": (tarfile.SYMTYPE, "later/s2.jpg"),  # symlink, target read after it
        "PMC9/g3.jpg": (tarfile.LNKTYPE, "PMC5/c1.jpg"),  # hard link into an earlier article
        "PMC9/g4.jpg": (tarfile.SYMTYPE, "../../etc/passwd"),
        "PMC9/g5.jpg": (tarfile.SYMTYPE, "/etc/hostname"),
        "PMC9/g6.jpg": (tarfile.LNKTYPE, "../PMC9/orig/h1.jpg"),
        "PMC9/g7.jpg": (tarfile.SYMTYPE, "orig/nowhere.jpg"),
    }
    path = tmp_path / "src" / "bundle.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tf:

        def add(name, data=None, link=None):
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = link
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)

        add("PMC5/PMC5.nxml", _jats("PMC5", one))
        add("PMC5/c1.jpg", image[0])
        add("PMC9/PMC9.nxml", _jats("PMC9", figs))
        add("PMC9/orig/h1.jpg", image[1])
        for name, link in links.items():
            add(name, link=link)
        add("PMC9/later/s2.jpg", image[2])
    report = ingest([path], tmp_path / "out")
    got = {r["pair_id"]: r for r in _records(tmp_path / "out")}
    # PMC9_F3 is read through its link too: the same image as PMC5_F1, so not written twice.
    assert list(got) == ["PMC5_F1", "PMC9_F1", "PMC9_F2"]
    out = tmp_path / "out"
    for pair_id, source in (("PMC9_F1", "PMC9/orig/h1.jpg"), ("PMC9_F2", "PMC9/later/s2.jpg")):
        with Image.open(out / got[pair_id]["image"]) as img:
            assert img.size == (64, 48), source
    assert report["reasons"]["skipped: duplicate image"] == 1
    assert report["reasons"]["link outside the package"] == 3
    assert report["reasons"]["link target not in the package"] == 1
    assert report["reasons"]["skipped: image missing"] == 4


def test_figure_files_saved_with_a_byte_order_mark_are_read(tmp_path):
    """LLaVA-Med's {domain: [records]} JSON, or a JSON list, saved by a Windows editor starts
    with a UTF-8 byte-order mark: the shape sniffing saw no "{" and read it as JSONL, which
    refused it ("invalid JSON line")."""
    from llavamed.data.figures import iter_figures

    bom = b"\xef\xbb\xbf"
    as_dict = tmp_path / "captions.json"
    as_dict.write_bytes(
        bom + b'{\n  "mri": [\n    {"pair_id": "1_F1", "fig_caption": "T2."}\n  ]\n}\n'
    )
    as_list = tmp_path / "list.json"
    as_list.write_bytes(bom + b'[{"pair_id": "1_F2", "fig_caption": "CT."}]')
    one_line = tmp_path / "one.jsonl"
    one_line.write_bytes(bom + b'{"pair_id": "1_F3", "fig_caption": "X-ray."}\n')
    [rec] = iter_figures(as_dict)
    assert (rec["pair_id"], rec["domain"]["mri"]) == ("1_F1", True)
    assert [r["pair_id"] for r in iter_figures(as_list)] == ["1_F2"]
    assert [r["pair_id"] for r in iter_figures(one_line)] == ["1_F3"]


def test_a_rerun_reads_a_figures_file_holding_a_lone_surrogate(tmp_path):
    """A record merged into figures.jsonl by hand whose pair_id holds a "\\ud83d" escape (an id
    cut inside an emoji's UTF-16 pair) stopped every later run into the folder: hashing the
    pair_ids it holds raised UnicodeEncodeError before a package was read."""
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    ingest([src], out)
    figures = out / "figures.jsonl"
    merged = {"pair_id": "PMC7_F1 \ud83d", "fig_caption": "Axial CT \ud83d", "image": None}
    with open(figures, "a") as fh:
        fh.write(json.dumps(merged) + "\n")  # ensure_ascii: "\ud83d" escapes
    report = ingest([src], out)
    assert report["figures_written"] == len(EXPECTED) + 1
    assert report["last_run"]["packages_skipped_as_done"] == 3
    assert json.loads(figures.read_text().splitlines()[-1]) == merged


def test_every_image_format_the_decoder_reads_is_found_beside_its_article(tmp_path):
    """A package's JPEG 2000 (".jp2"), PPM/PGM and ".jpe" JPEG files were never looked at: their
    figures were counted "image missing", though llavamed.images reads those formats."""
    import numpy as np

    rng = np.random.default_rng(5)
    files: dict[str, bytes] = {}
    formats = {"g1.jp2": "JPEG2000", "g2.ppm": "PPM", "g3.PGM": "PPM", "g4.JPE": "JPEG"}
    for name, fmt in formats.items():
        img = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        if name.endswith("PGM"):
            img = img.convert("L")
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        files[name] = buf.getvalue()
    figs = "".join(
        f'<fig id="F{i}"><label>Figure {i}</label><caption><p>Axial CT, case {i}.</p></caption>'
        f'<graphic xlink:href="g{i}"/></fig>'
        for i in range(1, 5)
    )
    files["PMC5.nxml"] = (
        '<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>'
        '<article-id pub-id-type="pmc">5</article-id></article-meta></front>'
        f"<body><sec><p>Cases.</p>{figs}</sec></body></article>"
    ).encode()
    for src in (
        write_dir(tmp_path / "dir" / "PMC5", files),
        write_tar(tmp_path / "PMC5.tar.gz", "PMC5", files),
    ):
        out = tmp_path / f"out_{src.name}"
        report = ingest([src], out)
        assert report["figures_written"] == 4, report["reasons"]
        for rec in _records(out):
            with Image.open(out / rec["image"]) as im:
                assert im.size == (64, 48)


def test_an_output_folder_inside_the_article_folder_is_not_part_of_the_package(tmp_path):
    """`data ingest . --out corpus` from inside a folder of unpacked articles: the output's
    images/ counted among the package's subfolder images, so the package's fingerprint changed
    with every run and each re-run redid it (its records dropped and written again)."""
    src = write_dir(tmp_path / "PMC1000001", article_files("PMC1000001"))
    out = src / "corpus"
    first = ingest([src], out)
    before = (out / "figures.jsonl").read_bytes()
    again = ingest([src], out)
    assert again["last_run"]["packages_skipped_as_done"] == 1
    assert again["last_run"]["packages_processed"] == 0
    assert again["figures_written"] == first["figures_written"] == 5
    assert (out / "figures.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "layout",
    [
        # An article at the top of the tarball, a figs/ preview after its figure.
        {"a.nxml": "xml", "fig1.png": "full", "figs/fig1.png": "preview"},
        # Two image subfolders as near as each other: the first in name order, as unpacked.
        {"PMC1/a.nxml": "xml", "PMC1/figs/fig1.png": "full", "PMC1/thumbs/fig1.png": "preview"},
    ],
)
def test_a_preview_never_replaces_the_figure_the_unpacked_folder_takes(tmp_path, layout):
    """A tarball's top level counted as near as its folders, so a figs/ preview listed after the
    figure of an article at the top replaced it (and of figs/ and thumbs/, the later did): the
    tarball's record had the 40x40 preview, the unpacked folder's the figure."""
    data = {
        "xml": _tiny_article("PMC1"),
        "full": _png((200, 0, 0)),
        "preview": _png((0, 200, 0), (40, 40)),
    }
    members = {name: data[kind] for name, kind in layout.items()}
    tar = _tar_of(tmp_path / "src" / "p.tar.gz", members)
    folder = tmp_path / "unpacked" / "p"
    for name, blob in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)
    for src in (tar, folder):
        out = tmp_path / f"out_{src.name}"
        ingest([src], out)
        (rec,) = _records(out)
        with Image.open(out / rec["image"]) as im:
            assert im.size == (64, 48), src


def test_linked_folders_under_a_source_are_searched_once(tmp_path):
    """A corpus spread over disks ("pmc/more -> /mnt/disk2/pmc") was "no PMC packages found":
    os.walk did not enter linked folders. A link to a folder above it must not loop."""
    disk2 = make_tarballs(tmp_path / "disk2")
    src = tmp_path / "pmc"
    src.mkdir()
    (src / "more").symlink_to(disk2, target_is_directory=True)
    (src / "again").symlink_to(disk2, target_is_directory=True)  # the same folder twice
    (disk2 / "up").symlink_to(src, target_is_directory=True)  # a loop
    assert [p.key for p in discover([src])] == [
        f"pmc/again/{pmcid}.tar.gz" for pmcid in ("PMC1000001", "PMC1000002", "PMC1000003")
    ]
    report = ingest([src], tmp_path / "out")
    assert report["figures_written"] == len(EXPECTED)


def test_a_line_that_is_not_utf8_survives_the_rewrite_of_a_changed_package(tmp_path):
    """A hand-merged Latin-1 record in figures.jsonl (skipped as a bad line by the scan) stopped
    the next run whose package had changed in a UnicodeDecodeError: the rewrite that drops the
    package's old records read the file as UTF-8 text."""
    src = make_tarballs(tmp_path / "src")
    out = tmp_path / "out"
    ingest([src], out)
    latin1 = '{"pair_id": "X_1", "fig_caption": "caf\u00e9", "image": null}\n'.encode("latin-1")
    with open(out / "figures.jsonl", "ab") as fh:
        fh.write(latin1)
    changed = src / "PMC1000003.tar.gz"
    changed.write_bytes(changed.read_bytes() + b"\0" * 1024)  # a new size: redone
    report = ingest([src], out)
    assert report["last_run"]["packages_processed"] == 1
    assert report["figures_written"] == len(EXPECTED)
    assert latin1 in (out / "figures.jsonl").read_bytes()  # kept as it was, not lost
