"""Bad study input: one line `error: ...` on stderr, exit 2, before anything is created."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, data_dir, free_port

CASES = {
    "unknown space": (["--space", "nope"], ["'nope'", "paper", "wide"]),
    "unknown sampler": (["--sampler", "cmaes"], ["'cmaes'", "nsga2", "tpe", "gp", "random"]),
    "zero trials": (["--num-trials", "0"], ["--num-trials", "0", ">= 1"]),
    "unknown preset": (["--preset", "huge"], ["'huge'", "smoke"]),
    "unknown option": (["--frobnicate", "3"], ["--frobnicate"]),
    "missing data dir": (["--data-dir", "/nonexistent/atop-data"], ["/nonexistent/atop-data"]),
    "unreachable mlflow": (["--mlflow-uri", f"http://127.0.0.1:{free_port()}"], ["unreachable", "127.0.0.1"]),
    "relative sqlite": (["--mlflow-uri", "sqlite:///mlflow.db"], ["absolute"]),
    "resume of a missing study": (["--resume"], ["no study 'bad'"]),
    "bad config value": (["--epochs", "-1"], ["epochs=-1", "accepted"]),
    "no configuration to confirm": (["--confirm-top", "0"], ["--confirm-top", "0", ">= 1", "--no-confirm"]),
    "no confirm seed": (["--confirm-seeds", "0"], ["--confirm-seeds", "0", ">= 1"]),
    "more validation images than the train split": (["--config", "{tmp}/v.yaml"], ["n_eval", "60000"]),
    "unreachable optuna storage": (["--optuna-storage", f"postgresql://atop@127.0.0.1:{free_port()}/optuna"],
                                   ["--optuna-storage", "127.0.0.1", "unreachable"]),
    "optuna storage of another kind": (["--optuna-storage", "redis://127.0.0.1/0"], ["'redis'", "postgresql"]),
    "constraint on an unknown metric": (["--constraint", "unknown_metric>=1"], ["'unknown_metric'", "clean_acc"]),
    "enqueue: unknown parameter": (["--enqueue", "{tmp}/e1.yaml"], ["e1.yaml", "'lamda'", "accepted", "lambda_ce"]),
    "enqueue: value outside the space": (["--enqueue", "{tmp}/e2.yaml"], ["e2.yaml", "'rt9'", "rt1, rt2, rt3"]),
    "enqueue: more references than trials": (["--enqueue", "{tmp}/e3.yaml", "--num-trials", "1"],
                                             ["--num-trials 1", "2 reference configurations"]),
    "pretrained: corrupt file": (["--pretrained", "{tmp}/corrupt"], ["corrupt/classifier.pt", "expected"]),
    "pretrained: foreign state dict": (["--pretrained", "{tmp}/foreign"], ["foreign/classifier.pt", "small_cnn"]),
    "pretrained: no such folder": (["--pretrained", "{tmp}/absent"], ["absent", "classifier.pt"]),
}
FILES = {"v.yaml": "config: {n_eval: 60000}\n",
         "e1.yaml": "- {rt: rt2, lambda_ce: 0.1, lamda: 3}\n",
         "e2.yaml": "- {rt: rt9, lambda_ce: 0.1}\n",
         "e3.yaml": "- {rt: rt2, lambda_ce: 0.1}\n- {rt: rt1, lambda_ce: 0.1}\n",
         "corrupt/classifier.pt": "PK\x03\x04 not really a zip",
         }


def _foreign_state_dict(folder) -> None:
    import torch

    folder.mkdir()
    torch.save({"foo": torch.zeros(3)}, folder / "classifier.pt")


def run_study(args: list[str], storage) -> subprocess.CompletedProcess:
    base = ["--storage-path", str(storage), "--study-name", "bad"]
    if "--data-dir" not in args:
        base += ["--data-dir", str(data_dir())]
    return subprocess.run([sys.executable, str(REPO / "study" / "run.py"), *args, *base], capture_output=True,
                          text=True, timeout=120, cwd=storage, check=False)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_anything_starts(case, tmp_path):
    args, needles = CASES[case]
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    _foreign_state_dict(tmp_path / "foreign")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    storage = tmp_path / "studies"
    storage.mkdir()
    done = run_study(args, storage)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert list(storage.iterdir()) == []  # no study folder left behind
    assert "Started a local Ray" not in done.stdout + done.stderr


def test_confirm_config_may_set_only_how_confirm_trials_are_scored(tmp_path):
    storage = tmp_path / "studies"
    storage.mkdir()
    (tmp_path / "c.yaml").write_text("confirm_config: {epochs: 9}\n")
    done = run_study(["--config", str(tmp_path / "c.yaml")], storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "'epochs'" in done.stderr and "eval_level, n_eval" in done.stderr
    (tmp_path / "t.yaml").write_text("confirm_config: {n_eval: 20000}\n")
    done = run_study(["--config", str(tmp_path / "t.yaml")], storage)
    assert done.returncode == 2 and "n_eval=20000" in done.stderr and "1..10000" in done.stderr
    assert list(storage.iterdir()) == []


def test_config_file_unknown_key_and_unsafe_yaml(tmp_path):
    storage = tmp_path / "studies"
    storage.mkdir()
    (tmp_path / "c.yaml").write_text("num_trials: 3\nconfig: {lamda_ce: 0.1}\n")
    done = run_study(["--config", str(tmp_path / "c.yaml")], storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'lamda_ce'" in done.stderr
    (tmp_path / "u.yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    done = run_study(["--config", str(tmp_path / "u.yaml")], storage)
    assert done.returncode == 2 and done.stderr.startswith("error: settings file") and "does not parse" in done.stderr and "hacked" not in done.stdout
    (tmp_path / "p.yaml").write_text("storage_path: /etc\n")
    done = run_study(["--config", str(tmp_path / "p.yaml")], storage)
    assert done.returncode == 2 and "'storage_path'" in done.stderr
    assert list(storage.iterdir()) == []


def test_searched_key_in_config_is_refused(tmp_path):
    storage = tmp_path / "studies"
    storage.mkdir()
    (tmp_path / "c.json").write_text('{"config": {"lambda_ce": 0.3}}')
    done = run_study(["--config", str(tmp_path / "c.json"), "--space", "paper"], storage)
    assert done.returncode == 2 and "lambda_ce" in done.stderr and "searched" in done.stderr


def test_a_new_study_never_joins_an_existing_experiment_or_a_changed_space(tmp_path):
    import json

    from tracking import mlflow_log

    storage = tmp_path / "studies"
    storage.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_log.ensure_experiment(uri, "bad")
    done = run_study(["--mlflow-uri", uri], storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "already has an experiment 'bad'" in done.stderr and "--resume" in done.stderr
    assert list(storage.iterdir()) == []

    folder = storage / "bad"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps({"settings": {"space": "tiny"}, "mlflow_uri": uri,
                                                    "space_fingerprint": "0123456789abcdef"}))
    done = run_study(["--resume"], storage)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "space 'tiny' changed since study 'bad' started (fingerprint 0123456789abcdef" in done.stderr
