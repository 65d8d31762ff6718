"""End-to-end and bad-input tests of ``python -m analysis`` on MLflow runs logged here."""

from __future__ import annotations

import html
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from analysis.__main__ import main
from analysis.load import load_study
from tracking.contract import (
    EVALUATION_TAG,
    OBJECTIVES,
    PARENT_TAG,
    ROLE_TAG,
    SPACE_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
    Role,
)

REPO = Path(__file__).resolve().parents[1]
#: how the synthetic trials' figures were obtained (what the trainable writes in `atop.evaluation`)
HOW = "screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 64 val images; eps linf 0.03137, l2 0.5"


def log_study(
    client: MlflowClient,
    root: Path,
    name: str,
    space: str,
    seed: int,
    n_trials: int = 12,
    epochs: int = 3,
) -> dict[str, list[str]]:
    """Log one study as the study driver does: a parent run and one child run per trial, the
    objectives once per epoch. Trial 0 fails, trial 1 is stopped early, trial 2 is still running;
    the others finish. Returns run ids by kind ("finished", "failed", "stopped", "running")."""
    rng = np.random.default_rng(seed)
    exp = client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    parent = client.create_run(exp, run_name=name, tags={ROLE_TAG: Role.STUDY.value}).info.run_id
    kinds: dict[str, list[str]] = {"finished": [], "failed": [], "stopped": [], "running": []}
    for trial in range(n_trials):
        rt = ("rt1", "rt2", "rt3")[trial % 3]
        tags = {
            PARENT_TAG: parent,
            ROLE_TAG: Role.TRIAL.value,
            TRIAL_TAG: str(trial),
            SPACE_TAG: space,
            EVALUATION_TAG: HOW,
        }
        kind = {0: "failed", 1: "stopped", 2: "running"}.get(trial, "finished")
        if kind == "stopped":
            tags[STOPPED_TAG] = "true"
        run = client.create_run(exp, run_name=f"trial-{trial}", tags=tags).info.run_id
        params = {
            "rt": rt,
            "mask_ratio": f"{rng.choice([0.25, 0.5]):g}",
            "lr": f"{10 ** rng.uniform(-4.5, -3):.3g}",
            "train_attack": "fgsm",
            "seed": str(seed),
        }
        clean = rng.uniform(0.6, 0.95)
        robust = (1 - clean) * rng.uniform(0.8, 1.6)
        metrics = []
        for epoch in range(epochs):
            grow = (epoch + 1) / epochs
            values = {
                **dict(zip(OBJECTIVES, (clean * grow, min(robust * grow, 1.0), 0.8 * robust * grow))),
                "loss/ce": 2.0 / (epoch + 1),
            }
            if kind == "failed":
                values = {"loss/ce": 2.0}
            metrics += [Metric(k, float(v), 1000 + epoch, epoch) for k, v in values.items()]
        client.log_batch(
            run,
            metrics=metrics,
            params=[Param(k, v) for k, v in params.items()],
            tags=[RunTag("mlflow.note.content", "")],
        )
        if kind != "running":
            client.set_terminated(run, "FAILED" if kind == "failed" else "FINISHED")
        kinds[kind].append(run)
    client.set_terminated(parent, "FINISHED")
    return kinds


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A sqlite store with studies a (space paper), b (space wide) and an empty one."""
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = {
        "a": log_study(client, root, "study-a", "paper", seed=1),
        "b": log_study(client, root, "study-b", "wide", seed=2),
    }
    empty = client.create_experiment("empty", artifact_location=(root / "artifacts/e").as_uri())
    client.set_terminated(
        client.create_run(empty, tags={ROLE_TAG: Role.STUDY.value}).info.run_id, "FINISHED"
    )
    return {"uri": uri, "root": root, "runs": runs}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "analysis", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_load_table(store):
    study = load_study(store["uri"], "study-a")
    table = study.table
    assert table.num_rows == 13  # parent + 12 trials
    assert {
        "run_id",
        "status",
        "params.rt",
        "final.clean_acc",
        "best.clean_acc",
        "best.loss/ce",
        "duration_s",
    } <= set(table.column_names)
    rows = {r["run_id"]: r for r in table.to_pylist()}
    for rid in store["runs"]["a"]["finished"]:
        row = rows[rid]
        # Accuracies grow each epoch: the final value is the best; the loss falls.
        assert row["best.clean_acc"] == row["final.clean_acc"]
        assert row["best.loss/ce"] == pytest.approx(2.0 / 3)
        assert row["duration_s"] >= 0
    assert rows[study.parent_run_id]["role"] == "study"
    assert table["trial_number"].to_pylist()[:12] == list(range(12))


def test_cli_end_to_end(store, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "--mlflow-uri",
        store["uri"],
        "--experiment",
        "study-a",
        "--out",
        str(out),
        "--compare",
        "study-b",
        "--log-to-mlflow",
    )
    assert proc.returncode == 0, proc.stderr
    expected = {
        "runs.parquet",
        "pareto.parquet",
        "front_pairs.png",
        "front_3d.png",
        "convergence.png",
        "params.png",
        "compare.png",
        "figures.html",
        "report.md",
    }
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    runs = pq.read_table(out / "runs.parquet")
    assert runs.num_rows == 13
    pareto = pq.read_table(out / "pareto.parquet")
    assert {"run_id", *OBJECTIVES, "hv_contribution", "is_knee"} <= set(pareto.column_names)
    assert 1 <= pareto.num_rows
    assert set(pareto["run_id"].to_pylist()) <= set(store["runs"]["a"]["finished"])
    assert sum(pareto["is_knee"].to_pylist()) == 1
    report = (out / "report.md").read_text()
    assert "Hypervolume" in report and "Knee" in report and "Reference point: (0, 0, 0)" in report
    assert "1 stopped early" in report and "1 status FAILED" in report
    assert "1 status RUNNING" in report
    assert f"- How the objectives were obtained (tag `atop.evaluation`): {HOW}\n" in report
    page = (out / "figures.html").read_text()
    assert "plotly" in page[:200000] and html.escape(f"Objectives: {HOW}.") in page  # the caption, atop the page
    # --log-to-mlflow: every file is an artifact of the parent run, under analysis/.
    client = MlflowClient(tracking_uri=store["uri"])
    parent = load_study(store["uri"], "study-a").parent_run_id
    logged = {Path(f.path).name for f in client.list_artifacts(parent, "analysis")}
    assert logged == expected


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"--objectives": ["clean_acc", "accuracy"]},
            "unknown objective 'accuracy'; metrics in this experiment: clean_acc, loss/ce, ",
        ),
        ({"--objectives": ["clean_acc:up"]}, "bad objective 'clean_acc:up'; accepted: NAME"),
        ({"--ref-point": ["0", "0"]}, "reference point [0.0, 0.0] has 2 values"),
        ({"--experiment": ["nope"]}, "experiment 'nope' does not exist"),
        ({"--experiment": ["empty"]}, "empty experiment: none of its 1 runs"),
        ({"--mlflow-uri": ["sqlite:////nonexistent/mlflow.db"]}, "no MLflow database at"),
        ({"--mlflow-uri": ["http://127.0.0.1:{port}"]}, "is unreachable"),
    ],
)
def test_bad_input(store, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    opts = {
        "--mlflow-uri": [store["uri"]],
        "--experiment": ["study-a"],
        "--out": [str(out)],
        **override,
    }
    argv = [x.format(port=_free_port()) for k, v in opts.items() for x in (k, *v)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not any(tmp_path.iterdir())


def test_bad_input_subprocess_exit_status(store, tmp_path):
    proc = run_cli(
        "--mlflow-uri", store["uri"], "--experiment", "nope", "--out", str(tmp_path / "out")
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: experiment 'nope' does not exist")
    assert "study-a" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_mlflow_server(tmp_path):
    """The CLI reads a study through a real ``mlflow server`` (bound to 127.0.0.1)."""
    port = _free_port()
    db = tmp_path / "server.db"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "server down"
                time.sleep(0.5)
        client = MlflowClient(tracking_uri=uri)
        runs = log_study(client, tmp_path, "served", "paper", seed=3, n_trials=6, epochs=2)
        out = tmp_path / "out"
        proc = run_cli("--mlflow-uri", uri, "--experiment", "served", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        pareto = pq.read_table(out / "pareto.parquet")
        assert set(pareto["run_id"].to_pylist()) <= set(runs["finished"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
