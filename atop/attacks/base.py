"""The attack base class: `Attack(model, eps=..., norm=...)(x, y) -> x_adv`.

Subclasses implement a short `perturb(x, y)`. The base class owns what every attack must get right:
inputs checked to be in [0,1], the result projected into the eps-ball and [0,1], gradients taken
with respect to the input only (model parameters never accumulate `.grad`), and EOT: the loss
gradient of a stochastic model averaged over `eot` random draws, batched into one forward pass by
default (`eot_batched=False` loops over draws, to bound memory).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from atop.attacks.losses import cross_entropy
from atop.config import Norm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example loss


class Attack:
    """Base class of all attacks on a model taking images in [0,1].

    Args:
        model: maps images (N,C,H,W) in [0,1] to logits; may be random (then use `eot` > 1).
        eps: radius of the threat model, on the [0,1] pixel scale (l-inf) or as an l2 norm.
        norm: `Norm.LINF` or `Norm.L2`.
        eot: random draws of the model averaged per gradient (Expectation over Transformation).
        eot_batched: draw all EOT samples in one forward pass (fast) or loop over them (less memory).
        seed: seeds the attack's own randomness (random starts, random search).

    `BUDGET` names the cost arguments an evaluation level sets on this class (`steps`, `queries`).
    """

    BUDGET: tuple[str, ...] = ("steps",)

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, eot: int = 1,
                 eot_batched: bool = True, seed: int = 0):
        if eps < 0:
            raise ValueError(f"eps={eps} is negative; accepted: eps >= 0")
        if eot < 1:
            raise ValueError(f"eot={eot} must be >= 1")
        self.model, self.eps, self.norm, self.eot, self.eot_batched = model, eps, Norm(norm), eot, eot_batched
        self.seed = seed
        self.generator: torch.Generator | None = None  # created on first use, on the input's device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.detach().clone()
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"attack inputs must lie in [0,1], got [{x.min().item():.3g}, {x.max().item():.3g}]")
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        x = x.detach()
        return self.project(self.perturb(x, y.detach()), x).detach()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict[str, float | int | str]:
        """What a reader needs to judge the number this attack produced (logged beside it)."""
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm.value, "eot": self.eot}

    # --- helpers for subclasses -------------------------------------------------------------

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over `eot` draws of the model, without gradients (black-box queries)."""
        if self.eot_batched:
            return self.model(x.repeat(self.eot, *([1] * (x.dim() - 1)))).view(self.eot, len(x), -1).mean(0)
        return torch.stack([self.model(x) for _ in range(self.eot)]).mean(0)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = cross_entropy
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss and its input gradient, both averaged over `eot` draws, and the mean logits."""
        x = x.detach().requires_grad_(True)
        if self.eot_batched:
            logits = self.model(x.repeat(self.eot, *([1] * (x.dim() - 1))))
            losses = loss_fn(logits, y.repeat(self.eot)).view(self.eot, -1).mean(0)
            grad, = torch.autograd.grad(losses.sum(), x)
            return losses.detach(), grad, logits.detach().view(self.eot, *y.shape, -1).mean(0)
        total_loss, total_grad, total_logits = 0.0, torch.zeros_like(x), 0.0
        for _ in range(self.eot):
            logits = self.model(x)
            losses = loss_fn(logits, y)
            total_grad += torch.autograd.grad(losses.sum(), x)[0]
            total_loss, total_logits = total_loss + losses.detach(), total_logits + logits.detach()
        return total_loss / self.eot, total_grad / self.eot, total_logits / self.eot

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clip into the eps-ball around `x`, then into [0,1]."""
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * (self.eps / norms).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def step(self, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """Steepest-ascent step of the norm: sign for l-inf, normalised gradient for l2."""
        if self.norm is Norm.LINF:
            return step_size * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return step_size * grad / norms

    def random_start(self, x: torch.Tensor) -> torch.Tensor:
        """A uniform point in the eps-ball (l-inf) or a random direction at a random radius (l2)."""
        noise = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) * 2 - 1
        if self.norm is Norm.LINF:
            return x + self.eps * noise
        noise = torch.randn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        norms = noise.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        radius = torch.rand(len(x), generator=self.generator, device=x.device, dtype=x.dtype).view_as(norms)
        return x + self.eps * radius * noise / norms
