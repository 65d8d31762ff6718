"""Trial failures, caused for real: a trial that raises, one whose loss goes NaN, a transient fault.

One tiny study (real CIFAR-10, in-process Ray, MLflow in the study folder) with the test-only
fault-injection hook `ATOP_FAULT_INJECT` (trainables/faults.py, `FaultPlan`):

- trial 0 raises after epoch 1, again on its retry: FAIL in Optuna, FAILED in MLflow, error tagged;
- trial 1 gets NaN weights after epoch 1, so its next loss is really non-finite (atop.finetune raises
  FloatingPointError): FAIL / FAILED at once, no retry;
- trial 2 raises once after epoch 1: retried by Tune (`FailureConfig`) from its epoch-1 checkpoint,
  ends COMPLETE with each epoch logged once;
- trial 3 is untouched. The study goes on and ends with 4 finished trials.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import STUDY_PY, service_env
from tracking.contract import ERROR_TAG, OBJECTIVES, RESTORED_TAG, TRIAL_TAG, Role, role_filter


@pytest.mark.slow
def test_raise_nan_and_transient_faults(cifar_dir, tmp_path):
    import optuna
    from mlflow import MlflowClient

    storage, name = tmp_path / "studies", "faults"
    once = tmp_path / "transient-{trial}.fired"
    faults = f"raise@trial=0,epoch=1;nan@trial=1,epoch=1;transient@trial=2,epoch=1,once={once}"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(STUDY_PY), "--preset", "tiny", "--num-trials", "4", "--max-concurrent", "2",
         "--cpus", "0.5", "--max-failures", "1", "--data-dir", str(cifar_dir), "--storage-path", str(storage),
         "--study-name", name],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False,
        env=service_env(ATOP_FAULT_INJECT=faults))
    wall_s = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{storage / name / 'optuna.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}, states
    assert "injected fault" in study.trials[0].user_attrs["error"] or "raised" in study.trials[0].user_attrs["error"]
    assert "FloatingPointError" in study.trials[1].user_attrs["error"]

    client = MlflowClient(f"sqlite:///{storage / name / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = {int(r.data.tags[TRIAL_TAG]): r
            for r in client.search_runs([exp.experiment_id], role_filter(Role.TRIAL))}
    assert sorted(runs) == [0, 1, 2, 3]  # exactly one run per Optuna trial
    status = {n: r.info.status for n, r in runs.items()}
    assert status == {0: "FAILED", 1: "FAILED", 2: "FINISHED", 3: "FINISHED"}, status
    assert "RuntimeError: injected fault" in runs[0].data.tags[ERROR_TAG]
    assert "FloatingPointError" in runs[1].data.tags[ERROR_TAG] and "non-finite" in runs[1].data.tags[ERROR_TAG]
    # the transient fault: retried from its epoch-1 checkpoint, not from scratch, no error left on it
    assert (tmp_path / "transient-2.fired").is_file()
    assert runs[2].data.tags.get(RESTORED_TAG) == "1", runs[2].data.tags
    assert ERROR_TAG not in runs[2].data.tags and ERROR_TAG not in runs[3].data.tags
    for n in (2, 3):
        for m in OBJECTIVES:
            assert [h.step for h in client.get_metric_history(runs[n].info.run_id, m)] == [1, 2], (n, m)
    # the NaN trial was not retried: it logged epoch 1 once and never restored
    assert RESTORED_TAG not in runs[1].data.tags
    assert [h.step for h in client.get_metric_history(runs[1].info.run_id, "clean_acc")] == [1]
    print(f"\nfault study: {states}; MLflow {status}; wall {wall_s:.0f} s")


def test_fault_plan_parses_only_what_it_documents(tmp_path, monkeypatch):
    import torch

    from trainables.faults import FAULT_ENV, FaultPlan

    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert FaultPlan.from_env(0).specs == []  # unset: the hook does nothing
    monkeypatch.setenv(FAULT_ENV, "explode@trial=0")
    with pytest.raises(ValueError, match="explode"):
        FaultPlan.from_env(0)
    monkeypatch.setenv(FAULT_ENV, f"transient@trial=*,epoch=1,once={tmp_path}/t-{{trial}};nan@trial=3,epoch=0")
    net = torch.nn.Linear(2, 2)
    plan = FaultPlan.from_env(5)
    plan.at(0, net)  # nothing at epoch 0 for trial 5
    with pytest.raises(RuntimeError, match="transient"):
        plan.at(1, net)
    plan.at(1, net)  # once: the retry goes through
    assert (tmp_path / "t-5").is_file() and torch.isfinite(net.weight).all()
    FaultPlan.from_env(3).at(0, net)
    assert torch.isnan(net.weight).all()
    monkeypatch.setenv(FAULT_ENV, "raise@trial=*,stage=confirm")  # a confirm trial's only
    assert FaultPlan.from_env(2).specs == [] and len(FaultPlan.from_env(2, "confirm").specs) == 1
