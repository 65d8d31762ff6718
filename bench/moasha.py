"""Does MO-ASHA save time? The same wall-clock budget with and without early stopping, on synthetic
learning curves, with the study's own rule and sampler.

What is real here: the stopping rule (`study.scheduler.decide`, the whole of MO-ASHA's decision, and
`rungs`), the sampler (`study.settings.make_sampler`, Optuna ask/tell with `concurrency` trials
outstanding, a stopped trial told PRUNED as `study.searcher.AskTellSearcher` does) and the search
space. What is synthetic: each trial's objectives per epoch (`learning_curve`, built on
`bench.samplers.synthetic_objectives`) and the clock (`Clock`: an epoch is one time unit, the
per-trial costs are fractions of it). A real study at this scale takes days of GPU time per arm;
here one arm takes seconds, so every seed can be run. The real-study counterpart, on `tiny` (whose
trials cannot differ), is the "study time to HV" row of `bench/study_rows.py`.

The comparison, per seed: the no-stopping arm runs `n_trials` trials and ends at time T; the MO-ASHA
arm starts trials until T (its stopped trials free their slots for new ones) and only what it
completed by T is scored. Scored on the true (noise-free) objectives of the completed trials, so
a lucky noisy evaluation is not counted as a better configuration; the noisy figures the study
would print are in each row's extra.

    python -m bench --rows moasha
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import moocore
import numpy as np
import optuna

from analysis.compute import eaf_difference
from bench.core import Context, Result, row
from bench.samplers import N_EVAL, synthetic_objectives
from search_spaces import SPACES
from study.scheduler import decide, rungs
from study.settings import make_sampler


@dataclass(frozen=True)
class Clock:
    """Trial costs in epochs (an epoch = its training plus the screen evaluation MO-ASHA's rungs read)."""

    start: float = 0.05  # a trial's start on a warm worker (reused actor: weights cached, ~1 s)
    final: float = 0.2  # after the last epoch: final artifacts, image grid, MLflow uploads
    stopped: float = 0.1  # a stopped trial's slot: Ray waits for its thread, then a fresh worker starts


@dataclass(frozen=True)
class Setting:
    """One comparison: the paper-cifar10 preset's schedule on a search space."""

    space: str = "wide"
    epochs: int = 10
    ce_warmup_epochs: int = 2  # used where the space does not search it
    concurrency: int = 8
    n_trials: int = 64  # the no-stopping arm's trials
    grace_period: int = 3  # the smallest `--grace-period` the wide space accepts (warm-up up to 2)
    reduction_factor: float = 3  # the study's default
    sampler: str = "tpe"  # the study's default
    population_size: int = 16  # NSGA-II only
    clock: Clock = field(default_factory=Clock)
    #: rung decisions read each trial's exact final objectives (no evaluation noise, no crossing curves):
    #: a perfect predictor, so the bound on what any rule cutting at these rungs could gain
    oracle: bool = False


def learning_curve(p: dict[str, Any], epochs: int) -> np.ndarray:
    """`(epochs, 3)` noise-free objectives of a trial with params `p` after each epoch.

    Shaped like AToP fine-tuning: it starts from the pre-trained defense (the random transform's
    cost and benefit only: `synthetic_objectives` with no fine-tuning effect), then moves towards
    the trial's final objectives in two parts: the gain of fine-tuning with CE alone from epoch 1,
    and the adversarial loss's effect only after the CE warm-up. Both follow `1 - exp(-r t)`, with
    a rate `r` that grows with the learning rate, normalised to arrive at the final values at the
    last epoch. So a fast learner with a poor learning rate can lead at an early rung and be passed
    later (the case that makes early stopping imperfect).
    """
    start = synthetic_objectives({**p, "lambda_ce": 0.0, "lr": 1e-7})
    ce_only = synthetic_objectives({**p, "lambda_ce": 0.0})
    final = synthetic_objectives(p)
    warmup = min(int(p.get("ce_warmup_epochs", 0)), epochs - 1)
    rate = 0.5 * math.sqrt(p["lr"] / 1e-4)

    def progress(t: np.ndarray, span: int) -> np.ndarray:
        return (1 - np.exp(-rate * np.clip(t, 0, None))) / (1 - math.exp(-rate * span))

    e = np.arange(1, epochs + 1, dtype=float)
    return (start + np.outer(progress(e, epochs), ce_only - start)
            + np.outer(progress(e - warmup, epochs - warmup), final - ce_only))


@dataclass
class Arm:
    """What one simulated study completed: (time, observed vector, true vector) per COMPLETE trial."""

    scheduler: str
    times: list[float] = field(default_factory=list)
    observed: list[np.ndarray] = field(default_factory=list)
    true: list[np.ndarray] = field(default_factory=list)
    started: int = 0
    stopped_at: list[int] = field(default_factory=list)  # the rung epoch of each stopped trial
    epochs_run: int = 0
    end: float = 0.0  # when its last trial ended

    def by(self, t: float, *, observed: bool = False) -> np.ndarray:
        """True (or, `observed`, noisy as the study saw them) vectors of the trials completed by time
        `t`, `(k, 3)`."""
        vectors = self.observed if observed else self.true
        return np.array([v for s, v in zip(self.times, vectors) if s <= t]).reshape(-1, 3)


def hypervolume(points: np.ndarray) -> float:
    """Hypervolume of accuracy vectors (maximised), reference point 0, as the study's plateau uses."""
    return float(moocore.hypervolume(points, ref=np.zeros(3), maximise=True)) if len(points) else 0.0


def simulate(setting: Setting, scheduler: str, seed: int, *, until: float | None = None) -> Arm:
    """One simulated study: `none` runs `setting.n_trials` trials; `mo-asha` starts trials until `until`.

    Events are processed in time order; a freed slot asks Optuna for the next trial at once, so the
    sampler sees exactly the trials told by then (as the study's ask/tell searcher does).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SPACES[setting.space]
    base = {"ce_warmup_epochs": setting.ce_warmup_epochs, **space.fixed}
    study = optuna.create_study(directions=["maximize"] * 3, sampler=make_sampler(
        setting.sampler, seed, setting.population_size, n_existing=0))
    noise = np.random.default_rng(20_000 + seed)
    rung_epochs = set(rungs(setting.grace_period, setting.reduction_factor, setting.epochs)) \
        if scheduler == "mo-asha" else set()
    records: dict[int, list[list[float]]] = {e: [] for e in rung_epochs}
    clock, arm = setting.clock, Arm(scheduler)
    events: list[tuple[float, int, Any, np.ndarray | None, int]] = []  # (time, order, trial, curve, epoch)
    order = itertools.count()

    def rung_view(seen: np.ndarray, curve: np.ndarray) -> list[float]:
        """What a rung decides on: the epoch's noisy figures, or (`oracle`) the trial's exact final ones."""
        return (curve[-1] if setting.oracle else seen).tolist()

    def start(t: float) -> None:
        if (scheduler == "none" and arm.started >= setting.n_trials) or (until is not None and t >= until):
            return
        trial = study.ask()
        curve = learning_curve({**base, **space.suggest(trial)}, setting.epochs)
        arm.started += 1
        heapq.heappush(events, (t + clock.start + 1.0, next(order), trial, curve, 1))

    for _ in range(setting.concurrency):
        start(0.0)
    while events:
        t, _, trial, curve, epoch = heapq.heappop(events)
        if curve is None:  # a freed slot
            start(t)
            continue
        arm.epochs_run += 1
        seen = noise.binomial(N_EVAL, curve[epoch - 1]) / N_EVAL  # the epoch's screen evaluation
        if epoch == setting.epochs:
            end = t + clock.final
            study.tell(trial, seen.tolist())
            arm.times.append(end)
            arm.observed.append(seen)
            arm.true.append(curve[-1])
            arm.end = max(arm.end, end)
            heapq.heappush(events, (end, next(order), None, None, 0))
        elif epoch in rung_epochs and not decide(records[epoch], (at_rung := rung_view(seen, curve)),
                                                 setting.reduction_factor):
            records[epoch].append(at_rung)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            arm.stopped_at.append(epoch)
            heapq.heappush(events, (t + clock.stopped, next(order), None, None, 0))
        else:
            if epoch in rung_epochs:
                records[epoch].append(rung_view(seen, curve))
            heapq.heappush(events, (t + 1.0, next(order), trial, curve, epoch + 1))
    return arm


@dataclass(frozen=True)
class Pair:
    """One seed's two arms at the no-stopping arm's time `budget`."""

    none: Arm
    mo: Arm

    @property
    def budget(self) -> float:
        return self.none.end

    def hv(self, arm: Arm, t: float | None = None) -> float:
        return hypervolume(arm.by(self.budget if t is None else t))

    def time_to_none_hv(self) -> float:
        """First time MO-ASHA's completed trials reach the no-stopping arm's final hypervolume, over
        the budget; inf when they do not within it."""
        target = self.hv(self.none)
        for t in sorted(s for s in self.mo.times if s <= self.budget):
            if self.hv(self.mo, t) >= target:
                return t / self.budget
        return math.inf


def compare(setting: Setting, seeds: Sequence[int]) -> list[Pair]:
    """Both arms for each seed, the MO-ASHA arm given the no-stopping arm's time."""
    pairs = []
    for seed in seeds:
        none = simulate(setting, "none", seed)
        pairs.append(Pair(none, simulate(setting, "mo-asha", seed, until=none.end)))
    return pairs


def eaf_balance(pairs: Sequence[Pair], objectives: tuple[int, int] = (0, 1)) -> tuple[float, float]:
    """Areas (in accuracy units squared) of the (clean, seen-robust) plane where MO-ASHA's fronts at the
    budget attain more often than no stopping's, and where less: `analysis --compare`'s EAF
    difference, weighted by how much more often, over the unit square."""
    cols = list(objectives)
    rects = eaf_difference([p.mo.by(p.budget)[:, cols] for p in pairs],
                           [p.none.by(p.budget)[:, cols] for p in pairs], np.array([True, True]))
    # best corner (x1, y1), opposite corner towards 0 (maximised; may be -inf): clip to the unit square
    x1, y1, x2, y2, d = (np.clip(rects[:, k], 0, 1) if k < 4 else rects[:, k] for k in range(5))
    area = np.abs(x1 - x2) * np.abs(y1 - y2) * d
    return float(area[area > 0].sum()), float(-area[area < 0].sum())


@row("moasha")
def moasha_rows(ctx: Context) -> list[Result]:
    """MO-ASHA against no stopping at the same wall-clock budget (simulated clock, real rule and sampler),
    at the study's default reduction factor 3 and at 2, and the bound: eta 3 deciding on exact final
    objectives (`Setting.oracle`)."""
    seeds = range(3 if ctx.quick else 10)
    settings = [Setting(reduction_factor=3), Setting(reduction_factor=2), Setting(reduction_factor=3, oracle=True)]
    return [r for setting in settings for r in _rows(ctx, setting, seeds)]


def _rows(ctx: Context, setting: Setting, seeds: Sequence[int]) -> list[Result]:
    pairs = compare(setting, seeds)
    ratios = [p.time_to_none_hv() for p in pairs]
    hv_none = [p.hv(p.none) for p in pairs]
    hv_mo = [p.hv(p.mo) for p in pairs]
    gain = np.array(hv_mo) - np.array(hv_none)
    half = 1.96 * gain.std(ddof=1) / math.sqrt(len(gain))  # normal 95% interval of the mean paired gain
    more, less = eaf_balance(pairs)
    c, eta = setting.clock, f"eta {setting.reduction_factor:g}" + (" oracle" if setting.oracle else "")
    how = (f"simulated (bench/moasha.py): {setting.space} space, {setting.epochs} epochs ({setting.ce_warmup_epochs} "
           f"CE warm-up where not searched), {setting.concurrency} at once, none = {setting.n_trials} trials, "
           f"grace {setting.grace_period}, {eta} (rungs "
           f"{rungs(setting.grace_period, setting.reduction_factor, setting.epochs)}), {setting.sampler}; clock in "
           f"epochs: start {c.start}, final {c.final}, stopped {c.stopped}; "
           + ("rungs decide on exact final objectives (a perfect predictor: the bound); " if setting.oracle else "")
           + "true objectives of COMPLETE trials, "
           f"{len(pairs)} seeds")
    fractions = (0.25, 0.5, 0.75, 1.0)
    curves = {arm: [float(np.median([p.hv(getattr(p, arm), f * p.budget) for p in pairs])) for f in fractions]
              for arm in ("none", "mo")}
    ctx.log(f"moasha {eta}: median true HV at 25/50/75/100% of the budget: none "
            + " ".join(f"{v:.4f}" for v in curves["none"]) + ", mo-asha " + " ".join(f"{v:.4f}" for v in curves["mo"]))
    started = [p.mo.started for p in pairs]
    stopped = [len(p.mo.stopped_at) for p in pairs]
    completed = [len(p.mo.by(p.budget)) for p in pairs]
    extra = {"ratios": ratios, "hv_none": hv_none, "hv_mo": hv_mo, "hv_curves": curves,
             "hv_observed": {arm: [hypervolume(getattr(p, arm).by(p.budget, observed=True)) for p in pairs]
                             for arm in ("none", "mo")},
             "mo_started": started, "mo_stopped": stopped, "mo_completed": completed}
    median_ratio = float(np.median(ratios))
    return [
        Result(f"mo-asha {eta}: time to none's HV", median_ratio, 0.5, "share of budget", len(pairs),
               f"{how}; per seed {', '.join(f'{r:.2f}' for r in ratios)} (inf: not reached within the budget); "
               f"mo-asha started {min(started)}-{max(started)} trials, stopped {min(stopped)}-{max(stopped)}, "
               f"completed {min(completed)}-{max(completed)} (none: {setting.n_trials}); goal <= 0.5",
               ratio=median_ratio / 0.5, extra=extra),
        Result(f"mo-asha {eta}: HV at none's budget", float(np.median(hv_mo)), float(np.median(hv_none)), "HV",
               len(pairs), f"{how}; median over seeds, ours = mo-asha, baseline = none; paired gain "
               f"{gain.mean():+.4f} +- {half:.4f} (95%): " + ("no difference" if abs(gain.mean()) <= half else
                                                           "a difference") + "; EAF difference on (clean, seen): "
               f"area where mo-asha attains more often {more:.4f}, less often {less:.4f}"),
    ]
