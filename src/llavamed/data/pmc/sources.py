"""Find PMC OA packages under the paths a user gives, and read their articles as streams.

A *package* is the unit of work, of resume and of sharding: one ``.tar.gz`` (or ``.tgz``/``.tar``)
file, or one folder of unpacked articles (``.nxml`` plus image files), or one lone ``.nxml``.
Tarballs are read front to back in stream mode (``r|*``): nothing is extracted to disk and a
truncated file yields every article that arrived before the break.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from llavamed.errors import InputError

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
XML_SUFFIXES = (".nxml", ".xml")
# Every format llavamed.images reads, under the names its files go by. DICOM too: a folder of
# case images may hold it; without it here a figure whose graphic is "ct1.dcm" was counted
# "image missing" beside its file, and so were JPEG 2000 (".jp2"), PPM/PGM and AVIF files and
# JPEGs named ".jpe"/".jfif".
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".gif", ".bmp", ".dib", ".webp",
    ".jp2", ".j2k", ".jpf", ".jpx", ".ppm", ".pgm", ".pbm", ".pnm", ".avif", ".dcm", ".dicom",
)  # fmt: skip
# When a graphic's href has no extension (common in PMC), prefer the full-resolution formats:
# PMC packages often carry a small .gif preview beside the .jpg/.tif. A DICOM file comes last:
# a rendered image beside it is what the authors showed.
_EXT_PREFERENCE = (
    ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".jpe", ".jfif", ".jp2", ".j2k",
    ".jpf", ".jpx", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".dib", ".gif", ".dcm", ".dicom",
)  # fmt: skip
# Bulk XML-only tarballs hold thousands of articles in one folder: don't buffer them all.
_FLUSH_XML_WITHOUT_IMAGES = 64
_PMCID = re.compile(r"PMC\d+", re.I)
# A package file larger than this is not read: members are read whole into memory, and a gzip
# stream of zeros inflates 1000-fold (a 4 MB tarball held an 800 MB "image" and took 1.6 GB).
# An uncompressed 8-bit RGB TIFF at llavamed.images' pixel cap is 537 MB; PMC figures are MBs.
MAX_FILE_BYTES = 512 << 20


@dataclass(frozen=True)
class Oversized:
    """An image file over :data:`MAX_FILE_BYTES`, not read: its figure is counted "image too
    large" instead of "image missing"."""

    size: int


@dataclass(frozen=True)
class PackageRef:
    key: str  # stable name: the shard hash and the resume ledger use it
    path: str
    kind: str  # "tar" | "dir" | "xml"
    size: int
    mtime: (
        float  # a folder's: the newest of its files' (its own changes only when files come or go)
    )


@dataclass
class ArticleFiles:
    """One article's XML and the image files that sit beside it."""

    name: str  # member or file name, for messages
    xml: bytes
    # lower-cased basename -> data
    images: dict[str, bytes | Path | Oversized] = field(default_factory=dict)

    def find_image(self, href: str | None) -> tuple[str, bytes | Path | Oversized] | None:
        """Resolve a ``<graphic>`` href to an image file: exact basename first, then the href
        plus a known extension (hrefs usually omit it), full-resolution formats first."""
        if not href:
            return None
        base = PurePosixPath(href.replace("\\", "/")).name.lower()
        if base in self.images:
            return base, self.images[base]
        for ext in _EXT_PREFERENCE:
            if base + ext in self.images:
                return base + ext, self.images[base + ext]
        stem, dot, ext = base.rpartition(".")
        if dot and ("." + ext) in IMAGE_SUFFIXES:  # href says .jpg, package holds .tif
            for alt in _EXT_PREFERENCE:
                if stem + alt in self.images:
                    return stem + alt, self.images[stem + alt]
        return None

    def pmcid_hint(self) -> str | None:
        m = _PMCID.search(self.name)
        return m.group(0).upper() if m else None


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES) and not _apple_double(name)


def _apple_double(name: str) -> bool:
    """macOS's "._name" companion files (extended attributes such as a download's quarantine
    flag), which it writes beside files copied to other disks and into tarballs it makes: they
    were counted as corrupt tarballs and malformed XML articles."""
    return name.rsplit("/", 1)[-1].startswith("._")


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _folder_fingerprint(folder: Path) -> tuple[int, float]:
    """What a folder package's resume record compares: its files' names and sizes, and those of
    the image subfolders it reads (:func:`_folder_files`); and the newest of their mtimes. A
    folder's own size does not change when files arrive in it, so an article ingested while its
    images were still downloading was skipped as done for good."""
    h = hashlib.blake2b(digest_size=8)
    newest = 0.0
    for rel, path in _folder_files(folder):
        try:
            st = path.stat()
            size, newest = st.st_size, max(newest, st.st_mtime)
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\0".encode("utf-8", "replace"))
    return int.from_bytes(h.digest(), "big") >> 1, newest  # a positive int, as sizes are


def content_digest(pkg: PackageRef) -> str | None:
    """A hash of the package's bytes (a folder's: its files' names and bytes), or None when it
    cannot be read. The resume ledger keeps it: a package whose size is unchanged but whose mtime
    moved (a download that preallocated the file at its full size, then filled it in) is redone
    only when these differ, so a source tree copied to another machine is not redone."""
    h = hashlib.blake2b(digest_size=16)
    if pkg.kind == "dir":
        files = list(_folder_files(Path(pkg.path)))
    else:
        files = [("", Path(pkg.path))]
    try:
        for rel, path in files:
            h.update(f"{rel}\0".encode("utf-8", "replace"))
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            h.update(b"\0")
    except OSError:
        return None
    return h.hexdigest()


# Files that mark an ingest output folder (llavamed.data.pmc.ingest's OPTIONS and LEDGER).
INGEST_OUTPUT_MARKERS = (".ingest_options.json", ".done_packages.jsonl")


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """``(path relative to folder, path)`` of a folder package's files: its own, then the images
    of its subfolders that hold no XML (``figs/``, ``thumbs/``), nearer folders first. A tarball
    keeps those images with the article; unpacking it with ``tar xzf`` lost them ("image
    missing"). A subfolder with XML of its own is another package, and keeps its files. An
    ingest's output folder (``--out`` inside the article folder ingested) is not the article's:
    its images/ changed the package's fingerprint, and every re-run redid the package."""
    queue = [(folder, "")]
    while queue:  # breadth first, so a nearer image of a name is met first
        here, rel = queue.pop(0)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            continue  # unreadable: _iter_dir notes it for the package's own folder
        subdirs = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry)
            elif _apple_double(entry.name):
                continue
            elif entry.is_file() and (not rel or _suffix(entry.name) in IMAGE_SUFFIXES):
                yield f"{rel}{entry.name}", Path(entry.path)
        for entry in subdirs:
            try:
                names = [(e.name, e.is_file()) for e in os.scandir(entry.path)]
            except OSError:
                continue
            holds_xml = any(
                _suffix(n) in XML_SUFFIXES and is_file and not _apple_double(n)
                for n, is_file in names
            )
            if not holds_xml and not any(n in INGEST_OUTPUT_MARKERS for n, _ in names):
                queue.append((Path(entry.path), f"{rel}{entry.name}/"))


def discover(sources: list[str | os.PathLike]) -> list[PackageRef]:
    """Every package under ``sources``, sorted by key, each once. Keys are paths relative to the
    source they were found under (a tarball given directly is keyed by its file name), so the same
    files mounted at different places on different machines get the same keys."""
    found: dict[str, PackageRef] = {}
    real_seen: set[str] = set()

    def add(path: Path, key: str, kind: str) -> None:
        real = os.path.realpath(path)
        if real in real_seen:
            return
        real_seen.add(real)
        while key in found:  # two sources with the same relative layout
            key = f"{key}~"
        try:
            st = path.stat()
        except OSError:
            # A dangling symlink, or a file a downloader renamed since it was listed: one such
            # entry stopped the whole run with a traceback. It is a package that cannot be read
            # (counted as such); once it can be, its size differs and it is done again.
            found[key] = PackageRef(key, str(path), kind, -1, 0.0)
            return
        size, mtime = _folder_fingerprint(path) if kind == "dir" else (st.st_size, st.st_mtime)
        found[key] = PackageRef(key, str(path), kind, size, mtime)

    for src in sources:
        root = Path(src)
        if not root.exists():
            raise InputError(root, "file not found")
        if root.is_file():
            if _is_tar(root.name):
                add(root, root.name, "tar")
            elif _suffix(root.name) in XML_SUFFIXES:
                add(root, root.name, "xml")
            else:
                raise InputError(root, "not a PMC package", "expected .tar.gz, .nxml or a folder")
            continue
        # The folder's own name, also when it is given as "." or "..": keyed "/p.tar.gz" from
        # inside the folder and "pmc/p.tar.gz" from outside it, one corpus was done twice (every
        # figure a duplicate) and fell into other shards.
        name = Path(os.path.abspath(root)).name
        hits = 0  # packages under this folder, counting those another source already named
        # Linked folders are searched too ("pmc/oa_comm -> /mnt/disk2/oa_comm": a corpus spread
        # over disks was "no PMC packages found"), each once: a link to a folder above it loops.
        walked: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if real_dir in walked:
                dirnames[:] = []
                continue
            walked.add(real_dir)
            dirnames.sort()
            here = Path(dirpath)
            rel = here.relative_to(root).as_posix()
            has_xml = False
            for fn in sorted(filenames):
                if _is_tar(fn):
                    hits += 1
                    add(
                        here / fn,
                        (name if rel == "." else f"{name}/{rel}") + f"/{fn}",
                        "tar",
                    )
                elif _suffix(fn) in XML_SUFFIXES and not _apple_double(fn):
                    has_xml = True
            if has_xml:
                hits += 1
                add(here, name if rel == "." else f"{name}/{rel}", "dir")
        if hits == 0:
            # A folder with nothing to ingest is almost always a wrong path; exiting 0 with
            # "0 figures" would let a pipeline go on to train on nothing.
            raise InputError(
                root, "no PMC packages found", "expected .tar.gz files or .nxml articles under it"
            )
    return [found[k] for k in sorted(found)]


def shard_of(key: str, n: int) -> int:
    """Stable shard index of a package key (the same on every machine and Python run)."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:15], 16) % n


def select_shard(packages: list[PackageRef], k: int, n: int) -> list[PackageRef]:
    return [p for p in packages if shard_of(p.key, n) == k]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` with 0 <= K < N (0-based, like ``$SLURM_ARRAY_TASK_ID``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise InputError("--shard", "expected K/N", text)
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise InputError("--shard", "K must be in 0..N-1", text)
    return k, n


def iter_articles(pkg: PackageRef, notes: list[str]) -> Iterator[ArticleFiles]:
    """Yield the package's articles. Problems with the package itself (corrupt or truncated
    tarball, unreadable file) are appended to ``notes`` as countable reasons."""
    if pkg.kind == "tar":
        yield from _iter_tar(pkg, notes)
    elif pkg.kind == "dir":
        yield from _iter_dir(Path(pkg.path), notes)
    else:
        path = Path(pkg.path)
        yield from _iter_dir(path.parent, notes, only=path.name)


def _article_names(names: Iterable[str]) -> list[str]:
    """The XML files that are articles, sorted. A folder with an .nxml keeps its other .xml files
    out (MathML, metadata); bulk dumps use .xml."""
    names = list(names)
    if any(name.lower().endswith(".nxml") for name in names):
        names = [n for n in names if n.lower().endswith(".nxml")]
    return sorted(names)


def _group_articles(
    xmls: dict[str, bytes], images: dict[str, bytes | Path | Oversized]
) -> Iterator[ArticleFiles]:
    for name in _article_names(xmls):
        yield ArticleFiles(name=name, xml=xmls[name], images=images)


def _place(folder: str) -> tuple[int, list[str]]:
    """How far an archive folder is from the top, then its path: the order in which
    :func:`_folder_files` meets the folders of an unpacked package."""
    parts = folder.split("/") if folder else []
    return len(parts), parts


class _TarGroup:
    """The article folder being read from a streamed tarball: its XML files and images, with
    images from its subfolders ("PMC1/thumbs/") kept too. A subfolder that turns out to hold an
    XML file of its own is another article ("bundle/index.xml" then "bundle/PMC1/a.nxml"): it
    leaves the group with the images read from it so far, so no article gets another's images."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self.xmls: dict[str, bytes] = {}
        self.images: dict[str, bytes | Path | Oversized] = {}
        self.image_folder: dict[str, str] = {}  # image key -> the folder it came from
        # Link members whose target the stream had not reached: (folder, name, target path).
        self.links: list[tuple[str, str, str]] = []

    def holds(self, parent: str) -> bool:
        # The tarball's top level ("") holds every folder: an article whose files sit at the top
        # keeps the images of its subfolders ("figs/"), as one in a folder of its own does.
        return self.folder is not None and (
            parent == self.folder or self.folder == "" or parent.startswith(f"{self.folder}/")
        )

    def add_image(self, parent: str, name: str, data: bytes | Oversized) -> None:
        key = name.rsplit("/", 1)[-1].lower()
        # A subfolder's file never replaces one of the same name nearer the article's own
        # folder (a thumbs/ preview named like the full-size figure); of two folders as near,
        # the first in name order keeps it, as in the unpacked folder (:func:`_folder_files`).
        # The tarball's top level is "" and its folders "figs": counting their slashes made
        # them as near, and a figs/ preview replaced the figure of an article at the top.
        if key in self.images and _place(parent) > _place(self.image_folder[key]):
            return
        self.images[key] = data
        self.image_folder[key] = parent

    def widen_to(self, parent: str) -> bool:
        """Before its first XML, take ``parent``'s folder in too, as the folder both share.
        Tarballs may list an article's subfolder images ("PMC1/figs/a.jpg") before the article's
        own XML ("PMC1/a.nxml"); ending the group there lost those images. An image-only folder
        is no article of its own, so nothing is lost by widening: an article in a subfolder still
        splits off with its own images when its XML arrives."""
        if self.folder is None or self.xmls:
            return False
        shared = []
        for a, b in zip(self.folder.split("/"), parent.split("/"), strict=False):
            if a != b:
                break
            shared.append(a)
        self.folder = "/".join(shared)
        return True

    def split_off(self, folder: str) -> _TarGroup:
        """The part of this group read from ``folder`` and below, as a group of its own."""
        sub = _TarGroup(folder)
        sub.links = [link for link in self.links if sub.holds(link[0])]
        self.links = [link for link in self.links if not sub.holds(link[0])]
        for key, parent in list(self.image_folder.items()):
            if sub.holds(parent):
                sub.images[key] = self.images.pop(key)
                sub.image_folder[key] = self.image_folder.pop(key)
        return sub

    def add(self, parent: str, name: str, data: bytes | Oversized) -> None:
        if _suffix(name) in XML_SUFFIXES:
            if not isinstance(data, Oversized):
                self.xmls[name] = data
        else:
            self.add_image(parent, name, data)

    def resolve_links(
        self,
        members: dict[str, bytes | Oversized],
        earlier: set[str],
        path: str,
        notes: list[str],
    ) -> None:
        """Give the links that wait for their target its data: read by now in this group, or in
        an earlier group of the package (``earlier``, data dropped), read again in one pass."""
        wanted = {t for _, _, t in self.links if t not in members and t in earlier}
        if wanted:
            members = {**members, **_read_members(path, wanted)}
        while self.links:
            waiting = []
            for parent, name, target in self.links:
                if target in members:
                    members[posixpath.normpath(name)] = members[target]
                    self.add(parent, name, members[target])
                else:
                    waiting.append((parent, name, target))
            if len(waiting) == len(self.links):  # no progress: the rest are not in the package
                notes.extend("link target not in the package" for _ in waiting)
                self.links = []
            else:
                self.links = waiting

    def articles(self) -> Iterator[ArticleFiles]:
        return _group_articles(self.xmls, self.images)


def _read_members(path: str, wanted: set[str]) -> dict[str, bytes | Oversized]:
    """The data of the archive members at ``wanted`` paths (and of the members those of them
    that are links point to, when they come later), in one more pass over the archive."""
    wanted = set(wanted)
    found: dict[str, bytes | Oversized] = {}
    aliases: dict[str, list[str]] = {}  # a link's target -> the wanted links that stand for it
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for member in tf:
                name = posixpath.normpath(member.name)
                if name not in wanted:
                    continue
                if member.islnk() or member.issym():
                    target = _link_target(member)
                    if target is not None:
                        wanted.add(target)
                        aliases.setdefault(target, []).append(name)
                        if target in found:
                            found[name] = found[target]
                    continue
                if not member.isfile():
                    continue
                if member.size > MAX_FILE_BYTES:
                    data: bytes | Oversized = Oversized(member.size)
                else:
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                found[name] = data
                for alias in aliases.get(name, []):
                    found[alias] = data
                if all(w in found for w in wanted):
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass  # the first pass counted the damage; the links not found are counted as such
    return found


def _link_target(member: tarfile.TarInfo) -> str | None:
    """The archive path a hard or symbolic link member stands for, or None when it points out
    of the archive (absolute, or climbing above its top with ".."): such a member is never
    followed, as extracting the archive would write or read outside its folder."""
    link = member.linkname.replace("\\", "/")
    if not link or link.startswith("/") or re.match(r"[A-Za-z]:", link):
        return None
    if member.issym():  # relative to the link's own folder; a hard link names an archive path
        link = posixpath.join(posixpath.dirname(member.name), link)
    target = posixpath.normpath(link)
    if target == ".." or target.startswith("../") or target.startswith("/"):
        return None
    return target


def _iter_tar(pkg: PackageRef, notes: list[str]) -> Iterator[ArticleFiles]:
    """A hard link, or a symbolic link that stays inside the archive, reads as its target (an
    article's "g1.jpg" linked to "figs/g1.jpg", read earlier or later in the stream); one that
    points outside the archive is refused, counted "link outside the package"."""
    group = _TarGroup(None)
    # The data of the current group's members, by archive path, for links to them; dropped with
    # the group, so a multi-article tarball is not held in memory.
    members: dict[str, bytes | Oversized] = {}
    earlier: set[str] = set()  # paths of the members of earlier groups (their data dropped)

    def flush(g: _TarGroup) -> Iterator[ArticleFiles]:
        g.resolve_links(members, earlier, pkg.path, notes)
        yield from g.articles()

    def drop_members() -> None:
        nonlocal members
        earlier.update(members)
        members = {}

    try:
        tf = tarfile.open(pkg.path, mode="r|*")
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        notes.append("unreadable package file")
        return
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        notes.append("corrupt tarball")
        return
    try:
        with tf:
            for member in tf:
                is_link = member.islnk() or member.issym()
                if not (member.isfile() or is_link) or _apple_double(member.name):
                    continue
                name = member.name
                parent = name.rsplit("/", 1)[0] if "/" in name else ""
                ext = _suffix(name)
                is_xml = ext in XML_SUFFIXES
                if not is_xml and ext not in IMAGE_SUFFIXES:
                    continue  # PDFs, videos, supplementary archives: skipped unread
                if not group.holds(parent) and not group.widen_to(parent):
                    yield from flush(group)  # a sibling folder: the next article
                    group = _TarGroup(parent)
                    drop_members()
                if is_xml and parent != group.folder:  # a subfolder that is an article
                    sub = group.split_off(parent)
                    yield from flush(group)
                    group = sub
                if is_link:
                    target = _link_target(member)
                    if target is None:
                        notes.append("link outside the package")
                    elif target in members:
                        members[posixpath.normpath(name)] = members[target]
                        group.add(parent, name, members[target])
                    else:  # its target may come later in the stream
                        group.links.append((parent, name, target))
                    continue
                if member.size > MAX_FILE_BYTES:
                    if is_xml:
                        notes.append("article: XML file too large")
                    else:
                        group.add_image(parent, name, Oversized(member.size))
                        members[posixpath.normpath(name)] = Oversized(member.size)
                    continue
                fh = tf.extractfile(member)
                data = fh.read() if fh is not None else b""
                members[posixpath.normpath(name)] = data
                if is_xml:
                    group.xmls[name] = data
                    if len(group.xmls) >= _FLUSH_XML_WITHOUT_IMAGES and not group.images:
                        yield from flush(group)
                        group.xmls = {}
                        drop_members()
                else:
                    group.add_image(parent, name, data)
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        notes.append("corrupt or truncated tarball")
    yield from flush(group)


def _iter_dir(folder: Path, notes: list[str], only: str | None = None) -> Iterator[ArticleFiles]:
    try:
        names = sorted(n for n in os.listdir(folder) if not _apple_double(n))
    except OSError:
        notes.append("unreadable folder")
        return
    images: dict[str, bytes | Path | Oversized] = {
        n.lower(): folder / n for n in names if _suffix(n) in IMAGE_SUFFIXES
    }
    if only is None:  # a folder package: the images of its subfolders too (a lone file: its own)
        for rel, path in _folder_files(folder):
            if "/" in rel:
                images.setdefault(path.name.lower(), path)
    xml_names = [n for n in names if _suffix(n) in XML_SUFFIXES and (only is None or n == only)]
    # Each file is read when its article is asked for: a bulk folder of thousands of articles is
    # never held in memory at once (images are paths, read by the worker when encoded).
    for n in _article_names(xml_names):
        try:
            if (folder / n).stat().st_size > MAX_FILE_BYTES:
                notes.append("article: XML file too large")
                continue
            data = (folder / n).read_bytes()
        except OSError:
            notes.append("unreadable XML file")
            continue
        yield ArticleFiles(name=n, xml=data, images=images)
