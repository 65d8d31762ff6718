"""Pre-trained weights cached across runs and studies, keyed by everything that shaped them.

An entry is one atop checkpoint, `classifier-<model>-<key>.pt` or `purifier-<model>-<key>.pt`, in
the cache folder (`$ATOP_CACHE_DIR`, else `~/.cache/atop/pretrained`). A key hashes:
  - the settings: `atop.pretrain.pretrain_key` (the config fields and `PretrainSettings` fields
    that shape that artifact);
  - the data: sha256 of the training subset's image and label bytes (`data_fingerprint`);
  - the code: sha256 of the source of the modules that define the models and the pre-training
    (`code_fingerprint`), so an edit to them retrains instead of reusing stale weights;
  - for the purifier, the classifier's key (it learns against that classifier's CE);
  - for a classifier given as a file (`PretrainSettings.classifier_checkpoint`), that file's sha256.
Entries are written by `atop.io.atomic_write_bytes` / `atop.checkpoint.save_checkpoint`: a unique temporary file
in the same folder, then `os.replace`. A reader sees the old entry, the new one or none, never half
of one; two processes filling the same key each write a whole file and the last rename wins.
A corrupt or foreign entry is refused with a one-line `CheckpointError` naming it (delete it to
rebuild): the atomic writes never leave one, so it means outside damage, not a crash to paper over.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from atop.checkpoint import (
    CheckpointError,
    build_classifier,
    build_purifier,
    load_checkpoint,
    save_checkpoint,
    sha256,
)
from atop.config import Config
from atop.data import DATASETS, Split
from atop.models import CLASSIFIERS

#: the modules whose source shapes pre-trained weights (models, losses, transforms, training loops)
CODE_MODULES = ("atop.models.classifiers", "atop.models.purifiers", "atop.losses", "atop.transforms",
                "atop.finetune", "atop.pretrain")


def default_cache_dir() -> Path:
    """`$ATOP_CACHE_DIR`, else `~/.cache/atop/pretrained`."""
    return Path(os.environ.get("ATOP_CACHE_DIR") or Path.home() / ".cache" / "atop" / "pretrained").expanduser()


def data_fingerprint(data: Split) -> str:
    """sha256 of a split's shapes, image bytes and label bytes (about 0.2 s for all of CIFAR-10)."""
    digest = hashlib.sha256(f"{tuple(data.x.shape)} {data.x.dtype} {tuple(data.y.shape)}".encode())
    digest.update(data.x.contiguous().numpy().tobytes())
    digest.update(data.y.contiguous().numpy().tobytes())
    return digest.hexdigest()


def code_fingerprint(modules: tuple[str, ...] = CODE_MODULES) -> str:
    """sha256 of the source files of `modules` (named, so that moving code between them counts)."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"module {name!r} has no source file to fingerprint")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes() + b"\0")
    return digest.hexdigest()


def entry_key(parts: Mapping[str, str]) -> str:
    """A short hash of named parts (settings key, data and code fingerprints, ...)."""
    text = "\n".join(f"{name}={parts[name]}" for name in sorted(parts))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_paths(cfg: Config, settings: Any, train: Split, folder: str | os.PathLike | None = None,
                *, code: str | None = None) -> tuple[Path, Path]:
    """Where the classifier and purifier pre-trained with these settings on `train` live.

    Args:
        settings: an `atop.pretrain.PretrainSettings`.
        folder: the cache folder; None = `default_cache_dir()`.
        code: the code fingerprint; None = `code_fingerprint()` (tests pass their own).
    """
    from atop.pretrain import pretrain_key  # pretrain imports this module: resolve at call time

    folder = Path(folder) if folder is not None else default_cache_dir()
    common = {"data": data_fingerprint(train), "code": code if code is not None else code_fingerprint()}
    clf_parts = {**common, "settings": pretrain_key(cfg, settings, "classifier")}
    if settings.classifier_checkpoint:
        clf_parts = {"settings": pretrain_key(cfg, settings, "classifier"),
                     "file": sha256(checked_file(settings.classifier_checkpoint))}
    clf_key = entry_key(clf_parts)
    pur_key = entry_key({**common, "settings": pretrain_key(cfg, settings, "purifier"), "classifier": clf_key})
    return (folder / f"classifier-{cfg.classifier}-{clf_key}.pt", folder / f"purifier-{cfg.purifier}-{pur_key}.pt")


def checked_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"classifier_checkpoint {str(path)!r} does not exist; expected a classifier checkpoint file")
    return path


def check_entry(path: Path, kind: str) -> None:
    """Refuse a cache entry that does not load as a whole `kind` checkpoint (one-line error)."""
    try:
        blob = load_checkpoint(path, kind=kind)
        build_classifier(blob) if kind == "classifier" else build_purifier(blob)
    except CheckpointError as exc:
        raise CheckpointError(f"cached {kind} {str(path)!r} is unusable ({exc}); delete it to rebuild") from None


def import_classifier(source: str | os.PathLike, cfg: Config, out: Path) -> Path:
    """Check a classifier given as a file and store it as an atop checkpoint at `out`.

    Accepted: an atop classifier checkpoint of `cfg.classifier`, or a plain state dict of that
    model (e.g. RobustBench's WRN-28-10 for `paper-cifar10`; a `state_dict` / `model_state_dict`
    wrapper and DataParallel's `module.` prefixes are unwrapped).

    Raises:
        CheckpointError: one line naming the file and what was expected.
    """
    path = checked_file(source)
    expected = f"an atop classifier checkpoint or a state dict of {cfg.classifier} for {cfg.dataset}"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"classifier_checkpoint {str(path)!r} does not load ({reason}); expected {expected}") from None
    if isinstance(blob, dict) and "format" in blob:
        checked = load_checkpoint(path, kind="classifier")
        name = checked.get("classifier", {}).get("name")
        if name != cfg.classifier:
            raise CheckpointError(f"classifier_checkpoint {str(path)!r} holds a {name!r} classifier; expected {expected}")
        model = build_classifier(checked)
    else:
        state = blob
        for wrapper in ("state_dict", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"classifier_checkpoint {str(path)!r} holds no state dict; expected {expected}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = CLASSIFIERS[cfg.classifier](DATASETS[cfg.dataset].num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = str(exc).splitlines()
            first = lines[1].strip() if len(lines) > 1 else lines[0]
            raise CheckpointError(f"classifier_checkpoint {str(path)!r} does not fit {cfg.classifier}: {first[:200]}; "
                                  f"expected {expected}") from None
    return save_checkpoint(out, kind="classifier", cfg=cfg, classifier=model)
