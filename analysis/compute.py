"""Pareto fronts, hypervolume, knee, convergence and attainment functions (pure numpy + moocore).

Every function takes objective values as an ``(n, m)`` array and a per-objective ``maximise``
flag; moocore does the multi-objective work. :func:`analyse` turns a runs table (see
``analysis.load``) into a :class:`FrontInfo`, the only thing ``analysis.draw`` and
``analysis.report`` read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np
import pyarrow as pa

from analysis.errors import AnalysisError
from tracking.contract import Role

GROUP_PARAM = "rt"
# A param with more distinct text values than this (run names, paths) is not drawn as an axis.
MAX_CATEGORIES = 12


@dataclass(frozen=True)
class Objective:
    """One objective: a metric name and its direction."""

    name: str
    maximise: bool = True

    @classmethod
    def parse(cls, text: str) -> Objective:
        """Parse ``name``, ``name:max`` or ``name:min`` (a bare name is maximised)."""
        name, sep, direction = text.partition(":")
        if not name or (sep and direction not in ("min", "max")):
            raise AnalysisError(f"bad objective {text!r}; accepted: NAME, NAME:min or NAME:max")
        return cls(name, direction != "min")

    def __str__(self) -> str:
        return f"{self.name}:{'max' if self.maximise else 'min'}"


@dataclass(frozen=True)
class FrontInfo:
    """What the figures and the report show of one study.

    Attributes:
        objectives: The objectives, in column order of ``points``.
        points: ``(n, m)`` final objective values of the runs kept for the front, in trial order.
        run_ids: MLflow run id of each row of ``points``.
        trial_numbers: Optuna trial number of each row (-1 when the tag is missing).
        groups: RT type (param ``rt``) of each row, ``"n/a"`` when absent.
        params: Hyperparameters that vary across the kept runs: name -> value of each row.
        ranks: Pareto rank of each row (0 = first front; duplicates share a rank).
        ref_point: Hypervolume reference point, one value per objective.
        hypervolume: Hypervolume of the first front against ``ref_point``.
        contributions: Hypervolume contribution of each row (0 off the first front and for
            duplicated front points, whose removal alone loses nothing).
        knee: Row index of the knee point (see :func:`knee_point`).
        convergence: Hypervolume of the first ``k + 1`` rows, for each ``k``.
        excluded: Reason -> number of runs left out of the front.
        lo, hi: ``(n, m)`` 95% interval of each value of ``points`` (the run's final
            ``<objective>_lo`` / ``_hi`` metrics: Wilson over images); NaN where not logged.
    """

    objectives: tuple[Objective, ...]
    points: np.ndarray
    run_ids: tuple[str, ...]
    trial_numbers: np.ndarray
    groups: tuple[str, ...]
    params: dict[str, tuple[str, ...]]
    ranks: np.ndarray
    ref_point: np.ndarray
    hypervolume: float
    contributions: np.ndarray
    knee: int
    convergence: np.ndarray
    excluded: dict[str, int]
    lo: np.ndarray
    hi: np.ndarray

    @property
    def maximise(self) -> np.ndarray:
        return np.array([o.maximise for o in self.objectives])

    @property
    def on_front(self) -> np.ndarray:
        return self.ranks == 0


def exclusion_reason(row: dict, objectives: Sequence[Objective]) -> str | None:
    """Why one run (a row of the runs table) is left out of the fronts, or None if it is kept.

    Kept: a search trial run (tag ``atop.role=trial``), FINISHED, not stopped early by the
    scheduler, meeting every ``--constraint`` (no tag ``atop.infeasible``), with a finite final
    value of every objective. The study's parent run and the
    confirm stage's runs (roles ``confirm``, ``confirm_seed``: scored on test images) never are.
    """
    role = row.get("role")
    if role == Role.STUDY.value:
        return "study parent run"
    if role != Role.TRIAL.value:
        return f"role {role}" if role else "no atop.role tag"
    if row["status"] != "FINISHED":
        return f"status {row['status']}"
    if row.get("stopped"):
        return "stopped early"
    if row.get("infeasible"):
        return f"broke --constraint {row['infeasible']}"
    values = [row.get(f"final.{o.name}") for o in objectives]
    if any(v is None or not np.isfinite(v) for v in values):
        return "missing objective metric"
    return None


def default_ref_point(points: np.ndarray, maximise: np.ndarray) -> np.ndarray:
    """0 for a maximised objective (the worst accuracy); for a minimised one, its worst
    observed value plus 10% of its observed range (plus 0.1 when the range is 0), so that the
    worst points still add volume."""
    worst = points.max(axis=0) if len(points) else np.zeros(len(maximise))
    span = np.ptp(points, axis=0) if len(points) else np.zeros(len(maximise))
    return np.where(maximise, 0.0, worst + 0.1 * np.where(span > 0, span, 1.0))


def knee_point(front: np.ndarray, maximise: np.ndarray) -> int:
    """Index of the knee of a front: the point closest (Euclidean) to the ideal point after each
    objective is scaled to [0, 1] over the front (0 = worst, 1 = best on the front; an objective
    constant over the front scales to 1). Ties go to the lowest index (the earliest trial).

    Args:
        front: ``(k, m)`` mutually non-dominated points, k >= 1.
        maximise: ``(m,)`` booleans.

    Returns:
        A row index into ``front``.
    """
    lo, hi = front.min(axis=0), front.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    goodness = np.where(maximise, front - lo, hi - front) / span
    goodness[:, hi == lo] = 1.0
    return int(np.argmin(np.linalg.norm(1.0 - goodness, axis=1)))


def hypervolume_convergence(
    points: np.ndarray, ref: np.ndarray, maximise: np.ndarray
) -> np.ndarray:
    """Hypervolume of the first ``k + 1`` points, for ``k = 0 .. n - 1`` (non-decreasing)."""
    return np.array(
        [
            moocore.hypervolume(points[: k + 1], ref=ref, maximise=maximise)
            for k in range(len(points))
        ]
    )


def front_analysis(
    points: np.ndarray, maximise: np.ndarray, ref: np.ndarray
) -> tuple[np.ndarray, float, np.ndarray, int, np.ndarray]:
    """Ranks, hypervolume, contributions, knee and convergence of points given in trial order.

    Args:
        points: ``(n, m)`` objective values, n >= 1.
        maximise: ``(m,)`` booleans.
        ref: ``(m,)`` reference point; points that do not strictly beat it add no volume.

    Returns:
        ``(ranks, hypervolume, contributions, knee, convergence)`` as in :class:`FrontInfo`.
    """
    ranks = moocore.pareto_rank(points, maximise=maximise)
    front_idx = np.flatnonzero(ranks == 0)
    contributions = np.zeros(len(points))
    contributions[front_idx] = moocore.hv_contributions(
        points[front_idx], ref=ref, maximise=maximise
    )
    hv = moocore.hypervolume(points[front_idx], ref=ref, maximise=maximise)
    knee = int(front_idx[knee_point(points[front_idx], maximise)])
    return ranks, hv, contributions, knee, hypervolume_convergence(points, ref, maximise)


def check_ref_point(ref_point: Sequence[float] | np.ndarray | None, n_objectives: int) -> None:
    """Raise AnalysisError unless ``ref_point`` (None: the default) has one value per objective."""
    if ref_point is not None and len(ref_point) != n_objectives:
        raise AnalysisError(
            f"reference point {list(ref_point)} has {len(ref_point)} values; "
            f"accepted: one per objective ({n_objectives})"
        )


def analyse(
    table: pa.Table,
    objectives: Sequence[Objective],
    ref_point: Sequence[float] | np.ndarray | None = None,
) -> FrontInfo:
    """Compute a study's :class:`FrontInfo` from its runs table.

    Args:
        table: Runs table of ``analysis.load`` (any row order; rows are kept in table order,
            which ``load`` sorts by trial number).
        objectives: Objectives; each needs a ``final.<name>`` column.
        ref_point: Reference point, one value per objective; default :func:`default_ref_point`.

    Returns:
        The study's front information.

    Raises:
        AnalysisError: An objective is not a metric of the table, the reference point has the
            wrong length, or no run is kept (an empty experiment).
    """
    rows = table.to_pylist()
    if all(exclusion_reason(r, ()) for r in rows):
        raise AnalysisError(
            f"empty experiment: none of its {len(rows)} runs is a FINISHED trial run"
        )
    metrics = sorted(c.removeprefix("final.") for c in table.column_names if c.startswith("final."))
    unknown = [o.name for o in objectives if o.name not in metrics]
    if unknown:
        raise AnalysisError(
            f"unknown objective {unknown[0]!r}; metrics in this experiment: {', '.join(metrics)}"
        )
    check_ref_point(ref_point, len(objectives))
    reasons = [exclusion_reason(r, objectives) for r in rows]
    kept = [r for r, why in zip(rows, reasons) if why is None]
    if not kept:
        raise AnalysisError(
            f"no FINISHED trial run has all objectives ({', '.join(o.name for o in objectives)})"
        )
    maximise = np.array([o.maximise for o in objectives])
    points = np.array([[r[f"final.{o.name}"] for o in objectives] for r in kept], dtype=float)
    ref = default_ref_point(points, maximise) if ref_point is None else np.asarray(ref_point, float)
    ranks, hv, contributions, knee, convergence = front_analysis(points, maximise, ref)
    return FrontInfo(
        objectives=tuple(objectives),
        points=points,
        run_ids=tuple(r["run_id"] for r in kept),
        trial_numbers=np.array(
            [-1 if r.get("trial_number") is None else r["trial_number"] for r in kept]
        ),
        groups=tuple(r.get(f"params.{GROUP_PARAM}") or "n/a" for r in kept),
        params=_varying_params(kept),
        ranks=ranks,
        ref_point=ref,
        hypervolume=hv,
        contributions=contributions,
        knee=knee,
        convergence=convergence,
        excluded=dict(Counter(why for why in reasons if why is not None)),
        lo=_bounds(kept, objectives, "lo"),
        hi=_bounds(kept, objectives, "hi"),
    )


def _bounds(rows: list[dict], objectives: Sequence[Objective], side: str) -> np.ndarray:
    values = [[r.get(f"final.{o.name}_{side}") for o in objectives] for r in rows]
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def _varying_params(rows: list[dict]) -> dict[str, tuple[str, ...]]:
    names = sorted({k for r in rows for k in r if k.startswith("params.")})
    out = {}
    for key in names:
        values = tuple("" if r.get(key) is None else r[key] for r in rows)
        distinct = set(values)
        if len(distinct) > 1 and (_all_numeric(distinct) or len(distinct) <= MAX_CATEGORIES):
            out[key.removeprefix("params.")] = values
    return out


def _all_numeric(values: set[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def attainment(sets: Sequence[np.ndarray], maximise: np.ndarray) -> np.ndarray:
    """Empirical attainment function of several runs' point sets (e.g. one study per seed).

    Args:
        sets: One ``(k_i, m)`` array per study.
        maximise: ``(m,)`` booleans.

    Returns:
        ``(p, m + 1)``: points of the attainment surfaces; the last column is the percentage of
        sets that attain (weakly dominate) that point, from ``100 / len(sets)`` to 100.
    """
    points = np.vstack(sets)
    ids = np.repeat(np.arange(1, len(sets) + 1), [len(s) for s in sets])
    # moocore.eaf only minimises: flip the maximised objectives there and back.
    sign = np.where(maximise, -1.0, 1.0)
    surfaces = moocore.eaf(points * sign, ids)
    surfaces[:, :-1] *= sign
    return surfaces


def eaf_difference(
    left: Sequence[np.ndarray], right: Sequence[np.ndarray], maximise: np.ndarray
) -> np.ndarray:
    """Difference of two settings' empirical attainment functions over 2 objectives.

    Args:
        left: One ``(k_i, 2)`` point set per study of the first setting (e.g. per seed).
        right: As many point sets of the second setting (moocore counts sets, so the sides
            must be the same size).
        maximise: ``(2,)`` booleans.

    Returns:
        ``(r, 5)`` rectangles ``x1, y1, x2, y2, d``: ``(x1, y1)`` is the rectangle's best corner,
        ``(x2, y2)`` the opposite one (may be infinite), and ``d`` in [-1, 1] is the fraction of
        left studies minus the fraction of right studies attaining it: > 0 where the left setting
        does better.

    Raises:
        AnalysisError: The sides differ in size or the points are not 2-D.
    """
    if len(left) != len(right) or not left:
        raise AnalysisError(
            f"EAF difference needs the same number of studies on each side, got {len(left)} "
            f"and {len(right)}"
        )
    if any(s.shape[1] != 2 for s in (*left, *right)):
        raise AnalysisError("EAF difference is defined here for 2 objectives only")

    def with_ids(sets: Sequence[np.ndarray]) -> np.ndarray:
        ids = np.repeat(np.arange(1, len(sets) + 1), [len(s) for s in sets])
        return np.column_stack([np.vstack(sets), ids])

    rects = moocore.eafdiff(with_ids(left), with_ids(right), maximise=maximise, rectangles=True)
    rects[:, -1] /= len(left)
    return rects


@dataclass(frozen=True)
class CompareInfo:
    """Several studies side by side in one pair of objectives.

    The first study is the analysed one. Its side of the EAF difference ("left") holds it and
    every compared study with the same search space label (repetitions of one setting, such as
    seeds); the others form the "right" side. When all share a label, the left side is the
    analysed study alone and the right side all compared studies.

    Attributes:
        pair: The two objectives drawn.
        names: Study names, the analysed one first.
        labels: Search space label of each study (tag ``atop.space``, else its name).
        points: Each study's kept points in the pair, ``(k_i, 2)``.
        hypervolumes: Each study's hypervolume in all objectives, against the analysed study's
            reference point.
        left: Indices into ``names`` of the left side.
        right: Indices into ``names`` of the right side.
        eaf_diff: Rectangles of :func:`eaf_difference` (left minus right), or None.
        eaf_note: Why ``eaf_diff`` is None, else empty.
    """

    pair: tuple[Objective, Objective]
    names: tuple[str, ...]
    labels: tuple[str, ...]
    points: tuple[np.ndarray, ...]
    hypervolumes: tuple[float, ...]
    left: tuple[int, ...]
    right: tuple[int, ...]
    eaf_diff: np.ndarray | None
    eaf_note: str


def study_label(table: pa.Table, name: str) -> str:
    """The search space most trial runs of a study were tagged with, or the study's name."""
    spaces = [
        s
        for s, role in zip(table["space"].to_pylist(), table["role"].to_pylist())
        if s and role != "study"
    ]
    return Counter(spaces).most_common(1)[0][0] if spaces else name


def default_pair(objectives: Sequence[Objective]) -> tuple[Objective, Objective]:
    """``clean_acc`` against ``robust_acc_unseen`` when both are objectives, else the first two."""
    by_name = {o.name: o for o in objectives}
    if "clean_acc" in by_name and "robust_acc_unseen" in by_name:
        return by_name["clean_acc"], by_name["robust_acc_unseen"]
    if len(objectives) < 2:
        raise AnalysisError("comparing studies needs at least 2 objectives")
    return objectives[0], objectives[1]


def compare(infos: Sequence[FrontInfo], names: Sequence[str], labels: Sequence[str]) -> CompareInfo:
    """Compare studies analysed with the same objectives (the first one is the reference).

    Args:
        infos: One :class:`FrontInfo` per study, the analysed study first.
        names: Study names.
        labels: Search space label of each study (:func:`study_label`).

    Returns:
        The :class:`CompareInfo`; its EAF difference is None (with a note) when the two sides
        differ in size.
    """
    main = infos[0]
    pair = default_pair(main.objectives)
    cols = [main.objectives.index(o) for o in pair]
    left = tuple(i for i, lab in enumerate(labels) if lab == labels[0])
    right = tuple(i for i in range(len(infos)) if i not in left)
    if not right:
        left, right = (0,), tuple(range(1, len(infos)))
    points = tuple(info.points[:, cols] for info in infos)
    maximise = np.array([o.maximise for o in pair])
    try:
        diff = eaf_difference([points[i] for i in left], [points[i] for i in right], maximise)
        note = ""
    except AnalysisError as exc:
        diff, note = None, str(exc)
    return CompareInfo(
        pair=pair,
        names=tuple(names),
        labels=tuple(labels),
        points=points,
        hypervolumes=tuple(
            moocore.hypervolume(i.points, ref=main.ref_point, maximise=main.maximise) for i in infos
        ),
        left=left,
        right=right,
        eaf_diff=diff,
        eaf_note=note,
    )
