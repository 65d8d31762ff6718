"""BPDA (Athalye, Carlini & Wagner, ICML 2018): the real defense forward, identity backward."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from atop.attacks.pgd import PGD
from atop.threat import Norm


@runtime_checkable
class Purifying(Protocol):
    """A defense made of a purifier and a classifier (as `atop.defense.Defense`)."""

    classifier: nn.Module

    def purify(self, x: torch.Tensor) -> torch.Tensor: ...


class BPDAWrapper(nn.Module):
    """Backward Pass Differentiable Approximation of a purifying defense.

    Forward: exactly the defense, `classifier(purify(x))` with fresh random transforms. Backward:
    the purifier (and the random transform) counts as the identity, through the straight-through
    trick x + (purify(x) - x).detach(). A model without `purify`/`classifier` passes through unchanged.
    """

    def __init__(self, defense: nn.Module):
        super().__init__()
        self.defense = defense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.defense, Purifying):
            return self.defense(x)
        purified = self.defense.purify(x)
        return self.defense.classifier(x + (purified - x).detach())


class BPDA(PGD):
    """PGD with BPDA gradients and EOT (Athalye et al., "Obfuscated gradients give a false sense of
    security", ICML 2018): the attack a purifier with a broken or noisy gradient cannot hide from.

    Args:
        model: an `atop.defense.Defense` (anything with `.purify(x)` and `.classifier`); images in [0,1].
        eps, norm, eot, eot_batched, seed, steps, step_size, random_start: see `PGD` (steps default 10).
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, **kwargs):
        super().__init__(BPDAWrapper(model), eps=eps, norm=norm, **kwargs)

    def settings(self) -> dict[str, float | int | str]:
        return {**super().settings(), "gradient": "bpda_identity"}
