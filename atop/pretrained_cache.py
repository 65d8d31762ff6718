"""Pre-trained weights cached across runs and studies, keyed by everything that shaped them.

An entry is one atop checkpoint, `classifier-<model>-<key>.pt` or `purifier-<model>-<key>.pt`, in
the cache folder (`$ATOP_CACHE_DIR`, else `~/.cache/atop/pretrained`). A key hashes:
  - the settings: `pretrain_key` (the config fields and `PretrainSettings` fields
    that shape that artifact);
  - the data: sha256 of the training subset's image and label bytes (`data_fingerprint`);
  - the code: sha256 of the source of the modules that define the models and the pre-training
    (`code_fingerprint`), so an edit to them retrains instead of reusing stale weights;
  - for the purifier, the classifier's key (it learns against that classifier's CE);
  - for a classifier given as a file (`PretrainSettings.classifier_checkpoint`), that file's sha256.
A purifier given as a file (`study/run.py --pretrained DIR`) is keyed by its sha256 and the
classifier entry it serves (`adopted_purifier_path`). Given files are checked against the config
(`check_classifier_file`, `check_purifier_file`) and re-saved as atop checkpoints in the cache.
Entries are written by `atop.io.atomic_write_bytes` / `atop.checkpoint.save_checkpoint`: a unique temporary file
in the same folder, then `os.replace`. A reader sees the old entry, the new one or none, never half
of one; two processes filling the same key each write a whole file and the last rename wins.
A corrupt or foreign entry is refused with a one-line `CheckpointError` naming it (delete it to
rebuild): the atomic writes never leave one, so it means outside damage, not a crash to paper over.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atop.checkpoint import (
    build_classifier,
    build_purifier,
    default_cache_dir,
    load_checkpoint,
    read_torch_file,
    save_checkpoint,
)
from atop.checkpoint_file import (
    CheckpointError,
    check_torch_file,
    classifier_expected,
    purifier_expected,
    sha256,
)
from atop.config import Config
from atop.data import DATASETS, Split
from atop.models import CLASSIFIERS
from atop.presets import PretrainSettings

#: the modules whose source shapes pre-trained weights (models, losses, transforms, training loops)
CODE_MODULES = ("atop.models.classifiers", "atop.models.purifiers", "atop.losses", "atop.transforms",
                "atop.finetune", "atop.pretrain")


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


#: the settings that shape the classifier; the purifier depends on all the others, and on the classifier
_CLASSIFIER_FIELDS = ("classifier_epochs", "n_train", "classifier_lr", "classifier_batch_size",
                      "classifier_weight_decay", "label_smoothing", "crop_pad", "bf16", "channels_last")
_SHARED_FIELDS = ("n_train", "bf16", "channels_last")


def pretrain_key(cfg: Config, settings: PretrainSettings, what: str) -> str:
    """A short hash of the settings that shape one pre-trained artifact (data and code apart).

    `atop.pretrained_cache.cache_paths` combines it with the data and code fingerprints.
    """
    values = asdict(settings)
    fields: dict[str, Any] = {"what": what, "dataset": cfg.dataset, "classifier": cfg.classifier, "seed": cfg.seed}
    if what == "classifier":
        own = _CLASSIFIER_FIELDS if not settings.classifier_checkpoint else ()
        fields["settings"] = {name: values[name] for name in own}
        if not settings.classifier_batch_size:  # the classifier then trains with batch_size
            fields["settings"]["batch_size"] = settings.batch_size
    else:
        fields["settings"] = {name: value for name, value in values.items()
                              if name in _SHARED_FIELDS or name not in _CLASSIFIER_FIELDS}
        del fields["settings"]["classifier_checkpoint"]  # reaches the purifier through the classifier's key
        fields.update(purifier=cfg.purifier, width=cfg.purifier_width, block_size=cfg.block_size,
                      mask_ratio=cfg.mask_ratio, noise_std=cfg.noise_std, num_masks=cfg.num_masks)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def cache_paths(cfg: Config, settings: Any, train: Split, folder: str | os.PathLike | None = None,
                *, code: str | None = None) -> tuple[Path, Path]:
    """Where the classifier and purifier pre-trained with these settings on `train` live.

    Args:
        settings: an `atop.presets.PretrainSettings`.
        folder: the cache folder; None = `default_cache_dir()`.
        code: the code fingerprint; None = `code_fingerprint()` (tests pass their own).
    """
    folder = Path(folder) if folder is not None else default_cache_dir()
    common = {"data": data_fingerprint(train), "code": code if code is not None else code_fingerprint()}
    clf_parts = {**common, "settings": pretrain_key(cfg, settings, "classifier")}
    if settings.classifier_checkpoint:
        clf_parts = {"settings": pretrain_key(cfg, settings, "classifier"),
                     "file": sha256(checked_file(settings.classifier_checkpoint))}
    clf_key = entry_key(clf_parts)
    pur_key = entry_key({**common, "settings": pretrain_key(cfg, settings, "purifier"), "classifier": clf_key})
    return (folder / f"classifier-{cfg.classifier}-{clf_key}.pt", folder / f"purifier-{cfg.purifier}-{pur_key}.pt")


def checked_file(path: str | os.PathLike, label: str = "classifier_checkpoint", kind: str = "classifier") -> Path:
    """`path` if it is a file, else a one-line `CheckpointError` naming it as `label`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{label} {str(path)!r} does not exist; expected a {kind} checkpoint file")
    return path


def check_entry(path: Path, kind: str) -> None:
    """Refuse a cache entry that does not load as a whole `kind` checkpoint (one-line error)."""
    try:
        blob = load_checkpoint(path, kind=kind)
        build_classifier(blob) if kind == "classifier" else build_purifier(blob)
    except CheckpointError as exc:
        raise CheckpointError(f"cached {kind} {str(path)!r} is unusable ({exc}); delete it to rebuild") from None


def check_classifier_file(source: str | os.PathLike, cfg: Config, *,
                          label: str = "classifier_checkpoint") -> nn.Module:
    """The classifier in a file given by a user, checked against `cfg` (nothing is written).

    Accepted: an atop classifier checkpoint of `cfg.classifier` for `cfg.dataset` (same number of
    classes), or a plain state dict that loads strictly into `cfg.classifier` with the dataset's
    number of classes (e.g. RobustBench's WRN-28-10 for `paper-cifar10`; a `state_dict` /
    `model_state_dict` wrapper and DataParallel's `module.` prefixes are unwrapped). Loaded with
    `weights_only=True`: a file that needs pickled code to load is refused, never run.

    Args:
        label: how messages name the file (the option or setting that gave it).

    Raises:
        CheckpointError: one line naming the file and what was expected.
    """
    path = checked_file(source, label)
    num_classes, expected = DATASETS[cfg.dataset].num_classes, classifier_expected(cfg)
    blob = read_torch_file(path, label, expected)
    if isinstance(blob, dict) and "format" in blob:
        try:
            checked = load_checkpoint(path, kind="classifier")
        except CheckpointError as exc:
            raise CheckpointError(f"{label}: {exc}; expected {expected}") from None
        entry, dataset = checked.get("classifier", {}), checked["config"].dataset
        found = f"a {entry.get('name')!r} classifier with {entry.get('num_classes')} classes for {dataset}"
        if (entry.get("name"), entry.get("num_classes"), dataset) != (cfg.classifier, num_classes, cfg.dataset):
            raise CheckpointError(f"{label} {str(path)!r} holds {found}; expected {expected}")
        return build_classifier(checked)
    state = blob
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label} {str(path)!r} holds no state dict; expected {expected}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CLASSIFIERS[cfg.classifier](num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        first = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{label} {str(path)!r} does not fit {cfg.classifier}: {first[:200]}; "
                              f"expected {expected}") from None
    return model


def import_classifier(source: str | os.PathLike, cfg: Config, out: Path, *,
                      label: str = "classifier_checkpoint") -> Path:
    """Check a classifier given as a file (`check_classifier_file`) and store it as an atop checkpoint at `out`.

    Raises:
        CheckpointError: one line naming the file and what was expected.
    """
    return save_checkpoint(out, kind="classifier", cfg=cfg, classifier=check_classifier_file(source, cfg, label=label))


def check_purifier_file(source: str | os.PathLike, cfg: Config, *,
                        label: str = "purifier") -> tuple[nn.Module, nn.Module]:
    """The purifier generator and discriminator in a file given by a user, checked against `cfg`.

    Accepted: an atop purifier checkpoint (as `atop.pretrain` writes), or a defense checkpoint (as
    fine-tuning writes, which holds one), of `cfg.purifier` at `cfg.purifier_width` for
    `cfg.dataset`, with its discriminator (fine-tuning trains both). No foreign format exists for
    these models, so plain state dicts are refused.

    Raises:
        CheckpointError: one line naming the file and what was expected.
    """
    path = checked_file(source, label, "purifier")
    expected = purifier_expected(cfg)
    check_torch_file(path, label, expected)  # as the command line's early check words it (no torch needed)
    try:
        blob = load_checkpoint(path, kind="purifier")
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {exc}; expected {expected}") from None
    entry, dataset = blob.get("purifier", {}), blob["config"].dataset
    if (entry.get("name"), entry.get("width"), dataset) != (cfg.purifier, cfg.purifier_width, cfg.dataset):
        raise CheckpointError(f"{label} {str(path)!r} holds a {entry.get('name')!r} purifier (width "
                              f"{entry.get('width')}) for {dataset}; expected {expected}")
    try:
        purifier, disc = build_purifier(blob)
    except CheckpointError as exc:
        raise CheckpointError(f"{label}: {exc}; expected {expected}") from None
    if disc is None:
        raise CheckpointError(f"{label} {str(path)!r} holds no discriminator; expected {expected}")
    return purifier, disc


def adopted_purifier_path(cfg: Config, source: str | os.PathLike, classifier_entry: Path,
                          folder: str | os.PathLike) -> Path:
    """Where a purifier given as a file is cached beside `classifier_entry`, the classifier it serves.

    Keyed by the file's sha256 and the classifier entry's name: no pre-training setting shaped it.
    """
    key = entry_key({"file": sha256(checked_file(source, "purifier", "purifier")), "classifier": classifier_entry.name,
                     "purifier": f"{cfg.purifier}-{cfg.purifier_width}-{cfg.dataset}"})
    return Path(folder) / f"purifier-{cfg.purifier}-{key}.pt"

