"""Which sampler learns under concurrency: hypervolume after N trials on a cheap synthetic study.

A trial here costs microseconds: its three objectives come from `synthetic_objectives`, a smooth,
documented stand-in for an AToP trial over the `wide` search space's own parameters (conditional
RT parameters included), with the evaluation noise of 512 scored images. The study loop is the
real one's shape: Optuna ask/tell with `concurrency` trials outstanding, the oldest told first
(equal trial durations), as `study/searcher.py` drives Ray Tune.

Every sampler is compared with random search at the same concurrency and trial count: the row's
ratio is the median hypervolume (reference point 0, accuracies) over seeds, ours / random.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

import moocore
import numpy as np
import optuna

from bench.core import Context, Result, row
from search_spaces import SPACES
from study.settings import make_sampler

#: images a synthetic trial is scored on (sets the noise of its accuracies)
N_EVAL = 512
EVAL_EPS = {"linf": 8 / 255, "l2": 0.5}


def synthetic_objectives(p: dict[str, Any], rng: np.random.Generator | None = None) -> np.ndarray:
    """(clean_acc, robust_acc_seen, robust_acc_unseen) of a synthetic AToP trial with params `p`.

    Made to have the shape the paper and our smoke studies show, not their numbers:
    - the random transform destroys information (mask ratio, noise; RT3 inpaints every mask and
      loses less): clean accuracy falls with it, robustness rises with it and then saturates;
    - the adversarial loss (lambda, the training attack's eps relative to the evaluation eps, PGD
      over FGSM, gradients through the defense) buys seen robustness at some clean accuracy, and
      generalises to unseen attacks only in part;
    - the learning rate has an optimum near 1e-4 (log-scale bowl); other weights matter little.
    With `rng`, each accuracy gets the binomial noise of `N_EVAL` scored images.
    """
    rt = p["rt"]
    noise = p.get("noise_std", 0.0)
    if rt == "rt3":
        destroy = 0.15 + 0.02 * p.get("num_masks", 4) + 1.0 * noise
    else:
        destroy = 0.7 * p.get("mask_ratio", 0.25) + 1.2 * noise
    destroy *= 1.0 + 0.05 * math.log2(p.get("block_size", 4) / 4)
    eps_rel = p["train_eps"] / EVAL_EPS[p["train_norm"]]
    strength = eps_rel * (1.3 if p["train_attack"] == "pgd" else 1.0)
    strength *= 1.15 if p["train_grad_path"] == "defense" else 1.0
    quality = math.exp(-((math.log10(p["lr"]) + 4.0) ** 2) / 0.3)
    adv = quality * (1.0 - math.exp(-p["lambda_ce"] / 0.1)) * min(strength, 1.6)
    shield = 1.0 - math.exp(-3.0 * destroy)
    clean = (0.90 - 0.40 * destroy ** 1.3 - 0.06 * adv - 0.08 * max(eps_rel - 1.0, 0.0) ** 2
             + 0.05 * quality - 0.01 * p.get("ce_warmup_epochs", 0))
    seen = 0.05 + 0.55 * shield * (0.55 + 0.45 * adv) - 0.3 * max(destroy - 0.7, 0.0)
    unseen = 0.05 + 0.55 * shield * (0.7 + 0.15 * adv) - 0.3 * max(destroy - 0.7, 0.0)
    values = np.clip([clean, seen, unseen], 0.0, 1.0)
    if rng is not None:
        values = rng.binomial(N_EVAL, values) / N_EVAL
    return values


#: the table's samplers: label -> (the study's sampler name, NSGA-II population at a concurrency);
#: each is built by the study's own `make_sampler`, so the rows measure what a study runs
SAMPLERS: dict[str, tuple[str, Callable[[int], int]]] = {
    "random": ("random", lambda conc: 16),
    "nsga2 pop 50": ("nsga2", lambda conc: 50),  # the study's default population
    "nsga2 pop=conc": ("nsga2", lambda conc: max(conc, 4)),
    "tpe": ("tpe", lambda conc: 16),
    "gp": ("gp", lambda conc: 16),
}
#: minutes per 48-trial run on a 2-core CPU (832 s at load 12): only the full bench runs it
SLOW = ("gp",)


def hypervolume_trace(sampler: str, *, concurrency: int, n_trials: int, seed: int, space: str = "wide") -> np.ndarray:
    """Hypervolume (reference 0) of the trials told so far, after each of `n_trials` tells."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, population = SAMPLERS[sampler]
    study = optuna.create_study(directions=["maximize"] * 3,
                                sampler=make_sampler(name, seed, population(concurrency), n_existing=0))
    searched = SPACES[space]
    noise = np.random.default_rng(10_000 + seed)
    running: deque[tuple[optuna.trial.Trial, dict[str, Any]]] = deque()
    told: list[np.ndarray] = []
    trace = np.zeros(n_trials)
    asked = 0
    while len(told) < n_trials:
        while len(running) < concurrency and asked < n_trials:
            trial = study.ask()
            running.append((trial, {**searched.fixed, **searched.suggest(trial)}))
            asked += 1
        trial, params = running.popleft()
        values = synthetic_objectives(params, noise)
        study.tell(trial, values.tolist())
        told.append(values)
        trace[len(told) - 1] = moocore.hypervolume(np.array(told), ref=np.zeros(3), maximise=True)
    return trace


@row("samplers")
def sampler_rows(ctx: Context) -> list[Result]:
    """Median hypervolume after N trials per sampler and concurrency, against random search."""
    n_trials, seeds = (48, 5) if ctx.quick else (64, 10)
    names = [n for n in SAMPLERS if not (ctx.quick and n in SLOW)]
    if len(names) < len(SAMPLERS):
        ctx.log(f"samplers: --quick leaves out {', '.join(SLOW)} (minutes per run on a 2-core CPU)")
    results = []
    for conc in (2, 8, 32):
        final = {name: [hypervolume_trace(name, concurrency=conc, n_trials=n_trials, seed=s)[-1]
                        for s in range(seeds)] for name in names}
        base = float(np.median(final["random"]))
        for name, values in final.items():
            if name == "random":
                continue
            results.append(Result(
                f"sampler {name} @ {conc} at once", float(np.median(values)), base, "HV", seeds,
                f"{n_trials} synthetic trials (bench/samplers.py), wide space, median of {seeds} seeds; "
                f"baseline = random search; spread {np.min(values):.4f}..{np.max(values):.4f}",
                extra={"samples": values, "random": final["random"]}))
        ctx.log(f"samplers at {conc} at once: " + ", ".join(f"{k} {np.median(v):.4f}" for k, v in final.items()))
    return results
