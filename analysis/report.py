"""The Markdown report of a study: its front, hypervolume, knee and (optionally) a comparison."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.compute import CompareInfo, FrontInfo


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def render(
    info: FrontInfo, study: str, uri: str, files: Sequence[str], cmp: CompareInfo | None = None
) -> str:
    """Render the report.

    Args:
        info: The study's front information.
        study: Study (experiment) name.
        uri: Tracking URI the runs came from.
        files: Names of the files written beside the report.
        cmp: Comparison with other studies, or None.

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
    if cmp is not None:
        lines += _compare_section(cmp)
    lines += ["", "## Files", "", *[f"- `{f}`" for f in files], ""]
    return "\n".join(lines)


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
