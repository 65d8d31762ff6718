"""The study command's checks that need neither torch, Optuna, MLflow nor Ray.

`python study/run.py` runs these first, before it imports what a study needs (about ten seconds
of imports on a loaded machine) and long before Ray starts: a mistyped name, a missing file or
folder, an unreachable tracking server or GPUs the machine lacks are refused in about a second.
What needs the settings (presets, spaces, samplers, ranges) or the data is checked next, in
`study.run.prepare`, still before Ray starts. Imports here must stay light: tests/test_refusal.py
checks what refusing imported.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

from atop.cli import check_folder_to_create
from study import optuna_storage
from study.devices import visible_gpus
from study.errors import StudyError
from study.storage import Storage, parse, refuse_local_stores
from tracking.uri import TrackingURIError, check_tracking_uri

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STUDY_FILE = "study.json"


def study_name(args: argparse.Namespace) -> str:
    """`--study-name`, or `<preset>-<date>-<time>`, fixed in `args` the first time it is asked for:
    the folder, the Optuna study and the MLflow experiment must get one name even when the clock
    ticks between the checks and `prepare` (it did: a folder `...-162924` held experiment `...-162926`)."""
    if not args.study_name:
        args.study_name = f"{args.preset or 'smoke'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args.study_name


def check_args(args: argparse.Namespace) -> tuple[Storage, Storage]:
    """Refuse what the command line alone shows to be wrong (see the module docstring).

    Returns:
        (the `--storage-path` storage, the study's folder in it).

    Raises:
        StudyError: one line naming the bad value and what is accepted.
    """
    if args.resume and not args.study_name:
        raise StudyError("--resume needs --study-name NAME (the study to continue)")
    name = study_name(args)
    if not NAME_RE.match(name):
        raise StudyError(f"--study-name {name!r} is invalid; accepted: letters, digits, '.', '_', '-' (max 100)")
    storage = parse(args.storage_path)
    if not args.resume:  # a resumed study reuses the stores it started with (study.json)
        refuse_local_stores(storage, args.optuna_storage or os.environ.get(optuna_storage.ENV), args.mlflow_uri)
    storage.check()
    store = storage.at(name)
    if args.resume and not store.exists(STUDY_FILE):
        raise StudyError(f"--resume: no study {name!r} at {storage.where()!r} ({store.where(STUDY_FILE)} is missing)")
    if not args.resume and store.exists():
        raise StudyError(f"study folder {store.where()!r} exists; pass --resume to continue it or another --study-name")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise StudyError(f"--data-dir {args.data_dir!r} does not exist; pass the folder holding "
                         "<dataset>_train.npz and <dataset>_test.npz (e.g. --data-dir ../shared/data)")
    for flag, value, kind in (("--config", args.config, "file"), ("--enqueue", args.enqueue, "file"),
                              ("--pretrained", args.pretrained, "folder")):
        path = Path(value).expanduser() if value else None
        if path is not None and not (path.is_file() if kind == "file" else path.is_dir()):
            what = "a folder holding classifier.pt (and purifier.pt if any)" if kind == "folder" else "a file"
            raise StudyError(f"{flag} {value!r} does not exist; expected {what}")
    if args.pretrained_cache:
        check_folder_to_create("--pretrained-cache", args.pretrained_cache, "cached pre-trained weights")
    if url := args.optuna_storage or os.environ.get(optuna_storage.ENV):
        optuna_storage.resolve(url)  # its scheme; `study.run.prepare` connects to it
    if args.gpus is not None:
        check_gpus(args.gpus)
    if args.mlflow_uri:
        check_mlflow_uri(args.mlflow_uri)
    return storage, store


def check_gpus(gpus: float) -> None:
    """Refuse `gpus` per trial that this machine cannot give, without starting Ray.

    Under `ray job submit` (`RAY_ADDRESS` set) the cluster's GPUs count, not this machine's:
    `study.cluster.init_ray` checks those once it has joined.
    """
    if not gpus > 0 or os.environ.get("RAY_ADDRESS"):  # a bad number is `StudySettings.validate`'s to refuse
        return
    found = visible_gpus()
    if found is not None and math.ceil(gpus) > found:
        seen, here = ("no GPU", "0") if found == 0 else (f"{found} GPU(s)", f"0..{found}")
        raise StudyError(f"--gpus {gpus:g}: this machine has {seen} (NVIDIA driver, CUDA_VISIBLE_DEVICES); "
                         f"accepted: {here} here, or submit to a cluster with GPUs (ray job submit)")


def check_mlflow_uri(uri: str) -> None:
    """A one-line `StudyError` unless the study can write to the tracking URI (`tracking.uri`)."""
    try:
        check_tracking_uri(uri, existing_store=False)
    except TrackingURIError as exc:
        raise StudyError(str(exc)) from None
