"""The threat-model vocabulary shared by `atop.config` and `atop.attacks`: the norm and PGD's
default step size. A leaf module (it imports nothing from `atop`), so both can import it at the top."""
from __future__ import annotations

import enum


class Norm(str, enum.Enum):
    LINF = "linf"
    L2 = "l2"


def pgd_step_size(eps: float, steps: int) -> float:
    """PGD's default step size, 2.5 * eps / steps (Madry et al., ICLR 2018): enough steps reach the
    boundary of the eps-ball from anywhere inside it, with room to move along it."""
    return 2.5 * eps / steps
