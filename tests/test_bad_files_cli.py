"""Property tests: every command-line option that takes a file or a store refuses a bad one in one line.

For each option (settings and config files, `--enqueue`, MLflow and Optuna sqlite URIs, the study's
storage and the pre-training cache, `--pretrained` weights, `.npz` data, spool files), hypothesis
writes a file that is not what the option expects: random bytes, an empty file, a truncated good
file, a folder, or a file of another format (PNG, JSON, YAML, `.npz`, another program's SQLite
database). The CLI's `main(argv)` runs in this process and must exit 2 with exactly one stderr line
`error: ...` that names the path, no traceback, nothing written. A file that is still good (an empty
settings file sets nothing; a settings file cut at a line end may still parse; an empty file is a new
database to a writer) is accepted, and only such a file: the study's `run` is a tripwire that stops
it before Ray, MLflow or Optuna would create anything.

tests/test_bad_files.py has the checkpoint (`atop.evaluate --checkpoint`) and `.npz` loader properties.
"""
from __future__ import annotations

import functools
import io
import json
import runpy
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO

PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: a folder where a file is expected
FOLDER = None
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"


class Accepted(Exception):
    """The study's `run` was reached: every check passed (raised instead of starting anything)."""


def _sqlite_of_another_program() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        db = sqlite3.connect(Path(folder) / "other.db")
        db.execute("CREATE TABLE notes (text)")
        db.commit()
        db.close()
        return (Path(folder) / "other.db").read_bytes()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((2, 4, 4, 3), np.uint8), y=np.arange(2))
    return buffer.getvalue()


#: files of other formats than any option here expects
OTHER_FORMATS = {"png": PNG, "json": b'{"x": [1, 2, 3]}\n', "yaml list": b"- 1\n- two\n", "npz": _npz(),
                 "sqlite": _sqlite_of_another_program()}


def bad_files(good: bytes, *others: str) -> st.SearchStrategy[bytes | None]:
    """Random bytes, empty, `good` cut short, a folder (None) or a file of another format."""
    return st.one_of(st.binary(min_size=1, max_size=2048), st.just(b""),
                     st.integers(1, len(good.rstrip(b"\n")) - 1).map(lambda n: good[:n]), st.just(FOLDER),
                     st.sampled_from([OTHER_FORMATS[name] for name in others or OTHER_FORMATS]))


def parts_of(data: bytes | None, good: bytes, values_may_differ: bool = False) -> bool:
    """Whether `data` is YAML (JSON too) that says nothing `good` does not: nothing, some of its keys
    (a nested mapping: some of its keys), or some of its list's entries; with `values_may_differ`,
    any mapping of `good`'s keys."""
    import yaml

    try:
        given, whole = yaml.safe_load(data), yaml.safe_load(good)
    except (yaml.YAMLError, ValueError, TypeError):
        return False
    if given is None or given == whole:
        return True
    if isinstance(given, list) and isinstance(whole, list):
        return all(entry in whole for entry in given)
    if isinstance(given, dict) and isinstance(whole, dict):
        if values_may_differ:
            return set(given) <= set(whole)
        return all(whole.get(k) == v or (isinstance(v, dict) and isinstance(whole.get(k), dict)
                                          and v.items() <= whole[k].items()) for k, v in given.items())
    return False


def intact_database(path: Path, table: str) -> bool:
    """Whether `path` is a whole SQLite database with `table` (a cut that only dropped free pages at
    its end leaves one): SQLite's full integrity check, independent of the code under test."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            whole = db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            return whole and db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def fresh(tmp_path: Path) -> Path:
    """A new folder for one example (hypothesis reuses the test's `tmp_path` for all of them)."""
    return Path(tempfile.mkdtemp(dir=tmp_path))


def put(path: Path, data: bytes | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is FOLDER:
        path.mkdir()
    else:
        path.write_bytes(data)
    return path


@functools.cache
def entry_point(cli: str) -> Callable[[list[str]], int]:
    """The CLI's `main`; study/run.py's `run` is replaced by the tripwire (`Accepted`)."""
    if cli == "study":
        main = runpy.run_path(str(REPO / "study" / "run.py"), run_name="study_run")["main"]

        def tripwire(plan: object) -> int:
            raise Accepted

        main.__globals__["run"] = tripwire
        return main
    module = {"run": "atop.run", "pretrain": "atop.pretrain", "evaluate": "atop.evaluate",
              "analysis": "analysis.__main__", "tracking": "tracking.mlflow_log"}[cli]
    return __import__(module, fromlist=["main"]).main


def call(cli: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[object, str]:
    """(exit status or "accepted", stderr) of one in-process call."""
    try:
        code: object = entry_point(cli)(argv)
    except SystemExit as exc:
        code = exc.code
    except Accepted:
        code = "accepted"
    return code, capsys.readouterr().err


def assert_refused(code: object, err: str, names: str, untouched: list[Path]) -> None:
    """Exit 2, one `error:` line naming `names`, no traceback, nothing written where `untouched` says."""
    assert code == 2, f"exit {code!r}: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert names in lines[0], lines[0]
    for path in untouched:
        assert not path.exists(), f"{path} was written"
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "Ray was started before refusing"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with tiny CIFAR-shaped splits: a study's checks read them in milliseconds."""
    folder = tmp_path_factory.mktemp("tiny-data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("test", 200)):
        np.savez(folder / f"cifar10_{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n) % 10)
    return folder


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good MLflow database (one experiment, no runs) and a good Optuna database (one study)."""
    import optuna
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("stores")
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").create_experiment("e", artifact_location=(folder / "a").as_uri())
    optuna.create_study(storage=f"sqlite:///{folder / 'optuna.db'}", study_name="s")
    return {"mlflow": folder / "mlflow.db", "optuna": folder / "optuna.db"}


def study_argv(tmp: Path, data: Path, *more: str) -> list[str]:
    return ["--storage-path", str(tmp / "studies"), "--study-name", "s", "--preset", "tiny", "--data-dir", str(data),
            *more]


# --- python study/run.py ------------------------------------------------------------------------

def feed_study(data: bytes, name: str, good: bytes, flags: list[str], tmp_path, tiny_data, capsys) -> None:
    """Give `data` to the study CLI as file `name` after `flags`: refused, or still a part of `good`."""
    tmp = fresh(tmp_path)
    path = put(tmp / name, data)
    code, err = call("study", study_argv(tmp, tiny_data, *flags, str(path)), capsys)
    if code == "accepted":
        assert parts_of(data, good), data
        return
    assert_refused(code, err, name, [tmp / "studies"])


GOOD_SETTINGS = b"num_trials: 3\nmax_concurrent: 1\nconfig:\n  epochs: 1\n"


@PROPERTY
@given(data=bad_files(GOOD_SETTINGS))
def test_study_config(data, tmp_path, tiny_data, capsys):
    # still a good settings file when empty, `{}`, or cut at a line end
    feed_study(data, "settings.yaml", GOOD_SETTINGS, ["--config"], tmp_path, tiny_data, capsys)


GOOD_ENQUEUE = b"- {rt: rt2, lambda_ce: 0.1}\n- {rt: rt1, lambda_ce: 0.05}\n"


@PROPERTY
@given(data=bad_files(GOOD_ENQUEUE))
def test_study_enqueue(data, tmp_path, tiny_data, capsys):
    # still good when cut after its first entry: one reference
    feed_study(data, "refs.yaml", GOOD_ENQUEUE, ["--space", "paper", "--enqueue"], tmp_path, tiny_data, capsys)


@PROPERTY
@given(data=st.data())
def test_study_mlflow_uri(data, tmp_path, tiny_data, stores, capsys):
    tmp = fresh(tmp_path)
    given_bytes = data.draw(bad_files(stores["mlflow"].read_bytes()))
    path = put(tmp / "tracking.db", given_bytes)
    before = None if given_bytes is FOLDER else path.read_bytes()
    code, err = call("study", study_argv(tmp, tiny_data, "--mlflow-uri", f"sqlite:///{path}"), capsys)
    if code == "accepted":  # an empty file is a new database to a writer; a cut may leave a whole one
        assert given_bytes == b"" or intact_database(path, "experiments"), given_bytes[:64]
        return
    assert_refused(code, err, str(path), [tmp / "studies"])
    assert before is None or path.read_bytes() == before  # never migrated or written into


@PROPERTY
@given(data=st.data())
def test_study_optuna_storage(data, tmp_path, tiny_data, stores, capsys):
    tmp = fresh(tmp_path)
    given_bytes = data.draw(st.one_of(bad_files(stores["optuna"].read_bytes()), st.just(stores["mlflow"].read_bytes())))
    path = put(tmp / "trials.db", given_bytes)
    before = None if given_bytes is FOLDER else path.read_bytes()
    code, err = call("study", study_argv(tmp, tiny_data, "--optuna-storage", f"sqlite:///{path}"), capsys)
    if code == "accepted":
        assert given_bytes == b"" or intact_database(path, "studies"), given_bytes[:64]
        return
    assert_refused(code, err, str(path), [tmp / "studies"])
    assert before is None or path.read_bytes() == before


@settings(PROPERTY, max_examples=8)
@given(data=bad_files(b"any file"))
@pytest.mark.parametrize("option", ["--storage-path", "--pretrained-cache"])
def test_study_folder_options_refuse_a_file(option, data, tmp_path, tiny_data, capsys):
    tmp = fresh(tmp_path)
    if data is FOLDER:  # a folder is what these options take
        return
    path = put(tmp / "in-the-way", data)
    argv = study_argv(tmp, tiny_data)
    argv[argv.index("--storage-path") + 1] = str(tmp / "studies")
    code, err = call("study", [*argv, option, str(path / "below")], capsys)
    assert_refused(code, err, str(path), [tmp / "studies"])
    assert path.read_bytes() == data


GOOD_STUDY_JSON = json.dumps({"settings": {"space": "tiny", "num_trials": 3}, "mlflow_uri": "sqlite:////m.db"},
                             indent=2).encode()


@PROPERTY
@given(data=bad_files(GOOD_STUDY_JSON))
def test_study_resume_reads_a_bad_study_json(data, tmp_path, capsys):
    tmp = fresh(tmp_path)
    path = put(tmp / "studies" / "s" / "study.json", data)
    code, err = call("study", ["--storage-path", str(tmp / "studies"), "--study-name", "s", "--resume"], capsys)
    assert_refused(code, err, str(path), [tmp / "studies" / "s" / "optuna.db", tmp / "studies" / "s" / "mlflow.db"])
    assert sorted(p.name for p in (tmp / "studies" / "s").iterdir()) == ["study.json"]


@PROPERTY
@given(data=bad_files(b"PK\x03\x04" + bytes(200), "png", "json", "npz", "sqlite"))
def test_study_pretrained_classifier(data, tmp_path, tiny_data, capsys):
    tmp = fresh(tmp_path)
    put(tmp / "weights" / "classifier.pt", data)
    code, err = call("study", study_argv(tmp, tiny_data, "--pretrained", str(tmp / "weights")), capsys)
    assert_refused(code, err, "classifier.pt", [tmp / "studies"])


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good `--pretrained` classifier.pt for the tiny preset: the purifier.pt beside it is what is checked."""
    from atop.checkpoint import save_checkpoint
    from atop.config import Config
    from atop.models import CLASSIFIERS
    from atop.presets import get_preset

    cfg = Config.from_dict(get_preset("tiny").config)
    path = tmp_path_factory.mktemp("tiny-classifier") / "classifier.pt"
    return save_checkpoint(path, kind="classifier", cfg=cfg, classifier=CLASSIFIERS[cfg.classifier](10))


@PROPERTY
@given(data=st.data())
def test_study_pretrained_purifier(data, tmp_path, tiny_data, tiny_classifier, capsys):
    tmp = fresh(tmp_path)
    (tmp / "weights").mkdir()
    good = tiny_classifier.read_bytes()  # a classifier where a purifier is expected, when not cut short
    (tmp / "weights" / "classifier.pt").write_bytes(good)
    put(tmp / "weights" / "purifier.pt", data.draw(st.one_of(bad_files(good, "png", "json", "npz", "sqlite"),
                                                             st.just(good))))
    code, err = call("study", study_argv(tmp, tiny_data, "--pretrained", str(tmp / "weights")), capsys)
    assert_refused(code, err, "purifier.pt", [tmp / "studies"])


@settings(PROPERTY, max_examples=10)
@given(data=bad_files(b"\x93NUMPY" + bytes(100), "png", "json", "sqlite"))
def test_study_data_dir(data, tmp_path, tiny_data, capsys):
    tmp = fresh(tmp_path)
    folder = tmp / "data"
    put(folder / "cifar10_train.npz", data)
    (folder / "cifar10_test.npz").write_bytes((tiny_data / "cifar10_test.npz").read_bytes())
    code, err = call("study", study_argv(tmp, folder), capsys)
    assert_refused(code, err, "cifar10_train.npz", [tmp / "studies"])


# --- python -m atop.run, python -m atop.pretrain ------------------------------------------------

GOOD_CONFIG = b"epochs: 1\nlambda_ce: 0.1\n"


@PROPERTY
@given(data=bad_files(GOOD_CONFIG))
def test_run_config(data, tmp_path, capsys):
    tmp = fresh(tmp_path)
    path = put(tmp / "config.yaml", data)
    # --data-dir is an empty folder: a config that passes is refused there, after the config's checks
    (tmp / "no-data").mkdir()
    code, err = call("run", ["--out", str(tmp / "out"), "--preset", "tiny", "--config", str(path),
                             "--data-dir", str(tmp / "no-data")], capsys)
    if "no-data" in err:  # a good config file: empty, or a mapping of config values
        assert data is not FOLDER and parts_of(data, GOOD_CONFIG, values_may_differ=True), data
        return
    assert_refused(code, err, "config.yaml", [tmp / "out"])


@settings(PROPERTY, max_examples=8)
@given(data=bad_files(b"any file"))
def test_run_pretrained_cache_refuses_a_file(data, tmp_path, capsys):
    tmp = fresh(tmp_path)
    if data is FOLDER:
        return
    path = put(tmp / "in-the-way", data)
    code, err = call("run", ["--out", str(tmp / "out"), "--preset", "tiny", "--pretrained-cache", str(path)],
                     capsys)
    assert_refused(code, err, str(path), [tmp / "out"])


@settings(PROPERTY, max_examples=10)
@given(data=bad_files(b"\x93NUMPY" + bytes(100), "png", "json", "sqlite"))
@pytest.mark.parametrize("cli", ["run", "pretrain"])
def test_data_dir_of_run_and_pretrain(cli, data, tmp_path, tiny_data, capsys):
    tmp = fresh(tmp_path)
    folder = tmp / "data"
    put(folder / "cifar10_train.npz", data)
    (folder / "cifar10_test.npz").write_bytes((tiny_data / "cifar10_test.npz").read_bytes())
    out = tmp / ("out" if cli == "run" else "out.pt")
    argv = {"run": ["--out", str(out), "--preset", "tiny"], "pretrain": ["classifier", "--out", str(out)]}[cli]
    code, err = call(cli, [*argv, "--data-dir", str(folder)], capsys)
    assert_refused(code, err, "cifar10_train.npz", [out])


# --- python -m atop.evaluate ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trial_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A defense checkpoint that names its classifier by sha256 (as a study trial's does), and that
    classifier's checkpoint, renamed (the search beside the defense does not find it)."""
    from atop.checkpoint import save_checkpoint
    from atop.config import Config
    from atop.models import CLASSIFIERS, UNetPurifier

    folder = tmp_path_factory.mktemp("trial")
    cfg = Config.from_dict({"purifier_width": 4, "n_eval": 2})
    clf = save_checkpoint(folder / "clf" / "classifier.pt", kind="classifier", cfg=cfg,
                          classifier=CLASSIFIERS["small_cnn"](10))
    defense = save_checkpoint(folder / "trial" / "defense.pt", kind="defense", cfg=cfg, classifier_ref=clf,
                              purifier=UNetPurifier(4))
    kept = clf.rename(folder / "kept-classifier.pt")
    return defense, kept


@PROPERTY
@given(data=st.data())
def test_evaluate_classifier(data, tmp_path, tiny_data, trial_checkpoint, capsys):
    tmp = fresh(tmp_path)
    defense, kept = trial_checkpoint
    path = put(tmp / "classifier.pt", data.draw(bad_files(kept.read_bytes(), "png", "json", "npz", "sqlite")))
    code, err = call("evaluate", ["--checkpoint", str(defense), "--classifier", str(path), "--out", str(tmp / "out"),
                                  "--level", "screen", "--data-dir", str(tiny_data)], capsys)
    assert_refused(code, err, str(path), [tmp / "out"])


# --- python -m analysis ------------------------------------------------------------------------

@PROPERTY
@given(data=st.data())
def test_analysis_mlflow_uri(data, tmp_path, stores, capsys):
    tmp = fresh(tmp_path)
    given_bytes = data.draw(st.one_of(bad_files(stores["mlflow"].read_bytes()), st.just(stores["optuna"].read_bytes())))
    path = put(tmp / "tracking.db", given_bytes)
    before = None if given_bytes is FOLDER else path.read_bytes()
    code, err = call("analysis", ["--mlflow-uri", f"sqlite:///{path}", "--experiment", "e",
                                  "--out", str(tmp / "out")], capsys)
    if "experiment 'e': empty experiment" in err:  # the database survived the cut (free pages at its end)
        assert intact_database(path, "experiments"), err
        assert_refused(code, err, "experiment 'e'", [tmp / "out"])
        return
    assert_refused(code, err, str(path), [tmp / "out"])
    assert before is None or path.read_bytes() == before  # a reader never creates MLflow's tables


# --- python -m tracking upload -----------------------------------------------------------------

GOOD_SPOOL = (json.dumps({"op": "params", "params": {"lr": "0.1"}, "run_id": "abc", "t": 1}) + "\n").encode()


@PROPERTY
@given(data=bad_files(GOOD_SPOOL))
def test_tracking_spool(data, tmp_path, capsys):
    tmp = fresh(tmp_path)
    path = put(tmp / "trial.jsonl", data)
    before = None if data is FOLDER else path.read_bytes()
    code, err = call("tracking", ["upload", str(path), "--mlflow-uri", f"sqlite:///{tmp / 'm.db'}"], capsys)
    if code == 0:  # nothing to send: an empty spool
        assert data == b"", data
        return
    assert_refused(code, err, "trial.jsonl", [tmp / "m.db", tmp / "trial.jsonl.skipped"])
    assert before is None or path.read_bytes() == before


@PROPERTY
@given(data=st.data())
def test_tracking_mlflow_uri(data, tmp_path, stores, capsys):
    tmp = fresh(tmp_path)
    given_bytes = data.draw(bad_files(stores["mlflow"].read_bytes()))
    path = put(tmp / "tracking.db", given_bytes)
    if given_bytes == b"" or intact_database(path, "experiments"):  # a new database, or a cut that left a
        return  # whole one: the upload may use it (test_study_mlflow_uri: such files are accepted, only they)
    spool = tmp / "trial.jsonl"
    spool.write_bytes(GOOD_SPOOL)
    code, err = call("tracking", ["upload", str(spool), "--mlflow-uri", f"sqlite:///{path}"], capsys)
    assert_refused(code, err, str(path), [tmp / "trial.jsonl.skipped"])
    assert spool.read_bytes() == GOOD_SPOOL
