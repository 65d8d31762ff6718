"""The driver's text table of the search's Pareto-optimal trials, with each figure's 95% interval.

Two front members whose intervals overlap on every objective are not told apart by this evaluation:
the table marks them (`~N`: inside the noise of trial N), so nobody picks one over the other on a
difference the images cannot show.
"""
from __future__ import annotations

from typing import Any

from tracking.contract import ATTR_INTERVALS, ATTR_REFERENCE, ATTR_RUN_ID, OBJECTIVES


def overlapping(intervals: dict[int, dict[str, Any]]) -> dict[int, list[int]]:
    """Trial number -> the other trials whose 95% intervals overlap its own on every objective.

    Args:
        intervals: trial number -> objective -> (lo, hi); a trial lacking an objective's interval
            overlaps nobody (nothing can be said about it).
    """
    def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(o in a and o in b and a[o][0] <= b[o][1] and b[o][0] <= a[o][1] for o in OBJECTIVES)

    return {n: [m for m in intervals if m != n and overlap(intervals[n], intervals[m])] for n in intervals}


def pareto_table(study: Any, note: str | None = None) -> str:
    """The Pareto-optimal COMPLETE trials as a text table (objectives with intervals, then params).

    Args:
        study: the Optuna study.
        note: a last line saying how strong the evaluation behind the figures was
            (`tracking.contract.eval_level_note`).
    """
    from study.warmstart import own_front  # (imports Optuna: this module stays light)

    best = own_front(study)
    tail = [f"figures at {note}"] if note else []
    if not best:
        return "\n".join(["Pareto-optimal trials: none (no trial completed)", *tail])
    same = overlapping({t.number: t.user_attrs.get(ATTR_INTERVALS, {}) for t in best})
    params = sorted({k for t in best for k in t.params})
    head = ["trial", *(f"{o} [95%]" for o in OBJECTIVES), "inside noise of", *params, ATTR_RUN_ID]
    rows = []
    for t in best:
        iv = t.user_attrs.get(ATTR_INTERVALS, {})
        figures = [f"{v:.3f} [{iv[o][0]:.3f}, {iv[o][1]:.3f}]" if o in iv else f"{v:.3f}"
                   for o, v in zip(OBJECTIVES, t.values)]
        ref = t.user_attrs.get(ATTR_REFERENCE)
        rows.append([f"{t.number}{f' ({ref})' if ref else ''}", *figures,
                     ",".join(f"~{m}" for m in same[t.number]) or "-",
                     *(_fmt(t.params.get(k, "-")) for k in params), t.user_attrs.get(ATTR_RUN_ID, "-")])
    title = ("Pareto-optimal trials (all objectives maximised; [95%]: Wilson interval over images; ~N: its "
             "intervals overlap trial N's on every objective, so the two are not distinguishable):")
    return "\n".join([title, *columns(head, rows), *tail])


def columns(head: list[str], rows: list[list[str]]) -> list[str]:
    """A text table's lines: the header, a rule, then the rows, each column padded to its widest cell."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, ["-" * w for w in widths], *rows]]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
