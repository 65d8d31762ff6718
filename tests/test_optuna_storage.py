"""`--optuna-storage`: a study whose trials live in a real PostgreSQL server, resumed by a new driver."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from services import postgres

from tests.conftest import REPO


def test_urls_get_the_installed_driver_and_never_show_a_password():
    from study import optuna_storage
    from study.errors import StudyError

    url = optuna_storage.resolve("postgresql://me:secret@db:5432/optuna")
    assert url == "postgresql+psycopg://me:secret@db:5432/optuna"
    assert optuna_storage.public(url) == "postgresql+psycopg://me:***@db:5432/optuna"
    with pytest.raises(StudyError, match="'redis'.*accepted: sqlite, postgresql, mysql"):
        optuna_storage.resolve("redis://db/0")
    with pytest.raises(StudyError, match="not a database URL") as err:
        optuna_storage.resolve("not a url :secret@")
    assert "secret" not in str(err.value)


@pytest.mark.slow
def test_a_study_on_postgres_resumes_from_a_fresh_driver_and_keeps_no_password(cifar_dir, tmp_path):
    import optuna

    storage, name = tmp_path / "studies", "pg"
    with postgres(tmp_path) as url:
        base = [sys.executable, "study/run.py", "--study-name", name, "--storage-path", str(storage),
                "--data-dir", str(cifar_dir)]
        first = subprocess.run([*base, "--preset", "tiny", "--num-trials", "2", "--optuna-storage", url],
                               cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        folder = storage / name
        assert not (folder / "optuna.db").exists()  # the trials are in PostgreSQL, not in the folder
        assert json.loads((folder / "study.json").read_text())["optuna_storage"] == url
        study = optuna.load_study(study_name=name, storage=url)
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2

        # a fresh driver reads the URL from study.json and extends the study
        again = subprocess.run([*base, "--resume", "--num-trials", "3"], cwd=REPO, capture_output=True, text=True,
                               timeout=900, check=False)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        study = optuna.load_study(study_name=name, storage=url)
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3

        # another new study of the same name is refused, not merged into this one
        named = subprocess.run([*base[:2], "--study-name", name, "--storage-path", str(tmp_path / "other"),
                                "--data-dir", str(cifar_dir), "--preset", "tiny", "--optuna-storage", url],
                               cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert named.returncode == 2 and f"already holds an Optuna study '{name}'" in named.stderr, named.stderr
