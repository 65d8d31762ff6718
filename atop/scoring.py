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
from atop.data import Split, to_float


def seen_attack(cfg: Config) -> str:
    """The registry name of the seen attack: PGD in the training attack's norm."""
    return f"pgd_{cfg.train_norm.value}"


def attack_eps(cfg: Config, name: str) -> float:
    """The config's evaluation eps in the norm of attack `name`."""
    return cfg.eval_eps_linf if ATTACKS[name].norm is Norm.LINF else cfg.eval_eps_l2


def _reseed(model: nn.Module, seed: int) -> None:
    if isinstance(model, Seedable):
        model.reseed(seed)


#: called with each attacked batch's row numbers in `data` and its attacked images (`measure`'s `on_attacked`)
OnAttacked = Callable[[torch.Tensor, torch.Tensor], None]


def measure(model: nn.Module, data: Split, attack: Attack | None, *, clean: np.ndarray | None = None,
            repeats: int = 1, seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
            on_batch: Callable[[], None] | None = None, on_attacked: OnAttacked | None = None) -> np.ndarray:
    """Attack every image once, then classify each attacked image with `repeats` fresh model draws.

    The model's randomness is reseeded (where it has `.reseed`) to `seed` for the attack and to
    `seed + 1 + r` for draw r, so every attack (and the clean images, `attack=None`) is judged by
    the same draws: differences between attacks are paired, not draw noise.

    Args:
        clean: the (repeats, N) result of `measure(..., attack=None)` with the same seed (or any
            (repeats, N) gate). Given, a draw counts as robust only if that same draw also classified
            the clean image correctly (`clean[r] & attacked[r]`), as reference AutoAttack counts
            robust accuracy; an image that no draw of `clean` got right is therefore not attacked,
            its answer being False on every draw whatever the attack does (`attacked_count`).
        on_batch: called after each batch is attacked (progress of long attacks).
        on_attacked: called with each attacked batch's row numbers and attacked images (e.g. to keep
            the very images that were scored, `atop.evaluate`'s examples).

    Returns:
        Bool array (repeats, N): whether draw r classified (attacked) image i correctly.
    """
    if clean is not None and clean.shape != (repeats, len(data)):
        raise ValueError(f"clean correctness has shape {clean.shape}, expected {(repeats, len(data))}")
    _reseed(model, seed)
    images, labels = to_float(data.x).to(device), data.y.to(device)
    if attack is not None:
        alive = None if clean is None else np.asarray(clean.any(axis=0))
        images = _attacked(images, labels, attack, alive=alive, batch_size=batch_size, on_batch=on_batch,
                           on_attacked=on_attacked)
    batches = list(zip(images.split(batch_size), labels.split(batch_size)))
    out = np.zeros((repeats, len(data)), dtype=bool)
    for r in range(repeats):
        # every draw classifies the images in the same batches as the clean draw, so image i meets the
        # same randomness of the defense in draw r of every attack
        _reseed(model, seed + 1 + r)
        start = 0
        with torch.no_grad():
            for x_in, y in batches:
                out[r, start:start + len(y)] = (model(x_in).argmax(dim=1) == y).cpu().numpy()
                start += len(y)
    if clean is not None:
        out &= clean
    return out


def attacked_count(data: Split, clean: np.ndarray | None) -> int:
    """How many of `data`'s images `measure` attacks under the gate `clean` (None: all of them)."""
    return len(data) if clean is None else int(clean.any(axis=0).sum())


def _attacked(images: torch.Tensor, labels: torch.Tensor, attack: Attack, *, alive: np.ndarray | None,
              batch_size: int, on_batch: Callable[[], None] | None, on_attacked: OnAttacked | None) -> torch.Tensor:
    """`images` (float; changed in place) with those marked `alive` (None: all) replaced by their
    attacked version; the attack sees the alive images only, in batches of `batch_size`. `labels`:
    all the images' labels, on `images`' device."""
    rows = torch.arange(len(images)) if alive is None else torch.from_numpy(np.flatnonzero(alive))
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size].to(images.device)
        images[idx] = attack(images[idx], labels[idx])
        if on_attacked is not None:
            on_attacked(idx, images[idx])
        if on_batch is not None:
            on_batch()
    return images


def measure_attack(model: nn.Module, data: Split, attack: Attack, *, clean: np.ndarray, repeats: int = 1,
                   seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                   on_batch: Callable[[], None] | None = None, on_attacked: OnAttacked | None = None) -> np.ndarray:
    """`measure`, except that an ensemble (`AutoAttack`) is scored as the per-image, per-draw worst case
    of its components: each output is classified by the same fresh draws, and a draw counts as robust
    only if the image survives every component on it. The ensemble's figure is therefore never above
    any component's, and equals their per-draw AND. Each component is gated by the AND so far (the
    images that some draw still classifies correctly): an image every draw already misclassifies is
    not attacked again, as it would count as not robust whatever a later component did.

    Returns:
        Bool array (repeats, N), gated by `clean` as in `measure`.
    """
    def score(part: Attack, gate: np.ndarray) -> np.ndarray:
        return measure(model, data, part, clean=gate, repeats=repeats, seed=seed, batch_size=batch_size,
                       device=device, on_batch=on_batch, on_attacked=on_attacked)

    if isinstance(attack, AutoAttack):
        standing = clean
        for part in attack.attacks:
            standing = score(part, standing)
        return standing
    return score(attack, clean)


def attack_batches(attack: Attack, n_images: int, batch_size: int) -> int:
    """How many batches `measure_attack` attacks at most, given `n_images` to attack (an ensemble
    attacks once per component, each later component only the images the earlier ones left standing)."""
    parts = len(attack.attacks) if isinstance(attack, AutoAttack) else 1
    return parts * -(-n_images // batch_size)
