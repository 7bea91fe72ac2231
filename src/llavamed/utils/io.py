"""Crash-safe file writing shared by every command.

Rules: a finished output file is always complete (written to a temp name beside it, fsynced, then
renamed), and an append-only JSONL log survives SIGKILL at any moment: a torn last line is cut off
when the log is reopened, so re-running resumes without corrupt or duplicated records.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from llavamed.errors import InputError, LlavamedError, StorageError

T = TypeVar("T")

# Below this much free space a failed write is taken to be a full disk: torch.save reports one as
# "RuntimeError: ... unexpected pos", not as ENOSPC.
_NEARLY_FULL = 64 * 2**20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: mkstemp creates 0600 files and mkdtemp 0700 folders, but outputs should get the
# usual 0644 / 0755 (umask 022): a checkpoint on a shared filesystem must be readable by others.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def make_folder(folder: str | os.PathLike) -> None:
    """``mkdir -p folder``. A folder the OS will not make although nothing is in the way (one
    under /proc) is a one-line :class:`InputError`, not a FileNotFoundError traceback; the other
    OS errors (a file in the way, no permission, read-only) already reach the user as one line
    through the CLI."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as exc:
        why = f"cannot create {exc.filename or folder}: {exc.strerror or exc}"
        raise InputError(folder, "cannot be written", why) from None


def make_temp_dir(beside: str | os.PathLike) -> Path:
    """An empty hidden folder next to ``beside``, with the mode a plain mkdir would give."""
    beside = Path(beside)
    make_folder(beside.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", dir=beside.parent))
    except OSError as exc:
        # The error named the random temp name (".m.2aaye15b: Read-only file system"); the user
        # asked for ``beside``.
        raise OSError(exc.errno, exc.strerror, str(beside)) from None
    os.chmod(tmp, _DIR_MODE)
    return tmp


def publish_modes(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the mode a plain ``open`` would (0644 under umask 022,
    executables keep their x bits). safetensors and mkstemp create files 0600 whatever the
    umask, so a checkpoint or tower on a shared filesystem was unreadable to every other user (a
    serving account, a colleague)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            f = os.path.join(root, name)
            if os.path.islink(f):
                continue
            executable = os.stat(f).st_mode & 0o111
            os.chmod(f, _DIR_MODE if executable else _FILE_MODE)


def _is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    # safetensors reports a full disk as its own SafetensorError ("... (os error 28)").
    return type(exc).__name__ == "SafetensorError" and f"os error {errno.ENOSPC})" in str(exc)


def disk_full_error(exc: BaseException, folder: str | os.PathLike) -> StorageError | None:
    """The :class:`StorageError` to raise instead of ``exc`` when ``exc`` came from a full disk
    under ``folder``, else None (the caller re-raises ``exc``)."""
    enospc = _is_enospc(exc)
    if not (enospc or isinstance(exc, OSError | RuntimeError)):
        return None
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if not enospc and free >= _NEARLY_FULL:
        return None
    return StorageError(
        f"{folder}: out of disk space while writing ({free / 2**20:.0f} MiB free). Free some "
        "space and rerun the same command: finished outputs are kept, training resumes from its "
        "last checkpoint and a quickstart from its last finished stage."
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path in the destination folder; on success rename it onto ``path``.
    ``fsync=False`` skips the disk flush (still safe against a killed process, not against power
    loss) for bulk writers of many small regenerable files, where the flush dominates."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder", "give a file path")
    make_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        if (full := disk_full_error(exc, path.parent)) is not None:
            raise full from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    # utf-8-sig: a byte-order mark (Windows editors, PowerShell's Out-File, Excel exports)
    # starts an otherwise valid file; json.load refuses it as "Unexpected UTF-8 BOM".
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, "invalid JSON", str(exc)) from exc


# A lone UTF-16 surrogate: what a JSON "\\ud83d" escape decodes to when text was cut inside an
# emoji's pair (a caption, a reply cut at max_tokens). UTF-8 cannot carry it, so writing or
# sending such text raised UnicodeEncodeError after the work.
_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(obj: Any) -> Any:
    """``obj`` (a string, or JSON-like lists and dicts of them, keys included) with every lone
    surrogate made U+FFFD; ``obj`` itself when it holds none, so hashes and cache keys of clean
    text do not change."""
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj) if _SURROGATE.search(obj) else obj
    if isinstance(obj, dict):
        pairs = [(without_lone_surrogates(k), without_lone_surrogates(v)) for k, v in obj.items()]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, obj.items(), strict=True)):
            return obj
        return dict(pairs)
    if isinstance(obj, list):
        items = [without_lone_surrogates(x) for x in obj]
        return obj if all(a is b for a, b in zip(items, obj, strict=True)) else items
    return obj


def parse_records(
    records: Sequence[Any],
    where: str | os.PathLike,
    parse: Callable[[dict, str], T],
    on_error: Callable[[InputError], None],
) -> list[T]:
    """``parse(record, src)`` for every record of a JSON list, where ``src`` (``where[i]``) names
    the record in errors. A record that is not an object, or that ``parse`` rejects with
    :class:`InputError`, goes to ``on_error`` (which counts it) and is skipped: one bad record
    never stops a load, and none is dropped silently."""
    out = []
    for i, rec in enumerate(records):
        src = f"{where}[{i}]"
        try:
            if not isinstance(rec, dict):
                raise InputError(src, "record is not an object")
            out.append(parse(rec, src))
        except InputError as err:
            on_error(err)
    return out


def iter_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> Iterator[dict]:
    """Yield one dict per line. A bad line raises :class:`InputError` naming file and line,
    unless ``skip_bad``, in which case a torn final line (a crash mid-write) is ignored."""
    for _, rec in iter_jsonl_numbered(path, on_bad=(lambda _err: None) if skip_bad else None):
        yield rec


def iter_jsonl_numbered(
    path: str | os.PathLike, on_bad: Callable[[InputError], None] | None = None
) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every JSON-object line (blank lines skipped, but counted, so
    the numbers are the file's). A line that is not a JSON object raises :class:`InputError`
    naming file and line, or, with ``on_bad``, goes to it and is skipped."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise InputError(path, "is a folder, not a JSONL file") from exc
    with fh:
        # Bytes, decoded line by line: a writer killed inside a multi-byte character leaves a
        # last line that is not UTF-8, and that torn line must be one bad line like any other,
        # not "not UTF-8 text" for the whole file on every later run.
        for lineno, raw in enumerate(fh, 1):
            try:
                # A byte-order mark may start the file (see read_json); only there.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                err = InputError(f"{path}:{lineno}", "not UTF-8 text", str(exc))
            else:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    err = InputError(f"{path}:{lineno}", "invalid JSON line", str(exc))
                else:
                    if isinstance(rec, dict):
                        yield lineno, rec
                        continue
                    err = InputError(f"{path}:{lineno}", "JSON line is not an object")
            if on_bad is None:
                raise err
            on_bad(err)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Atomically write all records; returns the count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


class JsonlAppender:
    """Append-only JSONL log that is safe against SIGKILL.

    On open, a partial trailing line (no newline) left by a killed writer is truncated away. Each
    ``append`` writes one full line and flushes it (``fsync=True`` also syncs to disk), so the
    file is always a sequence of complete records. Use :meth:`existing` to resume.
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = False):
        self.path = Path(path)
        make_folder(self.path.parent)
        self._fsync = fsync
        self._repair()
        # Opened at the first append: a run that fails before producing anything (a bad model,
        # a missing folder) leaves no empty file that would look like a finished one.
        self._fh: Any = None

    def _repair(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)

    def existing(self) -> list[dict]:
        return list(iter_jsonl(self.path, skip_bad=True)) if self.path.exists() else []

    def append(self, record: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder``, or None when they can. The OS is asked, not
    guessed at: missing folders are made and a file is created in ``folder``, then all of it is
    removed again, so nothing is left behind. Catches what a mode check cannot, before any
    work: a pseudo file system (/proc), a read-only mount, no permission, a file where a folder
    of the path should be. These failed at the first write, after the work, some with a
    FileNotFoundError traceback."""
    folder = Path(os.path.abspath(folder))
    missing: list[Path] = []
    probe = folder
    try:
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is a file, not a folder"
    except OSError as exc:  # a name too long, a folder we may not look into
        return f"cannot reach {probe}: {exc.strerror or exc}"
    made: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as exc:
                return f"cannot create {d}: {exc.strerror or exc}"
            made.append(d)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".llavamed-write-test.", dir=folder)
        except OSError as exc:
            return f"cannot write in {folder}: {exc.strerror or exc}"
        os.close(fd)
        os.unlink(tmp)
        return None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


def require_writable(path: str | os.PathLike, flag: str, *, folder: bool = False) -> None:
    """Stop with one line, "PATH: FLAG cannot be written: REASON", before any work when the
    output ``path`` (a file, or with ``folder`` a folder the command writes into) cannot be
    written; see :func:`unwritable_reason`."""
    path = Path(path)
    reason = unwritable_reason(path if folder else Path(os.path.abspath(path)).parent)
    if reason is not None:
        raise LlavamedError(f"{path}: {flag} cannot be written: {reason}")


def check_output_dir(
    path: str | os.PathLike,
    *,
    ours: Callable[[Path], bool] | None = None,
    keep: Sequence[str | os.PathLike] = (),
) -> None:
    """Refuse an output folder whose replacement would lose something: a file, a folder holding
    one of ``keep`` (the sources being converted), or a non-empty folder that ``ours`` does not
    recognise as an earlier output (a user's folder given as ``--out`` by mistake). Called before
    long work starts, and again by :func:`atomic_dir` before it replaces anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        # Checked first: replacing a user's file by a folder would lose it.
        raise InputError(path, "exists and is not a folder", "give a folder path")
    target = path.resolve()
    for k in keep:
        k = Path(k).resolve()
        if k == target or target in k.parents:
            raise InputError(path, "would replace the source", f"{k} is in it; write elsewhere")
    if path.is_dir() and any(path.iterdir()) and not (ours is not None and ours(path)):
        raise InputError(
            path,
            "exists and holds something else",
            "an earlier output of this command would be replaced, this is not one; "
            "remove it or choose another folder",
        )
    # The folder is written beside itself, then renamed into place (atomic_dir).
    if (reason := unwritable_reason(path.absolute().parent)) is not None:
        raise InputError(path, "cannot be written", reason)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike,
    *,
    ours: Callable[[Path], bool] | None = None,
    keep: Sequence[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield an empty temp folder beside ``path``; on success it replaces ``path`` (an existing
    folder is moved aside first and removed after), so readers never see a half-written one.
    What may be replaced: see :func:`check_output_dir`. Temp folders left by a killed run
    (their owner process gone) are removed first: a checkpoint's can be many GB. Files get the
    umask's modes (:func:`publish_modes`); a full disk is a one-line :class:`StorageError`."""
    path = Path(path)
    check_output_dir(path, ours=ours, keep=keep)
    _remove_orphan_temp_dirs(path)
    tmp = make_temp_dir(path)
    try:
        (tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
        yield tmp
        publish_modes(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        # Only now: a run killed before the rename leaves a temp folder that still names its
        # (dead) owner, so the next run removes it.
        (path / _OWNER).unlink()
    except Exception as exc:  # noqa: BLE001 - only to translate a full disk; re-raised otherwise
        if (full := disk_full_error(exc, path.parent)) is not None:
            raise full from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_OWNER = ".llavamed-writer-pid"


def _remove_orphan_temp_dirs(path: Path) -> None:
    if not path.parent.is_dir():
        return
    for d in path.parent.glob(f".{glob.escape(path.name)}.*"):
        owner = d / _OWNER
        if not (d.is_dir() and owner.is_file()):
            continue
        try:
            host, pid = owner.read_text().split()
            if host != socket.gethostname():
                continue  # a writer on another machine sharing this folder: not ours to judge
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, OSError):
            continue  # unreadable, or a process we may not signal: leave it


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock_path`` for one writer; a second raises naming ``what`` is already at work.

    lockf, not flock: a POSIX lock belongs to this process only, so worker processes forked
    from it (which may outlive a killed parent for a moment) do not keep it held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = Path(lock_path)
    make_folder(lock_path.parent)
    fh = open(lock_path, "w")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        raise LlavamedError(f"{lock_path}: {what} is already writing here") from exc
    try:
        yield
    finally:
        fcntl.lockf(fh, fcntl.LOCK_UN)
        fh.close()
