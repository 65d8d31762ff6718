"""A study driver stopped by SIGTERM mid-study (`kill PID`; `ray job stop` sends the same), then
resumed: the driver settles everything itself, nothing is lost and nothing counted twice.

`python study/run.py` (tiny preset, in-process Ray) runs in its own session; once trial 0 has reported
its last epoch (held after it by the test-only `ATOP_FAULT_INJECT` sleep; its final artifacts come
before that report) and trial 1 is RUNNING with its epoch-1 checkpoint (held there too), the driver
alone gets SIGTERM. It must (study/interrupt.py):

- print the stop line and, at the end, the exact resume command; exit 143; leave no process behind;
- leave Optuna and MLflow agreeing: no trial RUNNING, trial 0 COMPLETE (its last epoch's result and
  its final artifacts kept), trial 1 FAIL + `interrupted` with its parameters enqueued again from its
  epoch-1 checkpoint, its MLflow run KILLED + `atop.interrupted`, every COMPLETE trial's run FINISHED
  with Optuna's values, the parent run KILLED;

then the printed command (`--resume`) finishes the study: exactly `--num-trials` trials counted,
each finished trial's result once (one MLflow run per Optuna trial, one COMPLETE per parameter set),
the rerun continuing from the checkpoint (it logs epoch 2 only).

The second test does the same through a real `ray job submit` to conftest's Ray head and a real
`ray job stop`, then resumes with the `ray job submit` command the stopped job printed. The third
sends Ctrl+C's SIGINT to the driver's process group during the confirm stage; the last ones stop pre-training.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from study.scheduler import ATTR_EPOCH_OBJECTIVES
from tests.conftest import (
    REPO,
    STUDY_PY,
    VENV_BIN,
    service_env,
    session_procs,
    start_study,
    stop_study,
    wait_for,
)
from tracking.contract import (
    INTERRUPTED_TAG,
    OBJECTIVES,
    RESTORED_TAG,
    TRIAL_TAG,
    Role,
    role_filter,
)
from trainables.faults import FAULT_ENV

pytestmark = pytest.mark.slow
NUM_TRIALS = 3
NAME = "stopped"
# trial 0 stays RUNNING after it reported its last epoch (its final artifacts written before), trial 1 after its
# epoch-1 checkpoint
HOLD = "sleep@trial=0,epoch=2,seconds=600;sleep@trial=1,epoch=1,seconds=600"


def _trials(db):
    import optuna

    if not list(db.parent.glob("tune-*")):  # before Tune starts the driver may still be creating the database
        return []
    try:
        return optuna.load_study(study_name=NAME, storage=f"sqlite:///{db}").trials
    except Exception:  # noqa: BLE001 - not created yet
        return []


def _client(folder):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def _runs(folder):
    client = _client(folder)
    exp = client.get_experiment_by_name(NAME)
    trials = client.search_runs([exp.experiment_id], role_filter(Role.TRIAL), max_results=1000)
    parent = client.search_runs([exp.experiment_id], role_filter(Role.STUDY))
    return client, {int(r.data.tags[TRIAL_TAG]): r for r in trials}, len(trials), parent


def _agree(trials, runs):
    """Optuna and MLflow tell the same story: one run per asked trial, same end, same figures."""
    asked = [t for t in trials if t.state.name != "WAITING"]
    assert sorted(runs) == sorted(t.number for t in asked)
    for t in asked:
        run = runs[t.number]
        if t.user_attrs.get("interrupted"):
            assert t.state.name == "FAIL" and run.info.status == "KILLED" and run.data.tags[INTERRUPTED_TAG] == "true"
        elif t.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            for name, value in zip(OBJECTIVES, t.values):
                assert math.isclose(run.data.metrics[name], value), (t.number, name)
        else:
            raise AssertionError(f"trial {t.number} {t.state.name} ({t.user_attrs}), run {run.info.status}")


def _study_args(cifar_dir, storage) -> list[str]:
    return ["--preset", "tiny", "--num-trials", str(NUM_TRIALS), "--max-concurrent", "2", "--cpus", "0.5",
            "--data-dir", str(cifar_dir), "--storage-path", str(storage), "--study-name", NAME]


def _held(folder):
    """The study's trials once both are held (`HOLD`): trial 0's last epoch reached the driver, trial 1's
    epoch-1 checkpoint is written."""
    trials = _trials(folder / "optuna.db")
    last_told = any(t.number == 0 and "2" in t.user_attrs.get(ATTR_EPOCH_OBJECTIVES, {}) for t in trials)
    held = list(folder.glob("tune-*/trial-0001-*/checkpoint_000000"))
    return trials if last_told and held and any(t.number == 1 and t.state.name == "RUNNING" for t in trials) else None


def _check_stopped(folder, out: str, storage) -> list[str]:
    """What the stopped driver printed and left behind (module docstring); returns the resume command."""
    import optuna

    assert "stop requested (SIGTERM): no new trials;" in out, out[-5000:]
    resume_lines = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert len(resume_lines) == 1, out[-5000:]
    command = shlex.split(resume_lines[0].removeprefix("resume: "))
    assert command[command.index("python"):] == ["python", "study/run.py", "--study-name", NAME, "--storage-path",
                                                 str(storage), "--resume"]
    assert "Pareto-optimal" not in out  # no report
    trials = optuna.load_study(study_name=NAME, storage=f"sqlite:///{folder / 'optuna.db'}").trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert 1 in {t.number for t in interrupted}
    assert trials[0].state.name == "COMPLETE"  # its last epoch was reported: its result is kept, not rerun
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["rerun_of"] for t in waiting) == sorted(t.number for t in interrupted)
    held_rerun = next(t for t in waiting if t.user_attrs["rerun_of"] == 1)
    assert "/trial-0001-" in held_rerun.user_attrs["resume_from"]
    assert held_rerun.user_attrs["resume_from"].endswith("checkpoint_000000")
    client, runs, n_runs, parent = _runs(folder)
    assert n_runs == len(runs)
    _agree(trials, runs)
    kept = {a.path for a in client.list_artifacts(runs[0].info.run_id)}  # written before its last report
    assert {"defense.pt", "images.png", "per_example.parquet"} <= kept, kept
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    print(f"\nSIGTERM: {len(interrupted)} interrupted, {sum(t.state.name == 'COMPLETE' for t in trials)} COMPLETE, "
          f"{len(waiting)} re-enqueued, none RUNNING")
    return command


def _check_finished(folder) -> None:
    """After the resume: the study complete, each finished trial's result once, the rerun from its checkpoint."""
    import optuna

    trials = optuna.load_study(study_name=NAME, storage=f"sqlite:///{folder / 'optuna.db'}").trials
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    counted = [t for t in trials if t.state.name in ("COMPLETE", "FAIL") and not t.user_attrs.get("interrupted")]
    assert len(counted) == NUM_TRIALS, [(t.number, t.state.name, t.user_attrs) for t in trials]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(complete), "a result counted twice"
    client, runs, n_runs, parent = _runs(folder)
    assert n_runs == len(runs) == len(trials)
    _agree(trials, runs)
    assert parent[0].info.status == "FINISHED"
    rerun = next(t for t in trials if t.user_attrs.get("rerun_of") == 1)
    assert rerun.state.name == "COMPLETE"
    assert runs[rerun.number].data.tags.get(RESTORED_TAG) == "1"
    assert [h.step for h in client.get_metric_history(runs[rerun.number].info.run_id, "clean_acc")] == [2]
    print(f"resumed: {len(counted)} counted, {len(complete)} COMPLETE once each, {len(runs)} MLflow runs for "
          f"{len(trials)} Optuna trials, the rerun of trial 1 from its epoch-1 checkpoint")


def test_driver_sigterm_settles_then_resume_finishes(cifar_dir, tmp_path):
    storage = tmp_path / "studies"
    folder = storage / NAME
    log = tmp_path / "driver-1.log"
    proc = start_study(_study_args(cifar_dir, storage), log, ATOP_FAULT_INJECT=HOLD)
    try:
        wait_for(lambda: _held(folder), 900, "trials 0 and 1 held", every_s=2, proc=proc)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # the driver alone, as `kill PID`
        code = proc.wait(timeout=180)
        took = time.monotonic() - sent
        wait_for(lambda: not session_procs(proc.pid), 60, "the stopped driver's processes to be gone")
    finally:
        stop_study(proc)
    out = log.read_text()
    assert code == 143, out[-5000:]
    command = _check_stopped(folder, out, storage)
    assert command[0] == "python"
    print(f"the driver exited {code} {took:.1f} s after SIGTERM")

    resumed = subprocess.run([sys.executable, str(STUDY_PY), *command[2:]], capture_output=True, text=True,
                             timeout=900, cwd=tmp_path, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "interrupted by the last driver" not in resumed.stdout  # the stopped driver settled them itself
    _check_finished(folder)


def test_ray_job_stop_settles_then_the_printed_job_resumes(ray_head, cifar_dir, tmp_path):
    """The same through a real `ray job submit` and `ray job stop` (SIGTERM to the job's processes, then
    SIGKILL after the head's RAY_JOB_STOP_WAIT_TIME_S, 60 s in conftest's head); the resume is the
    printed `ray job submit` command."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage = tmp_path / "studies"
    folder = storage / NAME
    env = service_env(RAY_AUTH_MODE="disabled")
    jobs = JobSubmissionClient(ray_head.address)

    def submit(command: list[str], job_id: str) -> None:
        i = command.index("--")
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address, "--submission-id", job_id,
               "--no-wait", "--runtime-env-json", json.dumps({"env_vars": {FAULT_ENV: HOLD}}), *command[3:i + 1],
               *command[i + 1:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def ended(job_id: str):
        status = jobs.get_job_status(job_id)
        return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None

    first = f"atop-sigterm-{int(time.time())}"
    submit(["ray", "job", "submit", "--working-dir", ".", "--", "python", "study/run.py",
            *_study_args(cifar_dir, storage)], first)
    try:
        wait_for(lambda: _held(folder) or ended(first), 900, "trials 0 and 1 held", every_s=2)
        assert ended(first) is None, jobs.get_job_logs(first)[-5000:]
        sent = time.monotonic()
        stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", ray_head.address, first],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        status = wait_for(lambda: ended(first), 120, "the stopped job to end")
        took = time.monotonic() - sent
    finally:
        if not ended(first):
            jobs.stop_job(first)
    out = jobs.get_job_logs(first)
    assert status == JobStatus.STOPPED, out[-5000:]
    command = _check_stopped(folder, out, storage)  # printed before the SIGKILL would have come
    assert command[:5] == ["ray", "job", "submit", "--working-dir", "."], command
    print(f"`ray job stop` ended the job {took:.1f} s after it was sent")

    second = f"{first}-resume"
    submit(command, second)
    try:
        status = wait_for(lambda: ended(second), 900, "the resumed job to end", every_s=5)
    finally:
        if not ended(second):
            jobs.stop_job(second)
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(second)[-5000:]
    _check_finished(folder)


def test_ctrl_c_in_the_confirm_stage_leaves_it_for_resume(cifar_dir, tmp_path):
    """SIGINT (Ctrl+C) once a confirm trial checkpointed its first epoch (held there) takes SIGTERM's
    path, not Tune's own SIGINT handler (which would end the stage and let the driver report): the
    configuration is left unconfirmed (not recorded with failed seeds), its runs end KILLED at once,
    the search is untouched, exit 130; `--resume` confirms it, that seed going on from its checkpoint."""
    import optuna

    from tracking.contract import CHECKPOINT_FILES, CONFIRM_OF_TAG, CONFIRM_SEED_TAG, STAGE_TAG

    def checkpointed():
        return next((c for c in folder.glob("confirm-*/confirm-*/checkpoint_*")
                     if all((c / name).is_file() for name in CHECKPOINT_FILES)), None)

    storage, name = tmp_path / "studies", "stopped-confirm"
    folder = storage / name
    settings = tmp_path / "confirm.yaml"
    settings.write_text("confirm: true\nconfirm_top: 1\nconfirm_seeds: 2\n"
                        "confirm_config: {eval_level: screen, n_eval: 16}\n")
    log = tmp_path / "driver-1.log"
    proc = start_study(["--preset", "tiny", "--config", str(settings), "--num-trials", "2", "--data-dir",
                        str(cifar_dir), "--storage-path", str(storage), "--study-name", name], log,
                       **{FAULT_ENV: "sleep@trial=*,stage=confirm,epoch=1,seconds=600"})
    try:
        held = wait_for(checkpointed, 900, "a confirm trial's epoch-1 checkpoint", every_s=0.5, proc=proc)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl+C: a terminal signals its whole foreground process group
        code = proc.wait(timeout=180)
    finally:
        stop_study(proc)
    out = log.read_text()
    assert code == 130, out[-5000:]
    assert "stop requested (SIGINT, Ctrl+C): no new trials;" in out, out[-5000:]
    assert "confirm: stopped with 1 configuration(s) unconfirmed, left for --resume (3 run(s) ended KILLED" in out
    assert not (folder / "confirm.json").exists() and "Confirmed on test" not in out
    client = _client(folder)
    experiment = client.get_experiment_by_name(name).experiment_id
    stage = client.search_runs([experiment], f"tags.`{STAGE_TAG}` = 'confirm'")
    assert len(stage) == 3 and all(r.info.status == "KILLED" and r.data.tags.get(INTERRUPTED_TAG) == "true"
                                   for r in stage)
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the search is untouched

    resumed = subprocess.run([sys.executable, str(STUDY_PY), "--study-name", name, "--storage-path", str(storage),
                              "--resume"], capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "Confirmed on test (2 seeds per config, 16 test images" in resumed.stdout, resumed.stdout[-3000:]
    assert "go on from the checkpoint a stopped driver's trial left" in resumed.stdout, resumed.stdout[-3000:]
    stage = client.search_runs([experiment], f"tags.`{STAGE_TAG}` = 'confirm'")
    assert sorted(r.info.status for r in stage) == ["FINISHED"] * 3 + ["KILLED"] * 3
    assert len({r.data.tags[CONFIRM_OF_TAG] for r in stage}) == 1
    seed = held.parent.name.split("-seed")[1].split("-")[0]  # confirm-<NNNN>-seed<S>-<id>
    went_on = [r for r in stage if r.info.status == "FINISHED" and r.data.tags.get(CONFIRM_SEED_TAG) == seed]
    assert len(went_on) == 1 and went_on[0].data.tags.get(RESTORED_TAG) == "1", [r.data.tags for r in went_on]
    print(f"\nconfirm stage stopped: 3 runs KILLED, then resumed: {len(stage)} confirm runs")


@pytest.mark.parametrize(("signum", "group", "said", "status"), [
    (signal.SIGINT, True, "SIGINT, Ctrl+C", 130),  # a terminal signals its whole foreground process group
    (signal.SIGTERM, False, "SIGTERM", 143),  # `kill PID`; `ray job stop` signals the job's driver alone too
], ids=["ctrl-c", "sigterm"])
def test_a_stop_in_pre_training_goes_on_from_its_last_epoch_on_resume(cifar_dir, tmp_path, signum, group, said,
                                                                      status):
    """A stop once pre-training saved an epoch: the task is cancelled, the study settled (nothing ran),
    one resume command, exit 128 + the signal and no traceback (before, a KeyboardInterrupt or Ray's
    SIGTERM handler ended the driver); `--resume` goes on after the saved epoch and runs the study."""
    storage, cache, name = tmp_path / "studies", tmp_path / "cache", "stopped-pretraining"
    settings = tmp_path / "pretrain.yaml"
    settings.write_text("pretrain: {classifier_epochs: 40}\n")  # ~0.2 s each: a wide window after the first
    log = tmp_path / "driver-1.log"
    proc = start_study(["--preset", "tiny", "--config", str(settings), "--num-trials", "1", "--data-dir",
                        str(cifar_dir), "--storage-path", str(storage), "--pretrained-cache", str(cache),
                        "--study-name", name], log)
    try:
        partial = wait_for(lambda: next(cache.glob("*.partial"), None), 600, "pre-training's first saved epoch",
                           every_s=0.2, proc=proc)
        (os.killpg if group else os.kill)(proc.pid, signum)
        code = proc.wait(timeout=120)
        assert not session_procs(proc.pid), "the stopped driver left processes behind"
    finally:
        stop_study(proc)
    out = log.read_text()
    assert code == status, out[-5000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "received" not in out, out[-5000:]
    assert f"stop requested ({said}): pre-training stopped; --resume goes on after its last finished epoch" in out, \
        out[-5000:]
    resume_lines = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert len(resume_lines) == 1, out[-5000:]
    command = shlex.split(resume_lines[0].removeprefix("resume: "))
    assert command[-3:] == ["--pretrained-cache", str(cache), "--resume"], command  # not the default cache
    assert partial.is_file() and not [p for p in cache.glob("*.pt")], sorted(cache.iterdir())  # no entry yet

    resumed = subprocess.run([sys.executable, str(STUDY_PY), *command[2:]],  # the printed command
                             capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    said = resumed.stdout + resumed.stderr
    assert "pretrain classifier: resuming after epoch " in said, said[-5000:]
    assert not list(cache.glob("*.partial")) and len(list(cache.glob("*.pt"))) == 2, sorted(cache.iterdir())
    assert "Pareto-optimal" in resumed.stdout, resumed.stdout[-3000:]
