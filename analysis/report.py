"""The Markdown report of a study: its front, hypervolume, knee, how sure the front is, the
confirmed configurations' test figures and (optionally) a comparison."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from analysis.compute import CompareInfo, FrontInfo
from analysis.confirmed import ConfirmRow, render_table
from analysis.per_example import PER_EXAMPLE_ARTIFACT, PerImage
from analysis.uncertainty import FrontUncertainty
from tracking.contract import IMPORTANCE_METRIC, IMPORTANCE_TRIALS_METRIC, importance_order


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def render(
    info: FrontInfo,
    study: str,
    uri: str,
    files: Sequence[str],
    cmp: CompareInfo | None = None,
    *,
    per: PerImage | None = None,
    sure: FrontUncertainty | None = None,
    confirmed: tuple[ConfirmRow, ...] = (),
    evaluations: Sequence[str] = (),
    importances: tuple[dict[str, dict[str, float]], int] = ({}, 0),
) -> str:
    """Render the report.

    Args:
        info: The study's front information.
        study: Study (experiment) name.
        uri: Tracking URI the runs came from.
        files: Names of the files written beside the report.
        cmp: Comparison with other studies, or None.
        per: The trials' per-image scores (which trials have them), or None if not loaded.
        sure: The bootstrap's answers, or None when it could not run.
        confirmed: The confirm runs (``analysis.confirmed.confirm_table``).
        evaluations: How the kept runs' figures were obtained (``evaluations``), distinct lines.
        importances: The parent run's hyperparameter importances and trial count (``importances``).

    Returns:
        Markdown text.
    """
    names = [o.name for o in info.objectives]
    params = [p for p in info.params if p != "rt"]  # rt has its own column
    front = np.flatnonzero(info.on_front)
    knee = info.knee
    excluded = ", ".join(f"{n} {why}" for why, n in sorted(info.excluded.items())) or "none"
    lines = [
        f"# Pareto analysis of study `{study}`",
        "",
        f"- Tracking URI: `{uri}`",
        f"- Objectives: {', '.join(str(o) for o in info.objectives)} (final value of each run)",
        _how(evaluations),
        (
            f"- Runs kept: {len(info.points)} FINISHED trial runs with every objective; left out: "
            f"{excluded}"
        ),
        f"- Reference point: {_fmt(info.ref_point)} (0 = worst accuracy for maximised objectives)",
        f"- **Hypervolume: {info.hypervolume:.6g}**",
        f"- **First front: {len(front)} runs**",
        (
            f"- **Knee: run `{info.run_ids[knee]}` (trial {info.trial_numbers[knee]}, "
            f"rt {info.groups[knee]}) at {_fmt(info.points[knee])}**: the front point closest to "
            "the ideal point after scaling each objective to [0, 1] over the front"
        ),
        "",
        "## First front",
        "",
        "Hyperparameters are those that vary across the kept runs. Rows marked `= trial N` have",
        "exactly the same objective values as trial N: the study cannot tell them apart.",
        "",
        "| trial | run id | rt | " + " | ".join([*names, *params]) + " | HV contribution | same as |",
        "|---:|---|---|" + "---:|" * len(names) + "---|" * len(params) + "---:|---|",
    ]
    for i in front[np.argsort(-info.contributions[front], kind="stable")]:
        star = " (knee)" if i == knee else ""
        values = " | ".join([*(f"{v:.4f}" for v in info.points[i]), *(info.params[p][i] for p in params)])
        twins = [t for t in front if t != i and np.array_equal(info.points[t], info.points[i])]
        same = ", ".join(f"= trial {info.trial_numbers[t]}" for t in twins)
        lines.append(
            f"| {info.trial_numbers[i]} | `{info.run_ids[i]}`{star} | {info.groups[i]} "
            f"| {values} | {info.contributions[i]:.4g} | {same} |"
        )
    if per is not None:
        lines += _sure_section(info, per, sure)
    lines += _importance_section(*importances)
    lines += ["", "## Confirmed on test", "", render_table(confirmed)]
    if cmp is not None:
        lines += _compare_section(cmp)
    lines += ["", "## Files", "", *[f"- `{f}`" for f in files], ""]
    return "\n".join(lines)


def evaluations(table: pa.Table, run_ids: Sequence[str]) -> list[str]:
    """The distinct ``evaluation`` lines (tag ``atop.evaluation``) of the runs ``run_ids``, sorted."""
    if "evaluation" not in table.column_names:
        return []
    wanted = set(run_ids)
    return sorted({e for r, e in zip(table["run_id"].to_pylist(), table["evaluation"].to_pylist(), strict=True)
                   if r in wanted and e})


def importances(table: pa.Table, parent_run_id: str | None) -> tuple[dict[str, dict[str, float]], int]:
    """(objective -> parameter -> importance, trials fitted) from the study's parent run, as the
    driver logged them (``study.importance``); empty when it logged none."""
    prefix = "final." + IMPORTANCE_METRIC.split("{", 1)[0]
    rows = [r for r in table.to_pylist() if r.get("run_id") == parent_run_id]
    if not rows:
        return {}, 0
    found: dict[str, dict[str, float]] = {}
    for key, value in rows[0].items():
        if key.startswith(prefix) and value is not None and key.count("/") == 2:
            objective, param = key.removeprefix(prefix).split("/")
            found.setdefault(objective, {})[param] = float(value)
    n = rows[0].get("final." + IMPORTANCE_TRIALS_METRIC)
    return found, int(n) if n is not None else 0


def _importance_section(found: dict[str, dict[str, float]], n_trials: int) -> list[str]:
    if not found:
        return []
    objectives = list(found)
    return [
        "",
        "## Hyperparameter importances",
        "",
        (f"Optuna's fANOVA over the study's {n_trials} complete trials, as the driver logged them on the parent "
        "run (`importance/<objective>/<param>`); each objective's importances sum to 1. A point estimate "
        "without an interval: with few trials, indicative only."),
        "",
        "| parameter | " + " | ".join(objectives) + " |",
        "|---|" + "---:|" * len(objectives),
        *(f"| {p} | " + " | ".join(f"{found[o].get(p, 0.0):.2f}" for o in objectives) + " |" for p in importance_order(found)),
    ]


def figure_caption(lines: Sequence[str]) -> str:
    """How the objectives were obtained (``evaluations``' lines), as a figure's caption."""
    if not lines:
        return "How the objectives were obtained: not recorded on these runs (tag atop.evaluation)."
    if len(lines) == 1:
        return f"Objectives: {lines[0]}."
    return "Objectives obtained differently between the runs (not comparable): " + " | ".join(lines) + "."


def _how(lines: Sequence[str]) -> str:
    if not lines:
        return "- How the objectives were obtained: not recorded on these runs (tag `atop.evaluation`)"
    if len(lines) == 1:
        return f"- How the objectives were obtained (tag `atop.evaluation`): {lines[0]}"
    return ("- How the objectives were obtained (tag `atop.evaluation`) **differs between the kept runs**, so "
            "their figures are not comparable: " + " | ".join(lines))


def _compare_section(cmp: CompareInfo) -> list[str]:
    pair = f"{cmp.pair[0].name} against {cmp.pair[1].name}"
    lines = [
        "",
        "## Comparison",
        "",
        "| study | search space | side | hypervolume (all objectives, same reference) |",
        "|---|---|---|---:|",
    ]
    for i, (name, label, hv) in enumerate(zip(cmp.names, cmp.labels, cmp.hypervolumes)):
        side = "left" if i in cmp.left else "right"
        lines.append(f"| `{name}` | {label} | {side} | {hv:.6g} |")
    lines.append("")
    if cmp.eaf_diff is None:
        lines.append(f"EAF difference ({pair}) not computed: {cmp.eaf_note}.")
        return lines
    d = cmp.eaf_diff[:, -1]
    lines.append(
        f"`compare.png` overlays each study's 2-D front ({pair}) and maps the difference of the "
        f"two sides' empirical attainment functions: {np.sum(d > 0)} regions where the left side "
        f"attains more often (up to {d.max(initial=0):+.2f}), {np.sum(d < 0)} where the right "
        f"side does (down to {d.min(initial=0):+.2f})."
    )
    return lines


def _trials(info: FrontInfo, run_ids: Sequence[str]) -> str:
    return ", ".join(f"{info.trial_numbers[info.run_ids.index(r)]}" for r in run_ids)


def _sure_section(info: FrontInfo, per: PerImage, sure: FrontUncertainty | None) -> list[str]:
    lines = ["", "## How sure the front is", ""]
    reasons: dict[str, list[str]] = {}
    for run_id, why in per.missing.items():
        reasons.setdefault(why, []).append(run_id)
    absent = [f"- {why}: trial {_trials(info, ids)}" for why, ids in sorted(reasons.items())]
    if absent:
        lines.append(
            f"{len(per.missing)} kept trial(s) have no usable per-image scores "
            f"(`{PER_EXAMPLE_ARTIFACT}`); they are not part of the bootstrap and have no front "
            "probability:"
        )
        lines += ["", *absent, ""]
    if sure is None:
        why = "their files share no image" if per.run_ids else "no kept trial has per-image scores"
        return [*lines, f"Front probability not computed: {why}."]
    lines.append(
        f"Method: bootstrap over images, {sure.resamples} resamples (seed {sure.seed}) of the "
        f"{sure.n_images} evaluation images common to the {len(sure.run_ids)} trials with "
        "per-image scores; each resample draws the same images for every trial (paired). "
        "P(front): the fraction of resamples in which the trial is on the first front. Two "
        "front members are distinguishable when the 95% percentile interval of their paired "
        "difference excludes 0 for some objective."
    )
    if per.most_images > per.n_images:
        lines.append(f"The files hold up to {per.most_images} images; only shared ones are used.")
    lines += ["", "| trial | run id | P(front) | not distinguishable from |", "|---:|---|---:|---|"]
    for run_id in np.array(info.run_ids)[info.on_front]:
        p = sure.probability_of(run_id)
        if p is None:
            lines.append(f"| {_trials(info, [run_id])} | `{run_id}` | - | no per-image scores |")
            continue
        k = sure.front.index(run_id)
        same = [m for j, m in enumerate(sure.front) if j != k and not sure.apart[k, j]]
        near = f"trial {_trials(info, same)}" if same else "none"
        lines.append(f"| {_trials(info, [run_id])} | `{run_id}` | {p:.3f} | {near} |")
    pairs = [(i, j) for i in range(len(sure.front)) for j in range(i + 1, len(sure.front))]
    apart = sum(bool(sure.apart[i, j]) for i, j in pairs)
    if not pairs:
        verdict = "One front member has per-image scores: there is no pair to distinguish."
    elif apart == len(pairs):
        verdict = f"All {len(pairs)} pairs of front members are distinguishable."
    elif apart == 0:
        verdict = (
            f"No pair of front members is distinguishable ({len(pairs)} pairs): "
            "the study cannot rank them."
        )
    else:
        verdict = (
            f"{apart} of {len(pairs)} pairs of front members are distinguishable; "
            "the rest are within the noise."
        )
    return [*lines, "", f"**{verdict}**"]
