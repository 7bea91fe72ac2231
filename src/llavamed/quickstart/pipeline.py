"""Stage bookkeeping: keyed skip/resume of named stages, output fingerprints, the ETA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from llavamed.errors import ConfigError, InputError, LlavamedError
from llavamed.quickstart.presets import QuickstartOptions
from llavamed.utils.io import atomic_write_json, read_json

STATE_FILE = "quickstart_state.json"


class StageError(LlavamedError):
    """A stage's error, named with the stage and how to redo it (the quickstart's user never
    chose the stage's inner paths and options that the tool's own message refers to)."""

    def __init__(self, stage: str, folder: Path | None, cause: LlavamedError):
        self.stage, self.cause = stage, cause
        redo = (
            f"; to redo the stage from scratch, delete {folder} and run the same command again"
            if folder is not None
            else ""
        )
        super().__init__(f"quickstart stage {stage}: {cause}{redo}")


@dataclass
class StageResult:
    name: str
    key: str
    wall_s: float
    skipped: bool
    info: dict
    resumed_after_s: float = 0.0
    """Part of ``wall_s`` spent by earlier, interrupted runs of the stage."""


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _portable(settings: Any, out: Path) -> Any:
    """``settings`` with the output folder's path replaced by a placeholder, so a moved (or
    renamed) output folder keeps its stage keys and its finished stages."""
    blob = json.dumps(settings, default=str)  # (_key sorts the keys)
    return json.loads(blob.replace(json.dumps(str(out))[1:-1], "<out>"))


def _local(info: Any, out: Path) -> Any:
    """``_portable``'s inverse: a stage's recorded info with its paths under ``out``, where the
    output folder is now (a moved folder's report named the old folder's checkpoints)."""
    blob = json.dumps(info, default=str)
    if "<out>" not in blob:
        return info
    return json.loads(blob.replace("<out>", json.dumps(str(out))[1:-1]))


def remaining_seconds(
    expected: dict[str, float],
    finished: list[tuple[str, float]],
    pending: list[str],
    spent: dict[str, float] | None = None,
) -> float | None:
    """Estimated seconds left: the pending stages' reference times, scaled by how this machine
    ran the finished ones against theirs (``finished`` holds (stage, seconds taken) for stages
    this run or an earlier one ran in one go). Stages under 5 reference seconds are too short to
    measure the machine by. ``spent``: seconds interrupted runs already spent on a pending
    stage that resumes, taken off its estimate (down to a tenth of it). None when a pending
    stage has no reference time."""
    if any(name not in expected for name in pending):
        return None
    ref = sum(expected.get(n, 0.0) for n, _ in finished if expected.get(n, 0.0) >= 5)
    took = sum(t for n, t in finished if expected.get(n, 0.0) >= 5)
    speed = min(max(took / ref, 0.2), 5.0) if ref > 0 else 1.0
    spent = spent or {}
    return sum(
        max(speed * expected[n] - spent.get(n, 0.0), 0.1 * speed * expected[n]) for n in pending
    )


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


OUTPUTS_FILE = ".quickstart_outputs.json"
# ``started`` value of a stage whose output must be redone from scratch: an earlier stage it
# reads ran again (or its own output changed) in a run that was stopped before it got to it.
REDO = "redo"
# ``started`` value of a stage interrupted in a folder that has since moved: its tool's saved
# settings name the old folder's paths, and the trainers refuse to resume under new ones.
MOVED = "moved"
HEARTBEAT_FILE = ".quickstart_heartbeat"
HEARTBEAT_S = 2.0
# Written from the stages' results: a run that redoes a stage removes them first, so a killed
# rerun leaves no report of a model whose folders it already emptied.
REPORT_FILES = ("report.md", "report.json", "loss.png")


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _hash_or_none(path: Path | None) -> str | None:
    return _file_hash(path) if path is not None and path.is_file() else None


def _digest(hashes: dict[str, str]) -> str:
    return _key(sorted(hashes.items()))


class StageOutputs:
    """Fingerprints of finished stages' output files, so a rerun notices a file deleted or
    changed since (a deleted ``checkpoint-final``, an edited ``world/`` file).

    ``quickstart_state.json`` keeps each stage's digest (paths relative to the output folder,
    with content hashes); ``OUTPUTS_FILE`` lists its files with size, mtime and hash, so a check
    stats them and hashes only a file whose mtime moved (``cp -r``). Files added to a folder
    after its stage finished are not its output; lock files come and go with the tools."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / OUTPUTS_FILE
        try:
            data = read_json(self.path) if self.path.exists() else {}
        except InputError:
            data = {}
        self.files: dict[str, dict] = data if isinstance(data, dict) else {}
        self.dirty = False

    def _walk(self, root: Path, skip: set[Path]) -> list[Path]:
        if root.is_file():
            return [root]
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if here / d not in skip)
            found += [
                here / f for f in filenames if not f.endswith(".lock") and here / f not in skip
            ]
        return sorted(found)

    def record(self, name: str, root: Path, skip: set[Path]) -> dict:
        """Fingerprint ``root`` (a stage's folder or file, less ``skip``: other stages' paths
        inside it) as stage ``name``'s output."""
        listing = {}
        for path in self._walk(root, skip):
            st = path.stat()
            listing[path.relative_to(self.out).as_posix()] = [
                st.st_size,
                st.st_mtime_ns,
                _file_hash(path),
            ]
        self.files[name] = listing
        self.dirty = True
        return {"files": len(listing), "digest": _digest({k: v[2] for k, v in listing.items()})}

    def changed(self, name: str, root: Path, skip: set[Path], recorded: dict) -> str | None:
        """What changed in stage ``name``'s output since ``recorded`` (None: nothing)."""
        listing = self.files.get(name)
        valid = isinstance(listing, dict) and all(
            isinstance(v, list) and len(v) == 3 for v in listing.values()
        )
        if not valid or _digest({k: v[2] for k, v in listing.items()}) != recorded.get("digest"):
            # No file list to go by (lost, or another run's): hash what is there now.
            now = self.record(name, root, skip)
            return None if now["digest"] == recorded.get("digest") else "its files changed"
        for rel, entry in listing.items():
            try:
                st = (self.out / rel).stat()
            except OSError:
                return f"{rel} is missing"
            if st.st_size != entry[0]:
                return f"{rel} changed"
            if st.st_mtime_ns != entry[1]:
                try:
                    same = (self.out / rel).is_file() and _file_hash(self.out / rel) == entry[2]
                except OSError:
                    same = False
                if not same:
                    return f"{rel} changed"
                entry[1] = st.st_mtime_ns
                self.dirty = True
        return None

    def forget(self, name: str) -> None:
        if self.files.pop(name, None) is not None:
            self.dirty = True

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.files, indent=None)
            self.dirty = False


class Stage(NamedTuple):
    """One pipeline stage (a plain tuple in this order works too)."""

    name: str
    folder: str | None
    """The folder (or the one file) it writes, relative to the output folder; None: nothing."""
    run: Callable[[], dict | None]
    """Does the work; returns what the report shows of it (``incomplete: True`` retries it)."""
    settings: dict
    """What its output depends on besides the stages it reads: part of its key."""
    needs: tuple[str, ...] | None = None
    """The earlier stages whose output it reads (None: the stage before it)."""
    product: str | None = None
    """The one file (relative to the output folder) its readers read. A stage that runs again
    only to retry an incomplete run (self-instruct's failed requests) and leaves that file as it
    was does not redo its readers: a local server that keeps failing the same figures would
    otherwise redo stage 2 onwards on every run."""


class Pipeline:
    """Runs named stages in order with keyed skip/resume and a total progress bar whose ETA comes
    from reference stage times (``expected_s``), rescaled as stages finish.

    A stage's key hashes its settings and the keys of the stages it reads (``Stage.needs``), and
    it starts over, in a clean folder, when one of them runs in this invocation. A stage that
    reads nothing of another is not redone when that one is. A finished stage whose output files
    were deleted or changed since it finished starts over too, with every stage that reads it."""

    def __init__(
        self,
        opts: QuickstartOptions,
        stages: list[Stage | tuple],
        expected_s: dict[str, float] | None = None,
    ):
        self.opts = opts
        self.out = Path(opts.out)
        self.stages = [Stage(*s) for s in stages]
        names = [s.name for s in self.stages]
        self.needs: dict[str, tuple[str, ...]] = {}
        for i, stage in enumerate(self.stages):
            needs = tuple(names[i - 1 : i]) if stage.needs is None else stage.needs
            unknown = [n for n in needs if n not in names[:i]]
            if unknown:
                raise ValueError(f"stage {stage.name} needs {unknown}, which do not run before it")
            self.needs[stage.name] = tuple(needs)
        self.products = {s.name: s.product for s in self.stages if s.product}
        self.expected_s = dict(expected_s or {})
        self.finished: list[tuple[str, float]] = []
        self.state_path = self.out / STATE_FILE
        # Without its state the folder's stage outputs cannot be vouched for, and a run refuses
        # a folder that holds them (_check_out_is_ours): deleting the state alone is no restart.
        restart = f"delete the output folder {self.out} (or give another --out) to start over"
        try:
            self.state = read_json(self.state_path) if self.state_path.exists() else {"stages": {}}
        except InputError as exc:
            raise ConfigError(f"{exc}; {restart}") from exc
        if not (isinstance(self.state, dict) and isinstance(self.state.get("stages"), dict)):
            raise ConfigError(
                f"{self.state_path}: not a quickstart state file (expected an object with a "
                f"'stages' object); {restart}"
            )
        self.outputs = StageOutputs(self.out)
        self.results: list[StageResult] = []
        moved_from = self.state.get("out")
        if isinstance(moved_from, str) and moved_from != str(self.out):
            # Finished stages keep (their keys hold no --out path); interrupted ones start over.
            started = self.state.get("started", {})
            for name, key in list(started.items()) if isinstance(started, dict) else []:
                if key != REDO and name not in self.state["stages"]:
                    started[name] = MOVED
        self.state["out"] = str(self.out)

    def _paths(self) -> dict[str, Path]:
        return {s.name: self.out / s.folder for s in self.stages if s.folder}

    def _skip(self, name: str, paths: dict[str, Path]) -> set[Path]:
        """Other stages' paths inside stage ``name``'s (corpus/ holds corpus/instruct/)."""
        root = paths[name]
        return {p for n, p in paths.items() if n != name and p != root and p.is_relative_to(root)}

    def _readers(self, name: str) -> list[str]:
        """The stages that read ``name``'s output, directly or through other stages."""
        found: list[str] = []
        for other, needs in self.needs.items():  # in stage order: a reader follows its needs
            if name in needs or any(n in found for n in needs):
                found.append(other)
        return found

    def _count_killed_attempt(self) -> None:
        """A run killed without a chance to record its time (SIGKILL, the default SIGTERM)
        left its stage in ``running``: add the seconds up to its last heartbeat."""
        running = self.state.pop("running", None)
        if not isinstance(running, dict):
            return
        name, since = running.get("name"), running.get("since")
        if not isinstance(since, (int, float)):
            return
        if self.state.get("started", {}).get(name) != running.get("key"):
            return
        try:
            beat = (self.out / HEARTBEAT_FILE).stat().st_mtime
        except OSError:
            return
        lost = min(beat, time.time()) - since
        if lost > 0:
            spent = self.state.setdefault("interrupted_s", {})
            spent[name] = round(spent.get(name, 0.0) + lost, 1)

    def _plan(self) -> tuple[dict[str, str], dict[str, str | None], dict[str, bool]]:
        """Each stage's key, why it runs (None: skipped) and whether its folder must be emptied
        first; decided up front, so the total ETA counts only the stages that will run.
        ``self.retry_only`` gets the stages that would be skipped but for a retried stage
        upstream (see ``products``): run() skips them after all if its product is unchanged."""
        keys: dict[str, str] = {}
        why: dict[str, str | None] = {}
        stale: dict[str, bool] = {}
        retrying: set[str] = set()  # reruns only to retry an incomplete run, product declared
        self.retry_only: set[str] = set()
        paths = self._paths()
        started = self.state.get("started", {})
        for name, folder, _run, settings, *_ in self.stages:
            needs = self.needs[name]
            key = _key(name, _portable(settings, self.out), "|".join(keys[n] for n in needs))
            keys[name] = key
            upstream = [n for n in needs if why[n] is not None]
            done = self.state["stages"].get(name)
            path = paths.get(name)
            changed = None
            if not done and name not in started:
                own = "not run yet"
            elif started.get(name) == REDO:
                own = "an earlier run redid a stage it reads, or changed its output"
            elif started.get(name) == MOVED:
                own = "the output folder moved since the stage was interrupted: starting over"
            elif not done or done.get("key") != key:
                own = (
                    "resuming the interrupted run"
                    if started.get(name) == key
                    else "its settings changed"
                )
            elif done.get("incomplete"):
                own = "its last run was incomplete"
                if name in self.products:
                    retrying.add(name)
            elif path is not None and not path.exists():
                own = f"{folder} was deleted"
            elif path is not None and isinstance(done.get("output"), dict):
                changed = self.outputs.changed(name, path, self._skip(name, paths), done["output"])
                own = f"its output changed since it finished ({changed})" if changed else None
            else:
                own = None
            reason = own
            if upstream and own != "not run yet":
                reason = f"it reads the output of {upstream[0]}, which runs again"
                if own is None and all(n in retrying or n in self.retry_only for n in upstream):
                    self.retry_only.add(name)
            why[name] = reason
            stale[name] = (
                bool(upstream or changed)
                or started.get(name) not in (None, key)
                or bool(done and done.get("key") != key)
            )
        self.outputs.save()
        return keys, why, stale

    def run(self) -> list[StageResult]:
        import threading

        from tqdm import tqdm

        self._count_killed_attempt()
        keys, why, stale_map = self._plan()
        paths = self._paths()
        total = len(self.stages)
        bar = tqdm(
            total=total,
            desc="quickstart",
            unit="stage",
            disable=not self.opts.progress,
            position=0,
            leave=True,
            bar_format="{desc}{n}/{total} stages |{bar}| {elapsed} elapsed{postfix}",
        )
        names = [s.name for s in self.stages]
        heartbeat = self.out / HEARTBEAT_FILE
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    heartbeat.touch()
                except OSError:
                    pass

        beater = threading.Thread(target=beat, name="quickstart-heartbeat", daemon=True)
        beater.start()
        try:
            for i, (name, folder, fn, *_) in enumerate(self.stages):
                key = keys[name]
                stage_dir = self.out / folder if folder else None
                bar.set_description(f"quickstart [{name}]")
                if why[name] is None:
                    done = self.state["stages"][name]
                    if stage_dir is not None and not isinstance(done.get("output"), dict):
                        # Finished before outputs were fingerprinted: take them as they are.
                        done["output"] = self.outputs.record(
                            name, stage_dir, self._skip(name, paths)
                        )
                        self.outputs.save()
                        self._save()
                    if not done.get("resumed_after_s"):
                        # Timed here by an earlier run: a resumed run's ETA is scaled by the
                        # machine's speed too (it used the reference times as they are).
                        self.finished.append((name, done["wall_s"]))
                    self.results.append(
                        StageResult(
                            name,
                            key,
                            done["wall_s"],
                            True,
                            _local(done.get("info", {}), self.out),
                            done.get("resumed_after_s", 0.0),
                        )
                    )
                    bar.update(1)
                    continue
                left = remaining_seconds(
                    self.expected_s,
                    self.finished,
                    [n for n in names[i:] if why[n] is not None],
                    # Seconds toward output this run keeps (a stale stage's are thrown away).
                    {
                        n: t
                        for n, t in self.state.get("interrupted_s", {}).items()
                        if not stale_map.get(n)
                    },
                )
                if left is not None:
                    bar.set_postfix_str(f"~{_minutes(left)} left", refresh=True)
                # Stage lines print with --no-progress too: they are the run's log.
                tqdm.write(
                    f"[quickstart] {name} ({i + 1}/{len(names)})"
                    + (f": about {_minutes(left)} left in total" if left is not None else "")
                    + (f" [{why[name]}]" if why[name] != "not run yet" else ""),
                    file=sys.stderr,
                )
                for report_file in REPORT_FILES:  # about to describe another model
                    (self.out / report_file).unlink(missing_ok=True)
                started = self.state.setdefault("started", {})
                # Seconds that interrupted attempts spent on the output this attempt resumes.
                spent = self.state.setdefault("interrupted_s", {})
                stale = stale_map[name]
                if stale:
                    spent.pop(name, None)
                if stage_dir is not None and stale and stage_dir.exists():
                    # Settings or inputs changed since this stage last ran: its output is stale.
                    if stage_dir.is_dir():
                        shutil.rmtree(stage_dir)
                    else:
                        stage_dir.unlink()
                # Not finished until this run says so: a kill from here on must not leave the
                # old record behind to vouch for a folder that was just wiped or half-rewritten.
                self.state["stages"].pop(name, None)
                self.outputs.forget(name)
                started[name] = key
                # What a reader kept only for want of a changed product gets back (below).
                product = self.out / self.products[name] if name in self.products else None
                product_before = _hash_or_none(product)
                held = {
                    r: (self.state["stages"][r], started.get(r), self.outputs.files.get(r))
                    for r in self._readers(name)
                    if r in self.retry_only and r in self.state["stages"]
                }
                # Nor the records of the stages that read this output, directly or not: killed
                # before this run gets to one, the next would skip it on its old input.
                for reader in self._readers(name):
                    if reader in started or reader in self.state["stages"]:
                        self.state["stages"].pop(reader, None)
                        self.outputs.forget(reader)
                        started[reader] = REDO
                    if why[reader] is None:  # kept after an earlier stage's retry: no longer
                        why[reader] = f"it reads the output of {name}, which ran again"
                t0 = time.time()
                self.state["running"] = {"name": name, "key": key, "since": t0}
                heartbeat.touch()
                self._save()
                self.outputs.save()
                try:
                    info = fn() or {}
                except LlavamedError as err:
                    self._interrupted(name, t0)
                    raise StageError(name, stage_dir, err) from err
                except BaseException:  # Ctrl-C included: the next run resumes this work
                    self._interrupted(name, t0)
                    raise
                wall = time.time() - t0
                earlier = spent.pop(name, 0.0)
                if not earlier:  # a resumed stage's time says nothing of this machine's speed
                    self.finished.append((name, wall))
                wall += earlier
                # Paths inside --out as "<out>/...": a moved folder's report names its own.
                record = {"key": key, "wall_s": round(wall, 1), "info": _portable(info, self.out)}
                if earlier:
                    record["resumed_after_s"] = earlier
                if info.get("incomplete"):  # e.g. self-instruct's failed requests: retry them
                    record["incomplete"] = True
                if stage_dir is not None and stage_dir.exists():
                    record["output"] = self.outputs.record(name, stage_dir, self._skip(name, paths))
                    self.outputs.save()
                self.state.pop("running", None)
                self.state["stages"][name] = record
                if held and product_before is not None and _hash_or_none(product) == product_before:
                    for reader, (kept, started_as, files) in held.items():
                        self.state["stages"][reader] = kept
                        if started_as is None:
                            started.pop(reader, None)
                        else:
                            started[reader] = started_as
                        if files is not None:
                            self.outputs.files[reader] = files
                            self.outputs.dirty = True
                        why[reader] = None
                    self.outputs.save()
                    tqdm.write(
                        f"[quickstart] {name}: {self.products[name]} came out unchanged, so "
                        f"{', '.join(held)} stay finished",
                        file=sys.stderr,
                    )
                self._save()
                self.results.append(StageResult(name, key, wall, False, info, earlier))
                bar.update(1)
                tqdm.write(f"[quickstart] {name}: done in {wall:.0f} s", file=sys.stderr)
            bar.set_postfix_str("done", refresh=True)
        finally:
            stop.set()
            bar.close()
        return self.results

    def _interrupted(self, name: str, t0: float) -> None:
        spent = self.state.setdefault("interrupted_s", {})
        spent[name] = round(spent.get(name, 0.0) + time.time() - t0, 1)
        self.state.pop("running", None)
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.state_path, self.state)
