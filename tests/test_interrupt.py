"""SIGTERM's stop request (study/interrupt.py): the handler, the searcher that stops asking, the
resume command. The whole driver under SIGTERM: tests/test_reliability_sigterm.py."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import optuna
from ray.tune.search import Searcher

from atop.config import Config
from search_spaces import SPACES
from study.interrupt import EXIT_STOPPED, StopRequest, resume_command
from study.searcher import AskTellSearcher
from study.storage import JOB_ENV
from tests.conftest import REPO
from tracking.contract import DIRECTIONS

HANDLER = textwrap.dedent("""
    import os, signal, time
    from study.interrupt import StopRequest, catch_sigterm

    with catch_sigterm(StopRequest()):
        pass
    print("restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    request = StopRequest()
    with catch_sigterm(request):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs in this (the main) thread between two bytecodes
        print("first:", request.stop_all(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("survived the second SIGTERM", flush=True)
""")


def test_the_first_sigterm_sets_the_request_and_the_second_ends_the_process():
    done = subprocess.run([sys.executable, "-c", HANDLER], capture_output=True, text=True, timeout=120,
                          cwd=REPO, check=False)
    lines = done.stdout.splitlines()
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr[-3000:]
    assert lines[0] == "restored: True"
    assert lines[1].startswith("stop requested (SIGTERM): no new trials;") and lines[2] == "first: True", lines
    assert "survived" not in done.stdout
    assert EXIT_STOPPED == 143


def test_the_searcher_asks_no_trial_once_stopped():
    for max_trials in (None, 12):  # with a scheduler's cap too: "finished", not "ask again later"
        study = optuna.create_study(directions=list(DIRECTIONS))
        request = StopRequest()
        searcher = AskTellSearcher(study, SPACES["tiny"], Config(epochs=1), 4, lambda n: None, lambda *a: None,
                                   log=lambda line: None, interrupt=request, max_trials=max_trials)
        assert isinstance(searcher.suggest("a"), dict)
        request.reason = "stop requested (SIGTERM)"
        assert searcher.suggest("b") == Searcher.FINISHED
        assert len(study.trials) == 1 and searcher.stopped is None  # not a --time-budget stop: no report tag


def test_the_resume_command_names_the_study_and_its_storage(monkeypatch):
    plan = SimpleNamespace(name="my study", storage_path="/data/studies", optuna_url="sqlite:////data/studies/x.db")
    monkeypatch.delenv(JOB_ENV, raising=False)
    assert resume_command(plan) == "python study/run.py --study-name 'my study' --storage-path /data/studies --resume"
    monkeypatch.setenv(JOB_ENV, json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    plan.optuna_url = "postgresql://atop:secret@db:5432/optuna"
    command = resume_command(plan)
    assert command.startswith("ray job submit --working-dir . -- python study/run.py --study-name 'my study' ")
    assert "secret" not in command and "--optuna-storage" in command
