"""``llavamed quickstart``: the whole LLaVA-Med pipeline end to end on the embedded default.

MedSynth world -> PMC ingestion + domains -> stage-1 alignment set -> self-instruct conversations
(the embedded SmolLM2 behind a local OpenAI-compatible server, the same path a user points at
GPT-4 or vLLM) -> stage-0 caption pairs -> stage 0 (vision pretraining) -> stage 0b (the tower
learns the VQA train split) -> stage 1 -> stage 2 -> zero-shot VQA -> VQA fine-tuning -> VQA
again with the blank-image ablation -> report.

Every stage is keyed by a hash of its settings and of the keys of the stages it reads (so of every
earlier stage's settings), recorded in ``OUT/quickstart_state.json`` once it finishes, with a
fingerprint of its output files (content hashes; ``OUT/.quickstart_outputs.json`` lists them). A
re-run skips finished stages whose key is unchanged and whose output is still there unchanged; a
killed run resumes inside the interrupted stage (each stage's own tool resumes from its last saved
state), and its seconds before the kill count in the stage's wall time. A stage whose settings
changed, or whose output files were deleted or edited, starts over in a clean folder, and so does
every stage that reads one that ran again. The MedSynth stage's settings include the generator
version, so a new renderer redoes everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavamed.errors import ConfigError, InputError, LlavamedError
from llavamed.utils.io import atomic_write_json, atomic_write_text, exclusive_lock, read_json

STATE_FILE = "quickstart_state.json"
# Stage 0b trains the tower on the geometry the composed LLaVA feeds it (ModelSpec's default aspect);
# part of the stage's key, so a folder from a version that squashed images re-runs it.
STAGE0B_ASPECT = "pad"
EVAL_DATASET = "slake"  # MedSynth's SLAKE-shaped set: the largest, with en and zh questions


@dataclass(frozen=True)
class SizePreset:
    """Knobs of one quickstart size. Times are what they cost on 2 CPU cores."""

    articles: int
    """MedSynth articles (about 2.7 figures each)."""
    image_size: int
    instruct_samples: int
    """Figures sent to the local LLM for self-instruct conversations."""
    lm_layers: int | None
    """Keep the first N SmolLM2 layers (None = all 30)."""
    vision: str
    stage0_minutes: float
    stage0_steps: int
    stage0_batch: int
    probe_images: int
    """MedSynth images per domain for stage 0's linear-probe table (0 = skip the probes)."""
    stage1_steps: int
    stage2_epochs: float
    finetune_epochs: float
    eval_limit: int | None
    """Questions in each VQA evaluation (None = the whole test split)."""
    vqa_images: int | None = None
    """MedSynth VQA images (None = 10 per article)."""
    train_closed: int = 3
    """Most yes/no questions per train-split VQA image (3 = the real sets' shape)."""
    stage0_pairs: int = 0
    """Rendered single-panel MedSynth caption pairs that stage 0 trains on (a PMC-15M stand-in);
    0 trains on the ingested corpus's figures instead."""
    stage0b_steps: int = 0
    """Steps of stage 0b (the tower learns the VQA train split's yes/no questions); 0 skips it."""
    batch: int = 16
    lr_finetune: float = 2e-4
    lr_projector_finetune: float | None = None
    lr_vision_finetune: float | None = None
    lr_stage1: float = 2e-3
    """Stage 1's projector learning rate. With an LM cut to a few layers the caption loss stays
    near 10 nats, and at 2e-3 its gradients wash out what a fresh projector passes on: probes of
    the projector's output read the devices at 0.78-0.81 after stage 1 against 0.96-1.00 before
    it (benchmarks/readout_trace.py, docs/stage0.md)."""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each stage took in a reference run on the 2-core machine; the total ETA scales
    them by how fast this machine runs the stages already finished."""


SIZES: dict[str, SizePreset] = {
    # A few minutes end to end: exercises every stage (tests, smoke checks); learns little.
    "tiny": SizePreset(
        articles=8,
        image_size=128,
        instruct_samples=6,
        lm_layers=2,
        vision="cpu",
        stage0_minutes=0.3,
        stage0_steps=4,
        stage0_batch=8,
        stage0_pairs=48,
        probe_images=0,
        stage1_steps=4,
        stage2_epochs=1.0,
        finetune_epochs=1.0,
        eval_limit=24,
        batch=8,
        stage0b_steps=5,
        # Measured on the idle 2-core Zen 3 machine (about 100 s in all, 2026-12-06; `quickstart
        # --size tiny --out DIR` from an empty DIR, embedded-LM cache warm).
        stage_seconds={
            "synth": 1,
            "ingest": 0,
            "align": 0,
            "instruct": 67,
            "stage0_pairs": 1,
            "stage0_vision": 3,
            "stage0b_vision_vqa": 4,
            "stage1_alignment": 7,
            "stage2_instruct": 8,
            "eval_zero_shot": 1,
            "finetune_vqa": 8,
            "eval_finetuned": 2,
        },
    ),
    "small": SizePreset(
        articles=150,
        image_size=192,
        # 12 self-instruct figures (24 cost 93 s of the 20-minute budget; the fine-tuned
        # model's VQA scores do not use them).
        instruct_samples=12,
        # 8 layers: 4 layers fine-tune in 0.62x the time but score 1.2 / 2.2 points lower by
        # yes/no logits on all 1,669 closed test questions (78.4 / 79.7 against 79.6 / 81.9,
        # same world and towers, fp32 on an AVX2 CPU, 2026-11-22).
        lm_layers=8,
        # 32 px patches (16 image tokens): from this world's 2,600 VQA train images the tower
        # learns the findings better than with 16 px patches (stage 0b held out 0.873 against
        # 0.818, in 80 s against 230 s), and each fine-tuning step is cheaper.
        vision="cpu-p32",
        # Stage 0 on 12,000 rendered single-panel pairs for 900 steps (run F in docs/stage0.md):
        # local findings +6.7 / +18.2 points over a random tower (patch / pooled probes), and
        # stage 0b from this tower reaches 0.899 held out against 0.848 from 150 steps on the
        # corpus's 390 figures. The final model: 84.4% against 80.6% by yes/no logits on all
        # 1,669 closed test questions, 85.6% against 77.9% strict (AVX2 CPU, fp32). It costs
        # 7.4 minutes there (rendering 1, stage 0 6.5) against 1.
        # A safety cap, not the budget: the 900 steps train for 10.5 minutes on an idle 2-core
        # Zen 1 EPYC, and a cap that cut them short under load would make the tower (and every
        # score after it) depend on the machine.
        stage0_minutes=30.0,
        stage0_steps=900,
        stage0_batch=64,
        stage0_pairs=12000,
        probe_images=0,
        stage1_steps=30,
        stage2_epochs=1.0,
        # Three epochs: yes/no logits on all 1,669 closed test questions, 77.1 / 81.9 (SLAKE- /
        # VQA-RAD-shaped) against 75.9 / 79.5 after 1.9 epochs (same stage-2 checkpoint). With
        # the current towers, 83.8 / 85.2 against 81.0 / 82.9 for 2 epochs at LM lr 1e-3, and
        # 82.6 / 85.2 for 3 epochs at 1e-3 (docs/measurements.md, "Levers tried since").
        finetune_epochs=3.0,
        eval_limit=400,
        # 4,500 VQA images with dense train questions: MedSynth makes them in ~30 s, and each
        # training step sees more yes/no answers per image forward.
        vqa_images=4500,
        train_closed=12,
        # The final model's closed accuracy tracks the stage-0b tower's own (held out: 0.725 after
        # 300 steps, 0.818 after 900, 0.805 after 1,500 as it starts to memorise). Final models,
        # yes/no logits on all 1,669 closed test questions: 65.8 and 67.0 (two runs) after 300
        # steps, 69.8 after 900, 71.3 after 1,500 (docs/stage0.md, "The tower is the ceiling").
        stage0b_steps=900,
        lr_stage1=2e-4,
        lr_finetune=5e-4,
        # Below the LM's rate: at 2e-3 fine-tuning washed the devices out of the projector
        # (probes 0.69-0.81); 2e-4 lifted the blank-image gap from 21.6 to 26.9 (docs/stage0.md).
        lr_projector_finetune=2e-4,
        lr_vision_finetune=0,
        # Not the top 2 LM layers alone (train.frozen_lm_layers=6 with the projector frozen and
        # train.cache_frozen_layers): 2.8x fewer fine-tuning seconds by
        # benchmarks/frozen_layers.py (1,587 s on a 2-core Zen 1 EPYC), but strict closed
        # accuracy fell from 85.6% to 70.2% on the same towers, and to 73.6% with the top 4
        # layers trained (docs/measurements.md, "Training only the top of the LM").
        # Fresh clone of 25ccdfd on an idle 2-core Zen 3 EPYC (AVX2, fp32): 41 min 8 s in all,
        # 2,383 s of stages, 89.4% strict closed (docs/measurements.md; the same report
        # again at fc954c9 and 884c9a9). With AMX (bf16) the recipe before the 12,000-pair
        # stage 0 took 15 min 38 s, fine-tuning 708 s of it.
        stage_seconds={
            "synth": 39,
            "ingest": 1,
            "align": 0,
            "instruct": 102,
            "stage0_pairs": 42,
            "stage0_vision": 315,
            "stage0b_vision_vqa": 177,
            "stage1_alignment": 70,
            "stage2_instruct": 19,
            "eval_zero_shot": 20,
            "finetune_vqa": 1582,
            "eval_finetuned": 16,
        },
    ),
    "medium": SizePreset(
        # The small recipe with twice the VQA images and three times the stage-0b steps, which
        # together lift the stage-0b tower (held out 0.954 against small's 0.899). The LM keeps
        # small's 8 layers. Fresh clone of 8ae7d98 on an idle 2-core AVX2-only CPU (fp32,
        # 2026-11-23): 1 h 50 min; 87.1% [85.5, 88.6] strict closed on all 1,802 closed test
        # questions, 50.6% with a blank image (82.0% before the 12,000-pair stage 0, 78.9% with
        # the cpu tower, 76.4% before shared-prefix packing).
        articles=400,
        image_size=256,
        instruct_samples=96,
        lm_layers=8,
        vision="cpu-p32",  # as small (its comment)
        # small's stage 0 (its comment).
        stage0_minutes=30.0,
        stage0_steps=900,
        stage0_batch=64,
        stage0_pairs=12000,
        probe_images=150,
        stage1_steps=80,
        stage2_epochs=2.0,
        finetune_epochs=2.0,
        eval_limit=None,
        vqa_images=9000,
        train_closed=12,
        stage0b_steps=2700,
        lr_stage1=2e-4,
        lr_finetune=5e-4,
        # Below the LM's rate: at 2e-3 fine-tuning washed the devices out of the projector
        # (probes 0.69-0.81); 2e-4 lifted the blank-image gap from 21.6 to 26.9 (docs/stage0.md).
        lr_projector_finetune=2e-4,
        lr_vision_finetune=0,
        # The fresh-clone run above (AVX2, fp32; docs/measurements.md, the older `--size medium`).
        stage_seconds={
            "synth": 125,
            "ingest": 3,
            "align": 0,
            "instruct": 1063,
            "stage0_pairs": 64,
            "stage0_vision": 423,
            "stage0b_vision_vqa": 654,
            "stage1_alignment": 223,
            "stage2_instruct": 420,
            "eval_zero_shot": 311,
            "finetune_vqa": 3058,
            "eval_finetuned": 277,
        },
    ),
}


@dataclass
class QuickstartOptions:
    out: Path = Path("quickstart_out")
    size: str = "small"
    seed: int = 0
    workers: int = 2
    progress: bool = True
    vision: Path | None = None
    """A pretrained vision tower folder (stage 0's ``vision_tower/``, a converted BiomedCLIP ...):
    stage 0 is skipped and stage 0b, stage 1 and the rest start from this tower."""

    def preset(self) -> SizePreset:
        if self.size not in SIZES:
            raise ConfigError(f"--size {self.size!r}: choose from {', '.join(SIZES)}")
        return SIZES[self.size]

    def check_vision(self) -> Path | None:
        if self.vision is None:
            return None
        # `--vision=~/x` (no shell expands a ~ after =) is the home folder's, as in configs.
        tower = Path(self.vision).expanduser().resolve()
        if not (tower / "config.json").is_file():
            raise ConfigError(
                f"--vision {self.vision}: not a vision tower folder (no config.json); give the "
                "vision_tower/ folder that stage 0 or `llavamed convert biomedclip` wrote"
            )
        return tower


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


class Pipeline:
    """Runs named stages in order with keyed skip/resume and a total progress bar whose ETA comes
    from reference stage times (``expected_s``), rescaled as stages finish.

    A stage is ``(name, path, fn, settings)`` or ``(name, path, fn, settings, needs)``:
    ``path`` is the folder (or the one file) it writes under the output folder, or None.
    ``needs`` names the earlier stages whose output it reads (default: the stage before it). Its
    key hashes its settings and those stages' keys, and it starts over, in a clean folder, when
    one of them runs in this invocation. A stage that reads nothing of another is not redone
    when that one is. A finished stage whose output files were deleted or changed since it
    finished starts over too, with every stage that reads it."""

    def __init__(
        self,
        opts: QuickstartOptions,
        stages: list[tuple],
        expected_s: dict[str, float] | None = None,
    ):
        self.opts = opts
        self.out = Path(opts.out)
        names = [s[0] for s in stages]
        self.needs: dict[str, tuple[str, ...]] = {}
        for i, stage in enumerate(stages):
            needs = stage[4] if len(stage) > 4 else tuple(names[i - 1 : i])
            unknown = [n for n in needs if n not in names[:i]]
            if unknown:
                raise ValueError(f"stage {stage[0]} needs {unknown}, which do not run before it")
            self.needs[stage[0]] = tuple(needs)
        self.stages = [s[:4] for s in stages]
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
        return {name: self.out / folder for name, folder, _, _ in self.stages if folder}

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
        first; decided up front, so the total ETA counts only the stages that will run."""
        keys: dict[str, str] = {}
        why: dict[str, str | None] = {}
        stale: dict[str, bool] = {}
        paths = self._paths()
        started = self.state.get("started", {})
        for name, folder, _fn, settings in self.stages:
            needs = self.needs[name]
            key = _key(name, _portable(settings, self.out), "|".join(keys[n] for n in needs))
            keys[name] = key
            upstream = [n for n in needs if why[n] is not None]
            done = self.state["stages"].get(name)
            path = paths.get(name)
            changed = None
            if not done and name not in started:
                reason = "not run yet"
            elif upstream:
                reason = f"it reads the output of {upstream[0]}, which runs again"
            elif started.get(name) == REDO:
                reason = "an earlier run redid a stage it reads, or changed its output"
            elif started.get(name) == MOVED:
                reason = "the output folder moved since the stage was interrupted: starting over"
            elif not done or done.get("key") != key:
                reason = (
                    "resuming the interrupted run"
                    if started.get(name) == key
                    else "its settings changed"
                )
            elif done.get("incomplete"):
                reason = "its last run was incomplete"
            elif path is not None and not path.exists():
                reason = f"{folder} was deleted"
            elif path is not None and isinstance(done.get("output"), dict):
                changed = self.outputs.changed(name, path, self._skip(name, paths), done["output"])
                reason = f"its output changed since it finished ({changed})" if changed else None
            else:
                reason = None
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
        names = [s[0] for s in self.stages]
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
            for i, (name, folder, fn, _settings) in enumerate(self.stages):
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
                # Nor the records of the stages that read this output, directly or not: killed
                # before this run gets to one, the next would skip it on its old input.
                for reader in self._readers(name):
                    if reader in started or reader in self.state["stages"]:
                        self.state["stages"].pop(reader, None)
                        self.outputs.forget(reader)
                        started[reader] = REDO
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


def training_configs(
    p: SizePreset, out: Path, seed: int, given_tower: Path | None = None
) -> dict[str, dict]:
    """Every training stage's config (stage0, stage0b, stage1, stage2, finetune) for preset ``p``,
    reading the quickstart's folder layout under ``out``. ``configs/cpu/`` holds the ``small``
    preset's with ``out = runs/cpu`` (a test keeps them equal)."""
    corpus, world = out / "corpus", out / "world"
    pairs = out / "stage0_pairs" / "figures.jsonl"
    stage0_cfg = {
        "stage": "vision",
        "data": str(pairs if p.stage0_pairs else corpus / "figures.jsonl"),
        "output_dir": str(out / "stage0"),
        "vision": p.vision,
        "feature_layer": -2,
        # A fixed step count (so the schedule decays) with the time budget as a safety cap.
        "epochs": 1,
        "max_steps": p.stage0_steps,
        "time_budget_min": p.stage0_minutes,
        "batch_size": p.stage0_batch,
        "lr": 1e-3,
        "precision": "auto",
        "probe_images_per_domain": p.probe_images,
        "seed": seed,
    }
    stage0_tower = given_tower or out / "stage0" / "vision_tower"
    stage0b_cfg = {
        "stage": "vision_vqa",
        "sources": [
            {"dataset": "slake", "path": str(world / "slake"), "split": "train"},
            {"dataset": "vqa-rad", "path": str(world / "vqa_rad"), "split": "train"},
        ],
        "vision": str(stage0_tower),
        "output_dir": str(out / "stage0b"),
        "feature_layer": -2,
        "aspect": STAGE0B_ASPECT,
        "steps": p.stage0b_steps,
        "precision": "auto",
        "seed": seed,
    }
    tower = out / "stage0b" / "vision_tower" if p.stage0b_steps else stage0_tower
    common_train = {
        "precision": "auto",
        "global_batch_size": p.batch,
        "micro_batch_size": p.batch,
        "warmup_ratio": 0.03,
        "seed": seed,
    }
    stage1_cfg = {
        "stage": "align",
        "model": {
            "init": {
                "lm": "embedded",
                "lm_layers": p.lm_layers,
                "vision": str(tower),
                "template": "chatml",
                "seed": seed,
            }
        },
        "data": {"format": "llava_json", "path": str(corpus / "alignment.json"), "max_length": 256},
        "train": {
            **common_train,
            "trainable": ["projector"],
            "max_steps": p.stage1_steps,
            "lr": p.lr_stage1,
        },
        "output": {"dir": str(out / "stage1"), "save_every": 20},
    }
    stage2_cfg = {
        "stage": "instruct",
        "model": {"from": str(out / "stage1" / "checkpoint-final")},
        "data": {
            "sources": [
                {
                    "format": "llava_json",
                    "path": str(corpus / "instruct" / "instruct.json"),
                },
                {
                    "format": "llava_json",
                    "path": str(corpus / "alignment.json"),
                    "max_samples": 4 * p.instruct_samples,
                },
            ],
            "max_length": 384,
        },
        "train": {
            **common_train,
            "trainable": ["projector", "lm"],
            "epochs": p.stage2_epochs,
            "lr": 1e-4,
        },
        "output": {"dir": str(out / "stage2"), "save_every": 20},
    }
    finetune_cfg = {
        "stage": "finetune",
        "model": {"from": str(out / "stage2" / "checkpoint-final")},
        "data": {
            "sources": [
                {
                    "format": "vqa",
                    "dataset": "slake",
                    "path": str(world / "slake"),
                    "split": "train",
                    "group_by_image": True,
                },
                {
                    "format": "vqa",
                    "dataset": "vqa-rad",
                    "path": str(world / "vqa_rad"),
                    "split": "train",
                    "group_by_image": True,
                },
            ],
            "max_length": 320,
        },
        "train": {
            **common_train,
            # lr_vision_finetune == 0 keeps the (stage-0b) tower frozen.
            "trainable": ["projector", "lm"] + (["vision"] if p.lr_vision_finetune != 0 else []),
            "epochs": p.finetune_epochs,
            "lr": p.lr_finetune,
            "lr_projector": p.lr_projector_finetune,
            "lr_vision": p.lr_vision_finetune or None,
            # Packed questions need a 4-D mask, which CPU sdpa runs through its flash kernel;
            # eager attention was 1.12x faster per step in bf16 on AMX, 0.97x of sdpa in fp32 on a
            # Zen 1 CPU (benchmarks/packed_attention.py); kept, as the measured recipe used it.
            "attn_implementation": "eager",
        },
        "output": {"dir": str(out / "finetune"), "save_every": 25},
    }
    return {
        "stage0": stage0_cfg,
        "stage0b": stage0b_cfg,
        "stage1": stage1_cfg,
        "stage2": stage2_cfg,
        "finetune": finetune_cfg,
    }


LOCK_FILE = ".quickstart.lock"


def _check_out_is_ours(out: Path) -> None:
    """Refuse an --out that holds files and is no quickstart output: a stage that starts over
    empties its folder (corpus/, stage0/, finetune/ ...), which would delete a user's own
    folder of that name."""
    if not out.is_dir() or (out / STATE_FILE).exists():
        return
    other = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if {OUTPUTS_FILE, HEARTBEAT_FILE} & set(other):
        raise ConfigError(
            f"--out {out}: a quickstart output whose {STATE_FILE} is gone, so none of its stages "
            "can be trusted as finished; delete the folder to start over, or give another --out"
        )
    if other:
        shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
        raise ConfigError(
            f"--out {out}: the folder is not empty ({shown}) and holds no {STATE_FILE}, so it "
            "is no quickstart output; give a new or empty folder (re-runs empty stage folders)"
        )


def run_quickstart(opts: QuickstartOptions) -> dict:
    from llavamed.train.vision_pretrain import tower_fingerprint

    p = opts.preset()
    given_tower = opts.check_vision()
    out = Path(opts.out).expanduser().resolve()  # `--out=~/x` made a folder named ~
    if given_tower is not None and given_tower.resolve().is_relative_to(out):
        # A stage that starts over empties its folder, which would take the given tower with it.
        raise ConfigError(
            f"--vision {opts.vision}: the tower lies inside --out {out}, whose stage folders a "
            "re-run may empty; copy it elsewhere (or use another --out) and give that path"
        )
    if given_tower is not None:
        # Loaded now, not at stage 0b: a folder that is no tower (a LLaVA checkpoint has a
        # config.json too) failed there, after self-instruct (18 minutes of medium), with advice
        # to delete stage0b/.
        from llavamed.train.vision_pretrain import load_tower

        try:
            load_tower(str(given_tower))
        except InputError as exc:
            raise ConfigError(f"--vision {opts.vision}: {exc}") from exc
    given_fp = tower_fingerprint(given_tower) if given_tower else None
    try:
        _check_out_is_ours(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file, a name too long, a read-only or odd file system
        raise ConfigError(
            f"--out {opts.out}: cannot use it as the output folder "
            f"({exc.strerror or type(exc).__name__}); give a folder path you can write to"
        ) from exc
    opts.out = out
    world, corpus = out / "world", out / "corpus"
    seed = opts.seed
    fields = dataclasses.asdict(p)
    from llavamed.data.synth.world import GENERATOR_VERSION

    cfgs = training_configs(p, out, seed, given_tower)

    def synth() -> dict:
        from llavamed.data.synth import generate_world

        m = generate_world(
            world,
            articles=p.articles,
            seed=seed,
            image_size=p.image_size,
            workers=opts.workers,
            progress=opts.progress,
            vqa_images=p.vqa_images,
            train_closed=p.train_closed,
        )
        return {"counts": m.get("counts")}

    def ingest() -> dict:
        from llavamed.data.pmc.ingest import ingest as run_ingest

        rep = run_ingest([world / "packages"], corpus, workers=opts.workers, progress=opts.progress)
        return {
            k: rep.get(k) for k in ("figures_written", "skipped", "packages") if k in rep
        } or rep

    def align() -> dict:
        from llavamed.data.align import build_alignment
        from llavamed.data.figures import iter_figures

        samples, skipped = build_alignment(
            iter_figures(corpus / "figures.jsonl"), image_root=corpus, out_dir=corpus, seed=seed
        )
        atomic_write_json(corpus / "alignment.json", samples)
        return {"samples": len(samples), "skipped": skipped}

    def instruct() -> dict:
        from llavamed.data.instruct.runner import InstructOptions, run_instruct
        from llavamed.llm.client import ClientOptions
        from llavamed.serve.api import serve_in_background

        # bf16 where the CPU computes it (~4x faster than fp32 with AVX512-BF16/AMX), else fp32:
        # AVX2-only CPUs emulate bf16 and run it ~60x slower (utils/precision.py).
        server = serve_in_background(
            "embedded", dtype="auto", served_model_name="smollm2-135m-instruct"
        )
        try:
            report, rc = run_instruct(
                InstructOptions(
                    figures=corpus / "figures.jsonl",
                    out=corpus / "instruct" / "instruct.json",
                    client=ClientOptions(
                        base_url=server.base_url,
                        model="smollm2-135m-instruct",
                        concurrency=8,
                        timeout=600.0,
                    ),
                    inline_mentions=True,
                    max_samples=p.instruct_samples,
                    temperature=0.7,
                    max_tokens=256,
                    seed=seed,
                    few_shot=2,
                    progress=opts.progress,
                )
            )
        finally:
            server.stop()
        if report["out"] is None:  # every request failed: stage 2 would have nothing to train on
            raise LlavamedError(
                f"self-instruct: all {report['pending_after_failures']} requests to the local "
                f"server failed ({report['failed_this_run']}); re-run the quickstart to retry"
            )
        if rc:
            print(
                f"quickstart: self-instruct went on without {report['pending_after_failures']} "
                f"figures whose requests failed ({report['failed_this_run']}); the next run of the "
                "same command retries them",
                file=sys.stderr,
            )
        return {
            "incomplete": bool(rc),  # the next run retries the failed figures
            "kept": report["totals"]["kept"],
            "dropped": report["totals"]["dropped"],
            "failed": report["pending_after_failures"],
            "requests": report["this_run"]["http_requests"],
            "cache_hits": report["this_run"]["cache_hits"],
        }

    def stage0_pairs() -> dict:
        from llavamed.data.synth.pairs import write_caption_pairs

        path = write_caption_pairs(
            out / "stage0_pairs",
            p.stage0_pairs,
            seed=seed,
            workers=opts.workers,
            progress=opts.progress,
        )
        return {"pairs": p.stage0_pairs, "figures": str(path)}

    def stage0() -> dict:
        from tqdm import tqdm

        from llavamed.train.vision_pretrain import run_from_config

        res = run_from_config(cfgs["stage0"], [], progress=opts.progress)
        info = {"tower": str(res.tower_dir), "report": _small(res.report)}
        if (res.report or {}).get("stopped_early"):
            # The cap is a safety net: cut short, the tower (and every score after it) depends
            # on how busy the machine was, and the run no longer reproduces the documented one.
            info["stopped_early"] = stage0_cap_note(res.report.get("steps"), cfgs["stage0"])
            tqdm.write(f"[quickstart] stage0_vision: {info['stopped_early']}", file=sys.stderr)
        return info

    def stage0b() -> dict:
        from llavamed.train.vision_vqa import run_from_config as run_vision_vqa

        res = run_vision_vqa(cfgs["stage0b"], progress=opts.progress)
        rep = res.report
        return {
            "tower": str(res.tower_dir),
            "steps": rep.get("steps"),
            "val_accuracy": rep.get("val_accuracy"),
            "val_n": rep.get("val_n"),
        }

    def train_stage(name: str, cfg: dict) -> Callable[[], dict]:
        def run() -> dict:
            from llavamed.train import run_training

            res = run_training(cfg, progress=opts.progress)
            last = res.metrics[-1] if res.metrics else {}
            return {
                "checkpoint": str(res.final_checkpoint),
                "steps": last.get("step"),
                "final_loss": last.get("loss"),
                "train_wall_s": round(res.wall_time_s, 1),
            }

        return run

    stage1_cfg, stage2_cfg, finetune_cfg = cfgs["stage1"], cfgs["stage2"], cfgs["finetune"]

    def evaluate(name: str, ckpt: Path, ablate: list[str] | None) -> Callable[[], dict]:
        def run() -> dict:
            from llavamed.eval.report import write_report
            from llavamed.eval.vqa_data import load_vqa
            from llavamed.eval.vqa_runner import run_vqa_eval

            samples, load_report = load_vqa(EVAL_DATASET, world / "slake", split="test", lang="en")
            result = run_vqa_eval(
                ckpt,
                samples,
                out / "eval" / name,
                batch_size=16,
                ablate=ablate,
                limit=p.eval_limit,
                max_new_tokens=16,
                seed=seed,
                progress=opts.progress,
            )
            write_report(
                result,
                out / "eval" / name,
                EVAL_DATASET,
                load_report.to_dict() if hasattr(load_report, "to_dict") else None,
            )
            return {"metrics": _headline(result)}

        return run

    # The stage that last trained the tower stage 1 starts from (none: a given tower as is).
    tower_stage = (
        ("stage0b_vision_vqa",)
        if p.stage0b_steps
        else ("stage0_vision",)
        if given_tower is None
        else ()
    )
    stages = [
        (
            "synth",
            "world",
            synth,
            {
                "articles": p.articles,
                "image_size": p.image_size,
                "seed": seed,
                "vqa_images": p.vqa_images,
                "train_closed": p.train_closed,
                # A new renderer changes every image: an upgraded llavamed redoes the world
                # (and so every stage) rather than report the old one's numbers as its own.
                "generator": GENERATOR_VERSION,
            },
        ),
        ("ingest", "corpus", ingest, {}),
        # brief/detailed prompts by caption length since this key: older sets are redone
        ("align", "corpus/alignment.json", align, {"seed": seed, "prompts": "by-length"}),
        (
            "instruct",
            "corpus/instruct",
            instruct,
            # image paths relative to instruct.json since 4086f98: older outputs are redone
            {"n": p.instruct_samples, "seed": seed, "image_paths": "relative"},
            ("ingest",),  # the vision stages read none of it: a redo leaves them alone
        ),
        *(
            [
                (
                    "stage0_pairs",
                    "stage0_pairs",
                    stage0_pairs,
                    {"n": p.stage0_pairs, "seed": seed},
                    ("synth",),  # its own renders: the synth key carries the generator version
                )
            ]
            if given_tower is None and p.stage0_pairs
            else []
        ),
        *(
            [
                (
                    "stage0_vision",
                    "stage0",
                    stage0,
                    {
                        k: fields[k]
                        for k in (
                            "vision",
                            "stage0_minutes",
                            "stage0_steps",
                            "stage0_batch",
                            "stage0_pairs",
                            "probe_images",
                        )
                    },
                    ("stage0_pairs",) if p.stage0_pairs else ("ingest",),
                )
            ]
            if given_tower is None
            else []
        ),
        *(
            [
                (
                    "stage0b_vision_vqa",
                    "stage0b",
                    stage0b,
                    {"steps": p.stage0b_steps, "aspect": STAGE0B_ASPECT}
                    | ({"vision_fingerprint": given_fp} if given_tower else {}),
                    ("synth",) + (() if given_tower else ("stage0_vision",)),
                )
            ]
            if p.stage0b_steps
            else []
        ),
        (
            "stage1_alignment",
            "stage1",
            train_stage("stage1", stage1_cfg),
            stage1_cfg | ({"tower_fingerprint": given_fp} if given_fp else {}),
            ("align", *tower_stage),
        ),
        (
            "stage2_instruct",
            "stage2",
            train_stage("stage2", stage2_cfg),
            stage2_cfg,
            ("stage1_alignment", "instruct"),
        ),
        (
            "eval_zero_shot",
            "eval/zero_shot",
            evaluate("zero_shot", out / "stage2" / "checkpoint-final", None),
            {"limit": p.eval_limit},
        ),
        (
            "finetune_vqa",
            "finetune",
            train_stage("finetune", finetune_cfg),
            # group_by_image changed meaning (multi-turn -> shared image prefix): rerun old runs.
            finetune_cfg | {"group_by_image": "shared_prefix"},
            ("synth", "stage2_instruct"),  # not the zero-shot evaluation before it
        ),
        (
            "eval_finetuned",
            "eval/finetuned",
            evaluate("finetuned", out / "finetune" / "checkpoint-final", ["blank"]),
            {"limit": p.eval_limit},
        ),
    ]
    t0 = time.time()
    # Two runs on one --out would run the same stage into the same folder (and one's restart
    # would empty the other's live folder).
    with exclusive_lock(out / LOCK_FILE, "another `llavamed quickstart` run"):
        results = Pipeline(opts, stages, expected_s=p.stage_seconds).run()
        report = build_report(opts, results, time.time() - t0)
    return report


def stage0_cap_note(steps: int | None, cfg: dict) -> str:
    """What to tell a user whose stage 0 stopped at its time cap before its step count."""
    return (
        f"stopped at its {cfg['time_budget_min']:g}-minute safety cap after {steps} of "
        f"{cfg['max_steps']} steps (the machine ran slower than expected: busy?); the tower and "
        "every score after it differ from an uncut run. For the documented numbers, run again "
        "with another --out on an idle machine"
    )


def _small(report: dict | None) -> dict:
    if not report:
        return {}
    return {
        k: v for k, v in report.items() if k in ("retrieval", "probe_summary", "minutes", "steps")
    }


HEADLINE = (
    "strict_closed_acc",
    "llava_med_closed_acc",
    "llava_med_open_recall",
    "open_exact_match",
    "token_f1",
    "closed_unparsed",
)


def _pick(metrics: dict) -> dict:
    """The HEADLINE statistics of one evaluation's ``metrics``: closed ones over the closed
    questions, open ones over the open questions, the rest over all of them."""
    by = metrics.get("by_answer_type", {})
    overall = metrics.get("overall", {})
    out = {}
    for k in HEADLINE:
        src = (
            by.get("closed", {})
            if "closed" in k
            else by.get("open", {})
            if "open" in k
            else overall
        )
        stat = src.get(k) or overall.get(k)
        if stat:
            out[k] = _stat(stat)
    return out


def _headline(result: dict) -> dict:
    """The report's numbers from a ``run_vqa_eval`` result (or its saved report.json)."""
    metrics = result.get("metrics", {})
    out = {k: metrics.get(k) for k in ("n_answered", "n_closed", "n_open")}
    out |= _pick(metrics)
    out["limit"] = result.get("limit")
    # English test questions there were to ask: a limit over it evaluated the whole split.
    out["n_in_split"] = (result.get("load_report") or {}).get("n_loaded")
    for name, abl in (result.get("ablations") or {}).items():
        # Every metric the ablated run measured (open questions too), as in the other columns.
        out[f"ablation_{name}"] = _pick(abl.get("metrics", {}))
        # The paired per-question drop with its own CI (not a difference of two means).
        drop = abl.get("drop", {})
        keys = ("strict_closed_acc", "llava_med_closed_acc", "closed_unparsed")
        out[f"ablation_{name}_drop"] = {k: _stat(drop[k]) for k in keys if k in drop}
    return out


def _stat(stat: dict) -> dict:
    return {k: stat[k] for k in ("mean", "lo", "hi", "n")}


def _eval_metrics(out: Path, name: str) -> dict:
    path = out / "eval" / name / "report.json"
    return _headline(read_json(path)) if path.exists() else {}


def build_report(opts: QuickstartOptions, results: list[StageResult], wall_s: float) -> dict:
    """Write ``report.md``, ``report.json`` and ``loss.png`` into the output folder."""
    out = Path(opts.out)
    stages = {
        r.name: {
            "wall_s": round(r.wall_s, 1),
            "resumed_after_s": r.resumed_after_s,
            "skipped_this_run": r.skipped,
            **r.info,
        }
        for r in results
    }
    zs = _eval_metrics(out, "zero_shot")
    ft = _eval_metrics(out, "finetuned")
    data_stats = {}
    for name, path in (
        ("ingest", out / "corpus" / "ingest_report.json"),
        ("instruct", out / "corpus" / "instruct" / "instruct_report.json"),
    ):
        if path.exists():
            data_stats[name] = _relocated(read_json(path), path, out)
    # With --vision, an earlier run's stage-0 curve in the same folder is not this model's.
    loss_png = _plot_losses(out, stage0=opts.vision is None)
    total_stage_s = sum(r.wall_s for r in results)
    report = {
        "size": opts.size,
        "seed": opts.seed,
        "vision": str(opts.vision) if opts.vision else None,
        "output": str(out),
        "wall_time_s_all_stages": round(total_stage_s, 1),
        "wall_time_s_this_run": round(wall_s, 1),
        "stages": stages,
        "data": data_stats,
        "metrics": {"zero_shot": zs, "finetuned": ft},
        "loss_curves": str(loss_png) if loss_png else None,
        "try_it": _try_it(out),
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _relocated(tool_report: Any, path: Path, out: Path) -> Any:
    """A tool's report at ``path`` with the paths it wrote under the output folder it ran in put
    under ``out``, where that folder is now: self-instruct's report names its own
    ``instruct.json`` ("out"), so a moved folder's report.json named the old folder's files."""
    written = tool_report.get("out") if isinstance(tool_report, dict) else None
    if not isinstance(written, str):
        return tool_report
    rel = path.parent.relative_to(out)  # corpus/instruct
    was = Path(written).parent
    if was.parts[-len(rel.parts) :] != rel.parts:
        return tool_report
    old_out = Path(*was.parts[: -len(rel.parts)])
    if old_out == out:
        return tool_report
    return _local(_portable(tool_report, old_out), out)


def _try_it(out: Path) -> dict:
    """Commands to try the fine-tuned model, on a held-out test image whose questions the final
    evaluation asked, with the reference answers and this run's own answers to them: a user's
    first chat then starts from a question the model is known to handle (it was fine-tuned for
    short answers, not free-text descriptions)."""
    from llavamed.eval.vqa_data import load_vqa
    from llavamed.utils.io import iter_jsonl

    ckpt = out / "finetune" / "checkpoint-final"
    try:
        samples, _ = load_vqa(EVAL_DATASET, out / "world" / "slake", split="test", lang="en")
    except InputError:
        samples = []
    scores = out / "eval" / "finetuned" / "scores.jsonl"
    scored = {
        str(r["qid"]): r
        for r in (iter_jsonl(scores, skip_bad=True) if scores.exists() else [])
        if "qid" in r
    }
    by_image: dict[str, list] = {}
    for s in samples:
        if s.qid in scored and isinstance(s.image, str):
            by_image.setdefault(s.image, []).append(s)
    image, asked = max(by_image.items(), key=lambda kv: len(kv[1]), default=(None, []))
    chat = ["llavamed", "chat", "--model", str(ckpt)] + (["--image", image] if image else [])
    # shlex: paths and questions may hold spaces or quotes, and the lines are meant to be pasted.
    commands = {"chat": shlex.join(chat)}
    if asked:
        commands["one question"] = shlex.join(
            [*chat, "--prompt", asked[0].question, "--temperature", "0"]
        )
    commands["serve"] = shlex.join(["llavamed", "serve", "--model", str(ckpt), "--port", "8000"])
    commands["web"] = shlex.join(["llavamed", "web", "--model", str(ckpt)])
    questions = [
        {"question": s.question, "answer": s.answer, "model_answer": scored[s.qid]["prediction"]}
        for s in asked[:6]
    ]
    return {"commands": commands, "image": image, "questions": questions}


def _plot_losses(out: Path, stage0: bool = True) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llavamed.train.plots import ema
    from llavamed.train.vision_pretrain import LOG_FILE as STAGE0_LOG
    from llavamed.utils.io import atomic_path, iter_jsonl

    curves = []
    for name in ("stage1", "stage2", "finetune"):
        path = out / name / "metrics.jsonl"
        if path.exists():
            rows = [r for r in iter_jsonl(path, skip_bad=True) if "loss" in r]
            if rows:
                curves.append((name, [r["step"] for r in rows], [r["loss"] for r in rows]))
    s0 = out / "stage0" / STAGE0_LOG
    if stage0 and s0.exists():
        rows = [r for r in iter_jsonl(s0, skip_bad=True) if "loss" in r and "step" in r]
        if rows:
            curves.insert(
                0, ("stage0 (contrastive)", [r["step"] for r in rows], [r["loss"] for r in rows])
            )
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
    axes = [axes] if len(curves) == 1 else list(axes)
    for ax, (name, steps, losses) in zip(axes, curves, strict=True):
        ax.plot(steps, losses, alpha=0.3, color="C0")
        ax.plot(steps, ema(losses), color="C0")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    dest = out / "loss.png"
    with atomic_path(dest, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def _fmt(stat: Any) -> str:
    if isinstance(stat, dict) and "mean" in stat:
        return f"{100 * stat['mean']:.1f} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"
    if isinstance(stat, (int, float)):
        return f"{100 * stat:.1f}"
    return "–"


def _eval_scope(metrics: dict) -> str:
    limit, n = metrics.get("limit"), metrics.get("n_in_split")
    if limit and (n is None or limit < n):  # a subset: say so, as the evaluation's report does
        of = f" (of {n})" if n else ""
        return f"the first {limit} English questions{of} of the SLAKE-shaped test split"
    return "the SLAKE-shaped English test split" + (f" ({n} questions)" if n else "")


def _cell(text: str) -> str:
    """``text`` as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render_markdown(report: dict) -> str:
    m = report["metrics"]
    zs, ft = m.get("zero_shot", {}), m.get("finetuned", {})
    blank = ft.get("ablation_blank", {})
    lines = [
        f"# llavamed quickstart report (size: {report['size']}, seed {report['seed']})",
        "",
        "Everything below was measured by this run on MedSynth (procedurally generated; see "
        f"docs/medsynth.md). Evaluation: {_eval_scope(ft or zs)}, greedy decoding.",
        "",
        *(
            [f"Vision tower given with `--vision {report['vision']}`: stage 0 was skipped.", ""]
            if report.get("vision")
            else []
        ),
        "## VQA metrics (%; 95% bootstrap CI)",
        "",
        "| metric | zero-shot (after stage 2) | fine-tuned | fine-tuned, blank image |",
        "|---|---|---|---|",
    ]
    for k, label in (
        ("strict_closed_acc", "closed accuracy, strict yes/no parse"),
        ("llava_med_closed_acc", "closed accuracy, LLaVA-Med metric"),
        ("llava_med_open_recall", "open recall, LLaVA-Med metric"),
        ("open_exact_match", "open exact match (strict)"),
        ("token_f1", "token F1 (strict)"),
        ("closed_unparsed", "closed answers with no yes/no (counted wrong by the strict parse)"),
    ):
        lines.append(f"| {label} | {_fmt(zs.get(k))} | {_fmt(ft.get(k))} | {_fmt(blank.get(k))} |")
    preset = SIZES.get(report["size"])
    cut = (
        f" (the `{report['size']}` size keeps only the LM's first {preset.lm_layers} layers, "
        "which VQA fine-tuning has to turn into a working answerer)"
        if preset is not None and preset.lm_layers
        else ""
    )
    for name, col in (("zero-shot", zs), ("fine-tuned", ft)):
        unparsed = (col.get("closed_unparsed") or {}).get("mean")
        if unparsed is not None and unparsed >= 0.5:
            lines += [
                "",
                f"The {name} model answered {100 * unparsed:.1f}% of closed questions without a "
                "yes or no, so its closed accuracy says little about what it sees; its answers "
                f"are in `eval/`{cut}.",
            ]
    drop = ft.get("ablation_blank_drop", {}).get("strict_closed_acc")
    if drop:
        lines += [
            "",
            f"Blank-image drop in strict closed accuracy, paired per question: **{_fmt(drop)} "
            "points** (a model that doesn't drop isn't looking at the image).",
        ]
    lines += ["", "## Wall time per stage", "", "| stage | seconds | note |", "|---|---|---|"]
    for name, st in report["stages"].items():
        notes = ["skipped (finished earlier)"] if st.get("skipped_this_run") else []
        if st.get("resumed_after_s"):
            notes.append(f"resumed; {st['resumed_after_s']:.0f} s of it before an interruption")
        if st.get("stopped_early"):
            notes.append(st["stopped_early"])
        note = "; ".join(notes)
        lines.append(f"| {name} | {st['wall_s']:.0f} | {note} |")
    lines.append(f"| **total** | **{report['wall_time_s_all_stages']:.0f}** | |")
    lines += ["", "## Data", ""]
    ing = report["data"].get("ingest", {})
    if ing:
        kept = {k: ing.get(k) for k in ("articles", "figures_written", "reasons")}
        lines.append(f"- PMC ingestion (figures kept, skipped per reason): `{json.dumps(kept)}`")
    totals = report["data"].get("instruct", {}).get("totals", {})
    if totals:
        keys = (
            "kept",
            "dropped",
            "kept_share",
            "dropped_by_reason",
            "turns_dropped_by_reason",
            "prompt_tokens",
            "completion_tokens",
        )
        shown = {k: totals.get(k) for k in keys}
        lines.append(
            f"- self-instruct (conversations kept, dropped per reason): `{json.dumps(shown)}`"
        )
    for name in ("align", "stage0_pairs", "stage0_vision"):
        st = report["stages"].get(name, {})
        extra = {
            k: v
            for k, v in st.items()
            if k not in ("wall_s", "resumed_after_s", "skipped_this_run")
        }
        if extra:
            lines.append(f"- {name}: `{json.dumps(extra, default=str)[:600]}`")
    if report.get("loss_curves"):
        lines += ["", "## Loss curves", "", "![loss curves](loss.png)"]
    lines += ["", "## Try the model", ""]
    try_it = report["try_it"]
    if preset is not None and preset.lm_layers:
        lines += [
            f"This model answers short questions about MedSynth images (its LM is the first "
            f"{preset.lm_layers} layers of SmolLM2, fine-tuned on VQA): findings, modality, "
            "organ, position, size, counts. It was not trained to describe an image at length.",
            "",
        ]
    for k, cmd in try_it.get("commands", {}).items():
        lines.append(f"- {k}: `{cmd}`")
    if try_it.get("questions"):
        lines += [
            "",
            "The final evaluation asked these held-out test questions about that image "
            "(greedy decoding, as `--temperature 0`):",
            "",
            "| question | reference | this model |",
            "|---|---|---|",
        ]
        for q in try_it["questions"]:
            cells = (q["question"], q["answer"], q["model_answer"])
            # One line per row: a model's answer with a line break split the table.
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
