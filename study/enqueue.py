"""Reference configurations put at the head of a study: `study/run.py --enqueue FILE`.

FILE is YAML (read with `yaml.safe_load`) or JSON, ending in .yaml, .yml or .json: a list of
mappings, each an optional `name` (default `ref-<n>`, n counting entries from 1; letters, digits,
'.', '_', '-') and a value for every parameter the study's search space suggests for that entry,
conditional parameters exactly where their condition holds. For the paper space:

    - {name: paper-rt2, rt: rt2, lambda_ce: 0.1}
    - {name: paper-rt3, rt: rt3, lambda_ce: 0.1, num_masks: 4}   # num_masks: RT3 only

Each value must lie inside the space's distribution (a categorical choice; a number in the int or
float range, on its step), the values Optuna's `Study.enqueue_trial` hands to the space unchanged.
The distributions are found by running the space on real in-memory Optuna trials with the entry's
values fixed (as `search_spaces.searched_names` does), never by reading its source. Every problem
raises `StudyError` in one line naming the file, the entry, the key or value and what is accepted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from atop.config import Config, ConfigError, read_yaml_or_json
from search_spaces import Space, config_values, searched_names
from study.args import NAME_RE
from study.errors import StudyError
from tracking.contract import ATTR_REFERENCE


@dataclass(frozen=True)
class Reference:
    """One known configuration: its name and the searched parameters the space takes unchanged."""

    name: str
    params: dict[str, Any]


class _Outside(ValueError):
    """A value outside a distribution; the message says what the distribution accepts."""


def read_enqueue(path: str | Path, space: Space, base: Config) -> list[Reference]:
    """The reference configurations of an `--enqueue` file, checked against `space` and `base`.

    Args:
        path: the file (.yaml, .yml or .json).
        space: the study's search space.
        base: the config every trial starts from (`StudySettings.base_config()`); each entry's
            values over it must make a valid `Config`.

    Returns:
        The references in file order, each with the parameters the space suggests for it.

    Raises:
        StudyError: one line naming the file, the entry and the bad key or value.
    """
    where = f"--enqueue {str(path)!r}"
    return check_references(_read_list(Path(path), where), space, base, where)


def check_references(entries: list[Any], space: Space, base: Config, where: str) -> list[Reference]:
    """`entries` (mappings as in an `--enqueue` file) as references, checked like `read_enqueue`'s;
    `where` names their source in error messages (a file, or a settings file's `references:`)."""
    if not isinstance(entries, list):
        raise StudyError(f"{where} holds {type(entries).__name__}, not a list; accepted: a list of mappings, "
                         "one per reference configuration")
    known = searched_names(space)
    probes = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    refs: list[Reference] = []
    seen: dict[str, int] = {}
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise StudyError(f"{where}: entry {number} is {type(entry).__name__} {entry!r}; accepted: a mapping of "
                             f"parameter: value (and an optional name)")
        values = dict(entry)
        name = values.pop("name", f"ref-{number}")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise StudyError(f"{where}: entry {number} has name {name!r}; accepted: letters, digits, '.', '_', '-' "
                             "(max 100)")
        at = f"{where}: entry {number} ({name})"
        if name in seen:
            raise StudyError(f"{at}: name {name!r} is already entry {seen[name]}'s; accepted: a name per entry")
        seen[name] = number
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            # a config field the space holds fixed is set for every trial in the study's `config:`, not here
            fixed = [k for k in unknown if k in base.to_dict()]
            hint = f" ({', '.join(fixed)}: not searched; the study's config sets it for every trial)" if fixed else ""
            raise StudyError(f"{at}: unknown parameter(s) {', '.join(map(repr, unknown))} for space {space.name!r}"
                             f"{hint}; accepted: name, {', '.join(sorted(known))}")
        params = _check_entry(probes, space, values, at)
        try:
            Config.from_dict({**base.to_dict(), **config_values(space, params)})
        except ConfigError as exc:
            raise StudyError(f"{at}: the study's config with these values is invalid: {exc}") from None
        refs.append(Reference(name, params))
    return refs


def enqueue_references(study: optuna.Study, refs: list[Reference]) -> list[Reference]:
    """Put `refs` at the head of `study`, skipping those it already holds (a resumed study).

    Each enqueued trial carries its reference's name as the user attribute `ATTR_REFERENCE`; a
    reference counts as held when any trial of the study, in any state, carries its name.

    Returns:
        The references enqueued now.
    """
    held = {t.user_attrs.get(ATTR_REFERENCE) for t in study.get_trials(deepcopy=False)}
    new = [ref for ref in refs if ref.name not in held]
    for ref in new:
        study.enqueue_trial(ref.params, user_attrs={ATTR_REFERENCE: ref.name}, skip_if_exists=False)
    return new


def _read_list(path: Path, where: str) -> list[Any]:
    try:
        data = read_yaml_or_json(path, where, "a list of reference configurations")
    except ConfigError as exc:
        raise StudyError(str(exc)) from None
    if not isinstance(data, list):
        raise StudyError(f"{where} holds {type(data).__name__}, not a list; accepted: a list of mappings, "
                         "one per reference configuration")
    if not data:
        raise StudyError(f"{where} holds an empty list; accepted: at least one reference configuration")
    return data


def _check_entry(probes: optuna.Study, space: Space, values: dict[str, Any], at: str) -> dict[str, Any]:
    """The entry's values as the space takes them, or `StudyError` for the first bad one."""
    dists = _branch(probes, space, values)
    for name, dist in dists.items():
        if name in values:
            try:
                _inside(dist, values[name])
            except _Outside as exc:
                raise StudyError(f"{at}: {name}={values[name]!r} is outside space {space.name!r}; accepted: {exc}") \
                    from None
    choices = ", ".join(f"{n}={values[n]!r}" for n, d in dists.items()
                        if isinstance(d, CategoricalDistribution) and n in values)
    missing = [n for n in dists if n not in values]
    if missing:
        raise StudyError(f"{at}: lacks parameter(s) {', '.join(missing)}, which space {space.name!r} suggests with "
                         f"{choices or 'these values'}; accepted: a value for each of {', '.join(dists)}")
    stray = [n for n in values if n not in dists]
    if stray:
        raise StudyError(f"{at}: parameter(s) {', '.join(stray)} do not apply with {choices or 'these values'} in "
                         f"space {space.name!r}; accepted here: {', '.join(dists)}")
    return {name: _inside(dist, values[name]) for name, dist in dists.items()}


def _branch(probes: optuna.Study, space: Space, values: dict[str, Any]) -> dict[str, BaseDistribution]:
    """The distributions the space suggests on the branch that the entry's values choose.

    The space runs on an enqueued trial with the entry's values fixed wherever they lie inside the
    distribution met (parameters not fixed are sampled). A fixed categorical may open a branch with
    other parameters, and a value may only fit the distribution of another branch (wide's
    `train_eps` range follows `train_norm`), so the fixed set is recomputed from each run's
    distributions until a run reproduces it: that run took every fitting value as given.
    """
    fixed: dict[str, Any] | None = None
    for _ in range(2 * len(values) + 2):
        probes.enqueue_trial(fixed or {}, skip_if_exists=False)
        trial = probes.ask()
        space.suggest(trial)
        probes.tell(trial, state=optuna.trial.TrialState.FAIL)
        dists = dict(trial.distributions)
        again = {n: _inside(d, values[n]) for n, d in dists.items() if n in values and _fits(d, values[n])}
        if again == fixed:
            return dists
        fixed = again
    raise StudyError(f"space {space.name!r} suggests different parameters on every run with the values {values!r}; "
                     "its branches must depend only on suggested values")


def _fits(dist: BaseDistribution, value: Any) -> bool:
    try:
        _inside(dist, value)
    except _Outside:
        return False
    return True


def _inside(dist: BaseDistribution, value: Any) -> Any:
    """`value` as `dist` holds it (a choice itself, an int, a float), or `_Outside`."""
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            # True == 1 in Python: a bool matches only a bool choice, a number only a number
            if choice == value and isinstance(choice, bool) == isinstance(value, bool):
                return choice
        raise _Outside(f"one of {', '.join(map(_show, dist.choices))}")
    if isinstance(dist, IntDistribution):
        accepted = f"an integer in {dist.low}..{dist.high}" + (f" in steps of {dist.step}" if dist.step != 1 else "")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise _Outside(accepted)
        integer = int(value)
        if not dist.low <= integer <= dist.high or (integer - dist.low) % dist.step:
            raise _Outside(accepted)
        return integer
    if isinstance(dist, FloatDistribution):
        accepted = f"a number in {dist.low!r}..{dist.high!r}" + (f" in steps of {dist.step!r}" if dist.step else "")
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _Outside(accepted) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Outside(accepted)
        number = float(value)
        on_step = dist.step is None or abs((k := (number - dist.low) / dist.step) - round(k)) < 1e-8
        if not (dist.low <= number <= dist.high and on_step):
            raise _Outside(accepted)
        return number
    raise _Outside(f"a value of {type(dist).__name__}, which --enqueue does not check")


def _show(choice: Any) -> str:
    """A choice as it is written in YAML or JSON."""
    return str(choice).lower() if isinstance(choice, bool) or choice is None else str(choice)


__all__ = ["Reference", "check_references", "enqueue_references", "read_enqueue"]
