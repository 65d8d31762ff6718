"""Robustness evaluation of the whole stochastic defense.

Every attack differentiates the whole defense (RT + purifier + classifier) and averages its gradient
over EOT draws of the random transform; the attacked image is then classified by one fresh draw of
the defense, as a deployed defense would. Objectives (fractions in [0,1]):
- `clean_acc`: accuracy on the clean images through the defense;
- `robust_acc_seen`: PGD in the training attack's norm (the strongest member of the FGSM/PGD family
  it was trained on) at the evaluation eps;
- `robust_acc_unseen`: per image, correct under every attack of `cfg.unseen_attacks` (worst case).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from atop.attacks import ATTACKS
from atop.config import Config, EvalLevel, Norm
from atop.data import Split

#: attack strength per level: `screen` is cheap enough to run inside every trial's epochs
LEVELS: dict[EvalLevel, dict[str, int]] = {
    EvalLevel.SCREEN: {"steps": 10, "eot": 2},
    EvalLevel.FULL: {"steps": 100, "eot": 20},
}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # clean_acc, robust_acc_seen, robust_acc_unseen, robust_acc/<attack>
    settings: dict[str, dict[str, Any]]  # attack name -> its settings (eps, norm, steps, eot, ...)
    per_example: dict[str, np.ndarray] = field(default_factory=dict)  # index, label, <name>_correct


def seen_attack(cfg: Config) -> str:
    return f"pgd_{cfg.train_norm.value}"


def attack_eps(cfg: Config, name: str) -> float:
    return cfg.eval_eps_linf if ATTACKS[name].norm is Norm.LINF else cfg.eval_eps_l2


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def evaluate(defense: nn.Module, data: Split, cfg: Config, *, level: EvalLevel | str | None = None,
             device: str | torch.device = "cpu", batch_size: int | None = None) -> EvalResult:
    """Clean, seen and unseen robust accuracy of `defense` on `data` (all of it, in order).

    Args:
        defense: the whole defense (`atop.defense.Defense`), called on images in [0,1].
        data: evaluation images; callers pass the first `cfg.n_eval` test images.
        cfg: names the training norm (seen attack), the unseen suite and the eval eps.
        level: `screen` or `full` (attack steps and EOT samples, see `LEVELS`); default `cfg.eval_level`.
    """
    level = EvalLevel(level or cfg.eval_level)
    strength = LEVELS[level]
    if hasattr(defense, "reseed"):
        defense.reseed(cfg.seed)  # the same random transforms for every trial's evaluation
    names = [seen_attack(cfg)] + [n for n in cfg.unseen_attack_names if n != seen_attack(cfg)]
    attacks = {n: ATTACKS[n].build(defense, eps=attack_eps(cfg, n), seed=cfg.seed, **strength) for n in names}
    correct: dict[str, list[torch.Tensor]] = {"clean": [], **{n: [] for n in names}}
    for x, y in data.batches(batch_size or cfg.batch_size, device=device):
        correct["clean"].append(_correct(defense, x, y).cpu())
        for name, attack in attacks.items():
            correct[name].append(_correct(defense, attack(x, y), y).cpu())
    per = {name: torch.cat(values).numpy() for name, values in correct.items()}
    unseen = np.logical_and.reduce([per[n] for n in cfg.unseen_attack_names])
    metrics = {"clean_acc": float(per["clean"].mean()), "robust_acc_seen": float(per[seen_attack(cfg)].mean()),
               "robust_acc_unseen": float(unseen.mean()),
               **{f"robust_acc/{n}": float(per[n].mean()) for n in names}}
    per_example = {"index": np.arange(len(data)), "label": data.y.numpy(),
                   **{f"{n}_correct": v for n, v in per.items()}, "unseen_correct": unseen}
    settings = {n: {**a.settings(), "level": level.value} for n, a in attacks.items()}
    return EvalResult(metrics, settings, per_example)
