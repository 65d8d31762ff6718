"""The attack base class: `Attack(model, eps=..., norm=...)(x, y) -> x_adv`.

Subclasses implement a short `perturb(x, y)`. The base class owns what every attack must get right:
inputs checked to be in [0,1], the result projected into the eps-ball and [0,1], gradients taken
with respect to the input only (model parameters never accumulate `.grad`), and EOT: the loss
gradient of a stochastic model averaged over `eot` random draws, batched into one forward pass on a
GPU and looped over on a CPU by default (`eot_batched` forces either); and the one rule by which an attack
decides, on a random model, which of its candidate images to keep: `select_by_fresh_draws`.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

import torch
from torch import nn

from atop.attacks.losses import cross_entropy, margin
from atop.threat import Norm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> per-example loss

#: fresh draws of the model that decide, per image, which candidate an attack keeps (`Attack.draws`)
DRAWS = 10


@runtime_checkable
class Seedable(Protocol):
    """A random model whose stream can be restarted and read (as `atop.defense.Defense`)."""

    seed: int

    def reseed(self, seed: int) -> None: ...

    def generator(self, device: torch.device) -> torch.Generator: ...


class AttackOptions(TypedDict):
    """The base-class arguments an ensemble hands on to each of its component attacks."""

    eps: float
    norm: Norm
    eot: int
    eot_batched: bool | None
    draws: int


@dataclass
class Scored:
    """Images (N, C, H, W) with their scores on an attack's fresh draws of the model.

    `accuracy` (N,): fraction of the draws that classify each image correctly; `margin` (N,):
    z_y - max_{i != y} z_i of the logits averaged over the draws (as `Attack.predict` averages them).
    """

    x: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor

    def take(self, idx: torch.Tensor) -> Scored:
        return Scored(self.x[idx], self.accuracy[idx], self.margin[idx])

    def put(self, idx: torch.Tensor, other: Scored) -> None:
        self.x[idx], self.accuracy[idx], self.margin[idx] = other.x, other.accuracy, other.margin


class Attack:
    """Base class of all attacks on a model taking images in [0,1].

    Args:
        model: maps images (N,C,H,W) in [0,1] to logits; may be random (then use `eot` > 1).
        eps: radius of the threat model, on the [0,1] pixel scale (l-inf) or as an l2 norm.
        norm: `Norm.LINF` or `Norm.L2`.
        eot: random draws of the model averaged per gradient (Expectation over Transformation).
        eot_batched: draw all EOT samples in one forward pass or loop over them; None (default):
            batched for inputs on CUDA, looped on a CPU. On a CPU the loop was as fast or faster and
            held less: smoke-size evaluation (EOT 2, batch 64) 11-15 s per epoch against 13-15 s, its
            peak ~180 MB lower, the same figures (docs/PERFORMANCE.md); GPUs keep the one large batch.
        seed: seeds the attack's own randomness (random starts, random search).
        draws: fresh draws of the model that decide which candidate image an attack keeps (default
            10; see `select_by_fresh_draws`); each decision costs `draws` forward passes per image.

    `BUDGET` names the cost arguments an evaluation level sets on this class (`steps`, `queries`).
    """

    BUDGET: tuple[str, ...] = ("steps",)

    def __init__(self, model: nn.Module, *, eps: float, norm: Norm | str = Norm.LINF, eot: int = 1,
                 eot_batched: bool | None = None, seed: int = 0, draws: int = DRAWS):
        if eps < 0:
            raise ValueError(f"eps={eps} is negative; accepted: eps >= 0")
        if eot < 1:
            raise ValueError(f"eot={eot} must be >= 1")
        if not 1 <= draws <= 1 << 16:
            raise ValueError(f"draws={draws} is out of range; accepted: 1..65536")
        self.model, self.eps, self.norm, self.eot, self.eot_batched = model, eps, Norm(norm), eot, eot_batched
        self.seed, self.draws = seed, draws
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
        return {"attack": type(self).__name__, "eps": self.eps, "norm": self.norm.value, "eot": self.eot,
                "draws": self.draws}

    # --- helpers for subclasses -------------------------------------------------------------

    def _batched(self, x: torch.Tensor) -> bool:
        """Whether this call draws its EOT samples in one forward pass (see `eot_batched`)."""
        return self.eot_batched if self.eot_batched is not None else x.device.type == "cuda"

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over `eot` draws of the model, without gradients (black-box queries)."""
        if self._batched(x):
            return self.model(x.repeat(self.eot, *([1] * (x.dim() - 1)))).view(self.eot, len(x), -1).mean(0)
        return torch.stack([self.model(x) for _ in range(self.eot)]).mean(0)

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = cross_entropy
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss and its input gradient, both averaged over `eot` draws, and the mean logits."""
        x = x.detach().requires_grad_(True)
        if self._batched(x):
            logits = self.model(x.repeat(self.eot, *([1] * (x.dim() - 1))))
            losses = loss_fn(logits, y.repeat(self.eot)).view(self.eot, -1).mean(0)
            grad, = torch.autograd.grad(losses.sum(), x)
            return losses.detach(), grad, logits.detach().view(self.eot, *y.shape, -1).mean(0)
        # 0-d zeros broadcast to the loss's and the logits' shapes on the first addition
        total_loss, total_logits = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
        total_grad = torch.zeros_like(x)
        for _ in range(self.eot):
            logits = self.model(x)
            losses = loss_fn(logits, y)
            total_grad += torch.autograd.grad(losses.sum(), x)[0]
            total_loss, total_logits = total_loss + losses.detach(), total_logits + logits.detach()
        return total_loss / self.eot, total_grad / self.eot, total_logits / self.eot

    @torch.no_grad()
    def fresh_scores(self, x: torch.Tensor, y: torch.Tensor) -> Scored:
        """Score `x` on `draws` fresh draws of the model: draws the gradients never used.

        A model with a seedable stream (`reseed(seed)`, `generator(device)` and `seed`, as
        `atop.defense.Defense`) is reseeded to this attack's own selection seeds for draw m, and its
        stream is put back afterwards, so the attack's EOT draws continue untouched. The selection
        seeds are the same on every call (every candidate faces the same draws: paired comparisons)
        and lie above 2**48, away from the small seeds `atop.evaluate` scores with. Any other model
        is simply called `draws` more times. A model whose first two draws are identical is
        deterministic here: one draw decides (saves `draws - 1` forward passes on plain classifiers).
        """
        stream = self.model if isinstance(self.model, Seedable) else None
        if stream is not None:
            saved_seed, saved_state = stream.seed, stream.generator(x.device).get_state()
        # the settings name the attack (and its seed): two attacks of one evaluation get their own draws
        base = ((1 << 32) + zlib.crc32(repr((self.seed, sorted(self.settings().items()))).encode())) << 16
        # 0-d zeros broadcast to (N,) and (N, classes) on the first addition
        correct, total = torch.zeros((), device=x.device, dtype=x.dtype), torch.zeros((), device=x.device)
        first: torch.Tensor | None = None
        n = 0
        try:
            for m in range(self.draws):
                if stream is not None:
                    stream.reseed(base + m)
                logits = self.model(x)
                if m == 1 and first is not None and torch.equal(logits, first):
                    break
                first = logits if m == 0 else None
                correct = correct + (logits.argmax(1) == y).to(x.dtype)
                total, n = total + logits, n + 1
        finally:
            if stream is not None:
                stream.reseed(saved_seed)
                stream.generator(x.device).set_state(saved_state)
        return Scored(x.clone(), correct / n, margin(total / n, y))

    def select_by_fresh_draws(self, candidates: Sequence[torch.Tensor | Scored], y: torch.Tensor) -> Scored:
        """Per image, the candidate with the lowest accuracy over this attack's fresh draws.

        The rule: score every candidate (images of the same shape as the input) with
        `fresh_scores` (already `Scored` ones keep their scores: pass them to merge without
        re-scoring), then keep per image the candidate misclassified by the most fresh draws; ties
        go to the lowest mean margin, then to the earliest candidate. A random defense's decision
        on the draws an attack optimised with is biased towards "fooled" (it chose the point that
        fooled those draws); fresh draws are not. Costs `draws` forward passes per new candidate.

        Returns:
            The chosen images with their scores.
        """
        scored = [c if isinstance(c, Scored) else self.fresh_scores(c, y) for c in candidates]
        accuracy = torch.stack([s.accuracy for s in scored])
        lowest = accuracy.min(dim=0).values
        margins = torch.stack([s.margin for s in scored]).masked_fill(accuracy > lowest, float("inf"))
        pick, rows = margins.argmin(dim=0), torch.arange(len(y), device=y.device)
        return Scored(torch.stack([s.x for s in scored])[pick, rows], lowest, margins[pick, rows])

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clip into the eps-ball around `x`, then into [0,1]."""
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * (self.eps / norms).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def step(self, grad: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
        """Steepest-ascent step of the norm: sign for l-inf, normalised gradient for l2 (`step_size`
        a number, or per image, shaped to broadcast over `grad`)."""
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
