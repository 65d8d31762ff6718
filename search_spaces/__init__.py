"""Optuna define-by-run search spaces for AToP studies.

A space is a module with `suggest(trial) -> dict`, which only calls `trial.suggest_*` (conditional
parameters only where they apply), and `FIXED`, the settings the space holds constant. Every key of
either is a field of `atop.config.Config`; choices come from the `atop` registries and enums.

    from search_spaces import SPACES
    params = SPACES["wide"].suggest(optuna.trial.FixedTrial({...}))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import optuna

from search_spaces import paper, tiny, wide


@dataclass(frozen=True)
class Space:
    name: str
    suggest: Callable[[optuna.trial.BaseTrial], dict[str, Any]]
    fixed: dict[str, Any]
    doc: str


def _space(name: str, module: ModuleType) -> Space:
    return Space(name, module.suggest, dict(module.FIXED), (module.__doc__ or "").strip().splitlines()[0])


#: name -> space; `study/run.py --space NAME` picks one
SPACES: dict[str, Space] = {name: _space(name, m) for name, m in (("paper", paper), ("wide", wide), ("tiny", tiny))}

__all__ = ["SPACES", "Space"]
