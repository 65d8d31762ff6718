"""A real study's trial files name the classifier, never copy it, and still load and resume.

One tiny study (real CIFAR-10, in-process Ray, MLflow in the study folder), one trial that raises
once after epoch 1 (`ATOP_FAULT_INJECT`), so Tune restores it from its epoch-1 checkpoint.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import STUDY_PY, service_env
from tracking.contract import RESTORED_TAG, Role, role_filter


@pytest.mark.slow
def test_trial_checkpoints_and_artifacts_reference_the_study_classifier(cifar_dir, tmp_path):
    from mlflow import MlflowClient

    from atop.checkpoint import STUDY_CACHE_DIR, load_defense
    from atop.checkpoint_file import sha256

    storage, name = tmp_path / "studies", "small"
    once = tmp_path / "transient-{trial}.fired"
    done = subprocess.run(
        [sys.executable, str(STUDY_PY), "--preset", "tiny", "--num-trials", "1", "--max-concurrent", "1",
         "--cpus", "1", "--max-failures", "1", "--data-dir", str(cifar_dir), "--storage-path", str(storage),
         "--study-name", name],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False,
        env=service_env(ATOP_FAULT_INJECT=f"transient@trial=0,epoch=1,once={once}"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert (tmp_path / "transient-0.fired").is_file()  # it did fail once and was restored

    (classifier,) = (storage / STUDY_CACHE_DIR).glob("classifier-*.pt")  # the study's one copy
    checkpoints = sorted(storage.glob(f"{name}/tune-*/*/checkpoint_*/defense.pt"))
    artifacts = sorted(storage.glob(f"{name}/mlartifacts/**/defense.pt"))
    assert checkpoints and len(artifacts) == 1, (checkpoints, artifacts)
    for path in [*checkpoints, *artifacts]:
        blob = torch.load(path, weights_only=True)
        assert "classifier" not in blob and blob["classifier_ref"]["sha256"] == sha256(classifier), path
        defense = load_defense(path)  # found in <storage>/.pretrained-cache, above the file
        assert type(defense.classifier).__name__ == "SmallCNN"
    outside = [p for p in storage.rglob("*.pt") if p.parent.name != STUDY_CACHE_DIR]
    assert not [p for p in outside if "classifier" in torch.load(p, weights_only=True)], outside  # no copy anywhere

    client = MlflowClient(f"sqlite:///{storage / name / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id], role_filter(Role.TRIAL))
    assert run.info.status == "FINISHED" and run.data.tags.get(RESTORED_TAG) == "1", run.data.tags
