"""FGSM and PGD (l-inf and l2), with EOT over a stochastic model."""
from __future__ import annotations

import torch
from torch import nn

from atop.attacks.base import Attack
from atop.threat import Norm, pgd_step_size


class PGD(Attack):
    """Projected gradient descent (Madry et al., ICLR 2018) on the cross-entropy loss.

    Args:
        model, eps, norm, eot, eot_batched, seed: see `Attack`.
        steps: gradient steps (default 10).
        step_size: per step; default `atop.threat.pgd_step_size` (2.5 * eps / steps).
        random_start: start from a random point of the eps-ball (default True).
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, steps: int = 10,
                 step_size: float | None = None, random_start: bool = True, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        self.steps, self.random_start_ = steps, random_start
        self.step_size = step_size if step_size is not None else pgd_step_size(eps, steps)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.project(self.random_start(x), x) if self.random_start_ else x.clone()
        for _ in range(self.steps):
            _, grad, _ = self.loss_and_grad(x_adv, y)
            x_adv = self.project(x_adv + self.step(grad, self.step_size), x)
        return x_adv

    def settings(self) -> dict[str, float | int | str]:
        return {**super().settings(), "steps": self.steps, "step_size": self.step_size,
                "random_start": int(self.random_start_)}


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al., 2015): one full-size step, no random start."""

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, **kwargs):
        kwargs.setdefault("step_size", eps)
        kwargs.setdefault("random_start", False)
        kwargs.pop("steps", None)
        super().__init__(model, eps=eps, norm=norm, steps=1, **kwargs)
