"""What every Ray node that may run a trial must reach, checked from a task on that node.

The driver checks `--mlflow-uri` where it runs (study.args); on a cluster the trials log from other
nodes, whose network, proxies and mounts may differ. Before the study is created, a task pinned to
each alive node that can hold a trial (`NodeAffinitySchedulingStrategy`, no CPU asked) checks there:
an MLflow server's `/health`, or for a file store (sqlite, file:) that its folder is visible (a
shared file system). A node that fails, or does not answer, is one line naming it. Nodes that join
later (autoscaling) are not checked.
"""
from __future__ import annotations

import os
from typing import Any

from study.errors import StudyError
from tracking.uri import store_path

#: how long a node's check may take, its worker's start-up included
NODE_CHECK_TIMEOUT_S = 120.0


def trial_nodes(cpus_per_trial: float, gpus_per_trial: float) -> list[dict[str, Any]]:
    """The alive nodes of the connected cluster whose resources can hold one trial."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")
            and n["Resources"].get("CPU", 0) >= cpus_per_trial and n["Resources"].get("GPU", 0) >= gpus_per_trial]


def probe_folder(uri: str, storage_root: str | None) -> str | None:
    """For a file store, the folder every node must see: the database's folder, or (a new study's
    default store, inside a study folder not made yet) `storage_root`; None for a server."""
    if not uri.startswith(("sqlite:", "file:")):
        return None
    path = store_path(uri)
    folder = os.path.dirname(path) if uri.startswith("sqlite:") else path
    return folder if os.path.isdir(folder) or not storage_root else storage_root


def check_on_node(uri: str, folder: str | None) -> str | None:
    """Run on a node: why trials there could not log to `uri`, or None."""
    from tracking.uri import TrackingURIError, check_tracking_uri

    if folder is not None:
        return None if os.path.isdir(folder) else f"folder {folder!r} is not visible there"
    try:
        check_tracking_uri(uri, existing_store=False)
    except TrackingURIError as exc:
        return str(exc).removeprefix(f"--mlflow-uri {uri!r} ")
    return None


def check_tracking_on_nodes(uri: str, storage_root: str | None, cpus_per_trial: float, gpus_per_trial: float,
                            timeout_s: float = NODE_CHECK_TIMEOUT_S) -> int:
    """Check `uri` from every node that can run a trial; returns how many nodes were checked.

    Raises:
        StudyError: a node cannot reach it, or did not answer in `timeout_s` (one line naming the
            nodes and what to do).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = trial_nodes(cpus_per_trial, gpus_per_trial)
    folder = probe_folder(uri, storage_root)
    task = ray.remote(num_cpus=0, max_retries=0)(check_on_node)
    pending = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(uri, folder): n for n in nodes}
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = [f"{_name(pending[ref])}: did not answer within {timeout_s:.0f} s" for ref in late]
    for ref in done:
        try:
            reason = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a node that cannot run the check cannot run trials
            last = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
            reason = f"the check failed there ({last[0].strip()[:200]})"
        if reason:
            problems.append(f"{_name(pending[ref])}: {reason}")
    for ref in late:
        ray.cancel(ref, force=True)
    if problems:
        fix = ("mount it on every node (a shared file system) or log to an MLflow server (--mlflow-uri http://..., "
               "docs/CLUSTER.md)" if folder else "make the server reachable from every node (network, proxy "
               "settings) or pass a --mlflow-uri they all reach")
        raise StudyError(f"--mlflow-uri {uri!r} from the Ray nodes that would run trials: {'; '.join(sorted(problems))}"
                         f"; {fix}")
    return len(nodes)


def _name(node: dict[str, Any]) -> str:
    return f"node {node['NodeID'][:8]} ({node.get('NodeManagerAddress', '?')})"
