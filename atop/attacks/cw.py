"""Carlini-Wagner l2 attack (Carlini & Wagner, IEEE S&P 2017) with EOT."""
from __future__ import annotations

import torch
from torch import nn

from atop.attacks.base import Attack
from atop.attacks.losses import margin
from atop.threat import Norm


class CW(Attack):
    """Carlini-Wagner l2 (Carlini & Wagner, "Towards evaluating the robustness of neural networks",
    IEEE S&P 2017), judged at a fixed l2 radius.

    Minimises ||x' - x||_2^2 + c * max(z_y - max_{i != y} z_i, -kappa) over x' = (tanh(w) + 1) / 2
    (always inside [0,1]) with Adam on w, for `search_steps` values of c: c is bisected between the
    largest value that failed and the smallest that succeeded (times 10 while none succeeded).
    Success is judged on the EOT-mean logits. Returns per image, of the successful x' of smallest l2
    norm and the last iterate, both projected onto the eps-ball, the one fresh draws of the model
    misclassify more (`Attack.select_by_fresh_draws`): a success beyond eps may not survive the
    projection (CW is a minimum-norm attack; it is here as a differently-shaped optimiser, not as
    the strongest l2 attack).

    Args:
        model, eps, eot, eot_batched, seed, draws: see `Attack`; images in [0,1]; `norm` must be l2.
        steps: Adam steps in total, split evenly over the search steps (default 100).
        search_steps: values of c tried (default 3; the paper 9).
        c: the first value of c (default 1.0).
        kappa: confidence margin (default 0).
        lr: Adam's learning rate on w (default 0.01).
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.L2, steps: int = 100,
                 search_steps: int = 3, c: float = 1.0, kappa: float = 0.0, lr: float = 0.01, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if self.norm is not Norm.L2:
            raise ValueError(f"CW is an l2 attack, got norm={self.norm.value}")
        if steps < 1 or search_steps < 1:
            raise ValueError(f"steps={steps} and search_steps={search_steps} must be >= 1")
        self.steps, self.search_steps, self.c, self.kappa, self.lr = steps, search_steps, c, kappa, lr

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        kappa = self.kappa

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return margin(logits, labels).clamp_min(-kappa)

        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        c = torch.full((len(x),), self.c, device=x.device, dtype=x.dtype)
        low, high = torch.zeros_like(c), torch.full_like(c, float("inf"))
        best_adv, best_norm = x.clone(), torch.full_like(c, float("inf"))
        last = x.clone()
        per_search = max(self.steps // self.search_steps, 1)
        b1, b2 = 0.9, 0.999
        for _ in range(self.search_steps):
            w, m, v = w0.clone(), torch.zeros_like(x), torch.zeros_like(x)
            succeeded = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for t in range(1, per_search + 1):
                x_adv = (torch.tanh(w) + 1) / 2
                _, grad_f, logits = self.loss_and_grad(x_adv, y, loss_fn)
                delta = x_adv - x
                norms = delta.flatten(1).norm(dim=1)
                success = logits.argmax(1) != y
                keep = success & (norms < best_norm)
                best_adv[keep], best_norm[keep] = x_adv[keep], norms[keep]
                succeeded |= success
                # chain rule through x' = (tanh(w) + 1) / 2, then one Adam step on w
                g = (2 * delta + c.view(shape) * grad_f) * (1 - torch.tanh(w) ** 2) / 2
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                w = w - self.lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
            last = (torch.tanh(w) + 1) / 2
            high = torch.where(succeeded, torch.minimum(high, c), high)
            low = torch.where(succeeded, low, torch.maximum(low, c))
            c = torch.where(torch.isfinite(high), (low + high) / 2, c * 10)
        found = torch.where(torch.isfinite(best_norm).view(shape), best_adv, last)
        return self.select_by_fresh_draws([self.project(found, x), self.project(last, x)], y).x

    def settings(self) -> dict[str, float | int | str]:
        return {**super().settings(), "steps": self.steps, "search_steps": self.search_steps, "c": self.c,
                "kappa": self.kappa, "lr": self.lr}
