"""The stop request of SIGTERM or Ctrl+C (study/interrupt.py): the handler, the searcher that stops
asking, the resume command. The whole driver under SIGTERM: tests/test_reliability_sigterm.py."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.search import Searcher

from atop.config import Config
from search_spaces import SPACES
from study.interrupt import StopRequest, resume_command
from study.searcher import AskTellSearcher
from study.storage import JOB_ENV
from tests.conftest import REPO
from tracking.contract import DIRECTIONS, OBJECTIVES

HANDLER = textwrap.dedent("""
    import os, signal, sys, time
    from study.interrupt import TUNE_SIGINT_ENV, StopRequest, catch_stop_signals

    signum = getattr(signal, sys.argv[1])
    with catch_stop_signals(StopRequest()):
        print("tune leaves SIGINT alone:", os.environ.get(TUNE_SIGINT_ENV), flush=True)
    print("restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
          signal.getsignal(signal.SIGINT) is signal.default_int_handler, TUNE_SIGINT_ENV not in os.environ, flush=True)
    request = StopRequest()
    with catch_stop_signals(request):
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # the handler runs in this (the main) thread between two bytecodes
        print("first:", request.stop_all(), request.exit_status, flush=True)
        os.kill(os.getpid(), signum)
        time.sleep(30)
        print("survived the second signal", flush=True)
""")


@pytest.mark.parametrize(("name", "said", "status"), [("SIGTERM", "SIGTERM", 143), ("SIGINT", "SIGINT, Ctrl+C", 130)])
def test_the_first_signal_sets_the_request_and_the_second_ends_the_process(name, said, status):
    done = subprocess.run([sys.executable, "-c", HANDLER, name], capture_output=True, text=True, timeout=120,
                          cwd=REPO, check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == -getattr(signal, name), done.stdout + done.stderr[-3000:]
    assert lines[:2] == ["tune leaves SIGINT alone: 1", "restored: True True True"], lines
    assert lines[2].startswith(f"stop requested ({said}): no new trials;"), lines
    assert lines[3] == f"first: True {status}", lines
    assert "survived" not in done.stdout


def test_the_searcher_asks_no_trial_once_stopped_and_tells_no_failure_of_the_stop():
    for max_trials in (None, 12):  # with a scheduler's cap too: "finished", not "ask again later"
        study = optuna.create_study(directions=list(DIRECTIONS))
        request = StopRequest()
        searcher = AskTellSearcher(study, SPACES["tiny"], Config(epochs=1), 4, lambda n: None, lambda *a: None,
                                   log=lambda line: None, interrupt=request, max_trials=max_trials)
        assert isinstance(searcher.suggest("a"), dict)
        request.reason = "stop requested (SIGTERM)"
        assert searcher.suggest("b") == Searcher.FINISHED
        assert len(study.trials) == 1 and searcher.stopped is None  # not a --time-budget stop: no report tag
        # a trial whose worker died with the stop is not told FAIL (counted): the driver settles it as interrupted
        searcher.on_trial_complete("a", error=True)
        assert study.trials[0].state.name == "RUNNING" and searcher.counted == 0 and not searcher.live


def test_after_the_stop_a_trial_that_reported_its_last_epoch_is_told_the_others_stay_running():
    """Tune stops trials without telling the searcher; one may have reported its last epoch (its final
    artifacts were written before; its MLflow run then ends FINISHED): it is COMPLETE, not interrupted."""
    study = optuna.create_study(directions=list(DIRECTIONS))
    request = StopRequest()
    settled: list[tuple[int, str]] = []
    searcher = AskTellSearcher(study, SPACES["tiny"], Config(epochs=2), 4, lambda n: None,
                               lambda n, state, summary: settled.append((n, state.name)), log=lambda line: None,
                               interrupt=request)
    for trial_id, epoch in (("done", 2), ("midway", 1)):
        assert isinstance(searcher.suggest(trial_id), dict)
        searcher.on_trial_result(trial_id, {**dict(zip(OBJECTIVES, (0.5, 0.25, 0.125))), "epoch": epoch})
    assert isinstance(searcher.suggest("silent"), dict)  # no result yet
    request.reason = "stop requested (SIGTERM)"
    searcher.tell_ended()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "RUNNING"]
    assert study.trials[0].values == [0.5, 0.25, 0.125] and settled == [(0, "COMPLETE")]
    assert set(searcher.live) == {"midway", "silent"}


def test_the_resume_command_names_the_study_and_its_storage(monkeypatch):
    plan = SimpleNamespace(name="my study", storage_path="/data/studies", optuna_url="sqlite:////data/studies/x.db",
                           pretrained_cache=Path("/data/studies/.pretrained-cache"), cache_given=False)
    monkeypatch.delenv(JOB_ENV, raising=False)
    assert resume_command(plan) == "python study/run.py --study-name 'my study' --storage-path /data/studies --resume"
    plan.pretrained_cache, plan.cache_given = Path("/data/my cache"), True  # the resumed study needs it
    assert resume_command(plan) == "python study/run.py --study-name 'my study' --storage-path /data/studies " \
                                   "--pretrained-cache '/data/my cache' --resume"
    monkeypatch.setenv(JOB_ENV, json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    plan.optuna_url = "postgresql://atop:secret@db:5432/optuna"
    command = resume_command(plan)
    assert command.startswith("ray job submit --working-dir . -- python study/run.py --study-name 'my study' ")
    assert "secret" not in command and "--optuna-storage" in command


def test_a_confirm_stage_stopped_by_sigterm_leaves_unfinished_configurations_for_resume(tmp_path):
    """`fit` (standing in for Ray Tune, as in tests/test_confirm.py) ends the first configuration's
    seeds, then the stop request comes: the second configuration is neither recorded nor failed, its
    runs end KILLED at once, and the next stage confirms it. Real Optuna, MLflow (sqlite), study folder."""
    from study.confirm import load_state
    from tests.test_confirm import stage_bed
    from tracking.contract import CHECKPOINT_FILES, CONFIRM_OF_TAG, INTERRUPTED_TAG
    from trainables.atop_trainable import AUDIT_KEY, PER_IMAGE_KEY

    bed = stage_bed(tmp_path)
    figures = {PER_IMAGE_KEY: json.dumps({o: [1.0, 0.0] for o in OBJECTIVES}), AUDIT_KEY: ""}
    request = StopRequest()

    def stopped_after_the_first(jobs, ended):
        for job in (j for j in jobs if j["number"] == jobs[0]["number"]):
            ended(job, figures)
        # trial 1 seed 1 checkpointed an epoch in the stopped stage's experiment, as Tune does
        checkpoint = bed.folder / "study" / "confirm-20261201-120000" / "confirm-0001-seed1-ab12" / "checkpoint_000000"
        checkpoint.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (checkpoint / name).write_bytes(b"x")
        request.reason = "stop requested (SIGTERM)"  # Tune then ends the other seeds without a result

    resumed_jobs = []

    def all_end(jobs, ended):
        resumed_jobs.extend(jobs)
        for job in jobs:
            ended(job, figures)

    def confirm(fit):
        return bed.confirm(fit, interrupted=request.stop_all)

    confirmed, ran = confirm(stopped_after_the_first)
    assert ran and [c.number for c in confirmed] == [0] and list(load_state(bed.store)) == [0]
    runs_of_1 = [r for r in bed.client.search_runs([bed.experiment]) if r.data.tags.get(CONFIRM_OF_TAG) == "1"]
    assert len(runs_of_1) == 3  # its confirm run and two seed runs, all ended now
    assert all(r.info.status == "KILLED" and r.data.tags.get(INTERRUPTED_TAG) == "true" for r in runs_of_1)

    request.reason = None  # the resumed driver's stage
    confirmed, ran = confirm(all_end)
    assert [c.number for c in confirmed] == [0, 1] and not confirmed[1].failed_seeds
    # the seed that left a checkpoint goes on from it (`trainables.atop_trainable.confirm_atop`), the other anew
    assert {(j["number"], j["seed"]): j["resume_from"] for j in resumed_jobs} == {
        (1, 1): "confirm-20261201-120000/confirm-0001-seed1-ab12/checkpoint_000000", (1, 2): None}
    assert confirmed[1].figures["clean_acc"].mean == 0.5
