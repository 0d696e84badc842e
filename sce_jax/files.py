"""Writing files safely: atomic replacement, temporary files that neither an interrupt nor a killed process leaves
behind for good, locks that name their holder, content fingerprints, and one-line errors for a full disk.

Temporaries are named `.NAME.XXXXXXXX.tmp` (files) or `.NAME.XXXXXXXX.partial` (directories) beside what they
become, and their writer holds an exclusive `flock` on them while it writes. The kernel drops the lock when the
writer dies, so `remove_stale_temporaries` can tell a dead writer's leftovers (lockable) from a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from sce_jax.errors import InputError, Interrupted, located, one_line

logger = logging.getLogger(__name__)

TEMPORARY_FILE = ".tmp"
TEMPORARY_DIRECTORY = ".partial"
# Errors that mean the file system cannot take the write (full, over quota, read-only): one line, exit 2.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def current_umask() -> int:
    """The process's umask, read without changing it (safe beside threads that create files): from
    /proc/self/status on Linux, elsewhere from the mode the kernel gives a new file created with mode 0777."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with tempfile.TemporaryDirectory() as directory:
        probe = os.path.join(directory, "umask")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


# --- reading text -------------------------------------------------------------------------------------------


GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
BOM = "\ufeff"


def check_readable(path: str | os.PathLike, what: str = "file") -> None:
    """An InputError unless `path` is an existing, readable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such {what}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable")


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """The file's bytes (gunzipped for `.gz`); see `gzip_errors` for turning read errors into InputErrors."""
    check_readable(path)
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def gzip_errors(path) -> Iterator[None]:
    """Corrupt, truncated or not-gzip `.gz` input becomes one InputError naming the file."""
    try:
        yield
    except GZIP_ERRORS as error:
        raise InputError(f"{path}: not a valid gzip file (corrupt or truncated): {error}") from None


def decode_line(raw: bytes, path, line_no: int) -> str:
    """One line's bytes as text; non-UTF-8 bytes are an InputError naming file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise located(path, line_no, f"not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})") from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) of a UTF-8 text file (`.gz` allowed), a leading BOM stripped.

    Missing files, bad gzip data and non-UTF-8 bytes are InputErrors naming the file (and line)."""
    with open_binary(path) as f, gzip_errors(path):
        for line_no, raw in enumerate(f, start=1):
            line = decode_line(raw, path, line_no).rstrip("\r\n")
            if line_no == 1 and line.startswith(BOM):
                line = line[1:]
            yield line_no, line


def check_text(value: str, path, where, field: str) -> str:
    """`value`, if it can be encoded as UTF-8 (JSON escapes can make lone surrogates, which the tokenizer rejects)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise located(path, where, f"{field} contains a lone surrogate (an invalid \\u escape)") from None
    return value


# --- errors --------------------------------------------------------------------------------------------------


# How libraries that are not Python's own I/O report the OS error: TensorStore (Orbax) `os_error_code='28'`,
# Rust (safetensors) `(os error 28)` or `Os { code: 28, ... }`.
_OS_ERROR_CODE = re.compile(r"(?:os_error_code='?|\(os error |Os \{ code: )(\d+)")


def _errno(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    code = _OS_ERROR_CODE.search(str(error))
    return int(code.group(1)) if code else None


def write_error(path: str | os.PathLike, error: BaseException, action: str = "write") -> InputError:
    """One line for a failed write: `cannot write PATH: No space left on device`."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        code = _errno(error)
        reason = os.strerror(code) if code is not None else one_line(error, 160)
    return InputError(f"cannot {action} {path}: {reason}")


class _OrphanedFutureErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Future exception was never retrieved")


_ORPHANED_FUTURE_ERRORS = _OrphanedFutureErrors()


def drop_orphaned_future_errors() -> None:
    """After a write that failed and was reported (one line), Orbax's other writer tasks of that save end with
    the same error in futures nobody reads; asyncio logs each one with a traceback when it is collected, which
    may be after the error line. Those log records are dropped from then on (idempotent)."""
    logging.getLogger("asyncio").addFilter(_ORPHANED_FUTURE_ERRORS)


def is_write_error(error: BaseException) -> bool:
    """Whether `error` means the file system refused a write (full disk, quota, read-only): OSError, or a
    library's error that carries such an OS error code."""
    return _errno(error) in WRITE_ERRNOS


# --- signals -------------------------------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block, SIGTERM raises `Interrupted(SIGTERM)` as Ctrl-C raises KeyboardInterrupt, so that the
    block's cleanup runs. Only where SIGTERM would otherwise kill the process at once (its default handler) and
    in the main thread; elsewhere nothing changes."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handle(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _install(handler) -> dict:
    """`handler` for SIGINT and SIGTERM, except where one is ignored (a background job's SIGINT); the handlers
    it replaced."""
    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(signum) is not signal.SIG_IGN}


class DeferredSignals:
    """SIGINT and SIGTERM noted, not acted on, inside `deferred_signals()`; `check` raises for the first."""

    def __init__(self):
        self.received: int | None = None

    def note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def check(self, detail: str = "") -> None:
        if self.received is not None:
            raise Interrupted(self.received, detail)


@contextlib.contextmanager
def deferred_signals() -> Iterator[DeferredSignals]:
    """SIGINT/SIGTERM inside the block are noted (`.received`) instead of interrupting it: for work that must
    not stop half way (a checkpoint written by background threads) or that cannot be interrupted safely
    (JAX's C++ callbacks abort the process when an exception is raised inside them). Outside the main thread,
    nothing is deferred."""
    deferred = DeferredSignals()
    if not _in_main_thread():
        yield deferred
        return
    previous = _install(deferred.note)
    try:
        yield deferred
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_exit_at_once(cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """SIGINT/SIGTERM inside the block end the process at once: `cleanup()`, one line, exit 128 + the signal.
    For stages that write nothing (loading a model: an exception raised inside JAX's C++ callbacks can abort the
    process instead of stopping it). Only in the main thread."""
    if not _in_main_thread():
        yield
        return

    def handle(signum, frame):
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        os.write(2, b"interrupted\n")
        os._exit(128 + signum)

    previous = _install(handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- temporaries ---------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    """An exclusive flock on `fd` without waiting: True if taken, False if another process holds it (or the file
    system cannot lock, which then never counts as stale)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _same_inode(fd: int, path: str | os.PathLike) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def locked_temporary(target: Path, *, directory: bool = False) -> tuple[int, Path]:
    """A new temporary file (or directory) beside `target`, named for it, with this process's exclusive lock
    held on it: (open descriptor, path). Close the descriptor when done (that releases the lock)."""
    while True:
        if directory:
            name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_DIRECTORY, dir=target.parent)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMPORARY_FILE, dir=target.parent)
        # A cleaner that ran between creating and locking it may have removed it as stale: make another.
        if _try_lock(fd) and _same_inode(fd, name):
            return fd, Path(name)
        os.close(fd)


def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}({re.escape(TEMPORARY_FILE)}|"
                      rf"{re.escape(TEMPORARY_DIRECTORY)})")


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of `target` (see the module's docstring) whose writer is gone; returns them."""
    target = Path(target)
    pattern = _temporary_pattern(target.name)
    removed = []
    try:
        entries = [entry for entry in os.scandir(target.parent) if pattern.fullmatch(entry.name)]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        is_dir = entry.name.endswith(TEMPORARY_DIRECTORY)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0))
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # its writer is alive
            if is_dir:
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            removed.append(path)
        finally:
            os.close(fd)
    for path in removed:
        logger.info("removed %s, left by an interrupted process", path)
    return removed


def _write_through(path: Path) -> Path:
    """Where writing `path` should go: a symlink's target (so the link is kept), otherwise `path` itself."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write a file all at once: into a temporary file beside it, renamed over `path` only on success.

    mode "w" (UTF-8 text, `\\n` line ends) or "wb". A name ending in `.gz` is written gzip-compressed (with a
    zero timestamp, so equal contents give equal bytes). A symlink is written through: its target is replaced,
    the link kept. The file gets the usual mode for new files (0666 less the umask). A failure (an exception
    inside the block) removes the temporary file and leaves any existing `path` as it was; so do Ctrl-C and
    SIGTERM (then `Interrupted`, saying so), and a full disk is an InputError naming the file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    target = _write_through(path)
    try:
        fd, tmp_name = locked_temporary(target)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        with sigterm_raises():
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(os.dup(fd), "wb") as raw:
                yield from _write_stream(raw, path, mode)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(getattr(error, "signum", signal.SIGINT),
                              f"{path} was not written (its partial file was removed)") from None
        if is_write_error(error):
            raise write_error(path, error) from None
        raise
    finally:
        os.close(fd)


def _write_stream(raw: IO[bytes], path: Path, mode: str) -> Iterator[IO]:
    stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.name.endswith(".gz") else raw
    with contextlib.ExitStack() as stack:
        if stream is not raw:
            stack.enter_context(stream)
        if mode == "w":
            text = io.TextIOWrapper(stream, encoding="utf-8", newline="\n", write_through=False)
            yield text
            text.flush()
            text.detach()
        else:
            yield stream


# --- locks ---------------------------------------------------------------------------------------------------


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode().strip()
        if text:
            return text
    return "a process that is starting"


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the block, or raise an InputError at once naming the process
    that holds it (`WHAT is in use by pid N on HOST`). The lock file holds its holder's pid and host and is removed
    at the end. The kernel releases the lock when its process dies, so the file a killed process leaves does
    not block; a file system that cannot lock gives a warning, not an error."""
    lock_path = Path(lock_path)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~current_umask())
        except OSError as error:
            raise write_error(lock_path, error, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(f"{what} is in use by {holder} (lock file {lock_path}); wait for it to finish, or stop "
                             "it first") from None
        except OSError as error:
            logger.warning("cannot lock %s (%s): nothing stops a second process from writing %s", lock_path,
                           error.strerror, what)
            break
        if _same_inode(fd, lock_path):
            break
        os.close(fd)  # its holder removed it after we opened it: lock the new one
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    try:
        yield
    finally:
        if _same_inode(fd, lock_path):
            with contextlib.suppress(OSError):
                lock_path.unlink()
        os.close(fd)


# --- fingerprints --------------------------------------------------------------------------------------------

# Files up to this size are hashed whole; larger ones by evenly spaced blocks (first and last included).
WHOLE_FILE_BYTES = 64 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 64 << 10


def content_fingerprint(path: str | os.PathLike) -> dict:
    """{"size", "blake2b"} of a file: its content hashed whole up to 64 MiB; beyond, 64 evenly spaced blocks of
    64 KiB and the size (4 MiB read, whatever the file's size). For checking that a file is still the one a
    cache or a resumed run was made from, by content rather than modification time."""
    size = os.stat(path).st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb", buffering=0) as f:
        if size <= WHOLE_FILE_BYTES:
            while block := f.read(8 << 20):
                digest.update(block)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                digest.update(os.pread(f.fileno(), SAMPLE_BYTES, int(i * step)))
    return {"size": size, "blake2b": digest.hexdigest()}
