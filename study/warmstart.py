"""`--warm-start OTHER`: a new study starts from an earlier study's finished trials, for its sampler only.

    python study/run.py --preset cifar10-cpu --study-name second --warm-start first

OTHER is a study in the same `--storage-path` with the same search space (the fingerprint kept in
its study.json; another space is refused in one line). When the new study is created, OTHER's
COMPLETE trials are copied into its Optuna study, each with the user attr `warm_start_of`
("OTHER#<number>"), and as NSGA-II's first generation: NSGA-II reads its populations from a system
attr and would otherwise never use them as parents (TPE and GP read every COMPLETE trial).

They guide the sampler and nothing else: they get no MLflow run, do not count towards
`--num-trials`, are never on this study's front, never confirmed, and add nothing to
`--stop-on-plateau`'s hypervolume or to the importances (`own`, `own_front`). Their figures were
measured with OTHER's settings; the driver names the settings that differ.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import moocore
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from study import optuna_storage
from study.args import NAME_RE, STUDY_FILE
from study.constraints import Constraint, infeasible
from study.errors import StudyError
from tracking.contract import ATTR_WARM_START

if TYPE_CHECKING:
    from study.storage import Storage

#: where NSGA-II reads a trial's generation (optuna/samplers/_ga/_base.py, `get_trial_generation`)
NSGA2_GENERATION = "NSGAIISampler:generation"
#: settings whose difference makes the other study's figures a different measurement
COMPARED = ("config", "pretrain", "confirm_config")


def own(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that are this study's own (not copied by `--warm-start`)."""
    return [t for t in trials if ATTR_WARM_START not in t.user_attrs]


def own_front(study: optuna.Study) -> list[FrozenTrial]:
    """This study's Pareto-optimal trials, in trial order: its own feasible COMPLETE trials that no
    other such trial dominates (all objectives maximised; equal points all stay, as in Optuna's
    `best_trials`, which would also count the copied trials)."""
    trials = [t for t in own(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) if not infeasible(t)]
    if not trials:
        return []
    keep = moocore.is_nondominated(np.array([t.values for t in trials], dtype=float), maximise=True, keep_weakly=True)
    return sorted((t for t, k in zip(trials, keep) if k), key=lambda t: t.number)


@dataclass(frozen=True)
class WarmStart:
    """A checked `--warm-start`: the other study, its Optuna database, the settings that differ."""

    study: str
    url: str  # may hold a password: never printed or saved (`optuna_storage.public`)
    differs: tuple[str, ...]  # keys of `COMPARED` whose values differ from this study's

    def note(self, copied: int) -> str:
        """What the driver says once the trials are copied."""
        how = (f"; measured with other {', '.join(self.differs)} than this study's" if self.differs
               else "; measured with this study's settings")
        return (f"warm start: {copied} COMPLETE trial(s) of study {self.study!r} copied for the sampler only "
                f"(no MLflow runs, not counted, never on this study's front){how}")


def source(root: Storage, other: str, name: str, fingerprint: str, optuna_url: str,
           settings: dict[str, Any]) -> WarmStart:
    """Check `--warm-start OTHER` for the new study `name` in the storage `root`, whose space has
    `fingerprint`, whose Optuna database is `optuna_url` and whose settings are `settings`.

    Raises:
        StudyError: one line naming OTHER and what is accepted.
    """
    if not NAME_RE.match(other) or other == name:
        raise StudyError(f"--warm-start {other!r} is not another study's name; accepted: the name of an earlier "
                         f"study in {root.where()}")
    if not root.at(other).exists(STUDY_FILE):
        raise StudyError(f"--warm-start {other!r}: no study of that name in {root.where()} "
                         f"({root.at(other).where(STUDY_FILE)} is missing)")
    saved = root.at(other).read_json(STUDY_FILE)
    if saved.get("space_fingerprint") != fingerprint:
        raise StudyError(f"--warm-start {other!r} searched another space ({saved['settings'].get('space')!r}, "
                         "or the same name with other choices); accepted: a study with this study's space")
    theirs = saved.get("optuna_storage") or ""
    if theirs == optuna_storage.public(optuna_url):
        url = optuna_url  # the same database (with the password, which study.json never keeps)
    elif theirs.startswith("sqlite:"):
        url = theirs
    else:
        raise StudyError(f"--warm-start {other!r} keeps its trials in {theirs}, not in this study's Optuna "
                         "database; accepted: pass --optuna-storage with that database")
    try:
        optuna.load_study(study_name=other, storage=url)
    except KeyError:
        raise StudyError(f"--warm-start {other!r}: its Optuna database {optuna_storage.public(url)} has no "
                         "study of that name") from None
    theirs_settings = saved.get("settings", {})
    return WarmStart(other, url, tuple(k for k in COMPARED if theirs_settings.get(k) != settings.get(k)))


def copy_trials(study: optuna.Study, other: str, url: str, constraints: Sequence[Constraint] = ()) -> int:
    """Copy study `other`'s COMPLETE trials (its own) into `study` (see the module docstring), each
    judged by this study's `--constraint`s as its own trials are; returns how many."""
    trials = own(optuna.load_study(study_name=other, storage=url).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,)))
    study.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, values=t.values,
        user_attrs={ATTR_WARM_START: f"{other}#{t.number}"}, system_attrs={NSGA2_GENERATION: 0},
        constraints={str(c): c.violation(t.values) for c in constraints} or None)
        for t in trials])
    return len(trials)

