"""Pre-training once, before any trial, as one Ray task (it gets a GPU where trials do).

The files land in the pre-training cache (`--pretrained-cache`, default
`<storage-path>/.pretrained-cache/`), named by a hash of their settings, training data and code
(`atop.pretrained_cache.cache_paths`): a resumed study, and every later study with the same
settings, reuses them without starting a task. Trials receive the bytes through the object store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from atop.config import Config
from atop.data import Split
from atop.pretrain import PretrainSettings, ensure_pretrained
from atop.pretrained_cache import cache_paths, check_entry


def _pretrain_task(cfg: dict[str, Any], settings: PretrainSettings, train: Split, use_gpu: bool,
                   threads: int, folder: str) -> None:
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    # the cache folder itself: a classifier already there is reused when only the purifier is missing
    ensure_pretrained(Config.from_dict(cfg), settings, folder, train=train, device=device,
                      log=lambda m: print(m, flush=True))


def pretrain_once(cfg: Config, settings: PretrainSettings, train: Split, folder: Path, *, cpus: float,
                  gpus: float, log=print) -> tuple[Path, Path]:
    """Reuse or make the pre-trained classifier and purifier; returns their paths in the cache `folder`.

    Raises:
        CheckpointError: a cached entry is corrupt (the message says to delete it to rebuild).
    """
    import ray

    clf_path, pur_path = cache_paths(cfg, settings, train, folder)
    if clf_path.is_file() and pur_path.is_file():
        check_entry(clf_path, "classifier")
        check_entry(pur_path, "purifier")
        log(f"reusing pre-trained {clf_path} and {pur_path.name}")
        return clf_path, pur_path
    threads = max(1, int(cpus))
    task = ray.remote(num_cpus=cpus, num_gpus=min(1.0, gpus) if gpus > 0 else 0)(_pretrain_task)
    log(f"pre-training the classifier and purifier once for the study ({threads} CPU threads"
        f"{', 1 GPU' if gpus > 0 else ''})")
    ray.get(task.remote(cfg.to_dict(), settings, train, gpus > 0, threads, str(folder)))
    return clf_path, pur_path
