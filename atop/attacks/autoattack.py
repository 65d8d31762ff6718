"""AutoAttack-style compositions (Croce & Hein, ICML 2020): worst case per image over several attacks."""
from __future__ import annotations

import torch
from torch import nn

from atop.attacks.apgd import APGD
from atop.attacks.base import Attack
from atop.attacks.square import Square
from atop.config import Norm

VERSIONS = ("standard", "rand")


class AutoAttack(Attack):
    """An AutoAttack-style ensemble: each attack runs on the images that survived the ones before.

    `standard`: APGD-CE, APGD-T (targeted DLR over the top `n_targets` classes), Square (l-inf
    only). The reference also runs FAB-T, which is left out here (it rarely changes the result after
    APGD-T, Croce & Hein 2020, Table 2). `rand`, the reference version for randomized defenses:
    APGD-CE and APGD-DLR, each with EOT (the reference uses 20 draws; here `eot`, which the `full`
    level sets to 20). Unlike the reference, `standard` also uses `eot` for every gradient.

    An image counts as fooled, and is left out of later attacks, when one fresh draw of the model
    misclassifies it (as the reference decides it); images nothing fooled keep the last attack's output.

    Args:
        model, eps, norm, eot, eot_batched, seed: see `Attack`; images in [0,1].
        version: "standard" or "rand" (default "standard").
        steps: APGD iterations (default 100).
        queries: Square's query budget (default 1000; the reference 5000).
        n_targets: APGD-T's target classes (default 9).
    """

    BUDGET = ("steps", "queries")

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, version: str = "standard",
                 steps: int = 100, queries: int = 1000, n_targets: int = 9, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if version not in VERSIONS:
            raise ValueError(f"version={version!r} is unknown; accepted: {', '.join(VERSIONS)}")
        self.version, self.steps, self.queries, self.n_targets = version, steps, queries, n_targets
        common = {"eps": eps, "norm": self.norm, "eot": self.eot, "eot_batched": self.eot_batched}
        if version == "rand":
            self.attacks: list[Attack] = [APGD(model, steps=steps, loss="ce", seed=self.seed, **common),
                                          APGD(model, steps=steps, loss="dlr", seed=self.seed + 1, **common)]
        else:
            self.attacks = [APGD(model, steps=steps, loss="ce", seed=self.seed, **common),
                            APGD(model, steps=steps, targeted=True, n_targets=n_targets, seed=self.seed + 1, **common)]
            if self.norm is Norm.LINF:
                self.attacks.append(Square(model, queries=queries, seed=self.seed + 2, **common))

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        with torch.no_grad():
            alive = self.model(x).argmax(1) == y
        for attack in self.attacks:
            idx = alive.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_adv = attack(x[idx], y[idx])
            out[idx] = x_adv
            with torch.no_grad():
                alive[idx] = self.model(x_adv).argmax(1) == y[idx]
        return out

    def settings(self) -> dict[str, float | int | str]:
        names = "+".join(_name(a) for a in self.attacks)
        out = {**super().settings(), "version": self.version, "components": names, "steps": self.steps}
        if any(isinstance(a, Square) for a in self.attacks):
            out["queries"] = self.queries
        if self.version == "standard":
            out["n_targets"] = self.n_targets
        return out


def _name(attack: Attack) -> str:
    if isinstance(attack, APGD):
        return "apgd_t" if attack.targeted else f"apgd_{attack.loss}"
    return type(attack).__name__.lower()
