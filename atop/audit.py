"""Gradient-masking audit: does a robust accuracy come from robustness or from a broken gradient?

A defense whose gradient is zero, shattered or very noisy looks robust to gradient attacks without
being robust (Athalye, Carlini & Wagner, ICML 2018; Carlini et al., "On evaluating adversarial
robustness", 2019). The audit measures the tell-tale signs and raises a flag for each:

| flag | raised when (acc = robust accuracy, tol = `tol` + 1/n) |
|---|---|
| `acc_rises_with_eps` | acc at a larger eps exceeds acc at a smaller eps by more than tol |
| `not_zero_at_large_eps` | acc at the largest eps of the sweep (8x the eval eps) is above `zero_acc` |
| `steps_not_converged` | doubling the steps lowers acc by more than tol (the number is optimistic) |
| `weaker_with_more_steps` | doubling the steps raises acc by more than tol (noisy or broken gradient) |
| `eot_not_converged` | doubling the EOT samples lowers acc by more than tol |
| `weaker_with_more_eot` | doubling the EOT samples raises acc by more than tol |
| `blackbox_stronger` | Square (no gradients) beats the worst full-gradient attack by more than tol |
| `bpda_stronger` | BPDA (identity backward through the purifier) beats full-gradient PGD by more than tol |

`audit_flags` is a pure function of measured accuracies (unit-testable with made-up numbers);
`run_audit` measures them on a model, reusing whatever `atop.evaluate` already measured.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from atop.config import Config, Norm
from atop.data import Split

#: eps multipliers of the sweep; the last one is the "large eps" where accuracy must be about 0
EPS_MULTIPLIERS = (1, 2, 4, 8)
TOL, ZERO_ACC = 0.05, 0.1
FLAGS = ("acc_rises_with_eps", "not_zero_at_large_eps", "steps_not_converged", "weaker_with_more_steps",
         "eot_not_converged", "weaker_with_more_eot", "blackbox_stronger", "bpda_stronger")


def audit_flags(m: Mapping[str, Any], *, n: int, tol: float = TOL, zero_acc: float = ZERO_ACC
                ) -> dict[str, bool | None]:
    """Gradient-masking flags from measured robust accuracies (fractions in [0,1]).

    Args:
        m: any of these keys (a missing key leaves its flags None = not measured):
            `eps_acc`: accuracies of the reference attack at increasing eps (the sweep);
            `acc`, `acc_2x_steps`, `acc_2x_eot`: the reference attack as run, with twice the steps,
            with twice the EOT samples; `whitebox_acc`: worst case over full-gradient attacks;
            `blackbox_acc`: Square; `pgd_acc`, `bpda_acc`: l-inf PGD with full and BPDA gradients.
        n: images measured; one image of slack (1/n) is added to `tol`.
        tol: how much worse or better an accuracy may be before it counts (default 0.05).
        zero_acc: the most accuracy "about 0" allows at the largest eps (default 0.1).

    Returns:
        {flag: True (suspicious) / False (passed) / None (not measured)} for every name in `FLAGS`,
        plus `gradient_masking_suspected`: True when any flag is True.
    """
    slack = tol + 1.0 / max(n, 1)
    flags: dict[str, bool | None] = dict.fromkeys(FLAGS)
    sweep = m.get("eps_acc")
    if sweep:
        flags["acc_rises_with_eps"] = bool(any(b > a + slack for a, b in itertools.pairwise(sweep)))
        flags["not_zero_at_large_eps"] = bool(sweep[-1] > zero_acc)
    for more in ("steps", "eot"):
        if m.get("acc") is not None and m.get(f"acc_2x_{more}") is not None:
            flags[f"{more}_not_converged"] = bool(m[f"acc_2x_{more}"] < m["acc"] - slack)
            flags[f"weaker_with_more_{more}"] = bool(m[f"acc_2x_{more}"] > m["acc"] + slack)
    if m.get("blackbox_acc") is not None and m.get("whitebox_acc") is not None:
        flags["blackbox_stronger"] = bool(m["blackbox_acc"] < m["whitebox_acc"] - slack)
    if m.get("bpda_acc") is not None and m.get("pgd_acc") is not None:
        flags["bpda_stronger"] = bool(m["bpda_acc"] < m["pgd_acc"] - slack)
    flags["gradient_masking_suspected"] = any(v is True for v in flags.values())
    return flags


@dataclass
class AuditReport:
    flags: dict[str, bool | None]
    measurements: dict[str, Any]  # the inputs of `audit_flags`, plus the eps of the sweep
    tolerance: dict[str, float]
    #: extra in-threat-model runs: name -> (R, N) bool correctness; they count for the worst case
    runs: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"flags": self.flags, "gradient_masking_suspected": self.flags["gradient_masking_suspected"],
                "measurements": self.measurements, "tolerance": self.tolerance}


def run_audit(model: nn.Module, data: Split, cfg: Config, *, steps: int, eot: int, queries: int,
              measured: Mapping[str, np.ndarray] | None = None, repeats: int = 1,
              batch_size: int | None = None, device: str | torch.device = "cpu",
              tol: float = TOL, zero_acc: float = ZERO_ACC) -> AuditReport:
    """Measure what `audit_flags` needs on `model` and return the flags.

    The reference attack is PGD in the training norm (the seen attack) at the config's eval eps.
    Runs it at 1x (unless `measured` has it), 2x, 4x and 8x eps, with 2x steps and with 2x EOT;
    l-inf PGD with BPDA gradients; Square (l-inf) with `queries`.

    Args:
        model: the defense (or any model on [0,1] images); `.reseed(seed)` is used where present.
        data: the images; cfg: seed, training norm, eval eps; steps, eot, queries: the level's budget.
        measured: attack name -> (R, N) bool correctness already measured by `atop.evaluate`.
        repeats: classification draws per attacked image (mean over them is used).
    """
    from atop.attacks import ATTACKS, BLACK_BOX
    from atop.evaluate import attack_eps, measure, seen_attack

    measured = dict(measured or {})
    reference = seen_attack(cfg)
    eps = attack_eps(cfg, reference)
    opts = {"repeats": repeats, "batch_size": batch_size or cfg.batch_size, "device": device, "seed": cfg.seed}
    runs: dict[str, np.ndarray] = {}
    settings: dict[str, dict[str, Any]] = {}

    def run(name: str, attack_name: str, eps_: float, **budget: int) -> np.ndarray:
        attack = ATTACKS[attack_name].build(model, eps=eps_, seed=cfg.seed, **ATTACKS[attack_name].budget(**budget))
        settings[name] = attack.settings()
        return measure(model, data, attack, **opts)

    base = {"steps": steps, "eot": eot, "queries": queries}
    if reference not in measured:
        measured[reference] = runs[reference] = run(reference, reference, eps, **base)
    sweep = [float(measured[reference].mean())]
    for k in EPS_MULTIPLIERS[1:]:
        sweep.append(float(run(f"{reference}@{k}x_eps", reference, k * eps, **base).mean()))
    runs[f"{reference}_2x_steps"] = run(f"{reference}_2x_steps", reference, eps, **{**base, "steps": 2 * steps})
    runs[f"{reference}_2x_eot"] = run(f"{reference}_2x_eot", reference, eps, **{**base, "eot": 2 * eot})
    for name in ("pgd_linf", "bpda_linf", *BLACK_BOX):
        if name not in measured:
            measured[name] = runs[name] = run(name, name, cfg.eval_eps_linf, **base)
    # full-gradient l-inf attacks, the ones Square (l-inf, no gradient) must not beat
    white = [v for k, v in {**measured, **runs}.items() if _base(k) in ATTACKS and k not in BLACK_BOX
             and ATTACKS[_base(k)].norm is Norm.LINF and not _base(k).startswith("bpda")]
    m = {"eps": [k * eps for k in EPS_MULTIPLIERS], "eps_acc": sweep, "acc": sweep[0],
         "acc_2x_steps": float(runs[f"{reference}_2x_steps"].mean()),
         "acc_2x_eot": float(runs[f"{reference}_2x_eot"].mean()),
         "whitebox_acc": float(np.logical_and.reduce(white).mean()),
         "blackbox_acc": float(np.logical_and.reduce([measured[b] for b in BLACK_BOX]).mean()),
         "pgd_acc": float(measured["pgd_linf"].mean()), "bpda_acc": float(measured["bpda_linf"].mean()),
         "reference_attack": reference}
    flags = audit_flags(m, n=len(data), tol=tol, zero_acc=zero_acc)
    return AuditReport(flags, m, {"tol": tol, "slack_per_image": 1.0 / len(data), "zero_acc": zero_acc}, runs,
                       {k: v for k, v in settings.items() if k in runs})


def _base(name: str) -> str:
    """The registry name under an audit run's name (`pgd_linf_2x_steps` -> `pgd_linf`)."""
    for suffix in ("_2x_steps", "_2x_eot"):
        name = name.removesuffix(suffix)
    return name.split("@")[0]
