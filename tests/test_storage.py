"""`--storage-path` as a URI (study/storage.py): parsing and refusals in-process; a study on an S3
server (moto) that a fresh driver resumes, slow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from study.errors import StudyError
from study.run import main
from study.storage import JOB_ENV, local_folder, parse, refuse_local_stores
from tests.conftest import REPO
from tests.services import make_bucket, s3, s3_env

#: an S3 URI that names its endpoint and region, so parsing it contacts nothing
OFFLINE_S3 = "s3://bkt/studies?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


def test_local_paths_resolve_and_relative_ones_are_refused_under_a_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse("studies", job=False).base == str(tmp_path / "studies")
    assert parse("~/s", job=True).base == str(tmp_path / "home" / "s")
    assert parse(f"file://{tmp_path}/s", job=True).base == f"{tmp_path}/s"
    assert parse(str(tmp_path / "s"), job=True).where("n", "study.json") == f"{tmp_path}/s/n/study.json"
    with pytest.raises(StudyError, match=r"'studies' is relative: under `ray job submit` .* temporary working dir "
                                         r"on the head node.*give s3://BUCKET/PATH"):
        parse("studies", job=True)
    monkeypatch.setenv(JOB_ENV, "{}")  # what `ray job submit` sets in its driver
    with pytest.raises(StudyError, match="is relative"):
        parse("./studies")


def test_object_store_uris_keep_their_options_and_bad_ones_are_one_line():
    storage = parse(OFFLINE_S3)
    assert isinstance(storage.fs, pafs.S3FileSystem) and storage.remote
    assert storage.base == "bkt/studies" and storage.at("x").where("study.json") == "s3://bkt/studies/x/study.json"
    assert storage.at("x").tune_location() == {"storage_path": "bkt/studies/x", "storage_filesystem": storage.fs}
    assert parse("/abs").tune_location() == {"storage_path": "/abs"}
    for bad, said in [("ftp://h/x", "has scheme 'ftp'; accepted: s3://"),
                      ("s3://bkt/x?endpoint=1", "is not usable (Unexpected query parameter"),
                      ("s3://?region=us-east-1", "names no bucket")]:
        with pytest.raises(StudyError, match=r"--storage-path .*" + said.replace("(", r"\(")) as err:
            parse(bad)
        assert "\n" not in str(err.value)


def test_an_object_store_needs_a_database_and_a_tracking_server(tmp_path):
    storage = parse(OFFLINE_S3)
    with pytest.raises(StudyError, match="sqlite optuna.db cannot live; pass --optuna-storage URL"):
        refuse_local_stores(storage, None, "http://mlflow:5000")
    with pytest.raises(StudyError, match="sqlite mlflow.db cannot live; pass --mlflow-uri"):
        refuse_local_stores(storage, "postgresql://u@db/o", None)
    refuse_local_stores(storage, "postgresql://u@db/o", "http://mlflow:5000")
    refuse_local_stores(parse(str(tmp_path)), None, None)  # a local folder holds both sqlite files
    assert local_folder(storage.at("s")) == Path.home() / ".cache" / "atop" / "studies" / "s"
    assert local_folder(parse(str(tmp_path)).at("s")) == tmp_path / "s"


def test_the_driver_refuses_before_creating_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATOP_OPTUNA_STORAGE", raising=False)
    assert main(["--storage-path", OFFLINE_S3, "--study-name", "s"]) == 2
    assert "pass --optuna-storage URL" in capsys.readouterr().err
    monkeypatch.setenv(JOB_ENV, json.dumps({"metadata": {}}))
    assert main(["--study-name", "s"]) == 2  # the default ./studies, under a job
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --storage-path 'studies' is relative") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_json_files_round_trip_on_a_local_folder(tmp_path):
    store = parse(str(tmp_path)).at("s")
    assert not store.exists()
    store.make()
    store.write_json("study.json", {"a": [1]})
    assert store.exists("study.json") and store.read_json("study.json") == {"a": [1]}
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["study.json"]  # no temporary file left
    store.remove()
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_bucket_must_exist_and_the_endpoint_may_come_from_the_environment(tmp_path, monkeypatch, capsys):
    with s3(tmp_path) as endpoint:
        for k, v in s3_env(endpoint).items():
            monkeypatch.setenv(k, v)
        make_bucket(endpoint, "there")
        parse("s3://there/studies").check()
        with pytest.raises(StudyError, match="bucket 'absent' does not exist; create it first"):
            parse("s3://absent/studies").check()
        sqlite = f"sqlite:///{tmp_path / 'x.db'}"
        assert main(["--storage-path", "s3://absent/s", "--optuna-storage", sqlite, "--mlflow-uri", sqlite]) == 2
        assert "error: --storage-path 's3://absent/s': bucket 'absent' does not exist" in capsys.readouterr().err
        assert not (tmp_path / "x.db").exists()  # refused before any store was opened
        with pytest.raises(StudyError, match="'s3://there/x' is unreachable"):
            parse("s3://there/x?endpoint_override=127.0.0.1:9&scheme=http").check()


@pytest.mark.slow
def test_a_study_on_s3_keeps_its_state_in_the_bucket_and_resumes_from_it(cifar_dir, tmp_path):
    import optuna

    name = "ons3"
    with s3(tmp_path) as endpoint:
        make_bucket(endpoint, "studies")
        host = endpoint.removeprefix("http://")
        uri = f"s3://studies/team?endpoint_override={host}&scheme=http"  # the endpoint in the URI, not the env
        optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
        env = {**os.environ, **{k: v for k, v in s3_env(endpoint).items() if k != "AWS_ENDPOINT_URL"},
               "HOME": str(tmp_path / "home")}
        base = [sys.executable, "study/run.py", "--study-name", name, "--storage-path", uri,
                "--data-dir", str(cifar_dir)]
        first = subprocess.run([*base, "--preset", "tiny", "--num-trials", "2", "--optuna-storage", optuna_url,
                                "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert f"study folder: s3://studies/team/{name}" in first.stdout

        again = subprocess.run([*base, "--resume", "--num-trials", "3"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=600, check=False)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"study {name}: 2 finished, 1 to run" in again.stdout, again.stdout[-3000:]

        fs = pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                               region="us-east-1")
        keys = [i.path.removeprefix(f"studies/team/{name}/")
                for i in fs.get_file_info(pafs.FileSelector(f"studies/team/{name}", recursive=True))
                if i.type == pafs.FileType.File]
        with fs.open_input_stream(f"studies/team/{name}/study.json") as f:
            assert json.loads(f.read())["optuna_storage"] == optuna_url
    # Tune's two experiments (one per driver), each with its state and its trials' checkpoints
    experiments = {k.split("/")[0] for k in keys if "/experiment_state-" in k}
    assert len(experiments) == 2 and all(e.startswith("tune-") for e in experiments), keys
    assert sum(k.endswith("/defense.pt") or "/checkpoint_" in k for k in keys) >= 3, keys
    study = optuna.load_study(study_name=name, storage=optuna_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # the resume ran the one new trial only
    local = tmp_path / "home" / ".cache" / "atop" / "studies" / name
    assert not (local / "study.json").exists() and not list(local.glob("tune-*"))  # state only in the bucket
    assert not (REPO / "studies" / name).exists()
