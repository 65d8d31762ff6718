"""Pre-training once per study, before any trial, as one Ray task (it gets a GPU where trials do).

The files land in `<study folder>/pretrained/`, named by `atop.pretrain.pretrain_key`; a rerun or a
resumed study with the same settings reuses them. Trials receive the bytes through the object store.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from atop.config import Config
from atop.data import Split
from atop.io import atomic_write_bytes
from atop.pretrain import PretrainSettings, ensure_pretrained, pretrain_key


def expected_paths(cfg: Config, settings: PretrainSettings, folder: Path) -> tuple[Path, Path]:
    """The names `ensure_pretrained` gives its files (to reuse them without starting a task)."""
    return (folder / f"classifier-{cfg.classifier}-{pretrain_key(cfg, settings, 'classifier')}.pt",
            folder / f"purifier-{cfg.purifier}-{pretrain_key(cfg, settings, 'purifier')}.pt")


def _pretrain_task(cfg: dict[str, Any], settings: PretrainSettings, train: Split, use_gpu: bool,
                   threads: int) -> tuple[bytes, bytes]:
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="atop-pretrain-") as d:
        clf, pur = ensure_pretrained(Config.from_dict(cfg), settings, d, train=train, device=device,
                                     log=lambda m: print(m, flush=True))
        return clf.read_bytes(), pur.read_bytes()


def pretrain_once(cfg: Config, settings: PretrainSettings, train: Split, folder: Path, *, cpus: float,
                  gpus: float, log=print) -> tuple[Path, Path]:
    """Reuse or make the pre-trained classifier and purifier; returns their paths under `folder`."""
    import ray

    clf_path, pur_path = expected_paths(cfg, settings, folder)
    if clf_path.is_file() and pur_path.is_file():
        log(f"reusing pre-trained {clf_path.name} and {pur_path.name}")
        return clf_path, pur_path
    threads = max(1, int(cpus))
    task = ray.remote(num_cpus=cpus, num_gpus=min(1.0, gpus) if gpus > 0 else 0)(_pretrain_task)
    log(f"pre-training the classifier and purifier once for the study ({threads} CPU threads"
        f"{', 1 GPU' if gpus > 0 else ''})")
    clf_bytes, pur_bytes = ray.get(task.remote(cfg.to_dict(), settings, train, gpus > 0, threads))
    for path, data in ((clf_path, clf_bytes), (pur_path, pur_bytes)):
        atomic_write_bytes(path, data)
    return clf_path, pur_path
