"""Attacks on a model taking images in [0,1], and the registry of named threat-model attacks.

`ATTACKS` maps a name such as `pgd_linf` to an `AttackSpec`: the class, its norm, and fixed extra
arguments. The eps, steps and EOT samples come from the evaluation level (see `atop.evaluate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from atop.attacks.base import Attack
from atop.attacks.pgd import FGSM, PGD
from atop.config import Norm


@dataclass(frozen=True)
class AttackSpec:
    cls: type[Attack]
    norm: Norm
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module, *, eps: float, **kwargs: Any) -> Attack:
        return self.cls(model, eps=eps, norm=self.norm, **{**self.params, **kwargs})


ATTACKS: dict[str, AttackSpec] = {
    "fgsm_linf": AttackSpec(FGSM, Norm.LINF),
    "pgd_linf": AttackSpec(PGD, Norm.LINF),
    "pgd_l2": AttackSpec(PGD, Norm.L2),
}

__all__ = ["ATTACKS", "FGSM", "PGD", "Attack", "AttackSpec"]
