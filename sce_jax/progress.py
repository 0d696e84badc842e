"""Progress files: finished windows of a long run, appended as they complete, so a crash loses at most one window.

A progress file starts with a header line, `{"format", "settings", "first_window", "checksum"}`: the settings
that decide the output's bytes and the first window of this process's share. Then one record per finished
window, in order: a JSON line `{"window": k, "bytes": n, "payload": ..., ...meta, "checksum": ...}` followed by
`n` bytes of payload (the window's output). `payload` is the payload's blake2b; every line's `checksum` (blake2b)
covers all of its other fields; records must number their windows first_window, first_window + 1, ... in turn.

Reading stops at the first record that is incomplete (a torn write: the process died while appending; dropped
quietly), or that fails its checksum or is out of sequence (damaged, repeated or missing: dropped with a warning,
with everything after it). Either way the run continues from the last consistent record, and the windows after
it are scored again, so a resumed run neither misses nor repeats a query. A header that does not check is an
error: the file is not silently started over. Records are written unbuffered and fsynced one by one; a write
that fails (a full disk) is cut off again, so the file stays consistent and resumable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from sce_jax.errors import InputError
from sce_jax.files import atomic_write, write_error

logger = logging.getLogger(__name__)

FORMAT = "sce_jax-progress/2"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _checksum(fields: dict) -> str:
    return _digest(json.dumps(fields, sort_keys=True).encode())


def _line(fields: dict) -> bytes:
    """A header or record line: its fields and a checksum over all of them."""
    return json.dumps({**fields, "checksum": _checksum(fields)}, sort_keys=True).encode() + b"\n"


def settings_difference(saved: dict, current: dict) -> str | None:
    """The first setting (a flag name) whose value differs, described; None if they agree. A file's fingerprint
    (a dict) is described by the field that differs (e.g. its content)."""
    for name in sorted(set(saved) | set(current)):
        then, now = saved.get(name), current.get(name)
        if then == now:
            continue
        if isinstance(then, dict) and isinstance(now, dict) and then.get("path") == now.get("path"):
            field = next(k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
            what = "content" if field in ("blake2b", "files") else field
            return f"{name} {now.get('path')}: its {what} differs from the interrupted run's"
        return f"{name} differs from the interrupted run's ({then!r} then, {now!r} now)"
    return None


def _check_file(path: Path) -> None:
    """An InputError unless `path` is missing or a regular file this process can read and append to."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file (a directory?); it should hold the progress of an "
                         "interrupted run: move it away to start over")
    if not os.access(path, os.R_OK | os.W_OK):
        raise InputError(f"{path} cannot be read and written (a read-only file or file system?): --resume appends "
                         "to it")


class ProgressFile:
    """The progress of one process: `done` maps window index -> (payload offset, payload length, meta)."""

    def __init__(self, path: Path, settings: dict, first_window: int, done: dict, end: int):
        self.path = path
        self.settings = settings
        self.first_window = first_window
        self.done = done
        self._end = end
        self._fd: int | None = None
        self.created = False  # by this process (not a resumed one)
        self.dropped: str | None = None  # why records were dropped when read (None: none, or a torn tail)

    @staticmethod
    def check_absent_or_resuming(path: Path, resume: bool) -> None:
        """Without --resume, an existing progress file is an error saying how to continue or start over."""
        if resume:
            _check_file(path)
        elif path.exists() or path.is_symlink():
            raise InputError(f"{path} holds the progress of an interrupted run with this output: add --resume to "
                             f"continue it, or delete {path} to start over")

    @classmethod
    def read(cls, path: Path, *, records: bool = True) -> ProgressFile | None:
        """The file's consistent records (see the module's docstring; none read with `records=False`: the
        header alone); None if the file is missing. A header that does not check is an InputError."""
        _check_file(path)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        except OSError as error:
            raise InputError(f"cannot read {path}: {error.strerror}") from None
        with f:  # streamed: one window's payload in memory at a time
            header = _read_header(f, path)
            progress = cls(path, header["settings"], header["first_window"], {}, f.tell())
            if records:
                progress._read_records(f)
        return progress

    def _read_records(self, f) -> None:
        expected = self.first_window
        size = os.fstat(f.fileno()).st_size
        while True:
            start = f.tell()
            line = f.readline()
            if not line.endswith(b"\n"):
                return  # the end, or torn: the process died while writing this record
            meta, problem = _parse_record(line, expected)
            if problem is None and f.tell() + meta["bytes"] > size:
                return  # torn
            if problem is None and _digest(f.read(meta["bytes"])) != meta["payload"]:
                problem = "has a payload that fails its checksum"
            if problem is not None:
                self.dropped = (f"the record at byte {start} (after {len(self.done)} consistent windows) {problem}; "
                                "it and all after it are dropped, those windows will be scored again")
                return
            self.done[expected] = (start + len(line), meta["bytes"], meta)
            self._end = f.tell()
            expected += 1

    @classmethod
    def open(cls, path: Path, settings: dict, first_window: int, *, resume: bool) -> ProgressFile:
        """Continue the progress at `path` (with --resume; its settings must equal `settings`) or start it."""
        cls.check_absent_or_resuming(path, resume)
        existing = cls.read(path) if resume else None
        if existing is not None:
            existing._check_resumable(settings, first_window)
            progress = existing
        else:
            progress = cls._create(path, settings, first_window)
        try:
            progress._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            os.ftruncate(progress._fd, progress._end)  # drop a torn or damaged tail
        except OSError as error:
            progress.close()
            raise InputError(f"cannot write {path}: {error.strerror}") from None
        return progress

    @classmethod
    def _create(cls, path: Path, settings: dict, first_window: int) -> ProgressFile:
        header = _line({"format": FORMAT, "settings": settings, "first_window": first_window})
        with atomic_write(path, "wb") as f:
            f.write(header)
        progress = cls(path, settings, first_window, {}, len(header))
        progress.created = True
        return progress

    def _check_resumable(self, settings: dict, first_window: int) -> None:
        difference = settings_difference(self.settings, settings)
        if difference is None and self.first_window != first_window:
            difference = f"its share of windows starts at {self.first_window}, this run's at {first_window}"
        if difference:
            raise InputError(f"--resume: {difference}; run with the interrupted run's settings, or delete "
                             f"{self.path} to start over")
        if self.dropped is not None:
            logger.warning("%s: %s", self.path, self.dropped)

    def append(self, window: int, payload: bytes, **meta) -> None:
        """Save a finished window (the next in sequence). A failed write (a full disk) is cut off again, so the
        windows saved before stay resumable, and becomes an InputError saying so."""
        expected = self.first_window + len(self.done)
        if window != expected:
            raise ValueError(f"window {window} appended out of sequence (expected {expected})")
        fields = {"window": window, "bytes": len(payload), "payload": _digest(payload), **meta}
        record = _line(fields)
        try:
            data = memoryview(record + payload)
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)
            raise InputError(f"{write_error(self.path, error)}; the {len(self.done)} windows saved before are kept: "
                             "make room, then run the same command with --resume") from None
        start = self._end + len(record)
        self.done[window] = (start, len(payload), fields)
        self._end = start + len(payload)

    def payload(self, window: int) -> bytes:
        """A saved window's output, checked against its record's checksum once more."""
        start, length, meta = self.done[window]
        with open(self.path, "rb") as f:
            f.seek(start)
            payload = f.read(length)
        if _digest(payload) != meta["payload"]:
            raise InputError(f"{self.path}: window {window} changed on disk after it was saved; delete the file "
                             "and run again")
        return payload

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_header(f, path: Path) -> dict:
    line = f.readline()
    header = None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
        header = json.loads(line) if line.endswith(b"\n") else None
    if isinstance(header, dict) and header.get("format") != FORMAT and isinstance(header.get("format"), str) and \
            header["format"].startswith("sce_jax-progress/"):
        raise InputError(f"{path} was written by another version of sce_jax ({header['format']}, this one reads "
                         f"{FORMAT}): delete it to start over")
    fields = {k: v for k, v in header.items() if k != "checksum"} if isinstance(header, dict) else {}
    if not (isinstance(header, dict) and set(fields) == {"format", "settings", "first_window"}
            and isinstance(header["settings"], dict) and isinstance(header["first_window"], int)
            and header.get("checksum") == _checksum(fields)):
        raise InputError(f"{path}: its header is damaged (not the progress file of an interrupted run, or "
                         "corrupted): delete it to start over")
    return header


def _parse_record(line: bytes, expected: int) -> tuple[dict | None, str | None]:
    """(record fields, None), or (None or the fields, what is wrong with it)."""
    try:
        meta = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "is not a record"
    if not isinstance(meta, dict) or meta.get("checksum") != _checksum({k: v for k, v in meta.items()
                                                                        if k != "checksum"}):
        return None, "fails its checksum"
    if not (isinstance(meta.get("window"), int) and isinstance(meta.get("bytes"), int) and meta["bytes"] >= 0
            and isinstance(meta.get("payload"), str)):
        return None, "is not a record"
    if meta["window"] != expected:
        return meta, f"is out of sequence (window {meta['window']} where window {expected} belongs)"
    return meta, None
