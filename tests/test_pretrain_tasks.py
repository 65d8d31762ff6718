"""`study.pretrained.pretrain_once` under a real (in-process) Ray: the classifier and a purifier that
does not train against it pre-train as two tasks at once where the cluster has room, and make the
same cache entries, with the same weights, as one task making both in turn; a stop or a failing
task ends every task at once."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from atop.checkpoint import load_checkpoint
from atop.config import Config
from atop.data import Split
from atop.presets import PretrainSettings
from atop.pretrain import ensure_pretrained

pytestmark = pytest.mark.slow
CFG = Config.from_dict({"classifier": "small_cnn", "purifier": "unet", "purifier_width": 4})
TINY = PretrainSettings(classifier_epochs=1, purifier_epochs=1, n_train=64, batch_size=32)


def _split(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def _weights(path) -> dict[str, torch.Tensor]:
    blob = load_checkpoint(path)
    entry = blob.get("purifier") or blob["classifier"]
    return entry["state_dict"]


@pytest.fixture(scope="module")
def ray_two_cpus():
    from study.cluster import loopback_ray

    loopback_ray()  # before the first `import ray`: bind loopback only
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_purifier_without_a_ce_term_pre_trains_beside_the_classifier(tmp_path, ray_two_cpus):
    from study.pretrained import pretrain_once

    with_ce = dataclasses.replace(TINY, purifier_ce_weight=0.1)
    said: list[str] = []
    apart = pretrain_once(CFG, TINY, _split(), tmp_path / "apart", cpus=1, gpus=0, log=said.append)
    assert said == [("pre-training the classifier and purifier once for the study (1 CPU threads each, as two "
                     "tasks at once)")]
    said.clear()  # a CE term needs the classifier first: one task, classifier then purifier
    pretrain_once(CFG, with_ce, _split(), tmp_path / "ce", cpus=1, gpus=0, log=said.append)
    assert said == ["pre-training the classifier and purifier once for the study (1 CPU threads)"]
    said.clear()  # no room for two tasks of 2 CPUs: one task
    pretrain_once(CFG, TINY, _split(), tmp_path / "wide", cpus=2, gpus=0, log=said.append)
    assert said == ["pre-training the classifier and purifier once for the study (2 CPU threads)"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each task ran: the same arithmetic, so the same weights
    try:
        together = ensure_pretrained(CFG, TINY, tmp_path / "together", train=_split(), log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert [p.name for p in apart] == [p.name for p in together]
    for a, b in zip(apart, together, strict=True):
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name


def test_a_stop_or_a_failing_task_cancels_every_task_at_once(ray_two_cpus):
    from study.pretrained import PretrainingStopped, _results_unless_stopped

    ray = ray_two_cpus

    @ray.remote(num_cpus=1)
    def runs_long() -> str:
        time.sleep(120)
        return "done"

    @ray.remote(num_cpus=1)
    def fails() -> str:
        time.sleep(2)  # after the long one started
        raise ValueError("boom")

    def cancelled(ref) -> bool:
        try:
            ray.get(ref, timeout=60)
        except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError):
            return True
        return False

    started = time.monotonic()
    refs = [runs_long.remote(), fails.remote()]
    with pytest.raises(ray.exceptions.RayTaskError, match="boom"):
        _results_unless_stopped(refs, stop=lambda: False)
    assert time.monotonic() - started < 60 and cancelled(refs[0])  # not after the long one's 120 s

    asked = iter([False, False, True])
    refs = [runs_long.remote(), runs_long.remote()]
    with pytest.raises(PretrainingStopped):
        _results_unless_stopped(refs, stop=lambda: next(asked, True))
    assert all(cancelled(ref) for ref in refs)
