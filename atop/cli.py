"""What every command-line entry point of the project shares (imports no torch: `analysis` uses it)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input found after parsing (a value out of range, an --out in the way)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one `error: ...` line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


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
