"""Study-level bench rows: efficiency and overhead, trial start-up (reused vs fresh workers), memory per
concurrent trial against a bare torch worker, time to hypervolume.

Each row runs small real studies in this process (`study.run.prepare` -> `StudyPlan` -> `study.run.run`: Ray
started in-process, MLflow sqlite, real CIFAR-10 from `--data-dir` or $ATOP_DATA_DIR) and returns
`bench.core.Result`s. Studies are shared between rows of one bench run (the `none` study at
concurrency 2 serves all three rows), and pre-training runs once: its files are copied into every
later study folder (`study.pretrained` reuses files named by the hash of their settings).

    from bench.core import Context
    from bench.study_rows import study_rows
    for r in study_rows(Context(device=torch.device("cpu"), quick=True, data_dir="../shared/data")):
        print(r.to_dict())

`quick=True`: the `tiny` preset, 6 trials x 3 epochs (about 3 minutes on a 2-core CPU; its trials
all score alike, so its time-to-HV row checks the plumbing, not the scheduler);
otherwise the `smoke` preset, 8 trials x 3 epochs.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.core import Context, Result, row
from study.stopping import front_hypervolume
from tracking.contract import COMPUTE_S

#: studies already run in this process, by their settings (rows share them)
_RUNS: dict[tuple, StudyRun] = {}
_WORK: dict[str, Path] = {}
#: process names of Tune's function-trainable actors (the trial workers)
WORKER_MARKS = ("train_atop", "ImplicitFunc")
#: process name of a node's MLflow sender (`tracking.spool_sender`): one per node, not per trial
SENDER_MARK = "SpoolSender"


@dataclass
class StudyRun:
    """What one finished bench study leaves: Optuna trials, timings, sampled worker memory."""

    name: str
    folder: Path
    scheduler: str
    max_concurrent: int
    trials: list  # optuna FrozenTrials
    driver_s: float  # the whole `run()`: Ray start, pre-training (or its reuse), trials, Pareto table
    data_bytes: int  # train + test images and labels as the driver loaded them
    shared_bytes: int  # the subsets every trial receives (n_train + n_eval)
    rss_peak: float = float("nan")  # largest sum of trial-worker RSS seen at once, bytes
    uss_peak: float = float("nan")  # their USS and PSS at that moment
    pss_peak: float = float("nan")
    workers_peak: int = 0  # most trial workers alive at once
    sender_uss_peak: float = 0.0  # the largest USS of the node's MLflow sender, bytes
    log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def t0(self):
        return min(t.datetime_start for t in self.trials)

    @property
    def trial_phase_s(self) -> float:
        """From the first trial asked to the last one told (Tune's part of the study)."""
        return (max(t.datetime_complete for t in self.trials) - self.t0).total_seconds()

    def states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out


def _sizes(quick: bool) -> dict[str, Any]:
    # The tiny preset's defense predicts one class (every trial scores the same on every objective),
    # so its time-to-HV figure is degenerate; the smoke preset's trials differ (pre-training: minutes).
    return {"preset": "tiny", "num_trials": 6, "epochs": 3, "settings": None} if quick else \
        {"preset": "smoke", "num_trials": 8, "epochs": 3, "settings": None}


class _MemorySampler(threading.Thread):
    """Sums RSS/USS of this process's Ray trial workers every `period_s`; keeps the peaks."""

    def __init__(self, period_s: float = 0.5):
        super().__init__(daemon=True)
        self.period_s, self.stop = period_s, threading.Event()
        self.rss_peak, self.uss_peak, self.pss_peak, self.workers_peak = 0.0, 0.0, 0.0, 0
        self.sender_uss_peak = 0.0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(self.period_s):
            rss = uss = pss = 0.0
            n = 0
            for p in me.children(recursive=True):
                try:
                    text = " ".join(p.cmdline()) or p.name()
                    if SENDER_MARK in text:
                        self.sender_uss_peak = max(self.sender_uss_peak, p.memory_full_info().uss)
                    if not any(m in text for m in WORKER_MARKS):
                        continue
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, uss, pss, n = rss + info.rss, uss + info.uss, pss + info.pss, n + 1
            if rss > self.rss_peak:
                self.rss_peak, self.uss_peak, self.pss_peak = rss, uss, pss
            self.workers_peak = max(self.workers_peak, n)


def run_study(*, preset: str, num_trials: int, epochs: int, max_concurrent: int, scheduler: str = "none",
              reduction_factor: int = 2, data_dir: str | None = None, seed: int = 0,
              sample_memory: bool = False, settings: dict[str, Any] | None = None) -> StudyRun:
    """Run one small study in this process (cached by its arguments); Ray is shut down after it.

    Args:
        preset, num_trials, epochs, max_concurrent, seed: as `study/run.py`'s flags.
        scheduler, reduction_factor: `--scheduler` and `--reduction-factor` (grace period 1).
        data_dir: folder with cifar10_*.npz (default $ATOP_DATA_DIR).
        sample_memory: sample the trial workers' RSS while it runs.
        settings: a settings mapping merged over the preset (as `--config FILE`).

    Returns:
        The finished study's trials and timings.
    """
    key = (preset, num_trials, epochs, max_concurrent, scheduler, reduction_factor, data_dir, seed, sample_memory,
           json.dumps(settings, sort_keys=True))
    if key in _RUNS:
        return _RUNS[key]
    import optuna
    import ray

    from study.run import build_parser, prepare, run

    if "dir" not in _WORK:  # one folder per bench run (studies, settings files, pre-trained cache)
        _WORK["dir"] = Path(tempfile.mkdtemp(prefix="atop-bench-study-"))
    work = _WORK["dir"]
    name = f"{preset}-{scheduler}-c{max_concurrent}-n{num_trials}-e{epochs}-s{seed}-{len(_RUNS)}"
    argv = ["--preset", preset, "--num-trials", str(num_trials), "--epochs", str(epochs),
            "--max-concurrent", str(max_concurrent), "--seed", str(seed), "--scheduler", scheduler,
            "--reduction-factor", str(reduction_factor), "--storage-path", str(work / "studies"),
            "--study-name", name]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if settings:
        path = work / f"{name}.json"
        path.write_text(json.dumps(settings))
        argv += ["--config", str(path)]
    # pre-training is not what these rows measure: the studies share one cache under the storage path
    plan = prepare(build_parser().parse_args(argv))
    sampler = _MemorySampler() if sample_memory else None
    out = io.StringIO()
    started = time.perf_counter()
    try:
        if sampler:
            sampler.start()
        with contextlib.redirect_stdout(out):
            run(plan)
    finally:
        driver_s = time.perf_counter() - started
        if sampler:
            sampler.stop.set()
            sampler.join()
        ray.shutdown()
    study = optuna.load_study(study_name=name, storage=plan.optuna_url)
    pool, cfg = plan.pool, plan.cfg
    per_image = pool.x[0].numel() * pool.x.element_size() + pool.y.element_size()
    result = StudyRun(
        name=name, folder=plan.folder, scheduler=scheduler, max_concurrent=max_concurrent, trials=study.trials,
        driver_s=driver_s, data_bytes=sum(_nbytes(s) for s in (pool, plan.val, plan.test)),
        shared_bytes=per_image * ((cfg.n_train or len(pool)) + cfg.n_eval), log=out.getvalue())
    if sampler:
        result.rss_peak, result.uss_peak, result.pss_peak = sampler.rss_peak, sampler.uss_peak, sampler.pss_peak
        result.workers_peak, result.sender_uss_peak = sampler.workers_peak, sampler.sender_uss_peak
    _RUNS[key] = result
    return result


def worker_floor() -> dict[str, float]:
    """RSS, USS and PSS (bytes) of an actor that imports torch and nothing of ours (the floor of any
    trial worker), in a local Ray of its own (shut down after, which ends the actor)."""
    import psutil
    import ray

    from study.cluster import loopback_ray

    # Defined here, not at module level: cloudpickle then ships the class by value, so the worker does
    # not import this module, whose package imports atop (measured: a module-level class loaded atop).
    class TorchOnly:
        @ray.method
        def load(self) -> int:
            import torch  # noqa: F401 - the import is what is measured

            return os.getpid()

    loopback_ray()
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        actor = ray.remote(num_cpus=0)(TorchOnly).remote()
        info = psutil.Process(ray.get(actor.load.remote())).memory_full_info()
    finally:
        ray.shutdown()
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss}


def _imports_only(config: dict[str, Any]) -> None:
    """A Tune trial that imports what `train_atop` imports (torch, atop, tracking, mlflow) and reports."""
    from mlflow import MlflowClient  # noqa: F401 - a trial's logger thread imports it
    from ray import tune

    import trainables.atop_trainable  # noqa: F401 - the import is what is measured

    tune.report({"done": 1})


def startup_seconds(*, trials: int, reuse: bool) -> float:
    """Seconds per trial of `trials` `_imports_only` trials, one at a time, in a local Ray of its own."""
    import ray
    from ray import tune

    from study.cluster import ROOT, loopback_ray

    loopback_ray()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        with tempfile.TemporaryDirectory(prefix="atop-bench-startup-") as d:
            started = time.perf_counter()
            tune.Tuner(_imports_only, param_space={"i": tune.grid_search(list(range(trials)))},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
                       run_config=tune.RunConfig(storage_path=d, verbose=0)).fit()
            return (time.perf_counter() - started) / trials
    finally:
        ray.shutdown()


def _nbytes(split: Any) -> int:
    return int(sum(t.numel() * t.element_size() for t in (split.x, split.y)))


def _data_dir(ctx: Context) -> str | None:
    return ctx.data_dir


# --- rows -------------------------------------------------------------------------------------------------

def _compute_s(trial: Any) -> float:
    """A finished trial's own compute seconds (`compute_s`, as its last report gave them)."""
    return float(trial.user_attrs.get(COMPUTE_S, 0.0))


def _lifetime_s(trial: Any) -> float:
    """From the trial's ask to its tell."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def idle_breakdown(trials: list, concurrency: int) -> dict[str, float]:
    """Where a trial phase's slot-seconds that are not trial compute went, in seconds.

    `first_trials`: lifetime minus compute of the first `concurrency` trials (each starts a worker:
    actor, imports, weights, then its own end); `trial_ends`: the same for every later trial (its
    final evaluation's artifacts and report on a warm worker); `tail`: the slots left idle at the
    end, each from its last trial's end (after the last trial started, so nothing else ran there)
    to the phase's end; `between`: the rest (from one trial's end to the next one's start).
    """
    def overhead(t: Any) -> float:
        return _lifetime_s(t) - _compute_s(t)

    ordered = sorted(trials, key=lambda t: t.datetime_start)
    start, end = ordered[0].datetime_start, max(t.datetime_complete for t in trials)
    idle = (end - start).total_seconds() * concurrency - sum(_compute_s(t) for t in trials)
    last_start = ordered[-1].datetime_start
    ended = sorted((t.datetime_complete for t in trials if t.datetime_complete > last_start), reverse=True)
    out = {"first_trials": sum(overhead(t) for t in ordered[:concurrency]),
           "trial_ends": sum(overhead(t) for t in ordered[concurrency:]),
           "tail": sum((end - t).total_seconds() for t in ended[1:concurrency])}
    return {"idle": idle, **out, "between": idle - sum(out.values())}


def efficiency_rows(ctx: Context) -> list[Result]:
    """Σ trial compute_s / (trial-phase wall × max_concurrent), and overhead seconds per trial.

    The baseline is the goal 0.9: a sequential loop over `atop.finetune` without Ray would measure
    only the trials' own compute (efficiency 1 by construction, at the cost of another full run),
    so the goal is the honest yardstick for what Ray, Optuna, MLflow and the trainable add.
    """
    s = _sizes(ctx.quick)
    r = run_study(**s, max_concurrent=2, data_dir=_data_dir(ctx), sample_memory=True)
    compute = [_compute_s(t) for t in r.trials]
    lifetimes = [_lifetime_s(t) for t in r.trials]
    wall = r.trial_phase_s
    eff = sum(compute) / (wall * r.max_concurrent)
    overhead = (wall * r.max_concurrent - sum(compute)) / len(r.trials)
    in_trial = (sum(lifetimes) - sum(compute)) / len(r.trials)
    idle = idle_breakdown(r.trials, r.max_concurrent)
    common = (f"{s['preset']} preset, {len(r.trials)} trials x {s['epochs']} epochs, {r.max_concurrent} at once, "
              f"no scheduler; trial phase {wall:.0f} s (driver {r.driver_s:.0f} s incl. Ray start)")
    spent = (f"idle {idle['idle']:.0f} of {wall * r.max_concurrent:.0f} slot-s: first trials (worker starts) "
             f"{idle['first_trials']:.0f}, later trials' ends {idle['trial_ends']:.0f}, tail {idle['tail']:.0f}, "
             f"between trials {idle['between']:.0f}")
    return [
        Result("study efficiency", eff, 0.9, "share", 1,
               f"{common}; Σcompute_s {sum(compute):.0f} s; {spent}; baseline = goal 0.9",
               extra={"compute_s": compute, "trial_phase_s": wall, "driver_s": r.driver_s, "idle_s": idle}),
        Result("study overhead per trial", overhead, float("nan"), "s/trial", 1,
               f"(wall x concurrency - Σcompute)/trials; of it {in_trial:.1f} s inside each trial's lifetime "
               "(actor start, weights, final evaluation + artifacts, MLflow), the rest between trials",
               ratio=overhead / (sum(compute) / len(r.trials)),
               extra={"lifetime_s": lifetimes}),
    ]


def startup_rows(ctx: Context) -> list[Result]:
    """Trial start-up, reused workers against a fresh worker per trial, interleaved (median of 2)."""
    trials = 5
    fresh, reused = [], []
    for _ in range(2):
        fresh.append(startup_seconds(trials=trials, reuse=False))
        reused.append(startup_seconds(trials=trials, reuse=True))
    ours, base = float(np.median(reused)), float(np.median(fresh))
    warm = (trials * ours - base) / (trials - 1)  # the first trial of a reused worker starts it: `base`
    return [Result("study trial start-up (reused/fresh)", ours, base, "s/trial", 2,
                   f"{trials} trials that only import what train_atop imports, 1 at a time; a reused worker's "
                   f"later trials start in ~{warm:.2f} s", ratio=ours / base,
                   extra={"reused_s": reused, "fresh_s": fresh})]


def memory_rows(ctx: Context) -> list[Result]:
    """Trial-worker memory at concurrency 2 against 1, per extra trial, against the floor: a Ray
    actor that has only imported torch. RSS counts the pages worker processes share (libtorch) in
    each; USS is what one more worker adds on its own, PSS splits the shared pages between them."""
    s = _sizes(ctx.quick)
    two = run_study(**s, max_concurrent=2, data_dir=_data_dir(ctx), sample_memory=True)
    one = run_study(preset=s["preset"], num_trials=2, epochs=1, max_concurrent=1, data_dir=_data_dir(ctx),
                    sample_memory=True, settings=s["settings"])
    floor = worker_floor()
    extra = max(1, two.workers_peak - one.workers_peak)
    added = {k: (getattr(two, f"{k}_peak") - getattr(one, f"{k}_peak")) / extra for k in ("rss", "uss", "pss")}
    mb = 1 / 2**20
    return [Result("study memory per extra trial", added["rss"] * mb, floor["rss"] * mb, "MB", 1,
                   f"RSS of trial workers: {one.rss_peak * mb:.0f} MB with {one.workers_peak} alive, "
                   f"{two.rss_peak * mb:.0f} MB with {two.workers_peak}; added per extra trial: USS "
                   f"{added['uss'] * mb:.0f} MB, PSS {added['pss'] * mb:.0f} MB; baseline = a Ray actor that only "
                   f"imported torch (RSS; USS {floor['uss'] * mb:.0f}, PSS {floor['pss'] * mb:.0f} MB); not counted "
                   f"above, the node's one MLflow sender: USS {two.sender_uss_peak * mb:.0f} MB; train+test "
                   f"as loaded {two.data_bytes * mb:.0f} MB, the n_train+n_eval subset trials receive once "
                   f"through the object store {two.shared_bytes * mb:.2f} MB",
                   extra={"rss_peak": [one.rss_peak, two.rss_peak], "uss_peak": [one.uss_peak, two.uss_peak],
                          "pss_peak": [one.pss_peak, two.pss_peak], "workers": [one.workers_peak, two.workers_peak],
                          "sender_uss_peak": two.sender_uss_peak,
                          "added": added, "floor": floor, "data_bytes": two.data_bytes,
                          "shared_bytes": two.shared_bytes})]


def hypervolume_curve(trials: list, t0) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since `t0`, the study's front hypervolume by then) at each COMPLETE trial's end: the
    hypervolume `--stop-on-plateau` watches (`study.stopping.front_hypervolume`)."""
    done = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.datetime_complete)
    times = np.array([(t.datetime_complete - t0).total_seconds() for t in done])
    hv = np.array([front_hypervolume(done[: k + 1]) for k in range(len(done))])
    return times, hv


def time_to_hypervolume_rows(ctx: Context) -> list[Result]:
    """When mo-asha reaches the no-stopping study's final hypervolume, over that study's time.

    Both studies: same preset, seed, trials and epochs, 2 at once. Goal: ratio <= 0.5. When mo-asha
    never reaches it, `ours` is the fraction of the hypervolume it reached and the note says so.
    """
    s = _sizes(ctx.quick)
    none = run_study(**s, max_concurrent=2, data_dir=_data_dir(ctx), sample_memory=True)
    mo = run_study(**s, max_concurrent=2, scheduler="mo-asha", reduction_factor=2, data_dir=_data_dir(ctx))
    t_none, hv_none = hypervolume_curve(none.trials, none.t0)
    t_mo, hv_mo = hypervolume_curve(mo.trials, mo.t0)
    target = float(hv_none[-1]) if len(hv_none) else 0.0
    total_none, total_mo = none.trial_phase_s, mo.trial_phase_s
    hit = np.flatnonzero(hv_mo >= target * (1 - 1e-9)) if target > 0 else np.array([], int)
    distinct = len({tuple(t.values) for t in none.trials if t.values})
    common = (f"{s['preset']} preset, {s['num_trials']} trials x {s['epochs']} epochs, 2 at once, eta 2; "
              f"none: {none.states()} in {total_none:.0f} s, HV {target:.4g}; mo-asha: {mo.states()} in "
              f"{total_mo:.0f} s, HV {hv_mo[-1] if len(hv_mo) else 0:.4g}; {distinct} distinct objective "
              f"vectors in none" + (" (degenerate: the ratio says nothing about the scheduler)" if distinct < 2 else ""))
    extra = {"none_curve": [t_none.tolist(), hv_none.tolist()], "mo_asha_curve": [t_mo.tolist(), hv_mo.tolist()]}
    if len(hit):
        t_hit = float(t_mo[hit[0]])
        return [Result("study time to HV (mo-asha/none)", t_hit, total_none, "s", 1,
                       f"{common}; goal ratio <= 0.5", ratio=t_hit / total_none, extra=extra)]
    fraction = float(hv_mo[-1]) / target if len(hv_mo) and target > 0 else 0.0
    return [Result("study HV reached by mo-asha", fraction, 1.0, "share of none HV", 1,
                   f"{common}; mo-asha never reached none's HV; its time / none's = {total_mo / total_none:.2f}",
                   ratio=fraction, extra={**extra, "time_ratio": total_mo / total_none})]


def study_rows(ctx: Context) -> list[Result]:
    """All study-level rows (the studies they share run once); skipped without real data."""
    if not (ctx.data_dir or os.environ.get("ATOP_DATA_DIR")):
        return [Result("study rows", float("nan"), float("nan"), "-", 0,
                       "skipped: the study rows need real CIFAR-10 (--data-dir or $ATOP_DATA_DIR)")]
    return [*efficiency_rows(ctx), *startup_rows(ctx), *memory_rows(ctx), *time_to_hypervolume_rows(ctx)]


# Registration with `python -m bench` (the package imports this module to register it).
row("study")(study_rows)
