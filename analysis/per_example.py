"""Per-image scores of a study's trials, from each trial's ``per_example.parquet`` artifact.

The trainable logs one such file per trial (``atop.artifacts.write_parquet``: columns
``trial_number``, ``index``, ``label``, ``<name>_correct`` for the clean images, each attack,
``unseen`` and ``worst_case``, and ``<name>_correct_rate`` when the defense was drawn several
times). Here each kept trial's file is downloaded, each objective is matched to the column that
scored it (checked: the column's mean must equal the logged figure), and the trials are stacked on
the images they share, ready for ``analysis.uncertainty``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from analysis.compute import FrontInfo

#: the artifact's name as the trainable logs it (``trainables.atop_trainable.PER_EXAMPLE_FILE``)
PER_EXAMPLE_ARTIFACT = "per_example.parquet"
#: how far a column's mean may be from the logged figure (both are means of the same draws)
TOLERANCE = 1e-6


@dataclass(frozen=True)
class PerImage:
    """Trials' per-image scores on the images they all share.

    Attributes:
        run_ids: The trials with usable files, in the order of ``FrontInfo.run_ids``.
        scores: ``(len(run_ids), n_objectives, n_images)``: 1/0 per image, or the fraction of the
            defense's draws that were correct.
        n_images: Images common to all of ``run_ids`` (the bootstrap's sample size).
        most_images: The most images any one file holds (> ``n_images``: files differ).
        missing: Run id -> why that kept trial has no scores here.
    """

    run_ids: tuple[str, ...]
    scores: np.ndarray
    n_images: int
    most_images: int
    missing: dict[str, str]


class UnusableScores(Exception):
    """A trial's file cannot score it; the message says why."""


def score_source(objective: str, params: Mapping[str, str | None]) -> str | None:
    """The name ``<name>_correct`` is built from for one objective of one run, or None.

    ``robust_acc_seen`` is PGD in the training norm (``atop.scoring.seen_attack``), read from the
    run's ``params.train_norm``.
    """
    if objective.startswith("robust_acc/"):
        return objective.removeprefix("robust_acc/")
    if objective == "robust_acc_seen":
        norm = params.get("params.train_norm")
        return f"pgd_{norm}" if norm else None
    return {
        "clean_acc": "clean",
        "robust_acc_unseen": "unseen",
        "worst_case_acc": "worst_case",
    }.get(objective)


def trial_scores(
    table: pa.Table, objectives: Sequence[str], logged: Sequence[float], params: Mapping
) -> tuple[np.ndarray, np.ndarray]:
    """One trial's image indices ``(n,)`` and scores ``(n_objectives, n)`` from its file's table.

    Raises:
        UnusableScores: an objective has no column, or a column's mean is not the logged figure.
    """
    columns = set(table.column_names)
    rows = []
    for name, value in zip(objectives, logged):
        source = score_source(name, params)
        if source is None:
            raise UnusableScores(f"no per-image column scores {name}")
        column = next(
            (c for c in (f"{source}_correct_rate", f"{source}_correct") if c in columns), None
        )
        if column is None:
            raise UnusableScores(f"{PER_EXAMPLE_ARTIFACT} has no column {source}_correct")
        scores = table[column].to_numpy(zero_copy_only=False).astype(float)
        if abs(scores.mean() - value) > TOLERANCE:
            raise UnusableScores(
                f"mean of {column} {scores.mean():.4f} is not the logged {name} {value:.4f}"
            )
        rows.append(scores)
    index = table["index"].to_numpy(zero_copy_only=False)
    if len(np.unique(index)) != len(index):
        raise UnusableScores(f"{PER_EXAMPLE_ARTIFACT} repeats an image index")
    return index, np.array(rows)


def load_per_image(uri: str, info: FrontInfo, runs: pa.Table) -> PerImage:
    """Download and align the per-example files of the trials kept in ``info``.

    Args:
        uri: MLflow tracking URI of the study.
        info: The study's front information (which runs, which objectives, their logged values).
        runs: The study's runs table (``analysis.load``), for each run's params.

    Returns:
        The :class:`PerImage` of every kept trial with a usable file; the others in ``missing``.
    """
    client = MlflowClient(tracking_uri=uri)
    params = {r["run_id"]: r for r in runs.to_pylist()}
    names = [o.name for o in info.objectives]
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="per-example-") as tmp:
        for k, run_id in enumerate(info.run_ids):
            try:
                found[run_id] = run_scores(
                    client, run_id, names, info.points[k], params[run_id], Path(tmp)
                )
            except UnusableScores as exc:
                missing[run_id] = str(exc)
    return align(found, missing, len(names))


def run_scores(
    client: MlflowClient,
    run_id: str,
    objectives: Sequence[str],
    logged: Sequence[float],
    params: Mapping,
    folder: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Download one run's ``per_example.parquet`` into ``folder`` and score it (:func:`trial_scores`).

    Raises:
        UnusableScores: the run logged no such file, the file cannot be read, or
            :func:`trial_scores` refuses it; the message is one line.
    """
    if PER_EXAMPLE_ARTIFACT not in {Path(f.path).name for f in client.list_artifacts(run_id)}:
        raise UnusableScores(f"no {PER_EXAMPLE_ARTIFACT} logged")
    path = client.download_artifacts(run_id, PER_EXAMPLE_ARTIFACT, str(folder / run_id))
    try:
        return trial_scores(pq.read_table(path), objectives, logged, params)
    except (UnusableScores, pa.ArrowException) as exc:
        raise UnusableScores(str(exc).splitlines()[0]) from None


def align(
    found: Mapping[str, tuple[np.ndarray, np.ndarray]], missing: dict[str, str], n_objectives: int
) -> PerImage:
    """Stack trials' ``(index, scores)`` on the image indices all of them hold."""
    if not found:
        return PerImage((), np.zeros((0, n_objectives, 0)), 0, 0, missing)
    common = found[next(iter(found))][0]
    for index, _ in found.values():
        common = np.intersect1d(common, index)
    stacked = []
    for index, scores in found.values():
        order = np.argsort(index)
        stacked.append(scores[:, order[np.searchsorted(index, common, sorter=order)]])
    most = max(len(index) for index, _ in found.values())
    return PerImage(tuple(found), np.array(stacked), len(common), most, missing)
