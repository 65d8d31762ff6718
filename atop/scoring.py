"""Scoring an attack on a random defense: fresh draws, paired across attacks, gated by the clean draw.

Shared by `atop.evaluate` (the figures) and `atop.audit` (the gradient-masking checks), which both
import it at the top.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from atop.attacks import ATTACKS, Attack, AutoAttack, Seedable
from atop.config import Config, Norm
from atop.data import Split


def seen_attack(cfg: Config) -> str:
    """The registry name of the seen attack: PGD in the training attack's norm."""
    return f"pgd_{cfg.train_norm.value}"


def attack_eps(cfg: Config, name: str) -> float:
    """The config's evaluation eps in the norm of attack `name`."""
    return cfg.eval_eps_linf if ATTACKS[name].norm is Norm.LINF else cfg.eval_eps_l2


def _reseed(model: nn.Module, seed: int) -> None:
    if isinstance(model, Seedable):
        model.reseed(seed)


def measure(model: nn.Module, data: Split, attack: Attack | None, *, clean: np.ndarray | None = None,
            repeats: int = 1, seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
            on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """Attack every image once, then classify each attacked image with `repeats` fresh model draws.

    The model's randomness is reseeded (where it has `.reseed`) to `seed` for the attack and to
    `seed + 1 + r` for draw r, so every attack (and the clean images, `attack=None`) is judged by
    the same draws: differences between attacks are paired, not draw noise.

    Args:
        clean: the (repeats, N) result of `measure(..., attack=None)` with the same seed. Given, a
            draw counts as robust only if that same draw also classified the clean image correctly
            (`clean[r] & attacked[r]`), as reference AutoAttack counts robust accuracy.
        on_batch: called after each batch is attacked (progress of long attacks).

    Returns:
        Bool array (repeats, N): whether draw r classified (attacked) image i correctly.
    """
    _reseed(model, seed)
    batches = list(data.batches(batch_size, device=device))
    attacked = []
    for x, y in batches:
        attacked.append(x if attack is None else attack(x, y))
        if on_batch is not None:
            on_batch()
    out = np.zeros((repeats, len(data)), dtype=bool)
    for r in range(repeats):
        _reseed(model, seed + 1 + r)
        start = 0
        with torch.no_grad():
            for x_adv, (_, y) in zip(attacked, batches):
                out[r, start:start + len(y)] = (model(x_adv).argmax(dim=1) == y).cpu().numpy()
                start += len(y)
    if clean is not None:
        if clean.shape != out.shape:
            raise ValueError(f"clean correctness has shape {clean.shape}, expected {out.shape}")
        out &= clean
    return out


def measure_attack(model: nn.Module, data: Split, attack: Attack, *, clean: np.ndarray, repeats: int = 1,
                   seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                   on_batch: Callable[[], None] | None = None) -> np.ndarray:
    """`measure`, except that an ensemble (`AutoAttack`) is scored as the per-image, per-draw worst case
    of its components: each component attacks every image, each output is classified by the same
    fresh draws, and a draw counts as robust only if the image survives every component on it. The
    ensemble's figure is therefore never above any component's, and equals their per-draw AND.

    Returns:
        Bool array (repeats, N), gated by `clean` as in `measure`.
    """
    def score(part: Attack) -> np.ndarray:
        return measure(model, data, part, clean=clean, repeats=repeats, seed=seed, batch_size=batch_size,
                       device=device, on_batch=on_batch)

    if isinstance(attack, AutoAttack):
        return np.logical_and.reduce([score(part) for part in attack.attacks])
    return score(attack)


def attack_batches(attack: Attack, data: Split, batch_size: int) -> int:
    """How many batches `measure_attack` attacks (an ensemble attacks every batch once per component)."""
    parts = len(attack.attacks) if isinstance(attack, AutoAttack) else 1
    return parts * -(-len(data) // batch_size)
