"""Is this the same run? Stage 0 and stage 0b decide it alike, for a finished run's report (reuse
it) and for a resume state (go on from it): the same config, bar the settings that change nothing
computed, and the same inputs behind the config's names, which the config alone cannot tell
(a data file rewritten in place, a tower folder trained again, a text encoder's new files)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunInputs:
    """Content keys of what a run was made from, stored beside its config in its report and its
    resume state."""

    data: str
    start_tower: str
    """:func:`start_tower_key` of the starting tower."""
    text_encoder: str

    def as_fields(self, data_field: str = "data") -> dict[str, str]:
        """The keys as stored. ``data_field``: stage 0b's report keeps its data key under
        ``data_key`` (its ``data`` holds counts); every other record uses ``data``."""
        return {
            data_field: self.data,
            "start_tower": self.start_tower,
            "text_encoder": self.text_encoder,
        }

    def changed(
        self, saved: dict, words: tuple[str, str, str], data_field: str = "data"
    ) -> list[str]:
        """The inputs that differ in ``saved``, named by ``words`` (data, starting tower, text
        encoder). A key ``saved`` lacks was written before the key existed and is trusted."""
        mine = self.as_fields(data_field)
        return [w for (k, v), w in zip(mine.items(), words, strict=True) if saved.get(k, v) != v]


def run_changes(
    saved: dict,
    config: dict,
    inputs: RunInputs,
    words: tuple[str, str, str],
    *,
    may_change: frozenset[str],
    data_field: str = "data",
) -> list[str]:
    """What makes ``saved`` (a report or a resume state) another run than ``config`` over
    ``inputs``: the config keys that differ, except ``may_change``, then the inputs in ``words``.
    Empty: the same run."""
    from llavamed.config import diff

    changed = [k for k in diff(saved.get("config") or {}, config) if k not in may_change]
    return changed + inputs.changed(saved, words, data_field)


def start_tower_key(vision: str) -> str:
    """A starting tower's key: a preset by its name (it is built from the name, even where a
    folder of that name exists), a folder by the hash of its config and weights, and anything
    else by the name as given (loading it refuses it)."""
    from llavamed.model.compose import VISION_PRESETS
    from llavamed.model.vision_tower import tower_fingerprint

    start = Path(vision)
    if vision in VISION_PRESETS or not start.is_dir():
        return vision
    return tower_fingerprint(start)


def read_finished_report(path: Path, stage: str) -> dict | None:
    """A finished stage-0 or stage-0b run's report, or None when there is none or it cannot be
    read (cut short by a crash: it was a JSONDecodeError traceback on every re-run); the run then
    goes on, from its resume state if it has one."""
    from llavamed.errors import first_line

    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        print(
            f"{stage}: {path} is unreadable ({first_line(exc)}); not a finished run",
            file=sys.stderr,
        )
        return None
    return report if isinstance(report, dict) else None
