"""The figure record (DESIGN.md §3) and a reader for both shapes users hold:
our ``figures.jsonl`` and LLaVA-Med's ``{domain_name: [record, ...]}`` caption JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from llavamed.errors import InputError
from llavamed.utils.io import iter_jsonl, read_json, without_lone_surrogates

# LLaVA-Med's five domains, in the order the paper's judge uses to pick one per question.
DOMAINS: tuple[str, ...] = ("chest_xray", "mri", "histology", "gross", "ct_scan")

# LLaVA-Med's caption JSON keys its records by these names.
LLAVA_MED_DOMAIN_KEYS = {
    "chest_xray": "chest_xray",
    "mri": "mri",
    "histology": "histology",
    "gross": "gross",
    "ct_scan": "ct_scan",
}


def empty_domain() -> dict[str, bool]:
    return {d: False for d in DOMAINS}


def primary_domain(domain: dict | None) -> str:
    """First true flag in the judge's order, or ``"other"`` (also for a malformed field)."""
    for d in DOMAINS:
        if isinstance(domain, dict) and domain.get(d):
            return d
    return "other"


def mention_sentences(record: dict) -> list[str]:
    """A record's inline mentions as plain sentences (LLaVA-Med stores ``{"tokens": ...}``
    objects; plain strings are taken too). A malformed field gives no mentions rather than an
    error: mentions are optional context."""
    mentions = record.get("in_text_mention")
    out = []
    for m in mentions if isinstance(mentions, list) else []:
        s = m.get("tokens") if isinstance(m, dict) else m
        if isinstance(s, str) and s.strip():
            out.append(" ".join(s.split()))
    return out


def rebase_image(
    image: str, image_root: str | os.PathLike | None, out_dir: str | os.PathLike | None
) -> str:
    """A record's image path (relative to ``image_root``, the figures file's folder) made
    relative to ``out_dir``, the folder of the training file being written: the trainer's default
    image folder. Absolute paths stay absolute."""
    if os.path.isabs(image) or image_root is None:
        return Path(image).as_posix()
    path = image_on_disk(image, image_root)
    return Path(os.path.relpath(path, out_dir) if out_dir is not None else path).as_posix()


def record_image(record: dict) -> str | None:
    """The image a figure record names, or None when it has none. LLaVA-Med's caption JSON
    records carry no ``image`` field: their images are ``{pair_id}.jpg`` by convention. A
    figures.jsonl record always has one; ``image: null`` (``data ingest --keep-missing-images``)
    means there is no image file."""
    image = record.get("image")
    if isinstance(image, str) and image.strip():
        return image
    pair_id = record.get("pair_id")
    if "image" not in record and isinstance(pair_id, str | int) and not isinstance(pair_id, bool):
        return f"{pair_id}.jpg" if str(pair_id).strip() else None
    return None


def image_on_disk(image: str, image_root: str | os.PathLike | None) -> str:
    """A record's image path as the file system sees it (relative paths are under the root)."""
    if image_root is not None and not os.path.isabs(image):
        return os.path.join(image_root, image)
    return image


def iter_figures(path: str | os.PathLike) -> Iterator[dict]:
    """Yield figure records from ``figures.jsonl`` or LLaVA-Med's ``{domain: [records]}`` JSON.

    Records from the dict shape get a ``domain`` dict derived from the key they were filed under
    when they don't carry one. A lone surrogate in a record's text (a caption cut inside an
    emoji's UTF-16 pair, stored as a ``"\\ud83d"`` escape) becomes U+FFFD here, once for every
    reader: UTF-8 cannot encode it, and ``data domains`` ended in a UnicodeEncodeError when it
    wrote its output, after the work; stage-0 training in a TypeError from the tokenizer.
    """
    for rec in _iter_records(path):
        yield without_lone_surrogates(rec)


def _iter_records(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            # A byte-order mark (a file saved by a Windows editor) before the first bracket:
            # LLaVA-Med's {domain: [records]} JSON was read as JSONL and refused.
            head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    except FileNotFoundError:
        # A one-line error naming the file (`data instruct --figures` with a typo in the path
        # ended in a traceback), as the other commands that read figures say it.
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        # `--figures corpus` (the ingest output folder) was a bare "Is a directory".
        inside = path / "figures.jsonl"
        hint = f"did you mean {inside}?" if inside.is_file() else "give a figures.jsonl file"
        raise InputError(path, "a folder, not a figures file", hint) from None
    if head.startswith(b"{") and _is_single_json_document(path):
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(path, "expected figures.jsonl or a {domain: [records]} JSON object")
        for key, records in data.items():
            if not isinstance(records, list):
                raise InputError(path, f"domain {key!r} does not hold a list of records")
            for i, rec in enumerate(records):
                if not isinstance(rec, dict):
                    raise InputError(path, f"record {i} under {key!r} is not an object")
                if "domain" not in rec:
                    dom = empty_domain()
                    if key in dom:
                        dom[key] = True
                    rec = {**rec, "domain": dom}
                yield rec
    elif head.startswith(b"["):
        data = read_json(path)
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise InputError(path, f"list entry {i} is not an object")
            yield rec
    else:
        yield from iter_jsonl(path)


def _is_single_json_document(path: Path) -> bool:
    """True for a pretty-printed or one-line JSON object, False for JSONL with several objects.
    Blank lines are skipped, as :func:`llavamed.utils.io.iter_jsonl` skips them: a figures.jsonl
    that starts with an empty line is still JSONL."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        lines = (line for line in fh if line.strip())
        first = next(lines, "")
        second = next(lines, "")
    if not second.strip():
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            return True
        # A one-line file: a figures.jsonl with one record has a pair_id at top level.
        return "pair_id" not in obj
    try:
        json.loads(first)
        return False  # first line is a full object: JSONL
    except json.JSONDecodeError:
        return True
