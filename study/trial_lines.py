"""One line per trial event on the driver's terminal: a trial started, ended an epoch, ended.

Ray Tune's own output (`RunConfig(verbose=1)`) prints a 40-line table of every trial's config as it
starts, a 35-line table of its result as it ends and a status table every 30 s, most of it columns
nobody asked for; the study turns it off (`verbose=0`, back with `--verbose`) and prints these lines
instead, so a user sees what runs, how far each trial is (epoch k of n, its time) and its figures
with their 95% intervals. `trial_lines` is a Tune callback used by the search and the confirm stage.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tracking.contract import EPOCH, OBJECTIVES

#: what `trial_lines` hands each ended trial: its Tune config and last result ({} when it failed)
OnEnded = Callable[[dict[str, Any], dict[str, Any]], None]


def say(line: str) -> None:
    """Print one line to the driver's output, flushed: under `ray job submit` it goes to a file (a
    module function: it pickles by name)."""
    print(line, flush=True)


def figures(result: dict[str, Any], prefix: str = "") -> str:
    """The objectives in `result` with their intervals, e.g. `clean_acc 0.297 [0.199, 0.418], ...`
    ("" when it holds none, as a confirm trial's epochs before its last)."""
    parts = []
    for name in OBJECTIVES:
        if name in result:
            lo, hi = result.get(f"{name}_lo"), result.get(f"{name}_hi")
            interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            parts.append(f"{prefix}{name} {result[name]:.3f}{interval}")
    return ", ".join(parts)


def trial_lines(stage: str, epochs: Callable[[Any], int], label: Callable[[Any], str], *, total: int | None = None,
                started_label: Callable[[Any], str] | None = None, prefix: str = "",
                ended: OnEnded | None = None, log: Callable[[str], None] = print) -> Any:
    """A Ray Tune callback printing one line per trial event.

    Args:
        stage: the line's first word ("search", "confirm").
        epochs: a Tune trial's last epoch, for "epoch k/n" (its own config's: a reference may have none).
        label: how a line names a Tune trial (e.g. "trial 3 seed 1").
        total: how many trials the stage runs, where it is known in advance ("3 of 4 done").
        started_label: how the start line names it (e.g. with its searched values); default `label`.
        prefix: before each figure's name ("test " for the confirm stage's figures).
        ended: called with each ended trial's config and last result ({} when it failed); an
            error in it is printed, never raised into Tune (the caller records the trial later).
        log: where the lines go.
    """
    from ray.tune import Callback

    of_total = f" of {total}" if total is not None else ""

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.ended = 0
            self.hook = ended

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (this callback) into the experiment; the hook holds the
            # driver's MLflow client and store, and no restored Tuner needs it
            return {**self.__dict__, "hook": None}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started.setdefault(trial.trial_id, time.monotonic())
            log(f"{stage}: {(started_label or label)(trial)} started ({len(self.started)}{of_total})")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            scored = figures(result, prefix)
            log(f"{stage}: {label(trial)} epoch {int(result.get(EPOCH, 0))}/{epochs(trial)} in "
                f"{float(result.get('epoch_s', 0.0)):.0f} s{': ' + scored if scored else ''}")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = dict(trial.last_result or {})
            last = epochs(trial)
            epoch = int(result.get(EPOCH, last))
            stopped = f" (stopped early at epoch {epoch}/{last})" if epoch < last else ""
            self._ended(trial, result, (figures(result, prefix) or "no figures") + stopped)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trial, {}, "FAILED")

        def _ended(self, trial: Any, result: dict[str, Any], what: str) -> None:
            self.ended += 1
            minutes = (time.monotonic() - self.started.get(trial.trial_id, time.monotonic())) / 60
            log(f"{stage}: {label(trial)} ended after {minutes:.1f} min, {self.ended}{of_total} done: {what}")
            if self.hook is not None:
                try:
                    self.hook(trial.config, result)
                except Exception as exc:  # noqa: BLE001 - never end the other trials for it
                    log(f"{stage}: could not record {label(trial)} yet ({type(exc).__name__}: {exc}); "
                        "it is recorded when the stage ends")

    return TrialLines()
