"""AutoAttack-style compositions (Croce & Hein, ICML 2020): worst case per image over several attacks."""
from __future__ import annotations

import torch
from torch import nn

from atop.attacks.apgd import APGD
from atop.attacks.base import Attack, AttackOptions
from atop.attacks.square import Square
from atop.threat import Norm

VERSIONS = ("standard", "rand")


class AutoAttack(Attack):
    """An AutoAttack-style ensemble: every attack runs on every image; per image, the output that
    fresh draws of the model misclassify most is returned.

    `standard`: APGD-CE, APGD-T (targeted DLR over the top `n_targets` classes), Square (l-inf
    only). The reference also runs FAB-T, which is left out here (it rarely changes the result after
    APGD-T, Croce & Hein 2020, Table 2). `rand`, the reference version for randomized defenses:
    APGD-CE and APGD-DLR, each with EOT (the reference uses 20 draws; here `eot`, which the `full`
    level sets to 20). Unlike the reference, `standard` also uses `eot` for every gradient.

    Unlike the reference, no image is left out of a later attack because one draw of the model
    misclassified it (a random defense misclassifies some clean images on some draws only): each
    component attacks every image, and `Attack.select_by_fresh_draws` picks per image among the
    components' outputs (`outputs`) on `draws` fresh draws. What one image per input can guarantee:
    - scored on those same draws, the accuracy is per image the minimum over the components, so
      never above any component's; scored on other draws (as `atop.evaluate` does), the same holds
      up to the selection's sampling error (an image whose components fresh draws tell apart by
      less than about 1/sqrt(`draws`) may get the other one);
    - it is never below the per-draw AND of the components (on draw r an image counts only if every
      component's output is classified correctly): that figure lets the attacker choose the image
      after seeing the draw, which no single returned image can do. An evaluator that wants the
      conservative figure scores the AND of `outputs` itself.

    Args:
        model, eps, norm, eot, eot_batched, seed, draws: see `Attack`; images in [0,1].
        version: "standard" or "rand" (default "standard").
        steps: APGD iterations (default 100).
        queries: Square's query budget (default 5000, the reference's).
        n_targets: APGD-T's target classes (default 9).
    """

    BUDGET = ("steps", "queries")

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, version: str = "standard",
                 steps: int = 100, queries: int = 5000, n_targets: int = 9, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if version not in VERSIONS:
            raise ValueError(f"version={version!r} is unknown; accepted: {', '.join(VERSIONS)}")
        self.version, self.steps, self.queries, self.n_targets = version, steps, queries, n_targets
        common: AttackOptions = {"eps": eps, "norm": self.norm, "eot": self.eot, "eot_batched": self.eot_batched,
                                 "draws": self.draws}
        if version == "rand":
            self.attacks: list[Attack] = [APGD(model, steps=steps, loss="ce", seed=self.seed, **common),
                                          APGD(model, steps=steps, loss="dlr", seed=self.seed + 1, **common)]
        else:
            self.attacks = [APGD(model, steps=steps, loss="ce", seed=self.seed, **common),
                            APGD(model, steps=steps, targeted=True, n_targets=n_targets, seed=self.seed + 1, **common)]
            if self.norm is Norm.LINF:
                self.attacks.append(Square(model, queries=queries, seed=self.seed + 2, **common))

    def outputs(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each component's adversarial images for all of `x` (in the ball, in [0,1]), by name
        (`apgd_ce`, `apgd_dlr`, `apgd_t`, `square`), in the order they run.

        Each call runs the components anew (their random starts continue, so a second call differs);
        this attack's own output is `self.select_by_fresh_draws(list(outputs.values()), y).x`, so an
        evaluator that wants both calls `outputs` once and selects itself."""
        return {_name(attack): attack(x, y) for attack in self.attacks}

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.select_by_fresh_draws(list(self.outputs(x, y).values()), y).x

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
