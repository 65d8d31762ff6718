"""What a trial asks of the worker process it runs in: pre-trained weights, memory, its device.

A study's workers are reused (`reuse_actors=True` in `study/phases.py`): one Ray actor process runs
trial after trial. Two things here exist because of that:

- `pretrained` deserializes and checks the study's two pre-trained checkpoints on a worker's first
  trial and keeps them, keyed by the sha256 of their bytes; later trials build fresh modules from
  them (`Pretrained.build`) instead of reading them again.
- `release_freed_memory` hands back to the OS the heap earlier trials freed (glibc's
  `malloc_trim`): without it a reused worker's footprint grew trial after trial.

The rest is the process's device and what goes wrong with it: `trial_device` picks CUDA or the CPU
for a trial's GPU share and caps the process's CUDA memory to that share. Asking for a GPU on a
node without CUDA (`DeviceError`) and running out of CUDA memory are `PERMANENT` failures, like a
NaN loss or a bad config: a retry would meet them again, so the trainable reports them as a failed
result (`failure_message`, one line) instead of raising.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import platform
import re
from dataclasses import dataclass
from typing import Any

import torch

from atop.checkpoint import build_classifier, build_purifier, classifier_reference, load_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.config import Config, ConfigError


class DeviceError(RuntimeError):
    """A trial asked for a GPU on a node where CUDA is not available; one-line message."""


#: errors a retry cannot fix: reported as a failed result, not raised (no Tune retry). A CUDA
#: out-of-memory error comes back on every retry of the same batch size and GPU share.
PERMANENT = (FloatingPointError, ConfigError, CheckpointError, DeviceError, torch.cuda.OutOfMemoryError)


@dataclass(frozen=True)
class Pretrained:
    """The study's pre-trained checkpoints, read and checked once per worker process.

    The blobs are read-only: `build` loads copies of their state dicts into fresh modules for every
    trial, because a trial trains the purifier and moves all three (device, memory format).
    """

    key: str  # sha256 of the classifier file's bytes, then the purifier file's
    classifier: dict[str, Any]
    classifier_ref: dict[str, Any]
    purifier: dict[str, Any]

    def build(self) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
        """(classifier, purifier, discriminator), fresh modules with the pre-trained weights.

        Raises:
            CheckpointError: the purifier checkpoint holds no discriminator.
        """
        purifier, discriminator = build_purifier(self.purifier)
        if discriminator is None:
            raise CheckpointError("the pre-trained purifier checkpoint holds no discriminator")
        return build_classifier(self.classifier), purifier, discriminator


#: this worker process's `Pretrained`, by key; one entry (a worker serves one study at a time)
_PRETRAINED: dict[str, Pretrained] = {}


def pretrained(classifier_ckpt: bytes, purifier_ckpt: bytes) -> Pretrained:
    """The study's pre-trained checkpoints (their files' bytes), deserialized on the first trial of
    this process only.

    Raises:
        CheckpointError: a checkpoint is unreadable or of the wrong kind.
    """
    digest = hashlib.sha256(classifier_ckpt)
    digest.update(purifier_ckpt)
    key = digest.hexdigest()
    if key not in _PRETRAINED:
        classifier = load_checkpoint(classifier_ckpt, kind="classifier")
        loaded = Pretrained(key, classifier, classifier_reference(classifier_ckpt, classifier),
                            load_checkpoint(purifier_ckpt, kind="purifier"))
        _PRETRAINED.clear()
        _PRETRAINED[key] = loaded
    return _PRETRAINED[key]


def _libc_malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap earlier trials of this worker freed back to the OS.

    glibc keeps freed memory in its arenas, and each trial runs on a new thread (Ray's function
    trainable), so a reused worker's footprint grew trial after trial (USS ~1.0 GB after its first
    smoke trial, ~1.8 GB during its third, measured); `malloc_trim(0)` returns the free pages.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def select_device(gpus: float, *, cuda_available: bool) -> torch.device:
    """CUDA for a trial given a GPU (or a share of one), else the CPU.

    Raises:
        DeviceError: `gpus > 0` on a node without CUDA (a silent CPU run would be far slower and
            report a GPU it never had).
    """
    if gpus <= 0:
        return torch.device("cpu")
    if not cuda_available:
        raise DeviceError(f"gpus_per_trial={gpus} but CUDA is not available on node {platform.node()!r} "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                          "run the study with --gpus 0 or on GPU nodes")
    return torch.device("cuda")


def memory_fraction(gpus: float) -> float | None:
    """The share of its GPU's memory a trial may take: its share of the GPU below one GPU, else none
    (no cap). Ray shares a GPU by bookkeeping only; the cap keeps one trial from starving the others."""
    return float(gpus) if 0 < gpus < 1 else None


def trial_device(gpus: float) -> torch.device:
    """The device of a trial given `gpus` GPUs (`gpus_per_trial`), its CUDA memory capped to that
    share (see `memory_fraction`).

    Raises:
        DeviceError: as `select_device`.
    """
    device = select_device(gpus, cuda_available=torch.cuda.is_available())
    fraction = memory_fraction(gpus)
    if device.type == "cuda" and fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction)
    return device


def device_name(device: torch.device) -> str:
    """What the trial runs on, for its run's `device` tag: the GPU's name, or the CPU and threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def failure_message(exc: BaseException, cfg: Config, gpus: float) -> str:
    """The one-line `atop_error` of a permanent failure; a CUDA out-of-memory error names the batch
    size and the GPU share, the two settings that fix it."""
    if not isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"{type(exc).__name__}: {exc}"
    fraction = memory_fraction(gpus)
    share = f"capped to {fraction:g} of the GPU's memory (gpus_per_trial={gpus})" if fraction is not None \
        else f"gpus_per_trial={gpus}, no memory cap"
    asked = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
    return (f"OutOfMemoryError: CUDA out of memory at batch_size={cfg.batch_size} ({share})"
            f"{'; ' + asked.group(0) if asked else ''}; lower batch_size or give each trial more of a GPU (--gpus)")
