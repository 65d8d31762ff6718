"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, on CE, DLR or targeted DLR."""
from __future__ import annotations

import torch
from torch import nn

from atop.attacks.base import Attack, LossFn, Scored
from atop.attacks.losses import cross_entropy, dlr, targeted_dlr
from atop.threat import Norm

LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "dlr": dlr}


def checkpoints(steps: int) -> list[int]:
    """The iterations after which APGD may halve its step size.

    The first comes after 22% of the budget; each following interval is 3% of the budget shorter
    than the previous one, but at least 6% of it (the paper's p_j schedule in whole iterations).
    """
    interval = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at = [], interval
    while at <= steps:
        points.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return points


class APGD(Attack):
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020), with EOT over a stochastic model.

    Starts at step size 2 * eps; each step is a PGD step followed by momentum 0.75 towards the
    previous iterate. At each checkpoint (see `checkpoints`) an image's step size halves and it
    restarts from its best point if fewer than `rho` of the steps since the last checkpoint raised
    its loss, or if its best loss and step size are unchanged since the last checkpoint.
    It keeps iterating after an image is misclassified, and returns per image, of two candidates,
    the one misclassified by more fresh draws of the model (`Attack.select_by_fresh_draws`): the
    iterate of highest EOT loss, and the latest iterate the EOT-averaged model misclassified (the
    reference's rule; the final iterate where none was). The first misclassified iterate, a point on
    the boundary, is what fresh draws most often classify correctly again: never returned as such.

    Args:
        model, eps, norm, eot, eot_batched, seed, draws: see `Attack`; images in [0,1].
        steps: iterations per run (default 100; the AutoAttack paper's budget).
        loss: "ce" (cross-entropy), "dlr" (Difference of Logits Ratio) (default "ce").
        targeted: run the targeted DLR loss once towards each of the `n_targets` classes with the
            highest EOT-mean clean logits after the top one (APGD-T; default False). Each run
            starts on the images not yet misclassified by every fresh draw; per image the run whose
            output fresh draws misclassify most is kept. Success means "misclassified", as in
            AutoAttack.
        n_targets: target classes for `targeted` (default 9, AutoAttack's CIFAR-10 value).
        rho: fraction of loss-raising steps below which the step size halves (default 0.75).
        momentum: weight of the new PGD step against the previous direction (default 0.75).
        random_start: start from a random point of the eps-ball (default True).
    """

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, steps: int = 100,
                 loss: str = "ce", targeted: bool = False, n_targets: int = 9, rho: float = 0.75,
                 momentum: float = 0.75, random_start: bool = True, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; accepted: {', '.join(LOSSES)}")
        if n_targets < 1:
            raise ValueError(f"n_targets={n_targets} must be >= 1")
        self.steps, self.loss, self.targeted, self.n_targets = steps, loss, targeted, n_targets
        self.rho, self.momentum, self.random_start_ = rho, momentum, random_start

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.targeted:
            return self._run(x, y, LOSSES[self.loss]).x
        ranked = self.predict(x).sort(dim=1, descending=True).indices
        out: Scored | None = None
        for k in range(1, min(self.n_targets, ranked.shape[1] - 1) + 1):
            idx = torch.arange(len(x), device=x.device) if out is None else (out.accuracy > 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            target = ranked[idx, k]
            # the top class of a misclassified image is not y: never target y itself
            target = torch.where(target == y[idx], ranked[idx, 0], target)
            run = self._run(x[idx], y[idx], targeted_dlr(target))
            if out is None:
                out = run
            else:
                out.put(idx, self.select_by_fresh_draws([out.take(idx), run], y[idx]))
        assert out is not None  # the first pass runs: n_targets >= 1, x is not empty (see `Attack.__call__`)
        return out.x

    def _run(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> Scored:
        """One APGD run; returns its chosen images scored on fresh draws."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        eta = torch.full((len(x),), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        x_adv = self.project(self.random_start(x), x) if self.random_start_ else x.clone()
        loss, grad, logits = self.loss_and_grad(x_adv, y, loss_fn)
        x_best, grad_best, best = x_adv.clone(), grad.clone(), loss.clone()
        fooled = logits.argmax(1) != y
        x_fooled = x_adv.clone()
        x_prev, prev_loss = x_adv.clone(), loss
        raised = torch.zeros(len(x), device=x.device)
        best_at_check, reduced_at_check = best.clone(), torch.zeros_like(fooled)
        marks, last_mark = set(checkpoints(self.steps)), 0
        for k in range(self.steps):
            z = self.project(x_adv + self.step(grad, eta.view(shape)), x)
            a = 1.0 if k == 0 else self.momentum
            x_new = self.project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x)
            x_prev, x_adv = x_adv, x_new
            loss, grad, logits = self.loss_and_grad(x_adv, y, loss_fn)
            now = logits.argmax(1) != y
            x_fooled[now], fooled = x_adv[now], fooled | now
            raised += (loss > prev_loss).to(raised.dtype)
            prev_loss = loss
            better = loss > best
            x_best[better], grad_best[better], best = x_adv[better], grad[better], torch.maximum(best, loss)
            if k + 1 in marks:
                few_raises = raised <= self.rho * (k + 1 - last_mark)
                stalled = ~reduced_at_check & (best <= best_at_check)
                reduce = few_raises | stalled
                eta = torch.where(reduce, eta / 2, eta)
                # restart the halved images from their best point, without momentum
                x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
                x_prev[reduce] = x_best[reduce]
                raised.zero_()
                best_at_check, reduced_at_check, last_mark = best.clone(), reduce, k + 1
        latest = torch.where(fooled.view(shape), x_fooled, x_adv)
        return self.select_by_fresh_draws([x_best, latest], y)

    def settings(self) -> dict[str, float | int | str]:
        out = {**super().settings(), "steps": self.steps, "loss": "dlr_targeted" if self.targeted else self.loss,
               "rho": self.rho, "momentum": self.momentum, "random_start": int(self.random_start_)}
        if self.targeted:
            out["n_targets"] = self.n_targets
        return out

