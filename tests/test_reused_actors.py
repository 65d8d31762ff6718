"""Trials that share a worker process (`reuse_actors=True`) leak nothing into each other.

The weights cache (`trainables.worker.pretrained`) is checked without Ray; the slow test
runs the real trainable under a real in-process Ray: two different configurations one after the
other in one reused actor report exactly what each reports in a fresh actor of its own.
"""
from __future__ import annotations

import pytest
import torch

from atop.checkpoint import save_checkpoint
from atop.config import Config
from atop.data import Split
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from tracking.contract import OBJECTIVES
from trainables.atop_trainable import StudyContext
from trainables.worker import _PRETRAINED, pretrained

CFG = Config.from_dict({"n_train": 16, "n_eval": 8, "epochs": 2, "batch_size": 8, "purifier_width": 4,
                        "rt": "rt2", "unseen_attacks": "fgsm_linf"})


def _data(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _context(tmp_path, purifier_seed: int = 0) -> StudyContext:
    torch.manual_seed(purifier_seed)
    clf = save_checkpoint(tmp_path / "clf.pt", kind="classifier", cfg=CFG, classifier=CLASSIFIERS["small_cnn"](10))
    pur = save_checkpoint(tmp_path / f"pur{purifier_seed}.pt", kind="purifier", cfg=CFG,
                          purifier=PURIFIERS["unet"](4), discriminator=PatchDiscriminator())
    return StudyContext(train=_data(16, 0), eval_data=_data(8, 1), classifier_ckpt=clf.read_bytes(),
                        purifier_ckpt=pur.read_bytes(), mlflow_uri="", spool_dir=str(tmp_path / "spool"))


def test_weights_are_read_once_per_process_and_every_trial_gets_fresh_modules(tmp_path):
    ctx = _context(tmp_path)
    ckpts = ctx.classifier_ckpt, ctx.purifier_ckpt
    first = pretrained(*ckpts)
    assert pretrained(*ckpts) is first  # the second trial of this process reads nothing
    clf, pur, disc = first.build()
    before = {k: v.clone() for k, v in first.purifier["purifier"]["state_dict"].items()}
    with torch.no_grad():  # what a trial does to its modules (trains them, NaN faults) stays in them
        for p in pur.parameters():
            p.fill_(float("nan"))
    clf2, pur2, disc2 = first.build()
    assert all(torch.equal(before[k], v) for k, v in first.purifier["purifier"]["state_dict"].items())
    assert all(torch.isfinite(p).all() for p in pur2.parameters())
    assert clf2 is not clf and pur2 is not pur and disc2 is not disc
    other_ctx = _context(tmp_path, purifier_seed=1)  # another study's weights: read, and only they kept
    other = pretrained(other_ctx.classifier_ckpt, other_ctx.purifier_ckpt)
    assert other.key != first.key and list(_PRETRAINED) == [other.key]


@pytest.mark.slow
def test_a_reused_actor_reports_what_fresh_actors_report(tmp_path):
    from study.cluster import loopback_ray

    loopback_ray()  # before the first `import ray`: bind loopback only
    import ray
    from ray import tune

    from trainables.atop_trainable import train_atop

    ctx = _context(tmp_path)
    # two trials, seed 1 then seed 2, whose other settings differ too
    space = {**CFG.to_dict(), "seed": tune.grid_search([1, 2]),
             "lambda_ce": tune.sample_from(lambda spec: 0.05 if spec.config.seed == 1 else 0.2),
             "mask_ratio": tune.sample_from(lambda spec: 0.25 if spec.config.seed == 1 else 0.5)}

    def fit(reuse: bool) -> list:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(train_atop, ctx=ctx), {"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=reuse),
            run_config=tune.RunConfig(name=f"reuse-{reuse}", storage_path=str(tmp_path / "tune"), verbose=0))
        results = tuner.fit()
        assert not results.errors, results.errors
        return sorted(results, key=lambda r: r.config["seed"])

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        reused, fresh = fit(True), fit(False)
    finally:
        ray.shutdown()
    assert len({r.metrics["pid"] for r in reused}) == 1  # both trials ran in one process
    assert len({r.metrics["pid"] for r in fresh}) == 2
    keys = [*OBJECTIVES, "loss/total"]
    for a, b in zip(reused, fresh, strict=True):
        assert a.config == b.config
        history_a, history_b = a.metrics_dataframe, b.metrics_dataframe
        assert list(history_a["epoch"]) == list(history_b["epoch"]) == [1, 2]
        for k in keys:
            assert list(history_a[k]) == pytest.approx(list(history_b[k]), rel=1e-6, abs=1e-9), k
    assert reused[0].metrics["loss/total"] != reused[1].metrics["loss/total"]  # the configs did differ


_TRIAL_THEN_RELEASE = """
import json, threading
import psutil
from trainables.worker import _MALLOC_TRIM, release_freed_memory
if _MALLOC_TRIM is None:
    raise SystemExit(3)
me, kept = psutil.Process(), []
def trial():  # on a thread of its own, as Ray runs each trial: 100 kB chunks, every 10th kept
    chunks = [bytearray(100_000) for _ in range(3000)]
    kept.extend(chunks[::10])
start = me.memory_full_info().uss
worker = threading.Thread(target=trial)
worker.start()
worker.join()
before = me.memory_full_info().uss
release_freed_memory()
print(json.dumps({"grew": before - start, "freed": before - me.memory_full_info().uss, "kept": len(kept)}))
"""


def test_release_freed_memory_returns_a_finished_trials_heap():
    """In a fresh interpreter, so that what earlier tests did to this process's allocator (its
    arenas, its dynamic mmap threshold) cannot change what a trial's frees leave behind: inside
    the whole suite this once returned 97 MB where a fresh process returns ~270 MB."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TRIAL_THEN_RELEASE], check=False, capture_output=True, text=True, timeout=120)
    if done.returncode == 3:
        pytest.skip("this C library has no malloc_trim (not glibc)")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["kept"] == 300
    # 3000 x 100 kB allocated, 300 kept: ~270 MB of holes between the kept chunks stay resident
    # after the trial (grew) until release_freed_memory hands them back (freed)
    assert figures["grew"] > 250 * 2**20, figures
    assert figures["freed"] > 200 * 2**20, figures
