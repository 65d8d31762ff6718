"""Square Attack (Andriushchenko et al., ECCV 2020): query-limited black-box random search, l-inf."""
from __future__ import annotations

import math

import torch
from torch import nn

from atop.attacks.base import Attack
from atop.attacks.losses import margin
from atop.threat import Norm


def square_fraction(p_init: float, query: int, queries: int) -> float:
    """The fraction of pixels a square covers at `query` of `queries` (the paper's halving schedule,
    stated for 10,000 queries and rescaled to the budget)."""
    at = int(query / queries * 10_000)
    halvings = sum(at > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


class Square(Attack):
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
    black-box adversarial attack via random search", ECCV 2020), l-inf version.

    No gradients: it starts from vertical stripes of +-eps and then, once per query, proposes to
    set one random square window (side shrinking on a schedule) to +-eps per channel, keeping the
    proposal where it lowers the margin z_y - max_{i != y} z_i. For a stochastic model each query
    averages the margin over `eot` forward draws (so one query costs `eot` forward passes).

    On a random model an `eot`-draw mean that went negative is a noisy, selection-biased verdict
    (of many proposals, the accepted one is the one those draws liked), so it only triggers a check:
    an accepted proposal whose mean margin is negative is scored on `draws` fresh draws
    (`Attack.select_by_fresh_draws`); it becomes the image's output if fresh draws misclassify it
    more often than the output so far, the search continues from the fresh mean margin, and an
    image is no longer queried only once every fresh draw misclassifies its output. Returns per
    image the output so confirmed or the final search point, whichever fresh draws misclassify more.

    Args:
        model, eps, eot, eot_batched, seed, draws: see `Attack`; images in [0,1]; `norm` must be l-inf.
        queries: query budget per image, the initialisation included (default 5000, AutoAttack's;
            the paper 10,000).
        p_init: initial fraction of pixels per square (default 0.8, AutoAttack's value).
    """

    BUDGET = ("queries",)

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, queries: int = 5000,
                 p_init: float = 0.8, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if self.norm is not Norm.LINF:
            raise ValueError(f"Square is implemented for norm=linf only, got {self.norm.value}")
        if queries < 1:
            raise ValueError(f"queries={queries} must be >= 1")
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init={p_init} must lie in (0, 1]")
        self.queries, self.p_init = queries, p_init

    def _signs(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=self.generator, device=device).float() * 2 - 1

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x_best = (x + self.eps * self._signs(n, c, 1, w, device=x.device)).clamp(0, 1)
        out = self.fresh_scores(x_best, y)
        best = out.margin.clone()
        for query in range(1, self.queries):
            idx = (out.accuracy > 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            side = round(math.sqrt(square_fraction(self.p_init, query, self.queries) * h * w))
            side = min(max(side, 1), min(h, w) - 1)
            top = int(torch.randint(0, h - side + 1, (), generator=self.generator, device=x.device))
            left = int(torch.randint(0, w - side + 1, (), generator=self.generator, device=x.device))
            x_i, delta = x[idx], x_best[idx] - x[idx]
            delta[:, :, top:top + side, left:left + side] = self.eps * self._signs(len(idx), c, 1, 1, device=x.device)
            candidate = (x_i + delta).clamp(0, 1)
            new = margin(self.predict(candidate), y[idx])
            better = new < best[idx]
            x_best[idx[better]], best[idx[better]] = candidate[better], new[better]
            check = idx[better & (new < 0)]
            if len(check):
                fresh = self.fresh_scores(x_best[check], y[check])
                best[check] = fresh.margin
                out.put(check, self.select_by_fresh_draws([out.take(check), fresh], y[check]))
        return self.select_by_fresh_draws([out, x_best], y).x

    def settings(self) -> dict[str, float | int | str]:
        return {**super().settings(), "queries": self.queries, "p_init": self.p_init}
