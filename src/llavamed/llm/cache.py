"""On-disk response cache (SQLite) so that re-running a generation or judging job costs nothing.

The key is a SHA-256 of the canonical JSON of (endpoint URL, model, messages, sampling parameters
incl. seed): any change in server, prompt or sampling gives a new key, and an identical request is
never paid twice.
SQLite in WAL mode with a busy timeout tolerates several processes sharing one cache file, and a
committed row survives SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from llavamed.errors import InputError, first_line

# 2: the endpoint joined the key. Rows of version 1 are never hit again (a re-run asks anew).
SCHEMA_VERSION = 2


def cache_key(model: str, messages: list[dict], params: dict[str, Any], endpoint: str = "") -> str:
    payload = {
        "v": SCHEMA_VERSION,
        "endpoint": endpoint,
        "model": model,
        "messages": messages,
        "params": params,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """A key -> JSON value store. Thread-safe; values are whatever the client chooses to keep."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise InputError(self.path, "response cache is a folder", "give a file path to --cache")
        db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, model TEXT, value TEXT NOT NULL, created REAL NOT NULL)"
            )
            db.commit()
        except (sqlite3.Error, OSError) as exc:
            # Another file given as --cache, a damaged cache, a folder that cannot be made.
            if db is not None:
                db.close()
            raise InputError(
                self.path,
                "cannot use as the response cache",
                f"{first_line(exc)}; give another --cache path, or --cache none",
            ) from None
        self._db = db

    def _failed(self, exc: sqlite3.Error) -> InputError:
        """A cache that opened but fails in use: pages damaged past the first (a copy cut short,
        a disk error), a lock held by another program past the busy timeout, a full disk. A
        one-line error naming the file, not a traceback from the middle of a job."""
        return InputError(
            self.path,
            "response cache failed",
            f"{first_line(exc)}; finished records are kept: delete the cache or give another "
            "--cache path (or --cache none) and re-run",
        )

    def get(self, key: str) -> dict | None:
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT value FROM responses WHERE key = ?", (key,)
                ).fetchone()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except (ValueError, TypeError):  # also a damaged row stored as bytes that are not UTF-8
            return None  # a damaged row is a miss; the next put overwrites it
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict, model: str = "") -> None:
        blob = json.dumps(value, ensure_ascii=False)
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO responses (key, model, value, created) "
                    "VALUES (?, ?, ?, ?)",
                    (key, model, blob, time.time()),
                )
                self._db.commit()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def __contains__(self, key: str) -> bool:
        try:
            with self._lock:
                row = self._db.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._failed(exc) from None
        return row is not None

    def __len__(self) -> int:
        try:
            with self._lock:
                return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
