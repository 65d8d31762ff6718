"""What every command-line entry point of the project shares (imports no torch: `analysis` uses it)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

EXIT_BAD_INPUT = 2
T = TypeVar("T")


class UsageError(ValueError):
    """Bad command-line input found after parsing (a value out of range, an --out in the way)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def check_folder_to_create(flag: str, value: str, holds: str) -> None:
    """A `UsageError` unless `value` is a folder, or one that can be created (no file in the way).

    Args:
        flag: the option, as the message names it (e.g. "--pretrained-cache").
        value: the path given.
        holds: what the folder is for, as the message says it.
    """
    path = Path(value).expanduser()
    found = next(p for p in (path, *path.parents) if p.exists())  # the root, or ".", always exists
    if not found.is_dir():
        raise UsageError(f"{flag} {value!r}: {str(found)!r} is a file; expected a folder (created if missing) "
                         f"for {holds}")


def naming_the_file(build: Callable[[bool], T], flag: str, path: str | None, error: type[Exception]) -> T:
    """`build(True)`, which uses the values of the file `path` gave; an `error` the file's values cause
    (`build(False)`, without them, succeeds) is raised again naming the file, so that a bad file is
    one line that says which file.

    Args:
        build: makes the result with (True) or without (False) the file's values.
        flag: the option that named the file (e.g. "--config").
        path: the file, or None when none was given.
        error: the exception type of a bad value; raised again with the file named.
    """
    try:
        return build(True)
    except error as exc:
        if path is None or path in str(exc):
            raise
        try:
            build(False)
        except error:
            raise exc from None
        raise error(f"{flag} {path!r}: {exc}") from None


def one_line_errors(body: Callable[[], int], errors: tuple[type[Exception], ...]) -> int:
    """Run a CLI's body; a `UsageError` or one of the expected `errors` becomes one `error: ...` line
    on stderr and exit status `EXIT_BAD_INPUT` (anything else is a bug and keeps its traceback).

    Args:
        body: the command's work; returns its exit status.
        errors: the library's exception types that mean bad input (their message is the one line).
    """
    expected: tuple[type[Exception], ...] = (UsageError, *errors)
    try:
        return body()
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
