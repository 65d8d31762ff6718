"""Pareto analysis of a study's MLflow runs.

    python -m analysis --mlflow-uri sqlite:////abs/path/mlflow.db --experiment NAME --out DIR \
        [--objectives clean_acc robust_acc_seen robust_acc_unseen] [--ref-point 0 0 0] \
        [--compare OTHER ...] [--resamples 1000] [--log-to-mlflow] [--table] [--claims]

Writes into DIR: runs.parquet, pareto.parquet, front_pairs.png, front_3d.png, convergence.png,
params.png, compare.png (with --compare), figures.html and report.md (see docs/ANALYSIS.md).
``--table`` prints the confirm stage's results table (one row per confirm run; --out optional).
``--claims`` prints the paper's two claims' verdicts from the reference arms' paired differences
(``analysis.claims``; --out optional).
Bad input prints one line ``error: ...`` to stderr, exits 2 and leaves no DIR behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# Light imports only: the command line is checked before MLflow, pyarrow and matplotlib load
# (tests/test_refusal.py); `run` and `main` import what the work needs.
from analysis.compute import check_ref_point
from analysis.errors import AnalysisError
from analysis.uncertainty import RESAMPLES
from atop.cli import OneLineParser, one_line_errors
from tracking.contract import OBJECTIVES

if TYPE_CHECKING:
    import pyarrow as pa

    from analysis.compute import FrontInfo
    from analysis.load import Study
    from analysis.uncertainty import FrontUncertainty

#: the bootstrap's seed: the same study gives the same front probabilities
BOOTSTRAP_SEED = 0
#: fewest bootstrap resamples accepted (issue 11: >= 200)
MIN_RESAMPLES = 200


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    p.add_argument(
        "--mlflow-uri", required=True, help="tracking URI: http(s)://, sqlite:///, file:"
    )
    p.add_argument("--experiment", required=True, help="the study's MLflow experiment name")
    p.add_argument(
        "--out", type=Path, help="output directory (required unless --table or --claims)"
    )
    p.add_argument(
        "--objectives",
        nargs="+",
        default=list(OBJECTIVES),
        help="metric names, each optionally :min or :max (default: max)",
    )
    p.add_argument(
        "--ref-point",
        nargs="+",
        type=float,
        help="hypervolume reference point, one value per objective "
        "(default: 0 for maximised objectives)",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="NAME",
        help="other experiments to overlay, with the EAF difference",
    )
    p.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="log the outputs to the study's parent run under analysis/",
    )
    p.add_argument(
        "--resamples",
        type=int,
        default=RESAMPLES,
        help=f"bootstrap resamples of the images for each trial's front probability "
        f"(default {RESAMPLES}, at least {MIN_RESAMPLES})",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="print the confirm stage's results table (one row per confirm run: test figures with "
        "95%% intervals, seed spread, validation figure, val-to-test gap, audit verdict); "
        "--out is then optional",
    )
    p.add_argument(
        "--claims",
        action="store_true",
        help="print the verdicts of the paper's two claims from paired differences between the "
        "reference arms of a reproduce study (test images, 95%% bootstrap intervals over images "
        "and seeds); --out is then optional",
    )
    args = p.parse_args(argv)
    if args.out is None and not (args.table or args.claims):
        p.error("one of --out DIR, --table or --claims is required")
    if args.resamples < MIN_RESAMPLES:
        p.error(f"--resamples {args.resamples}: accepted: an integer >= {MIN_RESAMPLES}")
    return args


def pareto_table(info: FrontInfo, runs: pa.Table, sure: FrontUncertainty | None = None) -> pa.Table:
    """One row per first-front run: run id, trial, rt, objectives, contribution, knee, front
    probability (null without per-image scores), params."""
    import pyarrow as pa

    front = [i for i in range(len(info.points)) if info.on_front[i]]
    ids = [info.run_ids[i] for i in front]
    columns = {
        "run_id": ids,
        "trial_number": [int(info.trial_numbers[i]) for i in front],
        "rt": [info.groups[i] for i in front],
        **{o.name: info.points[front, k] for k, o in enumerate(info.objectives)},
        "hv_contribution": info.contributions[front],
        "is_knee": [i == info.knee for i in front],
        "front_probability": pa.array(
            [sure.probability_of(r) if sure else None for r in ids], pa.float64()
        ),
    }
    by_id = {r: k for k, r in enumerate(runs["run_id"].to_pylist())}
    params = runs.take([by_id[r] for r in ids]).select(
        [c for c in runs.column_names if c.startswith("params.")]
    )
    head = pa.table(columns)
    return pa.Table.from_arrays(
        [*head.columns, *params.columns], names=[*head.column_names, *params.column_names]
    )


def run(args: argparse.Namespace, study: Study | None = None) -> Path:
    """Load (unless ``study`` is given), compute, draw and write; return the output directory."""
    from analysis.compute import Objective, analyse, compare, study_label
    from analysis.load import load_study

    objectives = [Objective.parse(text) for text in args.objectives]
    minimise = [o.name for o in objectives if not o.maximise]
    study = study or load_study(args.mlflow_uri, args.experiment, minimise)
    # after loading, which checks the tracking URI first: these import MLflow and matplotlib
    import numpy as np
    import pyarrow.parquet as pq

    from analysis.confirmed import confirm_table
    from analysis.draw import write_figures
    from analysis.per_example import load_per_image
    from analysis.report import evaluations, figure_caption, importances, render
    from analysis.uncertainty import assess

    try:
        info = analyse(study.table, objectives, args.ref_point)
    except AnalysisError as exc:  # name the experiment: the message reaches a user of several studies
        raise AnalysisError(f"experiment {args.experiment!r}: {exc}") from None
    if args.log_to_mlflow and study.parent_run_id is None:
        raise AnalysisError(
            f"--log-to-mlflow: experiment {args.experiment!r} has no parent run "
            "(tag atop.role=study) to log to"
        )
    evaluated = evaluations(study.table, info.run_ids)
    cmp, compare_caption = None, ""
    if args.compare:
        others = [load_study(args.mlflow_uri, name, minimise) for name in args.compare]
        infos = [info, *(analyse(s.table, objectives, info.ref_point) for s in others)]
        studies = [study, *others]
        cmp = compare(
            infos, [s.name for s in studies], [study_label(s.table, s.name) for s in studies]
        )
        compare_caption = figure_caption(
            sorted({e for s, i in zip(studies, infos) for e in evaluations(s.table, i.run_ids)})
        )

    per = load_per_image(args.mlflow_uri, info, study.table)
    sure = None
    if per.n_images:
        front = [info.run_ids[i] for i in np.flatnonzero(info.on_front)]
        sure = assess(per.scores, per.run_ids, front, info.maximise, resamples=args.resamples,
                      seed=BOOTSTRAP_SEED)

    # Everything is written into a temporary sibling of DIR and moved into place at the end, so
    # a failure leaves no half-written DIR.
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pq.write_table(study.table, tmp / "runs.parquet")
        pq.write_table(pareto_table(info, study.table, sure), tmp / "pareto.parquet")
        files = ["runs.parquet", "pareto.parquet", *write_figures(info, tmp, study.name, cmp, figure_caption(evaluated),
                                                                   compare_caption)]
        files.append("report.md")
        text = render(info, study.name, args.mlflow_uri, files, cmp, per=per, sure=sure,
                      confirmed=confirm_table(study.table), evaluations=evaluated,
                      importances=importances(study.table, study.parent_run_id))
        (tmp / "report.md").write_text(text, encoding="utf-8")
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.log_to_mlflow:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=args.mlflow_uri)
        for name in files:
            client.log_artifact(study.parent_run_id, str(out / name), artifact_path="analysis")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on bad input)."""
    args = parse_args(argv)
    # one MLflow download bar per trial's per-example file is noise; the bootstrap says how far it is
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def body() -> int:
        check_ref_point(args.ref_point, len(args.objectives))  # before the store is read
        from analysis.compute import Objective
        from analysis.confirmed import confirm_table, render_table
        from analysis.load import load_study

        study = None
        if args.table or args.claims:
            minimise = [o.name for o in map(Objective.parse, args.objectives) if not o.maximise]
            study = load_study(args.mlflow_uri, args.experiment, minimise)
            if args.table:
                print(render_table(confirm_table(study.table)))
            if args.claims:
                from analysis.claims import (  # MLflow: after the URI check
                    assess_claims,
                    load_arms,
                    render_claims,
                )

                print(render_claims(assess_claims(*load_arms(args.mlflow_uri, study.table))))
        if args.out is not None:
            print(f"wrote {run(args, study)}")
        return 0

    return one_line_errors(body, (AnalysisError,))


if __name__ == "__main__":
    sys.exit(main())
