"""The study's Ray: an embedded Ray bound to 127.0.0.1, or the cluster of `ray job submit`, joined
and checked (resources for one trial; the MLflow store reachable from every node)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Only light modules here: bad input is refused (study.args, then `prepare`) before torch, Optuna,
# MLflow or Ray are imported; each function imports the heavy modules it needs (tests/test_refusal.py).
from study.errors import StudyError
from study.storage import submitted

#: this checkout: embedded Ray workers import its packages
ROOT = Path(__file__).resolve().parent.parent

if TYPE_CHECKING:
    from study.plan import StudyPlan


def loopback_ray() -> None:
    """Before the first `import ray`: an embedded Ray listens on 127.0.0.1 only.

    Ray on Linux turns a node IP of 127.0.0.1 into the machine's external IP and binds its gRPC
    servers (GCS, raylet, workers) there or on all interfaces; with "cluster mode" off it keeps
    127.0.0.1 and binds loopback only. Read once, when ray is imported. See docs/RELIABILITY.md.

    Token authentication: what a new local Ray turns on when RAY_AUTH_MODE is unset, said here so
    that Ray does not warn about it in every study (a RAY_AUTH_MODE of the user's own is kept).
    """
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "ray" not in sys.modules:  # read at import: set later, this process and its GCS would disagree
            os.environ.setdefault("RAY_AUTH_MODE", "token")


def init_ray(cpus_per_trial: float, gpus_per_trial: float, verbose: bool = False) -> None:
    """Join the cluster of `ray job submit`, or start a local Ray; Ray's own INFO logs only if `verbose`."""
    loopback_ray()
    import logging

    import ray

    level = logging.INFO if verbose else logging.WARNING
    if not sys.stdout.isatty():  # a log file or `ray job logs`: the workers' line prefixes without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by Ray as it prints each forwarded line

    from trainables.faults import FAULT_ENV

    # ray.init puts Ray's own SIGTERM handler (a stack dump, then death) over the driver's: the driver's
    # (`study.interrupt.catch_stop_signals`, which stops a study cleanly) is put back below
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    if os.environ.get("RAY_ADDRESS"):  # `ray job submit` sets it: join that cluster
        # A cluster's workers get the raylet's environment, not this driver's: the test-only fault
        # hook (trainables.faults.FAULT_ENV) must travel in a runtime env. A submitted job's own
        # runtime env already carries it (and Ray refuses a second one that sets the same variable).
        fault = os.environ.get(FAULT_ENV) if not submitted() else None
        context = ray.init(log_to_driver=True, logging_level=level,
                           runtime_env={"env_vars": {FAULT_ENV: fault}} if fault else None)
    else:  # embedded: a local Ray bound to 127.0.0.1, workers importing this checkout
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        # the workers' own Ray INFO logs reach this terminal too ("Checkpoint successfully created at"
        # for every checkpoint of every trial): warnings only there as well, unless `verbose`
        env = {"PYTHONPATH": path, **({} if verbose else {"RAY_LOGGER_LEVEL": "warning"})}
        context = ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=level,
                           runtime_env={"env_vars": env}, log_to_driver=True)
    for signum, handler in handlers.items():
        if callable(handler):  # set from Python (SIG_DFL, SIG_IGN and C handlers are left to Ray)
            signal.signal(signum, handler)
    if getattr(context, "dashboard_url", None):
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    total = ray.cluster_resources()
    if cpus_per_trial > total.get("CPU", 0) or gpus_per_trial > total.get("GPU", 0):
        ray.shutdown()
        raise StudyError(f"a trial asks for {cpus_per_trial:g} CPU and {gpus_per_trial:g} GPU but the Ray cluster "
                         f"has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU")


def join_ray(plan: StudyPlan) -> None:
    """`init_ray`, then on a cluster check the MLflow store from every node that can run a trial
    (`study.nodes`): the driver's own check says nothing about the other nodes."""
    s = plan.settings
    init_ray(s.cpus, s.gpus, plan.verbose)
    if not os.environ.get("RAY_ADDRESS"):  # embedded: this machine is the only node
        return
    from study.nodes import check_tracking_on_nodes

    root = plan.folder.parent  # a new study's default store will be inside it: nodes must see it
    if plan.mlflow_uri.startswith(("sqlite:", "file:")):
        root.mkdir(parents=True, exist_ok=True)
    n = check_tracking_on_nodes(plan.mlflow_uri, str(root), s.cpus, s.gpus)
    print(f"MLflow store reachable from all {n} Ray node(s) that can run a trial", flush=True)


# --- the study: resolve settings -> open the study -> data and weights -> search -> settle -> report --------


def ray_cpus() -> float:
    """CPUs of the largest alive node: one task (pre-training) must fit on one node."""
    import ray

    per_node = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return max(per_node, default=0.0) or ray.cluster_resources().get("CPU", 1.0)
