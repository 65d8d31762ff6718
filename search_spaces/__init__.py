"""Optuna define-by-run search spaces for AToP studies.

A space is a module with `suggest(trial) -> dict`, which only calls `trial.suggest_*` (conditional
parameters only where they apply), and `FIXED`, the settings the space holds constant. Every key of
either is a field of `atop.config.Config`; choices come from the `atop` registries and enums.

    from search_spaces import SPACES
    params = SPACES["wide"].suggest(optuna.trial.FixedTrial({...}))
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from search_spaces import paper, reproduce, tiny, wide

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Space:
    name: str
    suggest: Callable[[optuna.trial.BaseTrial], dict[str, Any]]
    fixed: dict[str, Any]
    doc: str


def _space(name: str, module: ModuleType) -> Space:
    return Space(name, module.suggest, dict(module.FIXED), (module.__doc__ or "").strip().splitlines()[0])


#: name -> space; `study/run.py --space NAME` picks one
SPACES: dict[str, Space] = {name: _space(name, m) for name, m in
                             (("paper", paper), ("wide", wide), ("tiny", tiny), ("reproduce", reproduce))}


def config_values(space: Space, params: dict[str, Any]) -> dict[str, Any]:
    """The config fields a trial with these Optuna parameters runs with: the space run on them.

    Most spaces name their parameters after config fields and return them unchanged; a space may
    also map one parameter to several fields (`reproduce`'s `arm`), so whoever turns a finished
    trial's `params` back into a config (the confirm stage, `--enqueue` checks) goes through here.
    """
    import optuna  # here, not at the top: naming and listing spaces (refusing an unknown one) costs no Optuna

    return space.suggest(optuna.trial.FixedTrial(params))


def distributions(space: Space) -> dict[str, list[str]]:
    """Every parameter `space` can suggest and its distributions (Optuna's JSON form, sorted), found by
    running it (never by reading its source).

    One probe per branch: a first trial samples every parameter it meets; then, for each choice of
    each categorical parameter met so far, a trial with that choice fixed (`enqueue_trial`) runs
    the space again, so parameters suggested only under that choice are met too. Parameters that
    appear only under a combination of two categorical choices would need a probe per combination.
    A parameter whose range depends on another choice has one distribution per range.
    In-memory storage, random sampling: milliseconds, nothing written.
    """
    import optuna  # here, not at the top: naming and listing spaces (refusing an unknown one) costs no Optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probes = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found: dict[str, set[str]] = {}
    done: set[tuple[str, Any]] = set()
    todo: list[dict[str, Any]] = [{}]
    while todo:
        probes.enqueue_trial(todo.pop(), skip_if_exists=False)
        trial = probes.ask()
        space.suggest(trial)
        for name, dist in trial.distributions.items():
            found.setdefault(name, set()).add(optuna.distributions.distribution_to_json(dist))
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                for choice in dist.choices:
                    if (name, choice) not in done:
                        done.add((name, choice))
                        todo.append({name: choice})
        probes.tell(trial, state=optuna.trial.TrialState.FAIL)
    return {name: sorted(found[name]) for name in sorted(found)}


def searched_names(space: Space) -> set[str]:
    """Every parameter name `space` can suggest (`distributions`)."""
    return set(distributions(space))


def fingerprint(space: Space) -> str:
    """A hash of what `space` searches and holds fixed: its distributions (`distributions`) and `fixed`.

    A study keeps it; resuming with a space whose fingerprint differs would mix trials of two spaces.
    Comments and code layout of the space's module do not change it.
    """
    text = json.dumps({"distributions": distributions(space), "fixed": space.fixed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["SPACES", "Space", "config_values", "distributions", "fingerprint", "searched_names"]
