"""The one error path for users: bad input or settings become one line on stderr and exit status 2.

Every command's `main` runs through `run_cli`. Code raises `InputError` (or a subclass) with a message that names
the file and line/field, or the flag, at fault; `run_cli` prints `error: MESSAGE` and returns 2, without a
traceback. `--debug` or `SCE_JAX_DEBUG=1` lets the exception through, traceback and all.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "SCE_JAX_DEBUG"

# Exit statuses: a usage or input error, and the shell's convention of 128 + the signal's number.
EXIT_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class InputError(ValueError):
    """Bad user input (file contents, ids, options): the CLI prints the message and exits with code 2."""


class NonFiniteScoresError(InputError):
    """A model produced NaN or infinite scores (e.g. corrupt weights): nothing is written or returned."""


class MissingTextError(InputError):
    """Queries or documents of a run for which no source has a text."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; `detail` says what was cleaned up (one line)."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(detail)
        self.signum = signum
        self.detail = detail


class SettingsError(InputError):
    """A bad setting (max_length, devices, dtype, ...); `setting` names it, so a CLI can name its flag."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def located(path: str | os.PathLike, where: str | int, message: str) -> InputError:
    """An InputError naming the file and the line (an int) or item (a string) at fault."""
    where = f"line {where}" if isinstance(where, int) else where
    return InputError(f"{path}: {where}: {message}")


def one_line(error: object, limit: int = 200) -> str:
    """An exception's message as one short line (library messages can span many lines or kilobytes)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_path(path: str | os.PathLike) -> Path:
    """A path as the user meant it: `~` expanded, relative to the current working directory, made absolute.

    (Orbax and some libraries reject relative paths; resolve user paths with this once, where they enter.)
    """
    return Path(os.path.expanduser(os.fspath(path))).absolute()


def debug_enabled(argv: list[str] | None = None) -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no") or "--debug" in (argv or [])


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run a command's `main(argv)`; InputError -> one line + 2, Ctrl-C -> one line + 130 (an `Interrupted`:
    one line saying what was cleaned up, and 128 + its signal).

    `--debug` is removed from argv here (so every command accepts it) and lets tracebacks through.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _end_startup_guard()
    debug = debug_enabled(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if debug:
        return main(argv) or 0
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver_interrupts
    try:
        return main(argv) or 0
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        detail = getattr(error, "detail", "")
        print(f"stopped ({signal.Signals(signum).name}): {detail}" if detail else "interrupted", file=sys.stderr)
        return 128 + signum
    finally:
        sys.unraisablehook = previous_hook


def _redeliver_interrupts(unraisable) -> None:
    """An interrupt raised where Python can only print and drop it (a garbage-collector callback, such as JAX's,
    or a finalizer) is delivered again, so that Ctrl-C or SIGTERM is never lost; anything else is reported as
    usual."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # From another thread, a little later: the main thread has left the callback by then (tripped here, the
        # handler would run, and raise, inside this hook).
        signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
        threading.Timer(0.05, _thread.interrupt_main, (signum,)).start()
        return
    if _late_callback_on_closed_loop(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


def _late_callback_on_closed_loop(error: BaseException | None) -> bool:
    """Orbax's writer threads, failing (a full disk), may hand their result to an asyncio loop that the
    checkpointer has already closed: asyncio raises "Event loop is closed" in that thread, where Python can only
    print it. The failure itself has reached the command (one line); this traceback says nothing more."""
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)


# Ctrl-C while a command is still importing (jax and the rest take seconds): one line and 130, not a traceback
# from inside whichever module was loading. `sce_jax/__init__.py` installs this handler when the process was
# started as one of the commands; `run_cli` puts Python's own handler back before the command starts.
COMMAND_NAMES = ("sce-jax-rerank", "sce-jax-train", "sce-jax-convert", "sce-jax-serve", "convert_torch_checkpoint.py")


def _interrupted_while_starting(signum, frame) -> None:
    os.write(2, b"interrupted\n")
    os._exit(EXIT_SIGINT)


def guard_startup() -> None:
    """Ctrl-C before `run_cli` runs exits 130 with one line (only in a process started as an sce_jax command:
    `python -m sce_jax.X`, whose package import runs while argv[0] is "-m", or a console script)."""
    started_as_command = sys.argv[:1] == ["-m"] or Path(sys.argv[0] if sys.argv else "").name in COMMAND_NAMES
    if started_as_command and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted_while_starting)
        except ValueError:  # not the main thread
            pass


def _end_startup_guard() -> None:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
