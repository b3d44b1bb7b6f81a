"""Exit codes and stop signals, the same for every command of the project.

``sf-generate``, ``python -m export.onnx|aoti|trt|convert|bench`` and ``python -m
training.train`` end with:

====  =====================================================================================
0     success
1     a failure: the command was right, the run went wrong (a crash, a full disk, a failed
      verification); one line says what happened
2     a mistake in the command: a bad argument or value, a missing, unreadable or existing
      file; one line says what is wrong and what to do
130   stopped by SIGINT (Ctrl-C)
143   stopped by SIGTERM (``kill``, a job scheduler, a container stop)
====  =====================================================================================

130 and 143 are 128 + the signal number, the shell's convention. :func:`run_command` maps a
command's exceptions to these codes; :func:`stop_signals` turns SIGTERM into the same
:class:`KeyboardInterrupt` that Ctrl-C raises (as :class:`Stopped`, which carries the exit
code), and can hold both signals back while a piece of work that must not be cut runs
(:meth:`StopSignals.held`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USER_ERROR", "EXIT_SIGINT", "EXIT_SIGTERM", "UserError", "Stopped",
           "StopSignals", "stop_signals", "exit_code", "is_user_error", "one_line", "run_command", "CommandParser",
           "check_output_folder"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class UserError(Exception):
    """A mistake in the command line: reported in one line, exit code 2."""


# Exceptions that mean the input was wrong: a bad value, a file that is missing, in the way or
# not readable. CheckpointError is a ValueError.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, FileExistsError,
                                                PermissionError, IsADirectoryError, NotADirectoryError)


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM) raised where Python raises Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USER_ERROR)


def check_output_folder(path: Path, option: str = "--out") -> None:
    """A folder a command will write: created if missing, and a file is written and removed in it.

    Raises :class:`UserError` for a file in the way or a place this process cannot write.
    """
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder: give a folder to write (it is created if "
                        f"missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write there ({exc.strerror or exc}): choose a folder you can "
                        f"write") from None


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, USER_ERRORS)


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that ended with ``exc``."""
    if isinstance(exc, KeyboardInterrupt):
        return getattr(exc, "exit_code", EXIT_SIGINT)
    return EXIT_USER_ERROR if is_user_error(exc) else EXIT_FAILURE


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class StopSignals:
    """The handler :func:`stop_signals` installs: raises :class:`Stopped`, or defers it while held."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self._depth:
            self._pending = self._pending or signum
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold SIGINT / SIGTERM back until the block ends (then raise :class:`Stopped` if one came)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM raise :class:`Stopped` (a KeyboardInterrupt) inside the block.

    Handlers can only be set in the main thread; elsewhere the block runs with the process's
    handlers (and :meth:`StopSignals.held` holds nothing back).
    """
    handler = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    saved = {sig: signal.signal(sig, handler._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield handler
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def run_command(prog: str, body: Callable[[StopSignals], int], *, debug: bool = False,
                traceback_hint: str = "rerun with --debug for the traceback") -> int:
    """Run a command's ``body`` under :func:`stop_signals`; map how it ends to an exit code.

    A stop prints ``PROG: interrupted`` (SIGINT) or ``PROG: terminated`` (SIGTERM); a user error
    ``PROG: error: MESSAGE``; any other exception ``PROG: failed: TYPE: MESSAGE (HINT)``, each
    one line on stderr (the traceback goes to the debug log). ``debug`` re-raises instead.
    """
    try:
        with stop_signals() as signals:
            return body(signals)
    except KeyboardInterrupt as exc:
        code = exit_code(exc)
        sys.stderr.write(f"{prog}: {'terminated' if code == EXIT_SIGTERM else 'interrupted'}\n")
        return code
    except Exception as exc:
        if debug:
            raise
        log.debug("%s ended with an exception", prog, exc_info=True)
        if is_user_error(exc):
            sys.stderr.write(f"{prog}: error: {one_line(exc)}\n")
            return EXIT_USER_ERROR
        sys.stderr.write(f"{prog}: failed: {type(exc).__name__}: {one_line(exc)} ({traceback_hint})\n")
        return EXIT_FAILURE
