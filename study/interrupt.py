"""SIGTERM (`ray job stop`, `kill PID`) or SIGINT (Ctrl+C) while the study runs: stop it cleanly, resumable.

Without this, SIGTERM would end the driver at once, like a crash: the trials it left RUNNING are
settled by the next `--resume` only; and Ctrl+C would reach Tune's own SIGINT handler, which ends the
search its own way and lets the driver go on to the confirm stage with trials still RUNNING. Here the
driver, on the first of either signal once its input is checked (from Ray's start to the report; Tune
is told to leave SIGINT alone):

1. prints one line (unbuffered: under `ray job stop` the output goes to a file and SIGKILL follows);
   before the study is created, it stops there (nothing written); during pre-training, it cancels the
   pre-training task, whose last finished epoch stays in the cache (`study.pretrained.pretrain_once`),
   and goes to step 4;
2. asks no new trial (`AskTellSearcher` checks the request before each one, as it checks
   `--time-budget`);
3. ends every running trial through Tune's own `Stopper.stop_all`: Tune stops their actors (the
   epoch in progress is lost, each trial keeps its last per-epoch checkpoint in the study folder)
   and saves its experiment state;
4. tells the trials that had reported their last epoch (or a failure) as Tune would have
   (`AskTellSearcher.tell_ended`: COMPLETE with that epoch's figures; a trial writes its final
   artifacts before that report, so they are there), then settles the study as `--resume` would
   (`study.resume.settle_interrupted`): the search trials still RUNNING in Optuna become FAIL (user attr `interrupted`, not counted), their MLflow runs
   KILLED (`atop.interrupted=true`), their parameters enqueued again with their last checkpoint; in
   the confirm stage, the configurations whose seeds did not all end are left unconfirmed, their
   runs KILLED (`study.confirm.run_confirm`); the study's parent run ends KILLED; spooled MLflow
   calls are sent;
5. skips what is left (the confirm stage, the report), prints the command that resumes the study
   and exits with 128 + the signal's number, as a shell reports a process that signal ended: 143
   after SIGTERM, 130 after Ctrl+C (`StopRequest.exit_status`).

The next `--resume` finds nothing RUNNING, reruns the interrupted trials first, each from its
checkpoint, runs the study to its `--num-trials`, then confirms what is not yet confirmed (a confirm
trial from its own newest checkpoint, `study.confirm.run_confirm`; one that had trained its last epoch
starts again, as its test scoring comes with that epoch; pre-training goes on after its last finished
epoch). A signal while the finished study is settled and reported stops nothing; the driver says so
and exits with the same status. Ctrl+C while the input is checked (before Ray starts, with the data
load) ends the driver with one line and 130, nothing created; SIGTERM then, or a second signal later,
ends it at once (the default action): the next `--resume` settles what is left, as after a crash. So
does a SIGTERM to the embedded driver's whole process group: it reaches the in-process Ray's own daemons (GCS, raylet), whose loss ends the driver
at once (Ray's core worker exits the process). `ray job stop` signals only the job's processes (a
cluster's daemons are not among them) and sends SIGKILL `RAY_JOB_STOP_WAIT_TIME_S` seconds after
SIGTERM (default 3, read from the environment of the head's `ray start`; Tune gives a busy trial
about 10 s to stop before it kills it, and a stop took 18-25 s in tests/test_reliability_sigterm.py
on 2 loaded cores): docs/CLUSTER.md asks for 60.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from ray import tune

from study import optuna_storage
from study.storage import job_submission_id

if TYPE_CHECKING:
    from study.plan import StudyPlan

#: the signals that stop a study cleanly -> how the stop line names them
STOP_SIGNALS: Final[dict[int, str]] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT, Ctrl+C"}
#: read by Tune at each `fit`: set, Tune installs no SIGINT handler of its own over `catch_stop_signals`'
TUNE_SIGINT_ENV: Final = "TUNE_DISABLE_SIGINT_HANDLER"


class StopRequest(tune.Stopper):
    """Set by SIGTERM or SIGINT (`catch_stop_signals`): the searcher asks no new trial and Tune ends every
    running trial (`stop_all`). Plain fields: Tune pickles its stopper with the experiment state."""

    def __init__(self) -> None:
        self.reason: str | None = None  # why the study stops, once it does
        self.signum = int(signal.SIGTERM)  # the signal that stopped it

    @property
    def exit_status(self) -> int:
        """The driver's exit status once settled: 128 + the signal's number (143 SIGTERM, 130 Ctrl+C), what a
        shell reports for a process that signal ended (a script's `$? -ge 128` test holds; 0 means
        finished, 1 crashed, 2 refused input)."""
        return 128 + self.signum

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False  # no trial stops on its own results

    def stop_all(self) -> bool:
        return self.reason is not None


@contextmanager
def catch_stop_signals(request: StopRequest) -> Iterator[StopRequest]:
    """Within the block, the first SIGTERM or SIGINT sets `request` and prints one line; a second one
    ends the process at once (the signal's default action). The previous handlers (and Tune's own
    SIGINT handling) are back after the block. Call it from the main thread (Python runs signal
    handlers there only)."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    tune_sigint = os.environ.get(TUNE_SIGINT_ENV)

    def handle(signum: int, frame: Any) -> None:
        if request.reason is not None:  # the second: stop now, as if no handler were there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        request.signum, request.reason = signum, f"stop requested ({STOP_SIGNALS[signum]})"
        # os.write, not print: a handler that prints while the main thread is inside a print of the
        # same stream raises "reentrant call"; unbuffered, the line survives a SIGKILL that follows
        _write(f"{request.reason}: no new trials; ending what runs (trials and pre-training each keep their last "
               "per-epoch checkpoint), then settling the study (a second signal stops at once)\n")

    os.environ[TUNE_SIGINT_ENV] = "1"
    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            # None: a handler not set from Python (Ray's C one), which Python cannot put back; the
            # default action then, rather than this block's handler answering a request nobody reads
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if tune_sigint is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = tune_sigint


def _write(text: str) -> None:
    try:
        sys.stdout.flush()  # what was printed before comes first
    except (OSError, RuntimeError, ValueError):  # reentrant or closed: the line itself matters more
        pass
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (OSError, ValueError):  # stdout closed or not a file: nothing to tell
        pass


def resume_command(plan: StudyPlan) -> str:
    """The command that continues the study of `plan` (under `ray job submit`, submitted the same way)."""
    command = f"python study/run.py --study-name {shlex.quote(plan.name)} --storage-path {shlex.quote(plan.storage_path)}"
    if plan.cache_given:  # its weights (or pre-training's last epoch) are there, not in the default cache
        command += f" --pretrained-cache {shlex.quote(str(plan.pretrained_cache))}"
    command += " --resume"
    if job_submission_id():
        command = f"ray job submit --working-dir . -- {command}"
    if "***" in optuna_storage.public(plan.optuna_url):  # study.json keeps the URL without its password
        command += "  (with --optuna-storage or $ATOP_OPTUNA_STORAGE holding the password, as now)"
    return command
