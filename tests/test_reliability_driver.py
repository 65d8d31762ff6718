"""A study driver SIGKILLed mid-study, then resumed: nothing lost, nothing counted twice.

`python study/run.py` (tiny preset, in-process Ray) runs in its own session; once two trials are
COMPLETE and two more are RUNNING with an epoch-1 checkpoint (held there by the test-only
`ATOP_FAULT_INJECT` sleep), the driver's process group gets SIGKILL. Ray's workers are in other
process groups of the same session: the test waits for them to exit, kills what is left by PID (that
session only) and records how many there were. Then `--resume`:

- the study ends with exactly `--num-trials` finished trials, the interrupted ones FAIL + user attr
  `interrupted` and re-run with the same parameters (user attr `rerun_of`);
- each Optuna trial has exactly one MLflow child run; none is left RUNNING; interrupted runs are
  KILLED with tag `atop.interrupted`; each rerun starts from its interrupted trial's epoch-1
  checkpoint (tags `atop.restored_from_epoch=1`, `atop.resumed_from`) and logs epoch 2 only;
- the sampler continues from the stored history (numbering continues; no earlier draw repeats);
- a second `--resume` with nothing left to run exits 0 without starting Ray.
A `--resume` while the first driver still runs is refused in one line naming it (study.lease), with
the live study's trials untouched; once the driver is killed, its lease is free.
While the driver runs, every TCP socket its session listens on is bound to 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    LOOPBACK,
    STUDY_PY,
    kill_session,
    listening,
    session_procs,
    start_study,
    stop_study,
    wait_for,
)
from tracking.contract import (
    INTERRUPTED_TAG,
    PRETRAINED_TAG,
    RESTORED_TAG,
    RESUMED_FROM_TAG,
    SPACE_TAG,
    TRIAL_TAG,
    Role,
    role_filter,
)

pytestmark = pytest.mark.slow
NUM_TRIALS = 5


def _states(db, name="killed"):
    import optuna

    if not list(db.parent.glob("tune-*")):  # before Tune starts the driver may still be creating the database:
        return {}  # opening it then would race its creation (both would stamp the schema version)
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except Exception:  # noqa: BLE001 - not created yet
        return {}
    return {t.number: t.state.name for t in study.trials}


def test_driver_sigkill_then_resume(cifar_dir, tmp_path):
    import optuna
    from mlflow import MlflowClient

    storage, name = tmp_path / "studies", "killed"
    folder = storage / name
    args = ["--preset", "tiny", "--num-trials", str(NUM_TRIALS), "--max-concurrent", "2", "--cpus", "0.5",
            "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", name]
    hold = "sleep@trial=2,epoch=1,seconds=600;sleep@trial=3,epoch=1,seconds=600"
    proc = start_study(args, tmp_path / "driver-1.log", ATOP_FAULT_INJECT=hold)
    try:
        def ready():
            states = _states(folder / "optuna.db")
            done = sum(s == "COMPLETE" for s in states.values())
            held = list(folder.glob("tune-*/trial-000[23]-*/checkpoint_000000"))
            return states if done >= 2 and len(held) >= 2 else None

        before = wait_for(ready, 900, "two trials COMPLETE and two held RUNNING", every_s=2, proc=proc)
        # a second driver on the live study is refused (study.lease) before it settles anything
        second = subprocess.run([sys.executable, str(STUDY_PY), "--study-name", name, "--storage-path",
                                 str(storage), "--resume"], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, check=False)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stdout[-2000:] + second.stderr[-3000:]
        assert "is being run by another driver" in errors[0] and f"PID {proc.pid}," in errors[0], errors
        assert _states(folder / "optuna.db") == before, "the refused driver changed the live study's trials"
        procs = session_procs(proc.pid)
        addresses = listening({p.pid for p in procs})
        assert addresses and all(ip in LOOPBACK for ip, *_ in addresses), addresses
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's own group: driver, GCS, raylet, agents
        proc.wait(timeout=30)
        time.sleep(15)  # Ray workers (own process groups) notice the raylet is gone and exit
        leftovers = kill_session(proc.pid)  # what did not: by PID, this session only
        wait_for(lambda: not session_procs(proc.pid), 30, "the killed driver's processes to be gone")
    finally:
        stop_study(proc)
    print(f"\nkilled driver: states before {before}; {len(procs)} processes in its session, "
          f"{leftovers} still alive 15 s after SIGKILL of its group (killed by PID)")

    resumed = subprocess.run([sys.executable, str(STUDY_PY), "--study-name", name, "--storage-path", str(storage),
                              "--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    trials = study.trials
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    reruns = [t for t in trials if "rerun_of" in t.user_attrs]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and t not in interrupted]
    assert len(finished) == NUM_TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert {t.number for t in interrupted} == {n for n, s in before.items() if s == "RUNNING"}
    assert all(t.state.name == "FAIL" for t in interrupted)
    assert sorted(t.user_attrs["rerun_of"] for t in reruns) == sorted(t.number for t in interrupted)
    for t in reruns:
        assert t.params == trials[t.user_attrs["rerun_of"]].params
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # the sampler went on from the stored history: numbering continues, no earlier draw repeats
    old = [t for t in trials if t.number in before]
    new = [t for t in trials if t.number not in before and "rerun_of" not in t.user_attrs]
    assert min(t.number for t in new + reruns) > max(before)
    assert all(t.params != o.params for t in new for o in old)

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL), max_results=1000)
    numbers = [int(r.data.tags[TRIAL_TAG]) for r in runs]
    assert sorted(numbers) == sorted(t.number for t in trials), "exactly one MLflow run per Optuna trial"
    by_number = {int(r.data.tags[TRIAL_TAG]): r for r in runs}
    assert not [n for n, r in by_number.items() if r.info.status in ("RUNNING", "SCHEDULED")]
    for t in trials:
        run = by_number[t.number]
        expected = "KILLED" if t in interrupted else {"COMPLETE": "FINISHED", "FAIL": "FAILED"}[t.state.name]
        assert run.info.status == expected, (t.number, t.state.name, run.info.status)
        if t in interrupted:
            assert run.data.tags.get(INTERRUPTED_TAG) == "true"
    # each rerun started from its interrupted trial's epoch-1 checkpoint: it ran (and logged) epoch 2 only
    for t in reruns:
        tags = by_number[t.number].data.tags
        assert tags.get(RESTORED_TAG) == "1" and f"/trial-{t.user_attrs['rerun_of']:04d}-" in tags[RESUMED_FROM_TAG]
        assert [h.step for h in client.get_metric_history(by_number[t.number].info.run_id, "clean_acc")] == [2]
    parent = client.search_runs([exp.experiment_id], role_filter(Role.STUDY))
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    # the resumed driver took the weights study.json recorded, and every trial names the same two files
    weights = json.loads((folder / "study.json").read_text())["weights"]
    assert "reusing the study's pre-trained" in resumed.stdout, resumed.stdout[-2000:]
    files = f"{weights['classifier']['file']},{weights['purifier']['file']}"
    assert {r.data.tags[PRETRAINED_TAG] for r in runs} == {files}

    # a study from before study.json recorded its weights: the resume finds them by its trial runs' tags
    saved = json.loads((folder / "study.json").read_text())
    (folder / "study.json").write_text(json.dumps({**saved, "weights": None}))
    again = subprocess.run([sys.executable, str(STUDY_PY), "--study-name", name, "--storage-path", str(storage),
                            "--resume"], capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((folder / "study.json").read_text())["weights"] == weights
    assert "0 to run" in again.stdout and "Started a local Ray" not in again.stdout + again.stderr
    assert len(optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}").trials) == len(trials)
    print(f"resumed: {len(interrupted)} interrupted (KILLED, re-run), {len(finished)} finished, "
          f"{len(runs)} MLflow runs for {len(trials)} Optuna trials, 0 duplicated, 0 RUNNING")


def test_a_trial_killed_before_its_run_existed_gets_one_killed_run(tmp_path):
    """The driver died between `study.ask()` and creating the trial's MLflow run: resume makes one."""
    import optuna

    from study.resume import settle_interrupted
    from tracking import mlflow_log

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"] * 3)
    exp = mlflow_log.ensure_experiment(uri, "s", (tmp_path / "art").as_uri())
    parent = mlflow_log.ensure_parent_run(uri, exp, "s", {}, {SPACE_TAG: "tiny"})
    asked = study.ask({"lambda_ce": optuna.distributions.FloatDistribution(0.05, 0.1)})
    assert settle_interrupted(study, storage, uri, exp, parent, log=lambda m: None) == 1
    runs = mlflow_log.trial_runs(uri, exp, parent)
    assert sorted(runs) == [asked.number]
    run = runs[asked.number]
    assert run.info.status == "KILLED" and run.data.tags[INTERRUPTED_TAG] == "true"
    assert run.data.tags[SPACE_TAG] == "tiny"
    settle_interrupted(study, storage, uri, exp, parent, log=lambda m: None)  # a second resume adds none
    assert len(mlflow_log.client(uri).search_runs([exp], role_filter(Role.TRIAL))) == 1

