"""The services the cluster tests stand on, each real: PostgreSQL as Optuna's storage, moto as S3 for pyarrow."""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from services import make_bucket, postgres, s3, s3_env

pytestmark = pytest.mark.slow


def test_postgres_holds_an_optuna_study_across_connections(tmp_path):
    import optuna
    import sqlalchemy.exc

    with postgres(tmp_path) as url:
        first = optuna.create_study(study_name="s", storage=url, directions=["maximize", "maximize"])
        first.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.5, 0.25]))
        again = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url))
        assert [t.values for t in again.trials] == [[0.5, 0.25]]
    with pytest.raises(sqlalchemy.exc.OperationalError):  # stopped by PID: nothing listens there any more
        optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": {"connect_timeout": 2}}))


def test_s3_server_serves_pyarrow_filesystem_by_uri(tmp_path, monkeypatch):
    with s3(tmp_path) as endpoint:
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        make_bucket(endpoint, "studies")
        fs, path = pafs.FileSystem.from_uri("s3://studies/a/b.txt")
        with fs.open_output_stream(path) as f:
            f.write(b"hello")
        with fs.open_input_stream(path) as f:
            assert f.read() == b"hello"
        assert fs.get_file_info("studies/nope").type == pafs.FileType.NotFound
