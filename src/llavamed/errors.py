"""One error type for bad input, so every command can print a one-line, actionable message.

Batch jobs catch :class:`InputError`, count it under its ``reason`` and go on; interactive commands
let it reach :func:`llavamed.cli.main`, which prints it and exits non-zero.
"""

from __future__ import annotations


class LlavamedError(Exception):
    """Base class for errors llavamed reports to the user without a traceback."""


class InputError(LlavamedError):
    """Bad input: names the file (or record) and a short machine-countable reason."""

    def __init__(self, source: object, reason: str, detail: str = ""):
        self.source = str(source)
        self.reason = reason
        self.detail = detail
        msg = f"{self.source}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ConfigError(LlavamedError):
    """An invalid configuration value; the message names the key."""


class StorageError(LlavamedError):
    """Writing an output failed because its disk is full; the message names the folder."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception message (or its type's name when empty), cut to
    ``limit`` characters: enough to say what failed in a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def format_counts(counts: dict[str, int]) -> str:
    """Per-reason counts as one line, e.g. ``2 missing image, 1 not an image`` (reasons sorted),
    for the summaries that tell a user what was skipped or failed."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
