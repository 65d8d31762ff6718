"""What a study run works from: `StudyPlan` (checked input, made by `study.run.prepare`) and
`OpenStudy` (its Optuna study and MLflow records, made by `study.phases.open_study`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light modules here: bad input is refused (study.args, then `prepare`) before torch, Optuna,
# MLflow or Ray are imported; each function imports the heavy modules it needs (tests/test_refusal.py).
from atop.config import Config
from study.storage import Storage

if TYPE_CHECKING:
    from atop.data import Split
    from study.enqueue import Reference
    from study.lease import Lease
    from study.settings import StudySettings
    from study.warmstart import WarmStart


@dataclass(frozen=True)
class StudyPlan:
    """Everything a study run needs, checked by `prepare` before anything is created.

    Attributes:
        settings: the resolved study settings (preset, file, flags; or the saved ones on resume).
        name: the study name (Optuna study, MLflow experiment and folder name).
        folder: the driver's local study folder: spool/, files logged as artifacts, and on a local
            `--storage-path` everything else too (it is then `store`'s folder).
        store: `<storage-path>/<name>` (`study.storage`): study.json, confirm.json, Tune's experiments
            and checkpoints; optuna.db and mlflow.db by default (a local `--storage-path` only).
        pretrained_cache: the pre-training cache (`atop.pretrained_cache`), shared across studies.
        mlflow_uri: the tracking URI (checked when given or on resume).
        data_dir: the data folder as resolved (None: `$ATOP_DATA_DIR` or atop's default).
        cfg: the config every trial starts from (`StudySettings.base_config()`).
        pool: the train split less its validation reserve (`atop.data.carve_validation`): all that
            pre-training and fine-tuning see.
        val: the validation images every search trial is scored on (`cfg.n_eval` of the train split,
            `atop.data.carve_validation`: the same for every trial, seed and later study).
        test: the whole test split; only the confirm stage scores on it.
        optuna_storage: the Optuna database URL as used (password included; never printed or saved).
        references: `--enqueue FILE`'s configurations, put at the head of the study (once).
        pretrained: `--pretrained DIR` (kept in study.json: a resumed study uses the same weights).
        resume: continue the study in `folder` instead of creating it.
        verbose: Ray's and Optuna's own INFO logs.
        warm_start: `--warm-start STUDY`, checked (`study.warmstart`): copied when the study is created.
        weights: a resumed study's classifier and purifier files, as study.json recorded them and
            checked (`study.pretrained.recorded_weights`), or, for a study from before that record,
            as its trial runs name them (`weights_named_by_trials`); None: pre-train or reuse the cache.
        storage_path: `--storage-path` as a later `--resume` must give it (a local path absolute, an
            object-store URI as given, its options included).
        cache_given: `--pretrained-cache` was given (a later `--resume` must give it too).
    """

    settings: StudySettings
    name: str
    folder: Path
    store: Storage
    pretrained_cache: Path
    mlflow_uri: str
    data_dir: str | None
    cfg: Config
    pool: Split
    val: Split
    test: Split
    optuna_storage: str = ""
    references: tuple[Reference, ...] = ()
    pretrained: str | None = None
    resume: bool = False
    verbose: bool = False
    warm_start: WarmStart | None = None
    weights: tuple[Path, Path] | None = None
    storage_path: str = ""
    cache_given: bool = False

    @property
    def optuna_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.folder / 'optuna.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.folder / "spool"

    @property
    def pretraining_data(self) -> Split:
        """The images the classifier and purifier are pre-trained on (a seeded subset of `pool`): the
        pre-training cache's data key, the same for every study whose pool is the same."""
        from atop.data import subset

        return subset(self.pool, self.settings.pretrain_settings().n_train, seed=self.cfg.seed)

    @property
    def validation_record(self) -> dict[str, Any]:
        """What the study's metadata keeps about its validation images (enough to re-carve and check them)."""
        from atop.data import VALIDATION_SEED

        rows = self.val.indices.tolist()
        return {"from": "train", "images": len(rows), "seed": VALIDATION_SEED,
                "rows_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}


@dataclass(frozen=True)
class OpenStudy:
    """The study's records once opened: the Optuna study and its MLflow experiment and parent run."""

    study: Any  # optuna.Study (optuna is imported after Ray's loopback setting)
    storage: Any  # its optuna.storages.RDBStorage
    experiment_id: str
    parent_id: str
    tags: dict[str, str]  # reproducibility tags every run of this driver gets
    lease: Lease  # this driver's hold on the study (study.lease), until `run` ends
