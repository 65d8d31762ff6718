"""Progress of the long steps: pre-training and fine-tuning epochs, evaluation attacks, bootstraps.

On a terminal, each step is a tqdm bar on stderr: what runs, how far, the rate and the time left.
Anywhere else (a pipe, a log file, a Ray worker) bars would be redrawn as thousands of lines, so
each finished step prints one line instead:

    pretrain classifier epoch 3/5: loss 0.912, train acc 0.41, 62 s

`ATOP_PROGRESS` overrides the choice: `bar`, `lines` or `off`. Ray Tune trials run with `off`
(`quiet()`): Tune's status table and MLflow already show each trial's epochs, and several trials
printing per-epoch and per-attack lines at once would bury the driver's own output.

    with progress.step("pretrain classifier epoch 1/4", total=len(batches), unit="batch") as bar:
        for batch in batches:
            ...
            bar.advance()
        bar.finish(f"loss {loss:.3f}")
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

#: the environment variable that picks the style: bar, lines or off (default: bar on a terminal)
ENV = "ATOP_PROGRESS"
MODES = ("bar", "lines", "off")

T = TypeVar("T")


def mode() -> str:
    """The style in force: `ATOP_PROGRESS` if set to one of `MODES`, else bar when stderr is a terminal."""
    chosen = os.environ.get(ENV, "").strip().lower()
    if chosen in MODES:
        return chosen
    if sys.stderr is None:  # pythonw, or a daemon that closed it: nowhere to write
        return "off"
    try:
        return "bar" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a replaced stderr without isatty, or a closed one
        return "lines"


def quiet() -> None:
    """No progress output for the rest of this process (and the processes it starts)."""
    os.environ[ENV] = "off"


class Step:
    """A running step: `advance` moves its bar, `finish` sets the summary its end shows."""

    def __init__(self, bar: tqdm | None):
        self._bar = bar
        self.summary = ""

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self, summary: str) -> None:
        """The step's outcome (e.g. its loss), shown beside the finished bar or in its line."""
        self.summary = summary
        if self._bar is not None:
            self._bar.set_postfix_str(summary, refresh=False)


def seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


@contextmanager
def step(desc: str, total: int | None = None, unit: str = "it") -> Iterator[Step]:
    """Show one step named `desc` of `total` parts (None: unknown, the bar counts without an ETA).

    The line (in `lines` style) is printed only when the step ends without an exception: an error
    prints its own message.
    """
    style = mode()
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) if style == "bar" else None
    started = time.perf_counter()
    progress = Step(bar)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
    if style == "lines":
        done = f"{progress.summary}, " if progress.summary else ""
        print(f"{desc}: {done}{seconds(time.perf_counter() - started)}", file=sys.stderr, flush=True)


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, one `step` part each (total: `len(items)` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with step(desc, total, unit) as progress:
        for item in items:
            yield item
            progress.advance()
        progress.finish(f"{total} {unit}" if total is not None else "")
