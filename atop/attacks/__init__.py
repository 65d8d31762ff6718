"""Attacks on a model taking images in [0,1], and the registry of named threat-model attacks.

`ATTACKS` maps a name such as `pgd_linf` to an `AttackSpec`: the class, its norm, and fixed extra
arguments. The eps comes from the config (`cfg.eval_eps_linf`, `cfg.eval_eps_l2`), the steps,
queries and EOT samples from the evaluation level (see `atop.evaluate`). Every attack here
differentiates (or queries) the whole model it is given, the random defense included, except
`bpda_linf`, which replaces the purifier's backward pass by the identity on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from atop.attacks.apgd import APGD
from atop.attacks.autoattack import AutoAttack
from atop.attacks.base import Attack, Seedable
from atop.attacks.bpda import BPDA, BPDAWrapper
from atop.attacks.cw import CW
from atop.attacks.pgd import FGSM, PGD
from atop.attacks.square import Square
from atop.threat import Norm


@dataclass(frozen=True)
class AttackSpec:
    cls: type[Attack]
    norm: Norm
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module, *, eps: float, **kwargs: Any) -> Attack:
        return self.cls(model, eps=eps, norm=self.norm, **{**self.params, **kwargs})

    def budget(self, **available: Any) -> dict[str, Any]:
        """Of the cost arguments offered (steps, queries, eot), those this attack takes."""
        return {k: v for k, v in available.items() if k == "eot" or k in self.cls.BUDGET}


ATTACKS: dict[str, AttackSpec] = {
    "fgsm_linf": AttackSpec(FGSM, Norm.LINF),
    "pgd_linf": AttackSpec(PGD, Norm.LINF),
    "pgd_l2": AttackSpec(PGD, Norm.L2),
    "bpda_linf": AttackSpec(BPDA, Norm.LINF),
    "apgd_ce_linf": AttackSpec(APGD, Norm.LINF, {"loss": "ce"}),
    "apgd_dlr_linf": AttackSpec(APGD, Norm.LINF, {"loss": "dlr"}),
    "apgd_t_linf": AttackSpec(APGD, Norm.LINF, {"targeted": True}),
    "apgd_ce_l2": AttackSpec(APGD, Norm.L2, {"loss": "ce"}),
    "apgd_dlr_l2": AttackSpec(APGD, Norm.L2, {"loss": "dlr"}),
    "square_linf": AttackSpec(Square, Norm.LINF),
    "cw_l2": AttackSpec(CW, Norm.L2),
    "autoattack_standard_linf": AttackSpec(AutoAttack, Norm.LINF, {"version": "standard"}),
    "autoattack_rand_linf": AttackSpec(AutoAttack, Norm.LINF, {"version": "rand"}),
}

#: attacks that never read a gradient of the model (the audit's black-box reference)
BLACK_BOX = ("square_linf",)

__all__ = ["APGD", "ATTACKS", "BLACK_BOX", "BPDA", "CW", "FGSM", "PGD", "Attack", "AttackSpec", "AutoAttack",
           "BPDAWrapper", "Seedable", "Square"]
