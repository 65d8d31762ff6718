"""One MLflow sender per Ray node: trials hand their calls to it instead of sending them themselves.

Why: a trial process that sends its own calls imports MLflow's client and, with a sqlite tracking
URI, SQLAlchemy and alembic: about 90 MB of every trial worker (docs/PERFORMANCE.md), paid once per
concurrent trial. A sender per node pays it once per node, in a process of its own.

The sender runs the very spool queues a trial would (`tracking.mlflow_log`), so every promise of that
module holds: a call is in the spool file before `put` returns (the sender writes it, and is the
file's only writer while it lives), calls are sent in order, retried while the server is down, and
what is left stays in the file for the driver's `flush_spools` or `python -m tracking upload`.

The driver starts the senders (`start_senders`: one per alive node, owned by the driver, so they live
as long as it does) and stops them before it replays the spools (`stop_senders`). A trial gets its
logger from `node_logger`; where its node has no sender (a node that joined later), or the sender
fails it (`SENDER_WAIT_S` without an answer, or dead), the trial sends its calls itself, as before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tracking.mlflow_log import RunLogger, SpoolQueue, close_queues, quiet_http

#: how long a trial waits for its node's sender to take a call before it sends the calls itself (the
#: sender only appends the call to the spool file: a wait this long means it is gone or stuck)
SENDER_WAIT_S = 60.0
#: calls of several trials at once, each of which may wait up to its flush timeout
SENDER_THREADS = 64

#: this driver's senders by node id: held here so that they live as long as the driver
_SENDERS: dict[str, Any] = {}


def sender_name(node_id: str) -> str:
    """The Ray actor name of the sender of node `node_id`."""
    return f"atop-mlflow-sender-{node_id}"


class SpoolSender:
    """The Ray actor (one per node) that holds the spool queues of the node's trials (module docstring)."""

    def __init__(self) -> None:
        quiet_http()  # as a trial does: fail fast on an unreachable server, the spool keeps the calls

    def put(self, spool: str, uri: str, op: dict[str, Any]) -> None:
        SpoolQueue.of(Path(spool), uri).put(op)

    def flush(self, spool: str, uri: str, timeout_s: float) -> bool:
        return SpoolQueue.of(Path(spool), uri).flush(timeout_s)

    def close(self, spool: str, uri: str, timeout_s: float) -> int:
        return SpoolQueue.of(Path(spool), uri).close(timeout_s)

    def state(self, spool: str, uri: str) -> dict[str, Any]:
        return SpoolQueue.of(Path(spool), uri).state()

    def close_all(self, timeout_s: float) -> int:
        """Close every queue (each `flush`ed for at most `timeout_s`); returns the calls left unsent."""
        return close_queues(timeout_s)

    def pid(self) -> int:
        return os.getpid()


class _NodeQueue:
    """The spool queue interface `RunLogger` uses, answered by the node's sender; once the sender
    fails to answer, by a queue of this process over the same file (the file is the truth)."""

    def __init__(self, sender: Any, path: Path, uri: str):
        self.path, self.uri, self._sender = path, uri, sender
        self._local: SpoolQueue | None = None

    def _ask(self, method: str, *args: Any, wait_s: float = SENDER_WAIT_S) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._local is None:
            try:
                return ray.get(getattr(self._sender, method).remote(str(self.path), self.uri, *args), timeout=wait_s)
            except (RayActorError, GetTimeoutError) as exc:
                print(f"MLflow: this node's sender failed ({type(exc).__name__}); this trial sends its calls "
                      "itself from now on", flush=True)
                self._local = SpoolQueue.of(self.path, self.uri)
        return getattr(self._local, method)(*args)

    def put(self, op: dict[str, Any]) -> None:
        self._ask("put", op)

    def flush(self, timeout_s: float) -> bool:
        return self._ask("flush", timeout_s, wait_s=timeout_s + SENDER_WAIT_S)

    def close(self, timeout_s: float) -> int:
        return self._ask("close", timeout_s, wait_s=timeout_s + SENDER_WAIT_S)

    @property
    def pending(self) -> int:
        return self._ask("state")["pending"]

    @property
    def last_error(self) -> str | None:
        return self._ask("state")["last_error"]

    @property
    def skipped(self) -> list[str]:
        return self._ask("state")["skipped"]


def start_senders() -> int:
    """Start a sender on every alive node that has none from this driver; returns how many run.

    Each is a Ray actor pinned to its node, taking no CPU from trials (`num_cpus=0`), named
    `sender_name(node id)` so that the node's trials find it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    for node_id in set(_SENDERS) - set(alive):  # a node gone, or of an earlier Ray session of this process
        del _SENDERS[node_id]
    for node_id in alive:
        if node_id not in _SENDERS:
            _SENDERS[node_id] = ray.remote(SpoolSender).options(
                name=sender_name(node_id), get_if_exists=True, num_cpus=0, max_concurrency=SENDER_THREADS,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    return len(_SENDERS)


def stop_senders(timeout_s: float = 10.0) -> int:
    """Close every queue of this driver's senders (each flushed for at most `timeout_s`), then end
    them; returns the calls they left unsent (in their spool files, for `flush_spools`). A sender
    that is already gone is skipped: its calls are in its files."""
    import ray
    from ray.exceptions import RayError

    left = 0
    senders = list(_SENDERS.values())
    _SENDERS.clear()
    if not ray.is_initialized():  # Ray ended, and the senders with it
        return 0
    for sender in senders:
        try:
            left += ray.get(sender.close_all.remote(timeout_s), timeout=timeout_s + SENDER_WAIT_S)
            ray.kill(sender)
        except RayError:  # gone already (or of an earlier Ray session of this process)
            pass
    return left


def node_logger(uri: str, run: str, spool: str | os.PathLike) -> RunLogger:
    """A `RunLogger` whose calls this node's sender sends; without a sender on this node, one that
    sends them from this process (`RunLogger` itself)."""
    import ray

    try:
        sender = ray.get_actor(sender_name(ray.get_runtime_context().get_node_id()))
    except ValueError:  # no sender on this node
        return RunLogger(uri, run, spool)
    return RunLogger(uri, run, spool, queue=_NodeQueue(sender, Path(spool).resolve(), uri))
