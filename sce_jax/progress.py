"""Progress files: finished windows of a long run, appended as they complete, so a crash loses at most one window.

A progress file starts with a header record holding the settings that decide the output's bytes; then one record
per finished window: a JSON line `{"window": k, "bytes": n, "blake2b": ..., ...meta}` followed by `n` bytes of
payload (the window's output). A record whose header does not parse or whose payload is short or fails its
checksum is a torn write (the process died while appending): it and anything after it are dropped on resume.
Records are flushed and fsynced one by one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sce_jax.errors import InputError
from sce_jax.runs import atomic_write

FORMAT = "sce_jax-progress/1"


def _digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def settings_difference(saved: dict, current: dict) -> str | None:
    """The first setting (a flag name) whose value differs, described; None if they agree."""
    for name in sorted(set(saved) | set(current)):
        if saved.get(name) != current.get(name):
            return f"{name} differs from the interrupted run's ({saved.get(name)!r} then, {current.get(name)!r} now)"
    return None


class ProgressFile:
    """The progress of one process: `done` maps window index -> (payload offset, payload length, meta)."""

    def __init__(self, path: Path, settings: dict, done: dict, end: int):
        self.path = path
        self.settings = settings
        self.done = done
        self._end = end
        self._file = None

    @staticmethod
    def check_absent_or_resuming(path: Path, resume: bool) -> None:
        """Without --resume, an existing progress file is an error saying how to continue or start over."""
        if path.exists() and not resume:
            raise InputError(f"{path} holds the progress of an interrupted run with this output: add --resume to "
                             f"continue it, or delete {path} to start over")

    @classmethod
    def read(cls, path: Path) -> ProgressFile | None:
        """The file's valid records (a torn tail ignored); None if the file is missing or has no valid header."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        with f:  # streamed: one window's payload in memory at a time
            line = f.readline()
            try:
                header = json.loads(line) if line.endswith(b"\n") else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
            if not isinstance(header, dict) or header.get("format") != FORMAT or \
                    not isinstance(header.get("settings"), dict):
                return None
            done, position = {}, len(line)
            while True:
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                try:
                    meta = json.loads(line)
                    length, window = int(meta["bytes"]), int(meta["window"])
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
                    break
                payload = f.read(length)
                if len(payload) != length or _digest(payload) != meta.get("blake2b"):
                    break
                start = position + len(line)
                done[window] = (start, length, meta)
                position = start + length
        return cls(path, header["settings"], done, position)

    @classmethod
    def open(cls, path: Path, settings: dict, *, resume: bool) -> ProgressFile:
        """Continue the progress at `path` (with --resume; its settings must equal `settings`) or start it."""
        cls.check_absent_or_resuming(path, resume)
        existing = cls.read(path) if resume else None
        if existing is not None:
            difference = settings_difference(existing.settings, settings)
            if difference:
                raise InputError(f"--resume: {difference}; run with the interrupted run's settings, or delete "
                                 f"{path} to start over")
            with open(path, "r+b") as f:  # drop a torn last record
                f.truncate(existing._end)
            progress = existing
        else:
            header = json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True).encode() + b"\n"
            with atomic_write(path, "wb") as f:
                f.write(header)
            progress = cls(path, settings, {}, len(header))
        progress._file = open(path, "ab")
        return progress

    def append(self, window: int, payload: bytes, **meta) -> None:
        record = json.dumps({"window": window, "bytes": len(payload), "blake2b": _digest(payload), **meta},
                            sort_keys=True).encode() + b"\n"
        self._file.write(record + payload)
        self._file.flush()
        os.fsync(self._file.fileno())
        start = self._end + len(record)
        self.done[window] = (start, len(payload), {"window": window, **meta})
        self._end = start + len(payload)

    def payload(self, window: int) -> bytes:
        start, length, _ = self.done[window]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
