"""The confirm stage: the search's front, fine-tuned again on new seeds and scored on test images.

The search scores every trial on validation images (carved from the train split); the test split
is touched here only. For each confirmed configuration (up to `confirm_top` Pareto-optimal search
trials, chosen to spread over the front, plus every enqueued reference) the driver runs
`confirm_seeds` Ray Tune trials, each fine-tuning the purifier again with a new seed and scoring
it on the first `n_eval` test images at the confirm level (`full` by default: the masking audit
included). MLflow gets one `confirm` run per configuration (a child of the study's run, linked to
its search trial) with the figures over seeds, and one `confirm_seed` run per seed below it.

Figures over seeds (`Figure`): the mean of the seeds' accuracies, their standard deviation, and a
95% two-stage bootstrap interval (`atop.stats.bootstrap`) resampling test images and, within each,
seeds: it covers which images were drawn and how much fine-tuning varies with the seed.

Pure planning and aggregation (`targets`, `spread`, `aggregate`, `table`) plus `run_confirm`,
which runs the trials and records each configuration (MLflow, `confirm.json`) as soon as its last
seed ends, so that a driver stopped in the middle of the stage resumes with the rest. A confirm
trial scores its purifier on test images once, after its last epoch (`finetune(score_every_epoch=False)`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atop.config import Config
from atop.io import atomic_write_text
from atop.stats import bootstrap
from search_spaces import Space, config_values
from study.tables import columns
from tracking.contract import (
    ATTACK_FIGURE_PREFIX,
    ATTR_INTERVALS,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    AUDIT_TAG,
    AUTOATTACK_FIGURE,
    CONFIRM_ARTIFACT,
    CONFIRM_OF_RUN_TAG,
    CONFIRM_OF_TAG,
    CONFIRM_SEED_TAG,
    EVAL_LEVEL_TAG,
    EVAL_SPLIT_TAG,
    GAP_PREFIX,
    INTERRUPTED_TAG,
    OBJECTIVES,
    PARENT_TAG,
    REFERENCE_TAG,
    ROLE_TAG,
    STAGE_TAG,
    TEST_PREFIX,
    VAL_PREFIX,
    EvalSplit,
    Role,
    Stage,
)

if TYPE_CHECKING:  # study.storage imports study.settings, which imports this module's CONFIRM_KEYS
    from study.storage import Storage

#: Config keys a study's `confirm_config` may set: how confirm trials are scored, not what they train
CONFIRM_KEYS = ("eval_level", "n_eval", "eval_precision", "audit_images")
#: bootstrap resamples behind every interval over seeds
N_BOOT = 2000
STATE_FILE = "confirm.json"


@dataclass(frozen=True)
class Target:
    """One configuration to confirm: a COMPLETE search trial (Pareto-optimal or a reference)."""

    number: int
    run_id: str | None
    params: dict[str, Any]
    values: tuple[float, ...]  # its validation objectives, `OBJECTIVES` order
    intervals: dict[str, list[float]]  # objective -> [lo, hi] on validation (may be empty)
    reference: str | None = None

    @property
    def label(self) -> str:
        return self.reference or f"trial {self.number}"


@dataclass(frozen=True)
class Figure:
    """An accuracy over seeds: mean, standard deviation over seeds, 95% interval (see module doc)."""

    mean: float
    sd: float
    lo: float
    hi: float

    def text(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


@dataclass
class Confirmed:
    """The confirm stage's outcome for one target (what `confirm.json` keeps per trial number)."""

    number: int
    label: str
    params: dict[str, Any]
    seeds: list[int]
    n_images: int
    figures: dict[str, Figure]  # figure name (`clean_acc`, ..., `robust_acc/<attack>`) -> over seeds
    val: dict[str, float]
    audit: str
    failed_seeds: list[int] = field(default_factory=list)
    run_id: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Confirmed:
        return cls(**{**data, "figures": {k: Figure(**v) for k, v in data["figures"].items()}})


def spread(points: np.ndarray, k: int) -> list[int]:
    """`k` rows of `points` (objectives, all maximised) spread over the front: first the row with the
    best mean, then repeatedly the row farthest (Euclidean) from those already chosen."""
    if k >= len(points):
        return list(range(len(points)))
    chosen = [int(np.argmax(points.mean(axis=1)))]
    while len(chosen) < k:
        dist = np.min(np.linalg.norm(points[:, None, :] - points[None, chosen, :], axis=2), axis=1)
        dist[chosen] = -1.0  # ties (e.g. equal points) must not pick a row twice
        chosen.append(int(np.argmax(dist)))
    return sorted(chosen)


def targets(study: Any, top: int) -> list[Target]:
    """The configurations to confirm: `top` Pareto-optimal trials (`spread`) and every reference."""
    from study.warmstart import own, own_front  # (study.settings imports this module)

    complete = own(t for t in study.trials if t.state.name == "COMPLETE")
    front = own_front(study)
    picked = [front[i] for i in spread(np.array([t.values for t in front]), top)] if front else []
    refs = [t for t in complete if t.user_attrs.get(ATTR_REFERENCE) and t not in picked]
    return [Target(t.number, t.user_attrs.get(ATTR_RUN_ID), dict(t.params), tuple(t.values),
                   dict(t.user_attrs.get(ATTR_INTERVALS, {})), t.user_attrs.get(ATTR_REFERENCE))
            for t in sorted([*picked, *refs], key=lambda t: t.number)]


def confirm_config(base: Config, space: Space, target: Target, overrides: Mapping[str, Any], seed: int) -> Config:
    """A confirm trial's config: the search trial's (its params through `space`), scored per
    `overrides` (`CONFIRM_KEYS`), with a new seed."""
    return Config.from_dict({**base.to_dict(), **config_values(space, target.params), **overrides, "seed": seed})


def aggregate(per_seed: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Figure]:
    """Figures over seeds from each seed's per-image rates (figure -> rates over the same images).

    Only figures every seed measured are kept.
    """
    names = [n for n in per_seed[0] if all(n in s for s in per_seed)]
    out = {}
    for name in names:
        rates = np.array([s[name] for s in per_seed], dtype=float)  # (seeds, images)
        accs = rates.mean(axis=1)
        lo, hi = bootstrap(rates, n_boot=N_BOOT, seed=0)
        out[name] = Figure(float(accs.mean()), float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, lo, hi)
    return out


def verdict(flags: Sequence[str]) -> str:
    """The audit's verdict over seeds from each seed's raised flags (`atop_trainable.audit_flags`)."""
    from trainables.atop_trainable import NOT_AUDITED

    if not flags or all(f == NOT_AUDITED for f in flags):
        return NOT_AUDITED
    raised = sorted({name for f in flags if f != NOT_AUDITED for name in f.split(",") if name})
    return f"flags: {', '.join(raised)}" if raised else "no flags"


def table(confirmed: Sequence[Confirmed], note: str) -> str:
    """The confirmed configurations: validation next to test for each objective, the gap, the audit."""
    if not confirmed:
        return "Confirmed on test: none"
    head = ["config", *(f"{o} val -> test [95%]" for o in OBJECTIVES), AUTOATTACK_FIGURE.removeprefix(ATTACK_FIGURE_PREFIX), "audit"]
    rows = []
    for c in confirmed:
        cells = [c.label]
        for o in OBJECTIVES:
            f = c.figures.get(o)
            cells.append(f"{c.val.get(o, float('nan')):.3f} -> {f.text()}  (gap {c.val[o] - f.mean:+.3f})"
                         if f is not None and o in c.val else "-")
        aa = c.figures.get(AUTOATTACK_FIGURE)
        cells += [aa.text() if aa else "-", c.audit]
        rows.append(cells)
    seeds = sorted({len(c.seeds) - len(c.failed_seeds) for c in confirmed})
    title = (f"Confirmed on test ({'/'.join(map(str, seeds))} seeds per config, "
             f"{'/'.join(sorted({str(c.n_images) for c in confirmed}))} test images; val: the search's "
             "validation figure; [95%]: bootstrap over test images and seeds):")
    lines = [title, *columns(head, rows)]
    failed = [f"{c.label}: seeds {c.failed_seeds} failed" for c in confirmed if c.failed_seeds]
    return "\n".join([*lines, *failed, f"test figures at {note}"])


# --- running the stage ------------------------------------------------------------------------------

def job_label(trial: Any) -> str:
    """How the driver's lines name a confirm trial: "trial 3 seed 1"."""
    job = trial.config["job"]
    return f"trial {job['number']} seed {job['seed']}"


@dataclass(frozen=True)
class Job:
    """One confirm trial: a target fine-tuned with one seed; its MLflow `confirm_seed` run."""

    number: int
    seed: int
    run_id: str | None
    config: dict[str, Any]
    resume_from: str | None = None  # the newest checkpoint a stopped driver's trial of this job left


def load_state(store: Storage) -> dict[int, Confirmed]:
    """The configurations an earlier driver already confirmed (`confirm.json` in the study folder
    `store`), by trial number."""
    if not store.exists(STATE_FILE):
        return {}
    return {int(k): Confirmed.from_dict(v) for k, v in store.read_json(STATE_FILE).items()}


#: (job, its trial's last result or {} when it failed): called in the driver as each confirm trial ends
Ended = Callable[[dict[str, Any], dict[str, Any]], None]
#: runs confirm jobs (dicts: number, seed, run_id, config) as Ray Tune trials, calling `Ended` as each ends
Fit = Callable[[list[dict[str, Any]], Ended], None]


def run_confirm(*, study: Any, space: Space, base: Config, overrides: Mapping[str, Any], top: int, seeds: int,
                folder: Path, store: Storage, uri: str, experiment_id: str, parent_id: str,
                start: Callable[[], tuple[Mapping[str, str], Fit]], note: str,
                log=print, interrupted: Callable[[], bool] | None = None) -> tuple[list[Confirmed], bool]:
    """Confirm the study's targets not yet confirmed.

    Args:
        study: the Optuna study after the search.
        space: the study's search space (turns a trial's params into config fields).
        base: the config every search trial started from; `overrides`: the study's `confirm_config`.
        top, seeds: `--confirm-top`, `--confirm-seeds`.
        folder: the driver's local study folder (spools, the table logged as an artifact).
        store: the study folder on its storage (`confirm.json` records what is done, so a resumed
            driver skips it).
        uri, experiment_id, parent_id: where to record MLflow runs.
        start: called only when a target is left to confirm (a resumed driver may have none, and then
            starts no Ray); returns the tags every confirm run gets and the `Fit` that runs the jobs.
        note: how strong the confirm level's attacks are (`tracking.contract.eval_level_note`).
        interrupted: whether the driver was asked to stop (SIGTERM or Ctrl+C, `study.interrupt`) while `fit`
            ran: then the configurations whose seeds did not all end are left for `--resume` (their
            runs ended KILLED now) instead of being recorded with failed seeds.

    Returns:
        (every target's outcome in order, whether any confirm trial ran now).
    """
    from study.resume import latest_checkpoint
    from tracking import mlflow_log

    chosen = targets(study, top)
    done = load_state(store)
    todo = [t for t in chosen if t.number not in done]
    log(f"confirm: {len(chosen)} configuration(s) x {seeds} seed(s) on test images "
        f"({len(chosen) - len(todo)} already confirmed)")
    if todo:
        started = time.time()
        tags, fit = start()
        client = mlflow_log.client(uri)
        if killed := end_interrupted_runs(client, experiment_id, {t.number for t in todo}):
            log(f"confirm: {killed} run(s) a stopped driver left RUNNING ended KILLED ({INTERRUPTED_TAG}=true); "
                "their configurations are confirmed again")
        jobs: list[Job] = []
        parents: dict[int, str] = {}
        for t in todo:
            cfg0 = confirm_config(base, space, t, overrides, base.seed)
            link = {CONFIRM_OF_TAG: str(t.number), CONFIRM_OF_RUN_TAG: t.run_id or "",
                    STAGE_TAG: Stage.CONFIRM.value, EVAL_SPLIT_TAG: EvalSplit.TEST.value,
                    EVAL_LEVEL_TAG: cfg0.eval_level.value, **({REFERENCE_TAG: t.reference} if t.reference else {})}
            parent = client.create_run(experiment_id, run_name=f"confirm-{t.label.replace(' ', '-')}",
                                       tags={**tags, **link, PARENT_TAG: parent_id, ROLE_TAG: Role.CONFIRM.value})
            parents[t.number] = parent.info.run_id
            mlflow_log.RunLogger(uri, parent.info.run_id, folder / "spool" / f"confirm-{t.number:04d}.jsonl") \
                .log_params({k: v for k, v in cfg0.to_dict().items() if k != "seed"})
            # Seeds are fine-tuning seeds: a configuration that fine-tunes nothing (epochs 0, e.g. a
            # no-FT control) gets one; its scoring draws are fresh either way.
            for k in range(1, (seeds if cfg0.epochs > 0 else 1) + 1):
                seed = base.seed + k
                run = client.create_run(experiment_id, run_name=f"confirm-{t.number:04d}-seed{seed}",
                                        tags={**tags, **link, PARENT_TAG: parent.info.run_id,
                                              ROLE_TAG: Role.CONFIRM_SEED.value, CONFIRM_SEED_TAG: str(seed)})
                cfg = confirm_config(base, space, t, overrides, seed)
                jobs.append(Job(t.number, seed, run.info.run_id, cfg.to_dict(), latest_checkpoint(store, t.number, seed)))
        results: dict[str | None, dict[str, Any]] = {}

        def record(t: Target) -> None:
            """Aggregate and log `t` once all its seeds ended, and keep it in `confirm.json` at once:
            a driver stopped later in the stage resumes without confirming it again. Called again
            at the stage's end if it raised (then it logs its figures twice, the same)."""
            done[t.number] = _record(t, [(j, results.get(j.run_id, {})) for j in jobs if j.number == t.number],
                                     uri, parents[t.number], folder)
            store.write_json(STATE_FILE, {str(k): asdict(v) for k, v in done.items()})

        def ended(job: dict[str, Any], result: dict[str, Any]) -> None:
            results.setdefault(job["run_id"], result)
            t = next(t for t in todo if t.number == int(job["number"]))
            if t.number not in done and all(j.run_id in results for j in jobs if j.number == t.number):
                record(t)

        if carried := [j for j in jobs if j.resume_from]:
            log(f"confirm: {len(carried)} trial(s) go on from the checkpoint a stopped driver's trial left (one that "
                f"had trained its last epoch starts again): {', '.join(f'trial {j.number} seed {j.seed}' for j in carried)}")
        fit([{"number": j.number, "seed": j.seed, "run_id": j.run_id, "config": j.config, "resume_from": j.resume_from}
             for j in jobs], ended)
        left = {t.number for t in todo if t.number not in done}
        if left and interrupted is not None and interrupted():
            killed = end_interrupted_runs(client, experiment_id, left)
            log(f"confirm: stopped with {len(left)} configuration(s) unconfirmed, left for --resume ({killed} "
                f"run(s) ended KILLED, {INTERRUPTED_TAG}=true)")
            return [done[t.number] for t in chosen if t.number in done], True
        for t in todo:  # a trial whose end Tune never reported (the stage was interrupted) counts as failed
            if t.number not in done:
                record(t)
        log(f"confirm: {len(jobs)} trial(s) in {time.time() - started:.0f} s")
    confirmed = [done[t.number] for t in chosen if t.number in done]
    text = table(confirmed, note)
    logger = mlflow_log.RunLogger(uri, parent_id, folder / "spool" / "driver-confirm.jsonl")
    logger.log_artifact(atomic_write_text(folder / CONFIRM_ARTIFACT, text + "\n"))
    logger.close()
    return confirmed, bool(todo)


def end_interrupted_runs(client: Any, experiment_id: str, numbers: set[int]) -> int:
    """End KILLED (tagged `INTERRUPTED_TAG`) the confirm runs of `numbers` that a stopped driver left
    RUNNING; returns how many. Only the driver holding the study's lease runs its confirm stage."""
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                 f"tags.`{STAGE_TAG}` = '{Stage.CONFIRM.value}'", max_results=50_000)
    stale = [r for r in running if r.data.tags.get(CONFIRM_OF_TAG, "").isdigit()
             and int(r.data.tags[CONFIRM_OF_TAG]) in numbers]
    for run in stale:
        client.set_tag(run.info.run_id, INTERRUPTED_TAG, "true")
        client.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


def _record(target: Target, finished: list[tuple[Job, dict[str, Any]]], uri: str, run_id: str,
            folder: Path) -> Confirmed:
    """Aggregate one target's seeds, log them to its `confirm` run and settle its seed runs."""
    from tracking import mlflow_log
    from trainables.atop_trainable import AUDIT_KEY, PER_IMAGE_KEY

    ok = [(j, r) for j, r in finished if r.get(PER_IMAGE_KEY)]
    for j, r in finished:
        if j.run_id and not r.get(PER_IMAGE_KEY):  # spooled: an MLflow outage must not lose the stage
            failed = mlflow_log.RunLogger(uri, j.run_id, folder / "spool" / f"driver-confirm-{j.number:04d}-seed{j.seed}.jsonl")
            failed.set_status("FAILED")
            failed.close()
    log = mlflow_log.RunLogger(uri, run_id, folder / "spool" / f"confirm-{target.number:04d}.jsonl")
    per_seed = [json.loads(r[PER_IMAGE_KEY]) for _, r in ok]
    figures = aggregate(per_seed) if per_seed else {}
    val = dict(zip(OBJECTIVES, target.values))
    audit = verdict([str(r.get(AUDIT_KEY, "")) for _, r in ok])
    metrics: dict[str, float] = {}
    for name, f in figures.items():
        metrics.update({f"{TEST_PREFIX}{name}": f.mean, f"{TEST_PREFIX}{name}_sd": f.sd,
                        f"{TEST_PREFIX}{name}_lo": f.lo, f"{TEST_PREFIX}{name}_hi": f.hi})
    for o, v in val.items():
        metrics[f"{VAL_PREFIX}{o}"] = v
        for side, bound in zip(("lo", "hi"), target.intervals.get(o, [])):
            metrics[f"{VAL_PREFIX}{o}_{side}"] = bound
        if o in figures:
            metrics[f"{GAP_PREFIX}{o}"] = v - figures[o].mean
    n_images = len(next(iter(per_seed[0].values()))) if per_seed else 0
    metrics.update({f"{TEST_PREFIX}n_seeds": len(ok), f"{TEST_PREFIX}n_images": n_images})
    log.log_metrics(metrics, step=0)
    log.set_tags({AUDIT_TAG: audit})
    log.set_status("FINISHED" if ok else "FAILED")
    log.close()
    return Confirmed(target.number, target.label, target.params, [j.seed for j, _ in finished], n_images, figures,
                     val, audit, [j.seed for j, r in finished if (j, r) not in ok], run_id)
