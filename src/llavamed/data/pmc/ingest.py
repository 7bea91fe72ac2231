"""``llavamed data ingest``: PMC OA packages -> ``figures.jsonl`` + ``images/`` + a report.

Work is split by package. Worker processes parse, label and decode; the parent is the only
writer. Per package the parent writes the images (temp + rename), appends the records to
``figures.jsonl``, then appends the package to the ledger ``.done_packages.jsonl``. A SIGKILL at
any point leaves at worst a package whose records are partly written and which is not in the
ledger: the next run processes it again and skips the pair_ids it already holds, so the output
never holds a duplicate pair_id or a torn line.

A record kept without its image (``--keep-missing-images``) is superseded when a later run finds
the image (a package whose download completed): the image is written, the new record appended,
and at the end of the run ``figures.jsonl`` is rewritten (temp + rename) without the image-less
one. A kill before that rewrite leaves both lines; the next run's writer drops the old one first.

The options that shape records are kept in ``.ingest_options.json``; a run with other ones into
the same folder is refused, as the packages already done would not be redone with them.

Reasons for skipping or failing are counted per package, stored in the ledger, and summed over
all runs into ``ingest_report.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llavamed.data.domains import classify_text
from llavamed.data.figures import DOMAINS
from llavamed.data.pmc.jats import Article, parse_articles
from llavamed.data.pmc.sources import (
    INGEST_OUTPUT_MARKERS,
    MAX_FILE_BYTES,
    ArticleFiles,
    Oversized,
    PackageRef,
    content_digest,
    discover,
    iter_articles,
    parse_shard,
    select_shard,
)
from llavamed.errors import ConfigError, InputError
from llavamed.utils.io import (
    JsonlAppender,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
)

FIGURES = "figures.jsonl"
IMAGES = "images"
REPORT = "ingest_report.json"
LEDGER = ".done_packages.jsonl"
LOCK = ".ingest.lock"
OPTIONS = ".ingest_options.json"
assert {OPTIONS, LEDGER} == set(INGEST_OUTPUT_MARKERS)  # sources skips folders that hold them

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class IngestOptions:
    keep_missing_images: bool = False
    """Keep figures whose image file is missing from the package, with ``image: null``."""
    min_image_size: int = 32
    """Drop images whose shorter side is below this many pixels (icons, spacers, arrows)."""
    max_image_side: int | None = None
    """Downscale images whose longer side exceeds this (None keeps the original size)."""
    label_domains: bool = True
    """Run the domain classifier on every record."""
    keep_domains: tuple[str, ...] | None = None
    """Keep only records labelled with one of these domains ("other" = no domain)."""
    jpeg_quality: int = 95
    max_pixels: int | None = None
    """Reject images with more pixels than this (None: :mod:`llavamed.images`' default)."""

    def __post_init__(self) -> None:
        # A bad value made every image fail in the workers ("package error: ValueError" for
        # --max-side -5), and the ledger then held every package as done.
        def bad(field: str, why: str) -> ConfigError:
            flag = _OPTION_FLAGS.get(field)
            return ConfigError(f"{flag or field}: {why}")

        if self.min_image_size < 0:
            raise bad("min_image_size", f"must be >= 0, got {self.min_image_size}")
        if self.max_image_side is not None:
            if self.max_image_side < 1:
                raise bad("max_image_side", f"must be >= 1, got {self.max_image_side}")
            if self.max_image_side < self.min_image_size:
                raise bad(
                    "max_image_side",
                    f"{self.max_image_side} is below --min-size {self.min_image_size}: images "
                    "would be downscaled under the minimum size",
                )
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise bad("max_pixels", f"must be >= 1, got {self.max_pixels}")
        if self.keep_domains is not None:
            bad_names = [d for d in self.keep_domains if d not in DOMAINS and d != "other"]
            if bad_names or not self.keep_domains:
                raise bad("keep_domains", f"unknown domain(s) {bad_names}")

    def recorded(self) -> dict:
        """The options as ``OPTIONS`` stores them: every one shapes the records written."""
        out = asdict(self)
        if out["keep_domains"] is not None:
            out["keep_domains"] = sorted(out["keep_domains"])
        return out


# How the command line spells each option, for messages.
_OPTION_FLAGS = {
    "keep_missing_images": "--keep-missing-images",
    "min_image_size": "--min-size",
    "max_image_side": "--max-side",
    "label_domains": "--no-domains",
    "keep_domains": "--domains",
}


@dataclass
class PackageResult:
    key: str
    records: list[tuple[dict, bytes | None]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    articles: int = 0
    seconds: float = 0.0
    digest: str | None = None  # of the bytes read (sources.content_digest), for the ledger


# A pair_id names its image file (images/<pair_id>.jpg, written through a temp name about 20
# characters longer): file names stop at 255 bytes, so a longer id is cut and made unique by a hash.
MAX_PAIR_ID = 200


def pair_id_for(pmcid: str | None, pmid: str | None, fallback: str, fig_id: str) -> str:
    pair_id = _SAFE.sub("_", f"{pmcid or pmid or fallback}_{fig_id}")
    if len(pair_id) > MAX_PAIR_ID:
        digest = hashlib.sha1(pair_id.encode("utf-8")).hexdigest()[:12]
        pair_id = f"{pair_id[: MAX_PAIR_ID - 13]}_{digest}"
    return pair_id


# --- worker side -----------------------------------------------------------------------------


# Reasons that say a file could not be read, not that its content is bad: a package counted
# under one is read again by the next run (once its permissions are fixed, or its disk is back)
# instead of standing in the ledger as done with figures missing.
READ_FAILURES = ("unreadable package file", "unreadable folder", "unreadable XML file")


def process_package(pkg: PackageRef, opts: IngestOptions) -> PackageResult:
    """Parse, label and decode one package. Never raises for bad input: every problem becomes a
    counted reason in the result."""
    t0 = time.perf_counter()
    result = PackageResult(key=pkg.key, digest=content_digest(pkg))
    notes: list[str] = []
    try:
        for files in iter_articles(pkg, notes):
            result.articles += 1
            _process_article(pkg, files, opts, result)
    except Exception as exc:  # a bug or an exotic failure must not stop a 1M-package run
        result.counts[f"package error: {type(exc).__name__}"] += 1
    for note in notes:
        result.counts[note] += 1
    if result.articles == 0 and not notes:
        result.counts["package without articles"] += 1
    result.seconds = time.perf_counter() - t0
    return result


def _process_article(
    pkg: PackageRef, files: ArticleFiles, opts: IngestOptions, result: PackageResult
) -> None:
    counts = result.counts
    try:
        articles, rejected = parse_articles(
            files.xml, name=files.name, fallback_pmcid=files.pmcid_hint()
        )
    except InputError as exc:
        counts[f"article: {exc.reason}"] += 1
        return
    # The caller counted the file as one article; an E-utilities <pmc-articleset> holds several.
    result.articles += len(articles) + len(rejected) - 1
    for exc in rejected:
        counts[f"article: {exc.reason}"] += 1
    for article in articles:
        _process_figures(pkg, files, article, opts, result)


def _process_figures(
    pkg: PackageRef,
    files: ArticleFiles,
    article: Article,
    opts: IngestOptions,
    result: PackageResult,
) -> None:
    counts = result.counts
    for note in article.notes:
        counts[note] += 1
    if not (article.pmcid or article.pmid):
        counts["article without pmcid or pmid"] += 1
    stem = Path(files.name).stem
    for fig in article.figures:
        if fig.skip_reason:
            counts[f"skipped: {fig.skip_reason}"] += 1
            continue
        mentions = article.mentions.get(fig.fig_id)
        record = _record(article, stem, fig, mentions, pkg.key)
        if opts.label_domains or opts.keep_domains:
            record["domain"] = classify_text(record["fig_caption"], mentions or [])
        if opts.keep_domains and not _wanted(record["domain"], opts.keep_domains):
            counts["skipped: domain not selected"] += 1
            continue
        found = files.find_image(fig.graphic_ref)
        if found is None:
            if opts.keep_missing_images:
                counts["kept without image"] += 1
                result.records.append((record, None))
            else:
                counts["skipped: image missing"] += 1
            continue
        member, data = found
        try:
            jpeg, width, height = encode_image(data, f"{pkg.key}:{member}", opts)
        except InputError as exc:
            counts[f"skipped: {exc.reason}"] += 1
            continue
        record["image"] = f"{IMAGES}/{record['pair_id']}.jpg"
        record["image_sha1"] = hashlib.sha1(jpeg).hexdigest()
        record["width"], record["height"] = width, height
        result.records.append((record, jpeg))


def _record(article: Article, stem: str, fig, mentions: list[str] | None, source: str) -> dict:
    return {
        "pair_id": pair_id_for(article.pmcid, article.pmid, stem, fig.fig_id),
        "pmid": article.pmid,
        "pmcid": article.pmcid,
        "fig_id": fig.fig_id,
        "fig_label": fig.label,
        "fig_caption": fig.caption,
        "graphic_ref": fig.graphic_ref,
        "image": None,
        "in_text_mention": [{"tokens": s} for s in mentions] if mentions else None,
        "domain": {d: False for d in DOMAINS},
        "source": source,
    }


def _wanted(domain: dict, keep: tuple[str, ...]) -> bool:
    if "other" in keep and not any(domain.values()):
        return True
    return any(domain.get(d) for d in keep)


JPEG_MAX_SIDE = 65_500


def encode_image(
    data: bytes | Path | Oversized, name: str, opts: IngestOptions
) -> tuple[bytes, int, int]:
    """Decode any supported image and re-encode it as RGB JPEG. Raises ``InputError`` with a
    countable reason ("corrupt image", "not an image", "tiny image", ...)."""
    from llavamed.images import load_image

    # A file is read whole before it is decoded: one over the limit is refused unread.
    size = data.size if isinstance(data, Oversized) else None
    if isinstance(data, Path):
        try:
            size = data.stat().st_size
        except OSError:
            size = None  # load_image names the problem
    if size is not None and size > MAX_FILE_BYTES:
        raise InputError(name, "image too large", f"{size} bytes > {MAX_FILE_BYTES}")

    kwargs = {"name": name}
    if opts.max_pixels:
        kwargs["max_pixels"] = opts.max_pixels
    img = load_image(data, **kwargs)
    if min(img.size) < opts.min_image_size:
        raise InputError(name, "tiny image", f"{img.size[0]}x{img.size[1]}")
    # JPEG stops at 65,500 pixels a side: a wider strip (a gel, a sequence track) raised OSError
    # at save, which lost the rest of its package ("package error: OSError").
    side = min(opts.max_image_side or JPEG_MAX_SIDE, JPEG_MAX_SIDE)
    if max(img.size) > side:
        img.thumbnail((side, side))
    buf = io.BytesIO()
    try:
        img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    except (OSError, ValueError) as exc:
        raise InputError(name, "unencodable image", str(exc)) from exc
    return buf.getvalue(), img.size[0], img.size[1]


# --- parent side: the single writer -----------------------------------------------------------


def _h64(text: str) -> int:
    # 8-byte digests keep the seen-sets small at PMC scale (15M pairs ~ 0.6 GB instead of ~2 GB).
    # surrogatepass: a pair_id in figures.jsonl holding a "\ud83d" escape (a hand-merged record)
    # stopped every re-run in a UnicodeEncodeError; other text hashes as it did.
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class IngestWriter:
    """Owns ``DIR``: loads what earlier runs wrote, then appends packages' results."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out = Path(out_dir)
        (self.out / IMAGES).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK, "w")
        try:
            # lockf, not flock: a POSIX lock belongs to this process only, so worker processes
            # forked from it (which outlive a SIGKILLed parent for a moment) do not hold it.
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise InputError(self.out, "another ingest is writing to this folder") from exc
        self._remove_temp_files()
        self.ledger = JsonlAppender(self.out / LEDGER)
        self.done: dict[str, dict] = {e["package"]: e for e in self.ledger.existing()}
        self.figures = JsonlAppender(self.out / FIGURES)
        self._scan()

    def _scan(self) -> None:
        """Index what ``figures.jsonl`` holds: pair_ids, image hashes, records kept without their
        image, and the packages a killed run left partly written."""
        self.pairs: set[int] = set()
        self.images: set[int] = set()
        # pair_ids written with "image": null -> the package that wrote them: a later run that
        # finds the image supersedes the record.
        self.without_image: dict[int, str] = {}
        self._superseded: set[int] = set()  # pair_ids whose image-less line is to be dropped
        partial_sources: set[str] = set()
        for rec in self.figures.existing():
            pid = _h64(str(rec.get("pair_id")))
            if pid in self.pairs:
                # A superseding record appended by a run killed before it rewrote the file.
                if rec.get("image") is not None and self.without_image.pop(pid, None) is not None:
                    self._superseded.add(pid)
            else:
                self.pairs.add(pid)
                if rec.get("image") is None:
                    self.without_image[pid] = sys.intern(str(rec.get("source")))
            if rec.get("image_sha1"):
                self.images.add(int(rec["image_sha1"][:16], 16))
            if rec.get("source") not in self.done:
                partial_sources.add(rec.get("source"))
        # Packages cut off by a crash: their records already written are not duplicates.
        self.partial = partial_sources
        self._drop_superseded()

    def _remove_temp_files(self) -> None:
        """Remove the temp files a killed run left (``images/.<pair_id>.jpg.XXXX.tmp``,
        ``.figures.jsonl.XXXX.tmp``): each atomic write removes its own unless the process is
        SIGKILLed mid-write, and then nothing did. Safe here: this writer holds the folder's lock,
        so no other run is writing them. One pass over the folder, cheaper than the read of
        figures.jsonl that follows."""
        ours = (FIGURES, REPORT, OPTIONS)
        for folder, is_ours in (
            (self.out / IMAGES, lambda n: ".jpg." in n),
            (self.out, lambda n: any(n.startswith(f"{f}.") for f in ours)),
        ):
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name[0] == "." and name.endswith(".tmp") and is_ours(name[1:]):
                        try:
                            os.unlink(entry.path)
                        except OSError:
                            pass

    def use_options(self, opts: IngestOptions) -> None:
        """Record the options of the first run in ``OPTIONS``; refuse other ones later. Packages
        are skipped as done whatever the options, so a re-run with ``--domains mri`` into a folder
        built with ``--domains ct_scan`` wrote nothing and exited 0. A folder from before this
        record existed takes the options it is given."""
        path = self.out / OPTIONS
        now = opts.recorded()
        if not path.exists():
            atomic_write_json(path, now)
            return
        try:
            then = read_json(path)
        except InputError:
            then = None
        if not isinstance(then, dict):  # written atomically, so only a hand edit breaks it
            atomic_write_json(path, now)
            return
        defaults = IngestOptions().recorded()
        changed = [k for k in now if then.get(k, defaults[k]) != now[k]]
        if changed:
            what = "; ".join(
                f"{_OPTION_FLAGS.get(k, k)}: {then.get(k, defaults[k])!r} then, {now[k]!r} now"
                for k in changed
            )
            raise InputError(
                self.out,
                "was built with other options",
                f"{what}. Packages done are not redone: give another --out, or the same options",
            )

    def is_done(self, pkg: PackageRef) -> bool:
        """Done when the ledger holds the package at its size and mtime; when only the mtime
        moved, when its bytes hash the same (a copied source tree is not redone; a download
        preallocated at its full size and filled in later is)."""
        entry = self.done.get(pkg.key)
        if not entry or entry.get("size") != pkg.size:
            return False
        if any(reason in entry.get("counts", {}) for reason in READ_FAILURES):
            return False  # a file it could not read then (permissions, a disk not mounted)
        if entry.get("mtime", pkg.mtime) == pkg.mtime:  # a ledger line of before mtimes counted
            return True
        if entry.get("digest") is None or entry["digest"] != content_digest(pkg):
            return False
        entry = {**entry, "mtime": pkg.mtime}  # so the next run need not hash it again
        self.ledger.append(entry)
        self.done[pkg.key] = entry
        return True

    def forget(self, keys: set[str]) -> None:
        """Drop what the packages ``keys`` wrote (records and their images) before they are
        redone: a package that changed since (a new version of an article, a download that
        completed) would otherwise keep its old captions, its new records skipped as duplicate
        pair_ids. ``figures.jsonl`` is rewritten first (temp + rename); a kill after that leaves
        at worst an orphan image, overwritten when the package is redone."""
        keys = {k for k in keys if k in self.done}
        if not keys:
            return
        images: list[str] = []

        def drop(rec: dict) -> bool:
            if rec.get("source") not in keys:
                return False
            if isinstance(rec.get("image"), str):
                images.append(rec["image"])
            return True

        self._rewrite_figures(drop)
        for image in images:
            try:
                (self.out / image).unlink()
            except OSError:
                pass
        for key in keys:  # the report must not count them until they are done again
            del self.done[key]
        self.figures = JsonlAppender(self.out / FIGURES)
        self._scan()

    def write(self, pkg: PackageRef, result: PackageResult) -> int:
        counts = Counter(result.counts)
        written = 0
        for record, jpeg in result.records:
            pid = _h64(record["pair_id"])
            superseding = pid in self.pairs and jpeg is not None and pid in self.without_image
            if pid in self.pairs and not superseding:
                if pkg.key in self.partial:
                    written += 1  # written before the crash; keep it, don't count twice
                else:
                    counts["skipped: duplicate pair_id"] += 1
                continue
            if jpeg is not None:
                img_hash = int(record["image_sha1"][:16], 16)
                if img_hash in self.images:
                    counts["skipped: duplicate image"] += 1
                    continue
                # No fsync per image (it was a quarter of single-process run time): safe against
                # a killed process, as the record is appended only after the rename.
                atomic_write_bytes(self.out / record["image"], jpeg, fsync=False)
                self.images.add(img_hash)
            self.figures.append(record)
            self.pairs.add(pid)
            if superseding:
                self._superseded.add(pid)
                if self.without_image.pop(pid) != pkg.key:
                    # Another package wrote the image-less record and counted it as written.
                    counts["image added to a record kept without one"] += 1
                    continue
            elif jpeg is None:
                self.without_image[pid] = pkg.key
            written += 1
        counts["figures written"] += written
        entry = {
            "package": pkg.key,
            "size": pkg.size,
            "mtime": pkg.mtime,
            "digest": result.digest,
            "articles": result.articles,
            "counts": dict(counts),
            "seconds": round(result.seconds, 4),
        }
        self.ledger.append(entry)
        self.done[pkg.key] = entry
        return written

    def _drop_superseded(self) -> None:
        """Rewrite ``figures.jsonl`` (temp + rename) without the image-less records that a record
        of the same pair_id with its image superseded, so the file holds each pair_id once."""
        if not self._superseded:
            return
        self._rewrite_figures(
            lambda rec: (
                rec.get("image") is None and _h64(str(rec.get("pair_id"))) in self._superseded
            )
        )
        self._superseded.clear()

    def _rewrite_figures(self, drop) -> None:
        """Rewrite ``figures.jsonl`` (temp + rename) without the records ``drop`` says to."""
        self.figures.close()
        path = self.out / FIGURES
        if not path.exists():
            return
        # Bytes, copied as read: a line that is not UTF-8 (a hand-merged Latin-1 record, which
        # the scan skips as bad) stopped the run in a UnicodeDecodeError here.
        with atomic_path(path) as tmp, open(tmp, "wb") as dst:
            with open(path, "rb") as src:
                for line in src:
                    try:
                        rec = json.loads(line)
                    except ValueError:  # JSONDecodeError, UnicodeDecodeError
                        rec = None
                    if isinstance(rec, dict) and drop(rec):
                        continue
                    dst.write(line)

    def report(self, extra: dict | None = None) -> dict:
        total: Counter = Counter()
        articles = 0
        for entry in self.done.values():
            total.update(entry.get("counts", {}))
            articles += entry.get("articles", 0)
        # The records the file holds, not the packages' own counts summed: a record kept without
        # its image and completed by another package stays counted by the first, and when that
        # one was redone the sum fell below the file (0 reported, 1 record).
        total.pop("figures written", None)
        self._drop_superseded()
        figures = len(self.pairs)
        report = {
            "packages_done": len(self.done),
            "articles": articles,
            "figures_written": figures,
            "reasons": dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
        if extra:
            report["last_run"] = extra
        # The run finished: its figures file exists even when no package gave a figure.
        (self.out / FIGURES).touch()
        atomic_write_json(self.out / REPORT, report)
        return report

    def close(self) -> None:
        self._drop_superseded()
        self.figures.close()
        self.ledger.close()
        self._lock.close()


def _results(
    todo: list[PackageRef], opts: IngestOptions, workers: int
) -> Iterator[tuple[PackageRef, PackageResult]]:
    """Results in input order (so the output does not depend on the worker count), with a bounded
    number of packages in flight so that memory stays flat on million-package runs."""
    if workers <= 1:
        for pkg in todo:
            yield pkg, process_package(pkg, opts)
        return
    window = workers * 3
    it = iter(todo)
    carry: list[PackageRef] = []  # in flight when a worker died; to be redone one by one
    while True:
        for pkg in carry:
            yield pkg, _isolated(pkg, opts)
        carry = []
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)
        ) as pool:
            pending: deque = deque()
            for pkg in it:
                if not _submit(pool, pending, pkg, opts) or len(pending) >= window:
                    break
            if not pending:
                return
            broken = pending[-1][1] is None
            while pending and not broken:
                pkg, fut = pending[0]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    break
                pending.popleft()
                yield pkg, result
                nxt = next(it, None)
                if nxt is not None and not _submit(pool, pending, nxt, opts):
                    break
            if not pending:
                return
            # A worker died (segfault in a decoder, OOM kill). Which package did it is unknown:
            # redo every package in flight alone, then carry on with a new pool.
            carry = [p for p, _ in pending]


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: a SIGKILLed parent (preemption, OOM) must not leave workers blocked on
    its queue forever. Linux only; elsewhere the workers exit when they notice the broken pipe."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _submit(
    pool: ProcessPoolExecutor, pending: deque, pkg: PackageRef, opts: IngestOptions
) -> bool:
    """Queue ``pkg``; False (with a placeholder queued) when the pool is already broken."""
    try:
        pending.append((pkg, pool.submit(process_package, pkg, opts)))
        return True
    except BrokenProcessPool:
        pending.append((pkg, None))
        return False


def _isolated(pkg: PackageRef, opts: IngestOptions) -> PackageResult:
    with ProcessPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(process_package, pkg, opts).result()
        except BrokenProcessPool:
            result = PackageResult(key=pkg.key)
            result.counts["package crashed a worker"] += 1
            return result


def ingest(
    sources: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    opts: IngestOptions | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] | str | None = None,
    progress: bool = False,
) -> dict:
    """Ingest PMC packages into ``out_dir``; returns the report (also in ``ingest_report.json``).

    Re-running resumes: packages in the ledger (same key, size and mtime or bytes; for a folder,
    its files' names and sizes, and their mtimes or bytes) are skipped; a changed one is redone,
    its old records replaced."""
    opts = opts or IngestOptions()
    packages = discover(list(sources))
    if isinstance(shard, str):
        shard = parse_shard(shard)
    if shard:
        packages = select_shard(packages, *shard)
    writer = IngestWriter(out_dir)
    try:
        writer.use_options(opts)
    except BaseException:
        writer.close()
        raise
    t0 = time.perf_counter()
    figures = 0
    present = 0  # figures this run found already written (as another package's, or in its image)
    done_now = 0
    todo = [p for p in packages if not writer.is_done(p)]
    # A package that changed since it was done (a download completed, a new article version) is
    # done again from scratch.
    writer.forget({p.key for p in todo})
    try:
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo), unit="pkg", desc="ingest", disable=not progress, dynamic_ncols=True
        )
        with bar:
            for pkg, result in _results(todo, opts, workers):
                figures += writer.write(pkg, result)
                counts = writer.done[pkg.key]["counts"]
                present += sum(
                    counts.get(f"skipped: duplicate {w}", 0) for w in ("pair_id", "image")
                )
                done_now += 1
                bar.update(1)
                bar.set_postfix(figures=figures, refresh=False)
    finally:
        elapsed = time.perf_counter() - t0
        run = {
            "packages_found": len(packages),
            "packages_skipped_as_done": len(packages) - len(todo),
            "packages_processed": done_now,
            "figures_written": figures,
            "figures_already_present": present,
            "seconds": round(elapsed, 3),
            "figures_per_second": round(figures / elapsed, 2) if elapsed > 0 else None,
            "workers": workers,
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "options": {k: v for k, v in asdict(opts).items()},
        }
        report = writer.report(run)
        writer.close()
    return report
