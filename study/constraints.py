"""`--constraint`: bounds on an objective that a configuration must meet to count at all.

    --constraint clean_acc>=0.7 --constraint robust_acc_unseen>=0.2

A trial that breaks a bound stays in the study (and in MLflow, tagged) but is never on the Pareto
front, never confirmed and never picked by the sampler as a parent: Optuna's constraints
(`Trial.set_constraint`; a value <= 0 is feasible), set from the trial's objectives before it is told.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from study.errors import StudyError
from tracking.contract import OBJECTIVES

_FORM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Constraint:
    """`objective op bound`, e.g. clean_acc >= 0.7."""

    objective: str
    op: str  # ">=" or "<="
    bound: float

    def violation(self, values: Sequence[float]) -> float:
        """Optuna's constraint value: <= 0 where `values` (in `OBJECTIVES` order) meet the bound."""
        value = values[OBJECTIVES.index(self.objective)]
        return self.bound - value if self.op == ">=" else value - self.bound

    def __str__(self) -> str:
        return f"{self.objective}{self.op}{self.bound:g}"


def parse(texts: Sequence[str]) -> tuple[Constraint, ...]:
    """The `--constraint` flags, checked: one-line `StudyError` naming the bad one and the accepted form."""
    out = []
    for text in texts:
        m = _FORM.match(text)
        if not m:
            raise StudyError(f"--constraint {text!r} is not OBJECTIVE>=NUMBER or OBJECTIVE<=NUMBER "
                             f"(e.g. clean_acc>=0.7)")
        name, op, bound = m.group(1), m.group(2), m.group(3)
        if name not in OBJECTIVES:
            raise StudyError(f"--constraint {text!r}: unknown objective {name!r}; accepted: {', '.join(OBJECTIVES)}")
        try:
            value = float(bound)
        except ValueError:
            raise StudyError(f"--constraint {text!r}: {bound!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise StudyError(f"--constraint {text!r}: bound {value:g} is outside [0, 1] (objectives are fractions)")
        out.append(Constraint(name, op, value))
    return tuple(out)


def violations(constraints: Sequence[Constraint], values: Sequence[float]) -> list[float]:
    """Optuna's constraint vector of a trial with objectives `values`."""
    return [c.violation(values) for c in constraints]


def infeasible(trial) -> bool:
    """Whether an Optuna trial broke any constraint (Optuna 5 keeps them as a name -> value dict)."""
    values = trial.constraints.values() if isinstance(trial.constraints, dict) else trial.constraints
    return any(v > 0 for v in values)
