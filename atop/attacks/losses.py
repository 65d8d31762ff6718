"""Per-example attack losses on logits: cross-entropy, CW margin, DLR and targeted DLR.

All take (logits (N, K), labels (N,)) and return a per-example loss (N,) that an attack *maximises*
(the CW margin is the exception: `margin` is what the CW attack minimises; see `atop.attacks.cw`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i: negative exactly when the image is misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return true - other


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020), untargeted, to maximise.

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), pi the classes sorted by decreasing logit: invariant
    to shifting and rescaling the logits, so a classifier cannot hide behind large or flat logits.
    """
    ordered = logits.sort(dim=1, descending=True).values
    return -margin(logits, y) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def targeted_dlr(target: torch.Tensor):
    """The targeted DLR loss towards class `target` (N,), to maximise (needs >= 4 classes).

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    """
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ordered = logits.sort(dim=1, descending=True).values
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        # EOT stacks `eot` copies of the batch: tile the targets the same way
        t = target.repeat(len(y) // len(target))
        z_t = logits.gather(1, t[:, None]).squeeze(1)
        return -(z_y - z_t) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)

    return loss
