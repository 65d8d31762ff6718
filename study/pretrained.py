"""Pre-training once, before any trial, as one Ray task (it gets a GPU where trials do), or as two at
once (classifier, purifier) where the purifier does not train against the classifier and the cluster
has room for both.

The files land in the pre-training cache (`--pretrained-cache`, default
`<storage-path>/.pretrained-cache/`), named by a hash of their settings, training data and code
(`atop.pretrained_cache.cache_paths`): a resumed study, and every later study with the same
settings, reuses them without starting a task. Trials receive the bytes through the object store.

`--pretrained DIR` gives the weights instead (`check_pretrained`, `adopt_pretrained`): DIR holds
  - `classifier.pt` (required): an atop classifier checkpoint of the study's classifier and dataset,
    or a plain state dict of that architecture (e.g. RobustBench's WRN-28-10 `Standard` for
    `paper-cifar10`, whose parameter names `atop.models.WideResNet` keeps);
  - `purifier.pt` (optional): an atop purifier or defense checkpoint of the study's purifier, width
    and dataset, with its discriminator. Without it the purifier pre-trains against the given
    classifier, cached as for `pretrain.classifier_checkpoint`.
Both are loaded with `weights_only=True`, checked against the study's config and re-saved as atop
checkpoints in the cache under their sha256, so a later change to DIR cannot change a study's weights
behind its back.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: `check_pretrained` refuses a file that is no torch file before torch is
# imported (tests/test_refusal.py); each function imports the torch modules it needs.
from atop.checkpoint_file import (
    CheckpointError,
    check_torch_file,
    classifier_expected,
    purifier_expected,
    sha256,
)
from atop.config import Config
from atop.io import atomic_write_bytes
from atop.presets import PretrainSettings
from study.errors import StudyError
from tracking.contract import PRETRAINED_TAG

if TYPE_CHECKING:
    from atop.data import Split

#: the files `--pretrained DIR` takes
CLASSIFIER_FILE, PURIFIER_FILE = "classifier.pt", "purifier.pt"
#: how messages name them
CLASSIFIER_LABEL, PURIFIER_LABEL = "--pretrained classifier", "--pretrained purifier"


@dataclass(frozen=True)
class GivenWeights:
    """The files of `--pretrained DIR`: the classifier, and the purifier where DIR holds one."""

    classifier: Path
    purifier: Path | None


#: what one pre-training task makes, in this order (`_pretrain_task`)
STAGES = ("classifier", "purifier")


def _pretrain_task(cfg: dict[str, Any], settings: PretrainSettings, train: Split, use_gpu: bool,
                   threads: int, folder: str, stages: tuple[str, ...] = STAGES) -> tuple[bytes, ...]:
    """Make (or reuse) the cache entries of `stages` in the cache `folder`; returns their files, in order."""
    import torch

    from atop.pretrain import ensure_classifier, ensure_purifier

    torch.set_num_threads(threads)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    ensure = {"classifier": ensure_classifier, "purifier": ensure_purifier}
    # the cache folder itself: a classifier already there is reused when only the purifier is missing.
    # Said on stderr, where each epoch's progress line goes: Ray forwards a worker's stdout and stderr
    # separately, so lines split over both reach the driver out of order.
    return tuple(ensure[stage](Config.from_dict(cfg), settings, train, folder, device=device,
                               log=lambda m: print(m, file=sys.stderr, flush=True)).read_bytes()
                 for stage in stages)


def given_weights(folder: str | os.PathLike, settings: PretrainSettings) -> GivenWeights:
    """The files of `--pretrained DIR` (found, not yet checked), or `StudyError` naming what is missing."""
    where = f"--pretrained {str(folder)!r}"
    accepted = (f"a folder with {CLASSIFIER_FILE} (an atop classifier checkpoint or a state dict of the study's "
                f"classifier) and optionally {PURIFIER_FILE} (an atop purifier or defense checkpoint)")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise StudyError(f"{where} is not a folder; accepted: {accepted}")
    clf, pur = path / CLASSIFIER_FILE, path / PURIFIER_FILE
    for name in (clf, pur):  # a folder of that name is no weights (and must not be taken for "absent")
        if name.exists() and not name.is_file():
            raise StudyError(f"{where}: {str(name)!r} is not a file; accepted: {accepted}")
    if not clf.is_file():
        alone = f" (its {PURIFIER_FILE} was pre-trained against a classifier, which must come with it)" \
            if pur.is_file() else ""
        raise StudyError(f"{where} holds no {CLASSIFIER_FILE}{alone}; accepted: {accepted}")
    if settings.classifier_checkpoint:
        raise StudyError(f"{where} and pretrain.classifier_checkpoint {settings.classifier_checkpoint!r} both give a "
                         "classifier; accepted: one of them")
    return GivenWeights(clf.resolve(), pur.resolve() if pur.is_file() else None)


def check_pretrained(folder: str | os.PathLike, cfg: Config, settings: PretrainSettings) -> GivenWeights:
    """Find and check the files of `--pretrained DIR` against the study's config; writes nothing.

    Call it before anything starts: a bad DIR is then a one-line error with nothing to clean up.

    Raises:
        StudyError: one line naming the file and what is accepted (a missing file; a corrupt,
            foreign or code-carrying file; another architecture, width, number of classes or dataset).
    """
    given = given_weights(folder, settings)
    try:
        # a file that is no torch file is refused in well under a second, before torch is imported
        check_torch_file(given.classifier, CLASSIFIER_LABEL, classifier_expected(cfg))
        if given.purifier is not None:
            check_torch_file(given.purifier, PURIFIER_LABEL, purifier_expected(cfg))
        from atop.pretrained_cache import check_classifier_file, check_purifier_file

        check_classifier_file(given.classifier, cfg, label=CLASSIFIER_LABEL)
        if given.purifier is not None:
            check_purifier_file(given.purifier, cfg, label=PURIFIER_LABEL)
    except CheckpointError as exc:
        raise StudyError(str(exc)) from None
    return given


def check_classifier_checkpoint(path: str, cfg: Config) -> None:
    """`pretrain.classifier_checkpoint` (a settings file's classifier to pre-train the purifier
    against), checked before anything starts as `check_pretrained` checks `--pretrained`: otherwise a
    bad file would end the study's pre-training task, after the study and Ray have started.

    Raises:
        StudyError: one line naming the file and what is accepted.
    """
    label, file = "classifier_checkpoint", Path(path).expanduser()
    try:
        check_torch_file(file, label, classifier_expected(cfg))  # no torch yet: see check_pretrained
        from atop.pretrained_cache import check_classifier_file

        check_classifier_file(file, cfg, label=label)
    except CheckpointError as exc:
        raise StudyError(str(exc)) from None


def adopt_pretrained(folder: str | os.PathLike, cfg: Config, settings: PretrainSettings, train: Split,
                     cache: Path, *, log: Callable[[str], None] = print) -> tuple[Path, Path | None]:
    """Check the files of `--pretrained DIR` and store them as entries of the cache `cache`.

    Args:
        train: the pre-training subset, as `cache_paths` takes it (the entries of given files are
            named by their sha256, not by data).

    Returns:
        (classifier entry, purifier entry), the purifier None where DIR holds no `purifier.pt`.
        The classifier entry is the one `cache_paths` names for `classifier_checkpoint` = the
        given file, so `pretrain_once` finds it when it pre-trains the purifier.

    Raises:
        StudyError: as `check_pretrained`, or a cache entry of these files is corrupt.
    """
    from atop.checkpoint import save_checkpoint
    from atop.pretrained_cache import (
        adopted_purifier_path,
        cache_paths,
        check_classifier_file,
        check_entry,
        check_purifier_file,
    )

    given = given_weights(folder, settings)
    clf_entry = cache_paths(cfg, _with_classifier(settings, given), train, cache)[0]
    pur_entry = None if given.purifier is None else adopted_purifier_path(cfg, given.purifier, clf_entry, cache)
    try:
        # entries are named by their file's sha256: one already stored was checked then. Both files
        # are checked before either is stored, so a bad purifier leaves no entry of its classifier.
        classifier = None if clf_entry.is_file() else \
            check_classifier_file(given.classifier, cfg, label=CLASSIFIER_LABEL)
        purifier = None if given.purifier is None or pur_entry is None or pur_entry.is_file() else \
            check_purifier_file(given.purifier, cfg, label=PURIFIER_LABEL)
        if classifier is None:
            check_entry(clf_entry, "classifier")
        else:
            save_checkpoint(clf_entry, kind="classifier", cfg=cfg, classifier=classifier)
            log(f"checked {given.classifier} and cached it as {clf_entry}")
        if purifier is not None and pur_entry is not None:
            save_checkpoint(pur_entry, kind="purifier", cfg=cfg, purifier=purifier[0], discriminator=purifier[1])
            log(f"checked {given.purifier} and cached it as {pur_entry}")
        elif pur_entry is not None:
            check_entry(pur_entry, "purifier")
    except CheckpointError as exc:
        raise StudyError(str(exc)) from None
    return clf_entry, pur_entry


def _with_classifier(settings: PretrainSettings, given: GivenWeights) -> PretrainSettings:
    return dataclasses.replace(settings, classifier_checkpoint=str(given.classifier))


class PretrainingStopped(Exception):
    """`pretrain_once` was asked to stop (SIGTERM or Ctrl+C, `study.interrupt`) and ended its task."""


def pretrain_once(cfg: Config, settings: PretrainSettings, train: Split, folder: Path, *, cpus: float,
                  gpus: float, log=print, pretrained: str | os.PathLike | None = None,
                  stop: Callable[[], bool] | None = None) -> tuple[Path, Path]:
    """Reuse or make the pre-trained classifier and purifier; returns their paths in the cache `folder`.

    Args:
        pretrained: `--pretrained DIR`: its files are used instead of pre-training (a purifier is
            pre-trained against its classifier only where DIR holds no `purifier.pt`).
        stop: asked every second while the task runs; once true, the task is cancelled (its last
            finished epoch stays in the cache, `atop.pretrain.EpochCheckpoint`, where the next
            pre-training with these settings goes on) and `PretrainingStopped` is raised.

    Raises:
        CheckpointError: a cached entry is corrupt (the message says to delete it to rebuild).
        StudyError: a file of `pretrained` is missing, corrupt, foreign or of another model.
        PretrainingStopped: `stop` became true.
    """
    from atop.pretrained_cache import cache_paths, check_entry

    if pretrained is not None:
        given = given_weights(pretrained, settings)
        clf_path, pur_path = adopt_pretrained(pretrained, cfg, settings, train, folder, log=log)
        if pur_path is not None:
            return clf_path, pur_path
        settings = _with_classifier(settings, given)  # names the classifier entry just stored
    clf_path, pur_path = cache_paths(cfg, settings, train, folder)
    if clf_path.is_file() and pur_path.is_file():
        check_entry(clf_path, "classifier")
        check_entry(pur_path, "purifier")
        log(f"reusing pre-trained {clf_path} and {pur_path.name}")
        return clf_path, pur_path
    import ray

    from atop.pretrain import purifier_needs_classifier

    threads, task_gpus = max(1, int(cpus)), min(1.0, gpus) if gpus > 0 else 0
    task = ray.remote(num_cpus=cpus, num_gpus=task_gpus)(_pretrain_task)
    # Two tasks at once where the purifier does not train against the classifier and the cluster has
    # room for both; otherwise one task, classifier then purifier, on one node (whose cache then
    # holds the classifier the purifier's CE term needs).
    apart = not clf_path.is_file() and not pur_path.is_file() and not purifier_needs_classifier(settings) \
        and _room_for_two(cpus, task_gpus)
    groups = [(stage,) for stage in STAGES] if apart else [STAGES]
    log(f"pre-training the classifier and purifier once for the study ({threads} CPU threads"
        f"{', 1 GPU' if gpus > 0 else ''}{' each, as two tasks at once' if apart else ''})")
    refs = [task.remote(cfg.to_dict(), settings, train, gpus > 0, threads, str(folder), group) for group in groups]
    files = [data for group in _results_unless_stopped(refs, stop) for data in group]
    # the task may have run on another node, whose copy of `folder` is not this driver's (a local
    # cache, as with an object-store --storage-path): keep the files here too
    for path, data in zip((clf_path, pur_path), files):
        if not path.is_file():
            atomic_write_bytes(path, data)
    return clf_path, pur_path


def _room_for_two(cpus: float, gpus: float) -> bool:
    """Whether the Ray cluster has the resources of two pre-training tasks at once (in total: Ray
    places each on a node that fits it, or queues the second, which then runs after the first)."""
    import ray

    total = ray.cluster_resources()
    return total.get("CPU", 0.0) >= 2 * cpus and total.get("GPU", 0.0) >= 2 * gpus


def _results_unless_stopped(refs: list[Any], stop: Callable[[], bool] | None) -> list[Any]:
    """The results of the Ray tasks `refs`: the first failure raises at once, and `PretrainingStopped`
    once `stop()` is true; either way every task still running is cancelled."""
    import ray

    checked: set[Any] = set()
    try:
        while True:
            ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=1.0)
            # the stop first: a Ctrl+C reaches the tasks' workers too (the terminal signals the whole
            # process group), and a task then fails with KeyboardInterrupt, which is no failure here
            if stop is not None and stop():
                raise PretrainingStopped
            if not waiting:
                return ray.get(refs)
            for ref in set(ready) - checked:  # a task that failed raises now, not once the other one ends
                checked.add(ref)
                ray.get(ref)
    except BaseException:
        for ref in refs:  # ends their workers (a no-op for an ended task): the epoch in progress is lost,
            ray.cancel(ref, force=True)  # the last saved one stays
        raise


def weights_record(classifier: Path, purifier: Path) -> dict[str, dict[str, str]]:
    """What study.json keeps of the weights a study's trials use: each file's name and sha256."""
    return {kind: {"file": path.name, "sha256": sha256(path)}
            for kind, path in (("classifier", classifier), ("purifier", purifier))}


def recorded_weights(folder: Path, record: dict[str, dict[str, str]]) -> tuple[Path, Path]:
    """The classifier and purifier a resumed study started with (`weights_record`), from the cache `folder`.

    A resumed study never pre-trains again: its cache entries' names hash the code too, so a code
    change would otherwise give its later trials other weights than its earlier ones.

    Raises:
        StudyError: a recorded file is missing from `folder` or is not the file recorded.
    """
    paths = []
    for kind in ("classifier", "purifier"):
        entry = record.get(kind) if isinstance(record, dict) else None
        if not isinstance(entry, dict) or not {"file", "sha256"} <= entry.keys():
            raise StudyError(f"--resume: study.json's weights record {record!r} is not one this driver wrote; "
                             "expected the classifier's and purifier's file and sha256")
        path = folder / str(entry["file"])
        if not path.is_file() or sha256(path) != entry["sha256"]:
            raise StudyError(f"--resume: the study's pre-trained {kind} {str(path)!r} (sha256 {entry['sha256'][:12]}) "
                             "is missing or changed; its trials were trained from it: copy it there (from the node "
                             "that started the study, or pass that node's --pretrained-cache), or start a new study")
        paths.append(path)
    return paths[0], paths[1]


def weights_named_by_trials(folder: Path, named: list[str], log: Callable[[str], None] = print) -> tuple[Path, Path] | None:
    """The weights of a resumed study whose study.json has no `weights_record` (a study started before
    the record existed): the files its trial runs' `PRETRAINED_TAG`s name, from the cache `folder`.

    Args:
        named: the tags' distinct values, oldest run first (`tracking.mlflow_log.pretrained_of_trials`).
            Where there are several (trials already fine-tuned from different weights), the first
            trials' are used and a warning says so.

    Returns:
        The classifier's and purifier's paths, or None when no trial has run (nothing was trained
        from any weights yet, so new ones may be made).

    Raises:
        StudyError: a tag does not name two files, or a named file is missing from `folder`.
    """
    if not named:
        return None
    if len(named) > 1:
        log(f"warning: this study's trials were fine-tuned from different pre-trained weights ({'; '.join(named)}); "
            f"the resumed trials use the first trials' ({named[0]})")
    files = named[0].split(",")
    if len(files) != 2 or any(not f or Path(f).name != f for f in files):
        raise StudyError(f"--resume: the trial runs' {PRETRAINED_TAG} tag {named[0]!r} is not one this driver wrote; "
                         "expected 'classifier file,purifier file'")
    paths = folder / files[0], folder / files[1]
    for kind, path in zip(("classifier", "purifier"), paths):
        if not path.is_file():
            raise StudyError(f"--resume: the study's pre-trained {kind} {str(path)!r} (named by its trial runs' "
                             f"{PRETRAINED_TAG} tag) is missing; its trials were trained from it: copy it there (from "
                             "the node that started the study, or pass that node's --pretrained-cache), or start a "
                             "new study")
    return paths
