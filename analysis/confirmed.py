"""The confirm stage's results table: one row per ``confirm`` run, its test figures with intervals.

Compute (:func:`confirm_table`, from the runs table of ``analysis.load``) then render
(:func:`render_table`, Markdown); ``python -m analysis --table`` prints it and ``report.md``
carries it under "Confirmed on test". The metric and tag names are those of ``tracking.contract``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from tracking.contract import (
    AUTOATTACK_FIGURE,
    GAP_PREFIX,
    OBJECTIVES,
    TEST_PREFIX,
    VAL_PREFIX,
    Role,
)

#: (column heading, figure) in table order; the seen heading gets the training norm
FIGURES = (
    ("clean", "clean_acc"),
    ("seen (PGD-EOT{norm})", "robust_acc_seen"),
    ("AutoAttack-rand", AUTOATTACK_FIGURE),
    ("unseen", "robust_acc_unseen"),
)
#: hyperparameters shown for each row, where they differ between rows (all of them for one row)
KEY_PARAMS = (
    "defense", "rt", "mask_ratio", "noise_std", "num_masks", "train_attack", "train_norm", "train_grad_path",
    "train_eot", "lambda_ce", "ce_warmup_epochs", "lr", "epochs",
)  # fmt: skip
NO_CONFIRM = (
    "No confirm runs in this experiment (tag atop.role=confirm): the study ran with --no-confirm, "
    "or its confirm stage has not run."
)


@dataclass(frozen=True)
class ConfirmRow:
    """One confirmed configuration.

    Attributes:
        run_id: The ``confirm`` run's id.
        name: Its reference config's name, else ``trial N`` (the search trial it confirms).
        status: MLflow run status.
        params: Its hyperparameters (its own params, else its search trial's), without ``params.``.
        metrics: Its final metrics, without ``final.`` (``test/...``, ``val/...``, ``gap/...``).
        eval_level, audit: Its tags (None when absent).
    """

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    eval_level: str | None
    audit: str | None

    def figure(self, prefix: str, name: str, suffix: str = "") -> float | None:
        return self.metrics.get(f"{prefix}{name}{suffix}")


def confirm_table(runs: pa.Table) -> tuple[ConfirmRow, ...]:
    """The ``confirm`` runs of a study, references first (by name), then by confirmed trial."""
    rows = runs.to_pylist()
    by_id = {r["run_id"]: r for r in rows}
    out = []
    for r in rows:
        if r.get("role") != Role.CONFIRM.value:
            continue
        own = _prefixed(r, "params.")
        params = own or _prefixed(by_id.get(r.get("confirm_of_run") or "", {}), "params.")
        name = r.get("reference") or (
            f"trial {r['confirm_of']}" if r.get("confirm_of") is not None else r["run_id"]
        )
        out.append(
            ConfirmRow(
                r["run_id"],
                name,
                r["status"],
                params,
                _prefixed(r, "final."),
                r.get("eval_level"),
                r.get("audit"),
            )
        )
    out.sort(key=lambda c: (c.name.startswith("trial "), _trial_key(c.name)))
    return tuple(out)


def _prefixed(row: dict, prefix: str) -> dict:
    """The row's non-null values under ``prefix`` (the runs table has every run's columns)."""
    return {
        k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix) and v is not None
    }


def _trial_key(name: str) -> tuple[int, str]:
    number = name.removeprefix("trial ")
    return (int(number), "") if number.isdigit() else (0, name)


def _interval(mean: float | None, lo: float | None, hi: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if lo is None or hi is None else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _slash(values: list[float | None], fmt: str) -> str:
    return " / ".join("-" if v is None else format(v, fmt) for v in values)


def _distinct(values: list) -> str:
    counts = Counter(
        "?" if v is None else (f"{v:g}" if isinstance(v, float) else v) for v in values
    )
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} runs)" for v, n in counts.most_common())


def header(rows: tuple[ConfirmRow, ...]) -> str:
    """The line that says how the table's numbers were obtained."""
    level = _distinct([r.eval_level for r in rows])
    seeds = _distinct([r.figure(TEST_PREFIX, "n_seeds") for r in rows])
    images = _distinct([r.figure(TEST_PREFIX, "n_images") for r in rows])
    return (
        f"Test figures of {len(rows)} confirmed configuration{'s' if len(rows) != 1 else ''} at "
        f"eval level {level} (tag atop.eval_level), {seeds} seeds, {images} test images: each cell "
        "is the mean over seeds [95% interval: bootstrap over test images of the seed-mean]; sd: "
        "standard deviation over seeds; val: the search trial's validation figure; gap: validation "
        "minus test."
    )


def render_table(rows: tuple[ConfirmRow, ...]) -> str:
    """The Markdown table (with its header line), or :data:`NO_CONFIRM` when ``rows`` is empty."""
    if not rows:
        return NO_CONFIRM
    norms = {r.params.get("train_norm") for r in rows}
    norm = f" {norms.pop()}" if len(norms) == 1 and None not in norms else ""
    heads = [h.format(norm=norm) for h, _ in FIGURES]
    # one row: every key param it has; several: those with more than one value among the rows
    keys = [
        k for k in KEY_PARAMS if len({r.params.get(k) for r in rows} - {None}) > (len(rows) > 1)
    ]
    objectives = " / ".join(OBJECTIVES)
    head = (
        f"| config | hyperparameters | {' | '.join(heads)} | sd over seeds ({' / '.join(heads)}) "
        f"| val ({objectives}) | gap val - test ({objectives}) | audit |"
    )
    lines = [header(rows), "", head, "|---|---|" + "---:|" * (len(heads) + 3) + "---|"]
    for r in rows:
        name = r.name if r.status == "FINISHED" else f"{r.name} ({r.status})"
        params = ", ".join(f"{k}={r.params[k]}" for k in keys if k in r.params) or "-"
        cells = [
            _interval(*(r.figure(TEST_PREFIX, f, s) for s in ("", "_lo", "_hi")))
            for _, f in FIGURES
        ]
        sd = _slash([r.figure(TEST_PREFIX, f, "_sd") for _, f in FIGURES], ".3f")
        val = " / ".join(
            _interval(*(r.figure(VAL_PREFIX, o, s) for s in ("", "_lo", "_hi"))) for o in OBJECTIVES
        )
        gap = _slash([r.figure(GAP_PREFIX, o) for o in OBJECTIVES], "+.3f")
        lines.append(
            f"| {name} | {params} | {' | '.join(cells)} | {sd} | {val} | {gap} | {r.audit or '-'} |"
        )
    return "\n".join(lines)
