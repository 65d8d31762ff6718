"""Checkpoint files: one `torch.save` dict, loaded with `weights_only=True` (no code runs on load).

Layout (see docs/CHECKPOINTS.md):
    format: "atop-checkpoint", version: 1, kind: "classifier" | "purifier" | "defense"
    config: Config.to_dict()                 (the run that produced the file)
    classifier: {"name", "num_classes", "state_dict"}
        or classifier_ref: {"sha256", "name", "num_classes", "size"[, "path"]}   (see `classifier_reference`)
    purifier: {"name", "width", "state_dict"}, discriminator: {"state_dict"}   (purifier, defense)
    optimizers: {name: state_dict}, epoch: int, metrics: {name: float}
Writes go to a temporary file in the same folder and are renamed into place, so a crash mid-write
never leaves a truncated checkpoint under the final name.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atop.checkpoint_file import (
    ACCEPTED,
    FORMAT,
    VERSION,
    CheckpointError,
    check_torch_file,
    sha256,
)
from atop.config import Config, ConfigError
from atop.data import DATASETS
from atop.defense import Defense
from atop.io import atomic_write
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator

KINDS = ("classifier", "purifier", "defense")
#: the pre-training cache folder a study keeps in its storage path (study/run.py's CACHE_DIR): a
#: referenced classifier is looked for in it, in every folder above the checkpoint
STUDY_CACHE_DIR = ".pretrained-cache"


def save_checkpoint(path: str | os.PathLike, *, kind: str, cfg: Config, classifier: nn.Module | None = None,
                    classifier_ref: str | os.PathLike | Mapping[str, Any] | None = None,
                    purifier: nn.Module | None = None,
                    discriminator: nn.Module | None = None, optimizers: dict[str, Any] | None = None,
                    epoch: int = 0, metrics: dict[str, float] | None = None) -> Path:
    """Write one checkpoint atomically.

    Args:
        kind: "classifier", "purifier" or "defense".
        classifier_ref: instead of embedding the classifier, name a classifier checkpoint by its
            sha256: its file (also kept as a path relative to this file's folder, a hint for loading)
            or a `classifier_reference` (how a trial that holds the classifier as bytes names it).
    """
    if kind not in KINDS:
        raise CheckpointError(f"kind={kind!r} is unknown; accepted: {', '.join(KINDS)}")
    path = Path(path)
    blob: dict[str, Any] = {"format": FORMAT, "version": VERSION, "kind": kind, "config": cfg.to_dict(),
                            "epoch": epoch, "metrics": dict(metrics or {})}
    if classifier is not None:
        blob["classifier"] = {"name": cfg.classifier, "num_classes": DATASETS[cfg.dataset].num_classes,
                              "state_dict": _cpu_state(classifier)}
    elif isinstance(classifier_ref, Mapping):
        blob["classifier_ref"] = dict(classifier_ref)
    elif classifier_ref is not None:
        target = Path(classifier_ref).resolve()
        blob["classifier_ref"] = {**classifier_reference(target),
                                  "path": os.path.relpath(target, path.resolve().parent)}
    if purifier is not None:
        blob["purifier"] = {"name": cfg.purifier, "width": cfg.purifier_width, "state_dict": _cpu_state(purifier)}
    if discriminator is not None:
        blob["discriminator"] = {"state_dict": _cpu_state(discriminator)}
    if optimizers:
        blob["optimizers"] = optimizers
    return atomic_write(path, lambda f: torch.save(blob, f))


def load_checkpoint(source: str | os.PathLike | bytes, *, kind: str | None = None) -> dict[str, Any]:
    """Read and check a checkpoint (weights_only); raise `CheckpointError` with a one-line reason.

    Args:
        source: a file path, or the file's bytes (as a study hands pre-trained weights to trials).
        kind: the kind expected ("purifier" also accepts a "defense" file, which holds one).

    Returns:
        The file's dict, its layout checked (every entry `build_classifier` and `build_purifier`
        read has the right type), with `config` as a `Config` and `path` the file's name.
    """
    if isinstance(source, bytes):
        name, blob = "<checkpoint bytes>", read_torch_file(source, "checkpoint", ACCEPTED)
    else:
        name, blob = str(Path(source)), read_torch_file(Path(source), "checkpoint", ACCEPTED)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{name!r} is not an atop checkpoint (no format={FORMAT!r} entry); accepted: {ACCEPTED}")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{name!r} has checkpoint version {blob.get('version')!r}; accepted: {VERSION}")
    if blob.get("kind") not in KINDS:
        raise CheckpointError(f"{name!r} has kind={blob.get('kind')!r}; accepted: {', '.join(KINDS)}")
    if kind is not None and blob["kind"] != kind and not (kind == "purifier" and blob["kind"] == "defense"):
        raise CheckpointError(f"{name!r} holds a {blob['kind']!r} checkpoint; expected {kind!r}")
    if not isinstance(blob.get("config"), dict):
        raise CheckpointError(f"{name!r} has no config dict; accepted: {ACCEPTED}")
    try:
        blob["config"] = Config.from_dict(blob["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{name!r} has an invalid config: {exc}") from None
    _check_layout(blob, name)
    blob["path"] = name
    return blob


def read_torch_file(source: Path | bytes, what: str, accepted: str) -> Any:
    """`torch.load(..., weights_only=True)` of a file nobody vouched for: no code runs, and any
    failure is one `CheckpointError` line naming the file and what was expected.

    Args:
        source: the file, or its bytes.
        what: what the file was given as, for the message (e.g. "checkpoint", "classifier_checkpoint").
        accepted: what the argument accepts, for the message ("expected <accepted>").
    """
    check_torch_file(source, what, accepted)  # a file that cannot be a torch file, refused as the CLIs refuse it
    label = f"{what} <bytes>" if isinstance(source, bytes) else f"{what} {str(source)!r}"
    target = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        # the weights-only unpickler may warn about the pickle protocol of a foreign file: noise
        # under a one-line error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(target, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"{label} cannot be read ({exc.strerror}); expected {accepted}") from None
    except Exception as exc:  # noqa: BLE001 - torch.load on arbitrary bytes raises any type; all mean "unreadable"
        # never repeat PyTorch's own message: it advises weights_only=False, i.e. running the file's code
        if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
            why = "it holds Python objects besides tensors and plain data, which a safe (weights-only) load refuses"
        else:
            why = f"it is corrupt, truncated or not a torch file ({type(exc).__name__})"
        raise CheckpointError(f"{label} does not load: {why}; expected {accepted}") from None


def classifier_reference(source: str | os.PathLike | bytes, blob: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a defense checkpoint stores instead of its classifier: {sha256, name, num_classes, size}.

    Args:
        source: the classifier checkpoint, a file or its bytes (checked to be one).
        blob: `load_checkpoint(source)`, where the caller has it already (saves a second read).
    """
    blob = blob if blob is not None else load_checkpoint(source, kind="classifier")
    if blob["kind"] != "classifier":
        raise CheckpointError(f"{blob['path']!r} holds a {blob['kind']!r} checkpoint; expected 'classifier'")
    if isinstance(source, bytes):
        digest, size = hashlib.sha256(source).hexdigest(), len(source)
    else:
        digest, size = sha256(source), Path(source).stat().st_size
    entry = blob["classifier"]
    return {"sha256": digest, "name": entry["name"], "num_classes": entry["num_classes"], "size": size}


def build_classifier(blob: dict[str, Any], classifier: str | os.PathLike | bytes | None = None) -> nn.Module:
    """The classifier of a loaded checkpoint: embedded, or the file its `classifier_ref` names.

    Args:
        classifier: where a referenced classifier is (a file, its bytes, or a folder to search);
            default: `find_classifier`'s search beside the checkpoint and in the caches.
    """
    if "classifier" not in blob and "classifier_ref" in blob:
        return build_classifier(find_classifier(blob, classifier))
    if "classifier" not in blob:
        raise CheckpointError(f"{blob['path']!r} holds no classifier")
    entry = blob["classifier"]
    return _load_state(CLASSIFIERS[entry["name"]](entry["num_classes"]), entry["state_dict"], blob["path"], "classifier")


def find_classifier(blob: dict[str, Any], classifier: str | os.PathLike | bytes | None = None) -> dict[str, Any]:
    """The classifier checkpoint (loaded, checked) that a checkpoint's `classifier_ref` names by sha256.

    Given `classifier` (a file or bytes: it must be the one; a folder: searched), only there.
    Otherwise: the reference's relative path, the checkpoint's folder and every folder above it
    (each also with its `STUDY_CACHE_DIR`, where a study keeps its pre-trained weights), then the
    pre-training cache (`$ATOP_CACHE_DIR`). Only files of the referenced size are hashed.

    Raises:
        CheckpointError: no such file, or a given one of another sha256 (one line: the sha256
            expected and where it looked).
    """
    ref, name = blob["classifier_ref"], blob["path"]
    want = ref["sha256"]
    details = [str(ref["name"])] if "name" in ref else []
    details += [f"{ref['num_classes']} classes"] if "num_classes" in ref else []
    what = f"classifier sha256 {want}" + (f" ({', '.join(details)})" if details else "")
    if classifier is not None and (isinstance(classifier, bytes) or not Path(classifier).is_dir()):
        return _given_classifier(classifier, want, f"{name!r} needs the {what}")
    folders = [Path(classifier)] if classifier is not None else _search_folders(name)
    hint = None if classifier is not None or "path" not in ref or name.startswith("<") \
        else (Path(name).resolve().parent / ref["path"]).resolve()
    changed = ""
    for candidate in _candidates(hint, folders, ref.get("size"), given=classifier is not None):
        if sha256(candidate) == want:
            return load_checkpoint(candidate, kind="classifier")
        if candidate == hint:
            changed = f" ({str(hint)!r}, where it was, now has another sha256)"
    where = _describe(folders, classifier is None)
    raise CheckpointError(f"{name!r} needs the {what}, not found{changed}; looked in {where}; "
                          "pass its file (load_defense(..., classifier=FILE); python -m atop.evaluate --classifier FILE)")


def _given_classifier(classifier: str | os.PathLike | bytes, want: str, need: str) -> dict[str, Any]:
    """A classifier file (or bytes) given for a reference: it must be the one, no search."""
    if isinstance(classifier, bytes):
        label, digest = "<classifier bytes>", hashlib.sha256(classifier).hexdigest()
    elif not Path(classifier).is_file():
        raise CheckpointError(f"classifier {str(classifier)!r} does not exist; {need}")
    else:
        label, digest = str(classifier), sha256(classifier)
    if digest != want:
        raise CheckpointError(f"classifier {label!r} has sha256 {digest}; {need}")
    return load_checkpoint(classifier if isinstance(classifier, bytes) else Path(classifier), kind="classifier")


def default_cache_dir() -> Path:
    """The pre-training cache (`atop.pretrained_cache`): `$ATOP_CACHE_DIR`, else
    `~/.cache/atop/pretrained`. Here because a referenced classifier is looked for there."""
    return Path(os.environ.get("ATOP_CACHE_DIR") or Path.home() / ".cache" / "atop" / "pretrained").expanduser()


def _search_folders(name: str) -> list[Path]:
    """Where a referenced classifier is looked for when none is given (see `find_classifier`)."""
    folders: list[Path] = []
    if not name.startswith("<"):  # a checkpoint read from bytes has no folder
        for folder in (start := Path(name).resolve().parent, *start.parents):
            folders += [folder, folder / STUDY_CACHE_DIR]
    folders.append(default_cache_dir())
    return list(dict.fromkeys(folders))


def _candidates(hint: Path | None, folders: list[Path], size: int | None, given: bool) -> Iterator[Path]:
    """The hint, then the `.pt` files of the referenced size in `folders` (of any size in a given
    folder, for an old reference that records no size; in the default search, hashing every large
    file above the checkpoint would be too slow)."""
    seen: set[Path] = set()
    if hint is not None and hint.is_file():
        seen.add(hint)
        yield hint
    if size is None and not given:
        return
    for folder in folders:
        try:
            files = sorted(f for f in folder.iterdir() if f.suffix == ".pt")
        except OSError:  # missing or unreadable folder: nothing there
            continue
        for f in files:
            try:
                if f not in seen and f.is_file() and size in (None, f.stat().st_size):
                    seen.add(f)
                    yield f
            except OSError:
                continue


def _describe(folders: list[Path], searched: bool) -> str:
    """Where `find_classifier` looked, in a few words (the folders above the checkpoint are many)."""
    if not searched or len(folders) == 1:
        return repr(str(folders[0]))
    first, cache = folders[0], default_cache_dir()
    return (f"{str(first)!r}, every folder above it and each one's {STUDY_CACHE_DIR}/, "
            f"and the pre-training cache {str(cache)!r}")


def build_purifier(blob: dict[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """The purifier generator and (if stored) discriminator of a loaded checkpoint."""
    if "purifier" not in blob:
        raise CheckpointError(f"{blob['path']!r} holds no purifier")
    entry = blob["purifier"]
    purifier = _load_state(PURIFIERS[entry["name"]](entry["width"]), entry["state_dict"], blob["path"], "purifier")
    disc = None
    if "discriminator" in blob:
        disc = _load_state(PatchDiscriminator(), blob["discriminator"]["state_dict"], blob["path"], "discriminator")
    return purifier, disc


def load_defense(path: str | os.PathLike, device: str | torch.device = "cpu", seed: int = 0,
                 classifier: str | os.PathLike | bytes | None = None) -> Defense:
    """The whole defense (RT -> purifier -> classifier) of a fine-tuning checkpoint, in eval mode.

    Args:
        classifier: where the classifier is, for a checkpoint that names it by sha256 (a study's
            trials do): a file, its bytes or a folder; default: found as `find_classifier` says.
    """
    blob = load_checkpoint(path, kind="defense")
    purifier, _ = build_purifier(blob)
    defense = Defense.from_config(blob["config"], purifier, build_classifier(blob, classifier))
    defense.reseed(seed)
    return defense.to(device).eval()


def _check_layout(blob: dict[str, Any], name: str) -> None:
    """Refuse entries of the wrong type before anything builds a model from them (one line)."""

    def refuse(entry: str, wanted: str) -> CheckpointError:
        return CheckpointError(f"{name!r}: its {entry} entry is not {wanted}; accepted: {ACCEPTED}")

    def state_dict(entry: str, value: Any) -> None:
        if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in value.items())):
            raise refuse(f"{entry} state_dict", "a dict of named tensors")

    cfg: Config = blob["config"]
    if "classifier" in blob:
        entry = blob["classifier"]
        if not isinstance(entry, dict) or entry.get("name") not in CLASSIFIERS:
            raise refuse("classifier", f"{{name, num_classes, state_dict}} with name in {', '.join(sorted(CLASSIFIERS))}")
        classes = DATASETS[cfg.dataset].num_classes
        if entry.get("num_classes") != classes:
            raise refuse("classifier", f"for {classes} classes (its config's dataset {cfg.dataset!r})")
        state_dict("classifier", entry.get("state_dict"))
    elif "classifier_ref" in blob:
        ref = blob["classifier_ref"]
        wanted = {"sha256": str, "path": str, "name": str, "num_classes": int, "size": int}
        if not (isinstance(ref, dict) and isinstance(ref.get("sha256"), str)
                and all(isinstance(ref[k], t) for k, t in wanted.items() if k in ref)
                and ("path" in ref or "size" in ref)):
            raise refuse("classifier_ref", "{sha256, name, num_classes, size} (or {path, sha256})")
    if "purifier" in blob:
        entry = blob["purifier"]
        if not isinstance(entry, dict) or entry.get("name") not in PURIFIERS:
            raise refuse("purifier", f"{{name, width, state_dict}} with name in {', '.join(sorted(PURIFIERS))}")
        if entry.get("width") != cfg.purifier_width:
            raise refuse("purifier", f"of width {cfg.purifier_width} (its config's purifier_width)")
        state_dict("purifier", entry.get("state_dict"))
    if "discriminator" in blob:
        entry = blob["discriminator"]
        state_dict("discriminator", entry.get("state_dict") if isinstance(entry, dict) else None)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str, what: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path!r}: its {what} weights do not fit the {type(model).__name__} model: {first}") from None
    return model
