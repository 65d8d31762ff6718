"""analysis on a study with per-example files and a confirm stage, logged here into a real sqlite
MLflow store as the trainable and the driver log them (tracking/contract.py): front probabilities
in pareto.parquet and report.md, confirm runs kept out of the front, and ``--table``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis.__main__ import main
from atop.artifacts import write_parquet
from tracking.contract import (
    AUDIT_TAG,
    CONFIRM_OF_RUN_TAG,
    CONFIRM_OF_TAG,
    CONFIRM_SEED_TAG,
    EVAL_LEVEL_TAG,
    OBJECTIVES,
    PARENT_TAG,
    REFERENCE_TAG,
    ROLE_TAG,
    STAGE_TAG,
    TRIAL_TAG,
    Role,
    Stage,
)

N = 200  # validation images of every trial
CLEAN, SEEN, UNSEEN = "clean_correct", "pgd_linf_correct", "unseen_correct"


def correct(k: int, *flip: int) -> np.ndarray:
    """Right on the first k of N images, with the images in ``flip`` toggled."""
    out = np.arange(N) < k
    out[list(flip)] = ~out[list(flip)]
    return out


def trials() -> dict[str, dict[str, np.ndarray] | None]:
    """Per-image outcomes of each trial (None: it logs no per-example file).

    a: accurate. b: robust. c: b with one image better on seen (image 150) and one worse on
    unseen (image 0): on the front beside b, within the noise of it. d: a minus 100 images on
    every objective: always dominated. e: on the front, no file. f: its file disagrees with
    its logged figures.
    """
    a = {CLEAN: correct(180), SEEN: correct(60), UNSEEN: correct(40)}
    b = {CLEAN: correct(100), SEEN: correct(120), UNSEEN: correct(100)}
    c = {CLEAN: correct(100), SEEN: correct(120, 150), UNSEEN: correct(100, 0)}
    d = {k: v & (np.arange(N) >= 100) for k, v in a.items()}
    return {"a": a, "b": b, "c": c, "d": d, "e": None, "f": {k: v.copy() for k, v in d.items()}}


FIGURES = {"e": (0.95, 0.05, 0.04), "f": (0.2, 0.1, 0.1)}  # logged figures of e and f


def log_trial(client, exp, parent, number, outcomes, figures, tmp: Path) -> str:
    tags = {ROLE_TAG: Role.TRIAL.value, TRIAL_TAG: str(number), STAGE_TAG: Stage.SEARCH.value}
    if parent:
        tags[PARENT_TAG] = parent
    run = client.create_run(exp, run_name=f"trial-{number}", tags=tags).info.run_id
    metrics = []
    for name, value in zip(OBJECTIVES, figures):
        lo, hi = max(value - 0.05, 0.0), min(value + 0.05, 1.0)
        metrics += [Metric(name, value, 0, 1), Metric(f"{name}_lo", lo, 0, 1),
                    Metric(f"{name}_hi", hi, 0, 1)]  # fmt: skip
    params = [
        Param("rt", "rt2"),
        Param("train_norm", "linf"),
        Param("lambda_ce", f"{number / 10:g}"),
    ]
    client.log_batch(run, metrics=metrics, params=params)
    if outcomes is not None:
        path = tmp / f"trial-{number}" / "per_example.parquet"
        path.parent.mkdir()
        columns = {"index": np.arange(N) + 1000, "label": np.zeros(N, np.int64), **outcomes}
        columns["worst_case_correct"] = outcomes[CLEAN] & outcomes[SEEN] & outcomes[UNSEEN]
        write_parquet(columns, path, trial_number=number)
        client.log_artifact(run, str(path))
    client.set_terminated(run, "FINISHED")
    return run


def log_confirm(client, exp, parent, tags, metrics, params=()) -> str:
    tags = {PARENT_TAG: parent, ROLE_TAG: Role.CONFIRM.value, STAGE_TAG: Stage.CONFIRM.value,
            EVAL_LEVEL_TAG: "full", **tags}  # fmt: skip
    run = client.create_run(exp, run_name="confirm", tags=tags).info.run_id
    client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, v) for k, v in params])  # fmt: skip
    client.set_terminated(run, "FINISHED")
    return run


def confirm_metrics(figures: tuple[float, float, float], val: tuple[float, float, float], aa: bool):
    out = {"test/n_seeds": 2.0, "test/n_images": 500.0}
    for name, value, v in zip(OBJECTIVES, figures, val):
        out |= {f"test/{name}": value, f"test/{name}_lo": value - 0.04,
                f"test/{name}_hi": value + 0.04, f"test/{name}_sd": 0.01,
                f"val/{name}": v, f"val/{name}_lo": v - 0.05, f"val/{name}_hi": v + 0.05,
                f"gap/{name}": v - value}  # fmt: skip
    if aa:
        out |= {"test/robust_acc/autoattack_rand_linf": 0.25,
                "test/robust_acc/autoattack_rand_linf_lo": 0.21,
                "test/robust_acc/autoattack_rand_linf_hi": 0.29,
                "test/robust_acc/autoattack_rand_linf_sd": 0.02}  # fmt: skip
    return out


def log_study(client: MlflowClient, name: str, root: Path, artifacts: str | None) -> dict[str, str]:
    """The study: trials a-f (``trials()``), b's confirm run with two seeds, a reference's confirm
    run; files are written under ``root`` and logged to ``artifacts`` (None: the server's)."""
    exp = client.create_experiment(name, artifact_location=artifacts)
    parent = client.create_run(exp, tags={ROLE_TAG: Role.STUDY.value}).info.run_id
    ids = {}
    for number, (key, outcomes) in enumerate(trials().items()):
        figures = FIGURES.get(key) or tuple(
            float(outcomes[c].mean()) for c in (CLEAN, SEEN, UNSEEN)
        )
        ids[key] = log_trial(client, exp, parent, number, outcomes, figures, root)
    confirm_b = log_confirm(
        client, exp, parent,
        {CONFIRM_OF_TAG: "1", CONFIRM_OF_RUN_TAG: ids["b"], AUDIT_TAG: "no flags"},
        confirm_metrics((0.45, 0.55, 0.47), (0.5, 0.6, 0.5), aa=True),
    )  # fmt: skip
    log_confirm(
        client, exp, parent,
        {REFERENCE_TAG: "lambda0-control", AUDIT_TAG: "flags: noise_gap, transfer"},
        confirm_metrics((0.6, 0.1, 0.08), (0.62, 0.12, 0.1), aa=False),
        params=[("rt", "rt2"), ("lambda_ce", "0"), ("train_norm", "linf")],
    )  # fmt: skip
    for seed in (1, 2):  # the seeds of b's confirm run also report the objectives, far above all
        run = client.create_run(exp, tags={PARENT_TAG: confirm_b, ROLE_TAG: Role.CONFIRM_SEED.value,
                                           CONFIRM_SEED_TAG: str(seed)}).info.run_id  # fmt: skip
        client.log_batch(run, metrics=[Metric(m, 0.99, 0, 0) for m in
                                       (*OBJECTIVES, f"test/{OBJECTIVES[0]}")])  # fmt: skip
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("confirm")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    ids = log_study(client, "s", root, (root / "artifacts").as_uri())
    bare = client.create_experiment("bare", artifact_location=(root / "bare").as_uri())
    log_trial(client, bare, "", 0, None, (0.5, 0.2, 0.1), root)
    return {"uri": uri, "ids": ids}


@pytest.fixture(scope="module")
def analysed(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "s"
    argv = [
        "--mlflow-uri",
        store["uri"],
        "--experiment",
        "s",
        "--out",
        str(out),
        "--resamples",
        "400",
    ]
    assert main(argv) == 0
    return out


def test_confirm_runs_never_join_the_front(store, analysed):
    pareto = pq.read_table(analysed / "pareto.parquet").to_pylist()
    ids = store["ids"]
    assert {r["run_id"] for r in pareto} == {ids["a"], ids["b"], ids["c"], ids["e"]}
    report = (analysed / "report.md").read_text()
    assert "left out: 2 role confirm, 2 role confirm_seed, 1 study parent run" in report


def test_front_probability_from_per_example_files(store, analysed):
    ids = store["ids"]
    probability = {r["run_id"]: r["front_probability"]
                   for r in pq.read_table(analysed / "pareto.parquet").to_pylist()}  # fmt: skip
    assert probability[ids["a"]] == 1.0  # the most accurate by 80 images: never dominated
    assert probability[ids["e"]] is None  # no per-example file
    # b and c differ by one image each way: each is dominated when only the other's image is drawn,
    # in about (1 - 1/N)^N * (1 - (1 - 1/N)^N) = 0.23 of the resamples
    for key in "bc":
        assert 0.65 < probability[ids[key]] < 0.9, probability[ids[key]]
    report = (analysed / "report.md").read_text()
    assert "bootstrap over images, 400 resamples (seed 0) of the 200 evaluation images" in report
    assert "P(front)" in report and "| 0 | `" + ids["a"] + "` | 1.000 | none |" in report
    assert f"| 1 | `{ids['b']}` |" in report and "| trial 2 |" in report  # b within the noise of c
    assert (
        "**2 of 3 pairs of front members are distinguishable; the rest are within the noise.**"
        in report
    )
    assert "- no per_example.parquet logged: trial 4" in report
    assert "- mean of clean_correct 0.4000 is not the logged clean_acc 0.2000: trial 5" in report
    assert "| 4 | `" + ids["e"] + "` | - | no per-image scores |" in report


def test_error_bars_are_drawn_and_labelled(analysed):
    from matplotlib.image import imread

    assert imread(analysed / "front_pairs.png").shape[0] > 100
    assert "95% interval (Wilson over images)" in (analysed / "figures.html").read_text()


def test_table_prints_the_confirm_runs(store, analysed, capsys):
    assert main(["--mlflow-uri", store["uri"], "--experiment", "s", "--table"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("Test figures of 2 confirmed configurations at eval level full "
                               "(tag atop.eval_level), 2 seeds, 500 test images")  # fmt: skip
    assert "bootstrap over test images of the seed-mean" in lines[0]
    head = lines[2]
    assert "| clean | seen (PGD-EOT linf) | AutoAttack-rand | unseen |" in head
    reference, trial = lines[4], lines[5]  # references first
    assert reference.startswith("| lambda0-control | lambda_ce=0 |")
    assert "| 0.600 [0.560, 0.640] | 0.100 [0.060, 0.140] | - | 0.080 [0.040, 0.120] |" in reference
    assert reference.endswith("| flags: noise_gap, transfer |")
    assert trial.startswith("| trial 1 | lambda_ce=0.1 | 0.450 [0.410, 0.490] |")
    assert "| 0.250 [0.210, 0.290] |" in trial and "| 0.010 / 0.010 / 0.020 / 0.010 |" in trial
    assert "| 0.500 [0.450, 0.550] / 0.600 [0.550, 0.650] / 0.500 [0.450, 0.550] |" in trial
    assert "| +0.050 / +0.050 / +0.030 | no flags |" in trial
    report = (analysed / "report.md").read_text()
    assert "## Confirmed on test" in report and trial in report


def test_no_confirm_runs_and_no_per_example_files(store, tmp_path, capsys):
    out = tmp_path / "bare"
    assert (
        main(["--mlflow-uri", store["uri"], "--experiment", "bare", "--table", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith(
        "No confirm runs in this experiment (tag atop.role=confirm): the study ran with --no-confirm"
    )
    report = (out / "report.md").read_text()
    assert "Front probability not computed: no kept trial has per-image scores." in report
    assert "No confirm runs in this experiment" in report
    assert pq.read_table(out / "pareto.parquet")["front_probability"].to_pylist() == [None]


def test_help_documents_the_table(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--table" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resamples", "50", "--table"], "--resamples 50: accepted: an integer >= 200"),
        ([], "one of --out DIR, --table or --claims is required"),
    ],
)
def test_bad_flags(store, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["--mlflow-uri", store["uri"], "--experiment", "s", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


@pytest.mark.slow
def test_per_example_files_through_a_server(mlflow_server, tmp_path):
    """The files are downloaded through a real ``mlflow server`` (proxied artifacts)."""
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    ids = log_study(client, "served-confirm", tmp_path, None)
    out = tmp_path / "out"
    argv = ["--mlflow-uri", mlflow_server.uri, "--experiment", "served-confirm", "--out", str(out)]
    assert main([*argv, "--resamples", "200"]) == 0
    pareto = {
        r["run_id"]: r["front_probability"]
        for r in pq.read_table(out / "pareto.parquet").to_pylist()
    }
    assert pareto[ids["a"]] == 1.0 and pareto[ids["e"]] is None and 0 < pareto[ids["b"]] < 1
