"""The one error path for users: bad input or settings become one line on stderr and exit status 2.

Every command's `main` runs through `run_cli`. Code raises `InputError` (or a subclass) with a message that names
the file and line/field, or the flag, at fault; `run_cli` prints `error: MESSAGE` and returns 2, without a
traceback. `--debug` or `SCE_JAX_DEBUG=1` lets the exception through, traceback and all.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

DEBUG_ENV = "SCE_JAX_DEBUG"

# Exit statuses: a usage or input error, and the shell's convention of 128 + the signal's number.
EXIT_INPUT = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class InputError(ValueError):
    """Bad user input (file contents, ids, options): the CLI prints the message and exits with code 2."""


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
    """Run a command's `main(argv)`; InputError -> one line + 2, Ctrl-C -> one line + 130.

    `--debug` is removed from argv here (so every command accepts it) and lets tracebacks through.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if debug:
        return main(argv) or 0
    try:
        return main(argv) or 0
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_SIGINT
