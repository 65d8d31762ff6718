"""Where Ray Tune puts a study's trials in the study folder: one experiment folder each time a driver
runs the search or the confirm stage, one folder per trial in it, its checkpoints below
(`checkpoint_<k>/`). `study.resume.latest_checkpoint` finds an interrupted trial's newest one there.
Light (no Ray, no Optuna): the driver imports it before it checks its input."""
from __future__ import annotations

import time

#: Tune experiments' folders in the study folder start so, then the time: a new one each time a driver
#: runs the search or the confirm stage
SEARCH_EXPERIMENT, CONFIRM_EXPERIMENT = "tune-", "confirm-"


def experiment_name(prefix: str) -> str:
    """A new Tune experiment's folder: `prefix` (`SEARCH_EXPERIMENT` or `CONFIRM_EXPERIMENT`), then the time."""
    return prefix + time.strftime("%Y%m%d-%H%M%S")


def trial_folder(number: int, seed: int | None, trial_id: str) -> str:
    """A Tune trial's folder (and name): `trial-<NNNN>-<id>` for search trial `number`, or
    `confirm-<NNNN>-seed<S>-<id>` for its confirm trial of fine-tuning seed `seed`."""
    return f"trial-{number:04d}-{trial_id}" if seed is None else f"confirm-{number:04d}-seed{seed}-{trial_id}"
