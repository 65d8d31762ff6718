"""Gradient-masking audit: does a robust accuracy come from robustness or from a broken gradient?

A defense whose gradient is zero, shattered or very noisy looks robust to gradient attacks without
being robust (Athalye, Carlini & Wagner, ICML 2018; Carlini et al., "On evaluating adversarial
robustness", 2019). The audit measures the tell-tale signs and raises a flag for each. Each sign is
a paired difference between two runs on the same images and the same classification draws
(robust accuracy of one minus the other); a flag is raised only when the difference's 95% interval
(`atop.stats.bootstrap`, paired, over images and draws) lies wholly on the suspicious side of 0, so
the tolerance follows the measured spread (wide on 64 images, narrow on 5000) instead of a fixed
margin:

| flag | raised when (difference: its whole 95% interval) |
|---|---|
| `acc_rises_with_eps` | acc at 2x eps minus acc at 1x eps (or 4x - 2x, 8x - 4x) is above 0 |
| `not_zero_at_large_eps` | acc at the largest eps of the sweep (8x the eval eps) is above `zero_acc` |
| `steps_not_converged` | acc with 2x steps minus acc is below 0 (the number is optimistic) |
| `weaker_with_more_steps` | acc with 2x steps minus acc is above 0 (noisy or broken gradient) |
| `eot_not_converged` | acc with 2x EOT samples minus acc is below 0 |
| `weaker_with_more_eot` | acc with 2x EOT samples minus acc is above 0 |
| `blackbox_stronger` | Square (no gradients) minus the worst case of the full-gradient attacks is below 0 |
| `bpda_stronger` | BPDA (identity backward through the purifier) minus full-gradient PGD is below 0 |

`paired_differences` (per-image arrays -> differences with intervals) and `audit_flags`
(differences -> flags) are pure functions, unit-testable with made-up numbers; `run_audit`
measures the arrays on a model, reusing whatever `atop.evaluate` already measured.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from atop.attacks import ATTACKS, BLACK_BOX
from atop.config import Config, Norm
from atop.data import Split
from atop.scoring import attack_eps, measure, seen_attack
from atop.stats import bootstrap

#: eps multipliers of the sweep; the last one is the "large eps" where accuracy must be about 0
EPS_MULTIPLIERS = (1, 2, 4, 8)
ZERO_ACC = 0.1
#: bootstrap resamples behind each difference's interval
N_BOOT = 2000
FLAGS = ("acc_rises_with_eps", "not_zero_at_large_eps", "steps_not_converged", "weaker_with_more_steps",
         "eot_not_converged", "weaker_with_more_eot", "blackbox_stronger", "bpda_stronger")
#: paired differences the flags read: name -> (run, minus run), keys of `paired_differences`' input
PAIRS = {"steps_2x_vs_1x": ("more_steps", "reference"), "eot_2x_vs_1x": ("more_eot", "reference"),
         "blackbox_vs_whitebox": ("blackbox", "whitebox"), "bpda_vs_pgd": ("bpda", "pgd")}


class Difference(NamedTuple):
    """Robust accuracy of one run minus another's on the same images and draws, with its 95% interval."""

    diff: float
    lo: float
    hi: float


def paired_differences(correct: Mapping[str, Any], *, seed: int = 0, n_boot: int = N_BOOT
                       ) -> dict[str, Difference]:
    """The differences the flags read, each with a paired 95% bootstrap interval over images and draws.

    Args:
        correct: per-image correctness, each an (N,) or (R, N) bool array over the same images and
            draws; any of: `sweep` (a sequence of arrays at increasing eps, `EPS_MULTIPLIERS`),
            `reference` (the reference attack as run), `more_steps`, `more_eot` (it with twice the
            steps / EOT samples), `whitebox` (correct under every full-gradient l-inf attack),
            `blackbox` (Square), `pgd`, `bpda` (l-inf PGD with full and BPDA gradients).
        seed: seed of the bootstrap (the same arrays and seed give the same intervals).

    Returns:
        {name: Difference}: `eps_<b>x_vs_<a>x` for consecutive sweep points, and the names of
        `PAIRS` whose two runs are both given.
    """
    def compare(a: np.ndarray, b: np.ndarray) -> Difference:
        a, b = np.asarray(a), np.asarray(b)
        return Difference(float(a.mean() - b.mean()), *bootstrap(a, b, n_boot=n_boot, seed=seed))

    out: dict[str, Difference] = {}
    sweep: Sequence[np.ndarray] = correct.get("sweep") or ()
    for (k_a, a), (k_b, b) in itertools.pairwise(zip(EPS_MULTIPLIERS, sweep)):
        out[f"eps_{k_b}x_vs_{k_a}x"] = compare(b, a)
    for name, (run, minus) in PAIRS.items():
        if correct.get(run) is not None and correct.get(minus) is not None:
            out[name] = compare(correct[run], correct[minus])
    return out


def audit_flags(diffs: Mapping[str, Difference], *, large_eps_acc: float | None = None,
                zero_acc: float = ZERO_ACC) -> dict[str, bool | None]:
    """Gradient-masking flags from paired differences of robust accuracy (fractions in [0,1]).

    Args:
        diffs: any of the names `paired_differences` returns (a missing name leaves its flags None
            = not measured); a difference counts only when its whole interval is beyond 0.
        large_eps_acc: robust accuracy at the largest eps of the sweep.
        zero_acc: the most accuracy "about 0" allows at the largest eps (default 0.1).

    Returns:
        {flag: True (suspicious) / False (passed) / None (not measured)} for every name in `FLAGS`,
        plus `gradient_masking_suspected`: True when any flag is True.
    """
    flags: dict[str, bool | None] = dict.fromkeys(FLAGS)
    eps = [d for name, d in diffs.items() if name.startswith("eps_")]
    if eps:
        flags["acc_rises_with_eps"] = any(d.lo > 0 for d in eps)
    if large_eps_acc is not None:
        flags["not_zero_at_large_eps"] = bool(large_eps_acc > zero_acc)
    for more in ("steps", "eot"):
        if (d := diffs.get(f"{more}_2x_vs_1x")) is not None:
            flags[f"{more}_not_converged"] = d.hi < 0
            flags[f"weaker_with_more_{more}"] = d.lo > 0
    if (d := diffs.get("blackbox_vs_whitebox")) is not None:
        flags["blackbox_stronger"] = d.hi < 0
    if (d := diffs.get("bpda_vs_pgd")) is not None:
        flags["bpda_stronger"] = d.hi < 0
    flags["gradient_masking_suspected"] = any(v is True for v in flags.values())
    return flags


@dataclass
class AuditReport:
    flags: dict[str, bool | None]
    measurements: dict[str, Any]  # accuracies behind the flags, the eps of the sweep, the differences
    tolerance: dict[str, Any]  # how a difference is judged (interval, resamples, seed) and zero_acc
    #: extra in-threat-model runs: name -> (R, N) bool correctness; they count for the worst case
    runs: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"flags": self.flags, "gradient_masking_suspected": self.flags["gradient_masking_suspected"],
                "measurements": self.measurements, "tolerance": self.tolerance}


def run_audit(model: nn.Module, data: Split, cfg: Config, *, steps: int, eot: int, queries: int,
              measured: Mapping[str, np.ndarray] | None = None, repeats: int = 1,
              batch_size: int | None = None, device: str | torch.device = "cpu",
              zero_acc: float = ZERO_ACC, on_batch: Callable[[], None] | None = None) -> AuditReport:
    """Measure what `audit_flags` needs on `model` and return the flags.

    The reference attack is PGD in the training norm (the seen attack) at the config's eval eps.
    Runs it at 1x (unless `measured` has it), 2x, 4x and 8x eps, with 2x steps and with 2x EOT;
    l-inf PGD with BPDA gradients; Square (l-inf) with `queries`. Every run counts a draw as robust
    only where the same draw classified the clean image correctly (`atop.scoring.measure`).

    Args:
        model: the defense (or any model on [0,1] images); `.reseed(seed)` is used where present.
        data: the images; cfg: seed, training norm, eval eps; steps, eot, queries: the level's budget.
        measured: name -> (R, N) bool correctness already measured by `atop.evaluate` with the same
            seed and draws: `clean`, and attacks by registry name (already gated by `clean`).
        repeats: classification draws per attacked image.
        on_batch: called after each attacked batch (progress).
    """
    measured = dict(measured or {})
    reference = seen_attack(cfg)
    eps = attack_eps(cfg, reference)
    score = functools.partial(measure, model, data, repeats=repeats, batch_size=batch_size or cfg.batch_size,
                              device=device, seed=cfg.seed, on_batch=on_batch)
    if "clean" not in measured:
        measured["clean"] = score(None)
    runs: dict[str, np.ndarray] = {}
    settings: dict[str, dict[str, Any]] = {}

    def run(name: str, attack_name: str, eps_: float, **budget: int) -> np.ndarray:
        attack = ATTACKS[attack_name].build(model, eps=eps_, seed=cfg.seed, **ATTACKS[attack_name].budget(**budget))
        settings[name] = attack.settings()
        return score(attack, clean=measured["clean"])

    base = {"steps": steps, "eot": eot, "queries": queries}
    if reference not in measured:
        measured[reference] = runs[reference] = run(reference, reference, eps, **base)
    sweep = [measured[reference]] + [run(f"{reference}@{k}x_eps", reference, k * eps, **base)
                                     for k in EPS_MULTIPLIERS[1:]]
    runs[f"{reference}_2x_steps"] = run(f"{reference}_2x_steps", reference, eps, **{**base, "steps": 2 * steps})
    runs[f"{reference}_2x_eot"] = run(f"{reference}_2x_eot", reference, eps, **{**base, "eot": 2 * eot})
    for name in ("pgd_linf", "bpda_linf", *BLACK_BOX):
        if name not in measured:
            measured[name] = runs[name] = run(name, name, cfg.eval_eps_linf, **base)
    # full-gradient l-inf attacks, the ones Square (l-inf, no gradient) must not beat
    white = [v for k, v in {**measured, **runs}.items() if _base(k) in ATTACKS and k not in BLACK_BOX
             and ATTACKS[_base(k)].norm is Norm.LINF and not _base(k).startswith("bpda")]
    correct = {"sweep": sweep, "reference": sweep[0], "more_steps": runs[f"{reference}_2x_steps"],
               "more_eot": runs[f"{reference}_2x_eot"], "whitebox": np.logical_and.reduce(white),
               "blackbox": np.logical_and.reduce([measured[b] for b in BLACK_BOX]),
               "pgd": measured["pgd_linf"], "bpda": measured["bpda_linf"]}
    diffs = paired_differences(correct, seed=cfg.seed)
    m: dict[str, Any] = {"reference_attack": reference, "eps": [k * eps for k in EPS_MULTIPLIERS],
         "eps_acc": [float(v.mean()) for v in sweep], "acc": float(sweep[0].mean()),
         "acc_2x_steps": float(correct["more_steps"].mean()), "acc_2x_eot": float(correct["more_eot"].mean()),
         **{f"{k}_acc": float(correct[k].mean()) for k in ("whitebox", "blackbox", "pgd", "bpda")},
         "differences": {k: d._asdict() for k, d in diffs.items()}}
    flags = audit_flags(diffs, large_eps_acc=m["eps_acc"][-1], zero_acc=zero_acc)
    tolerance = {"interval": "95% paired percentile bootstrap over images and draws; a flag needs the whole "
                             "interval beyond 0", "n_boot": N_BOOT, "seed": cfg.seed, "zero_acc": zero_acc,
                 "n_images": len(data), "draws": repeats}
    return AuditReport(flags, m, tolerance, runs, {k: v for k, v in settings.items() if k in runs})


def _base(name: str) -> str:
    """The registry name under an audit run's name (`pgd_linf_2x_steps` -> `pgd_linf`)."""
    for suffix in ("_2x_steps", "_2x_eot"):
        name = name.removesuffix(suffix)
    return name.split("@")[0]
