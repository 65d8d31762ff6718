"""The bad-input table: every command-line entry point refuses bad input the same way.

Each row calls one CLI's `main([...])` in this process (`atop.run`, `atop.evaluate`,
`study/run.py`, `analysis`) with one bad input and checks:

- exit status 2;
- stderr's last non-empty line starts with `error:` and it is the only such line (one line, no
  traceback);
- that line names the bad value (and, where there is a closed set or a range, what is accepted);
- nothing is left behind (the `--out` folder or the study folder stays empty) and Ray never starts.

In-process, because a subprocess per row proves nothing more than one per CLI does: the last test
runs each CLI as a real process once (its `__main__` turns `main`'s 2 into the exit status), and
tests/test_refusal.py runs its cases in fresh interpreters to check what refusing imports.
tests/test_evaluate.py and tests/test_analysis_cli.py keep the cases that need their own fixtures.
"""
from __future__ import annotations

import functools
import json
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, data_dir, free_port
from tracking.contract import PARENT_TAG, ROLE_TAG, Role


@dataclass
class Case:
    cli: str  # "run", "evaluate", "study", "analysis"
    args: list[str]  # "{tmp}", "{data}", "{ckpt}", "{other}", "{store}", "{foreign}", "{port}" are filled in
    needles: list[str]  # each must appear in the error line
    files: dict[str, str] = field(default_factory=dict)  # name -> text, written into tmp first


CASES: dict[str, Case] = {
    # --- python -m atop.run ----------------------------------------------------------------------
    "run: unknown preset": Case("run", ["--preset", "huge"], ["'huge'", "accepted", "smoke"]),
    "run: unknown config key": Case("run", ["--set", "lamda_ce=0.1"], ["lamda_ce"]),
    "run: out-of-range number": Case("run", ["--set", "lr=5"], ["lr", "5"]),
    "run: unknown enum value": Case("run", ["--set", "rt=rt9"], ["rt9", "rt1"]),
    "run: not key=value": Case("run", ["--set", "epochs"], ["'epochs'", "key=value"]),
    "run: config file with unknown keys": Case("run", ["--config", "{tmp}/c.yaml"], ["lamda"],
                                               {"c.yaml": "lamda: 0.1\nepochs: 1\n"}),
    "run: unsafe YAML tag": Case("run", ["--config", "{tmp}/u.yaml"], ["u.yaml"],
                                 {"u.yaml": "!!python/object/apply:os.system ['echo pwned']\n"}),
    "run: unknown evaluation level": Case("run", ["--level", "quick"], ["'quick'", "screen", "full"]),
    "run: missing data dir": Case("run", ["--preset", "tiny", "--data-dir", "{tmp}/no-data"], ["no-data"]),
    "run: unreadable data file": Case("run", ["--preset", "tiny", "--data-dir", "{tmp}/junk"], ["cifar10_train.npz"],
                                      {"junk/cifar10_train.npz": "not an npz", "junk/cifar10_test.npz": "nope"}),
    # --- python -m atop.evaluate -----------------------------------------------------------------
    "evaluate: missing checkpoint": Case("evaluate", ["--checkpoint", "{tmp}/none.pt"], ["none.pt", "does not exist"]),
    "evaluate: truncated checkpoint": Case("evaluate", ["--checkpoint", "{tmp}/truncated.pt"], ["truncated.pt", "corrupt"]),
    "evaluate: checkpoint of another model": Case("evaluate", ["--checkpoint", "{other}"], ["other.pt", "do not fit"]),
    "evaluate: checkpoint of another kind": Case("evaluate", ["--checkpoint", "{tmp}/clf.pt"], ["'classifier'", "'defense'"]),
    "evaluate: unknown attack": Case("evaluate", ["--checkpoint", "{ckpt}", "--attacks", "pgd_linf2"],
                                     ["pgd_linf2", "accepted"]),
    "evaluate: zero images": Case("evaluate", ["--checkpoint", "{ckpt}", "--n-images", "0"], ["--n-images=0", ">= 1"]),
    "evaluate: negative eps": Case("evaluate", ["--checkpoint", "{ckpt}", "--eps-linf", "-1"], ["--eps-linf=-1", ">= 0"]),
    "evaluate: missing data dir": Case("evaluate", ["--checkpoint", "{ckpt}", "--data-dir", "{tmp}/no-data"],
                                       ["no-data"]),
    # --- python study/run.py ---------------------------------------------------------------------
    "study: unknown option": Case("study", ["--frobnicate", "3"], ["--frobnicate"]),
    "study: unknown space": Case("study", ["--space", "nope"], ["'nope'", "paper", "wide", "tiny"]),
    "study: unknown sampler": Case("study", ["--sampler", "cmaes"], ["'cmaes'", "nsga2", "tpe", "gp", "random"]),
    "study: unknown preset": Case("study", ["--preset", "huge"], ["'huge'", "smoke"]),
    "study: zero trials": Case("study", ["--num-trials", "0"], ["--num-trials", "0", ">= 1"]),
    "study: zero CPUs": Case("study", ["--cpus", "0"], ["--cpus", "0", "> 0"]),
    "study: zero concurrency": Case("study", ["--max-concurrent", "0"], ["--max-concurrent", "0", ">= 1"]),
    "study: bad config value": Case("study", ["--epochs", "-1"], ["epochs=-1", "accepted"]),
    "study: no configuration to confirm": Case("study", ["--confirm-top", "0"],
                                               ["--confirm-top", "0", ">= 1", "--no-confirm"]),
    "study: no confirm seed": Case("study", ["--confirm-seeds", "0"], ["--confirm-seeds", "0", ">= 1"]),
    "study: constraint on an unknown metric": Case("study", ["--constraint", "unknown_metric>=1"],
                                                   ["'unknown_metric'", "clean_acc"]),
    "study: a plateau of zero trials": Case("study", ["--stop-on-plateau", "0,x"],
                                            ["--stop-on-plateau", "'0,x'", "K,EPS", ">= 1"]),
    "study: a negative time budget": Case("study", ["--time-budget", "-1"], ["--time-budget", "-1", "hours > 0"]),
    "study: settings file with unknown keys": Case("study", ["--config", "{tmp}/s.yaml"], ["'trials'", "num_trials"],
                                                   {"s.yaml": "trials: 3\n"}),
    "study: unknown config key in a settings file": Case("study", ["--config", "{tmp}/c.yaml"], ["'lamda_ce'"],
                                                         {"c.yaml": "num_trials: 3\nconfig: {lamda_ce: 0.1}\n"}),
    "study: searched key in a settings file": Case("study", ["--config", "{tmp}/c.json", "--space", "paper"],
                                                   ["lambda_ce", "searched"], {"c.json": '{"config": {"lambda_ce": 0.3}}'}),
    "study: path in a settings file": Case("study", ["--config", "{tmp}/p.json"], ["'storage_path'"],
                                           {"p.json": '{"storage_path": "/etc"}'}),
    "study: unsafe YAML tag": Case("study", ["--config", "{tmp}/u.yaml"], ["settings file", "does not parse"],
                                   {"u.yaml": "!!python/object/apply:os.system ['echo pwned']\n"}),
    "study: unreadable settings file": Case("study", ["--config", "{tmp}/absent.yaml"], ["absent.yaml"]),
    "study: more validation images than the train split": Case("study", ["--config", "{tmp}/v.yaml"],
                                                               ["n_eval", "60000"], {"v.yaml": "config: {n_eval: 60000}\n"}),
    "study: confirm_config sets a training field": Case("study", ["--config", "{tmp}/c.yaml"],
                                                        ["'epochs'", "eval_level, n_eval"],
                                                        {"c.yaml": "confirm_config: {epochs: 9}\n"}),
    "study: confirm_config with too many test images": Case("study", ["--config", "{tmp}/t.yaml"],
                                                            ["n_eval=20000", "1..10000"],
                                                            {"t.yaml": "confirm_config: {n_eval: 20000}\n"}),
    "study: name escaping the study folder": Case("study", ["--study-name", "../escape"], ["'../escape'", "accepted"]),
    "study: resume of a missing study": Case("study", ["--resume"], ["no study 'bad'"]),
    "study: warm start from a missing study": Case("study", ["--warm-start", "nosuch"],
                                                   ["--warm-start 'nosuch'", "no study of that name"]),
    "study: missing data dir": Case("study", ["--data-dir", "/nonexistent/atop-data"], ["/nonexistent/atop-data"]),
    "study: data dir without the data": Case("study", ["--data-dir", "{tmp}/empty"], ["cifar10"], {"empty/.keep": ""}),
    "study: unreachable tracking URI": Case("study", ["--mlflow-uri", "http://127.0.0.1:{port}"],
                                            ["127.0.0.1:{port}", "unreachable"]),
    "study: relative sqlite": Case("study", ["--mlflow-uri", "sqlite:///mlflow.db"], ["absolute"]),
    "study: unreachable optuna storage": Case("study", ["--optuna-storage", "postgresql://atop@127.0.0.1:{port}/optuna"],
                                              ["--optuna-storage", "127.0.0.1", "unreachable"]),
    "study: optuna storage of another kind": Case("study", ["--optuna-storage", "redis://127.0.0.1/0"],
                                                  ["'redis'", "postgresql"]),
    "study: enqueue an unknown parameter": Case("study", ["--enqueue", "{tmp}/e1.yaml"],
                                                ["e1.yaml", "'lamda'", "accepted", "lambda_ce"],
                                                {"e1.yaml": "- {rt: rt2, lambda_ce: 0.1, lamda: 3}\n"}),
    "study: enqueue a value outside the space": Case("study", ["--enqueue", "{tmp}/e2.yaml"],
                                                     ["e2.yaml", "'rt9'", "rt1, rt2, rt3"],
                                                     {"e2.yaml": "- {rt: rt9, lambda_ce: 0.1}\n"}),
    "study: enqueue more references than trials": Case(
        "study", ["--enqueue", "{tmp}/e3.yaml", "--num-trials", "1"], ["--num-trials 1", "2 reference configurations"],
        {"e3.yaml": "- {rt: rt2, lambda_ce: 0.1}\n- {rt: rt1, lambda_ce: 0.1}\n"}),
    "study: corrupt pretrained classifier": Case("study", ["--pretrained", "{tmp}/corrupt"],
                                                 ["corrupt/classifier.pt", "expected"],
                                                 {"corrupt/classifier.pt": "PK\x03\x04 not really a zip"}),
    "study: pretrained state dict of another model": Case("study", ["--pretrained", "{foreign}"],
                                                          ["foreign/classifier.pt", "small_cnn"]),
    "study: no pretrained folder": Case("study", ["--pretrained", "{tmp}/absent"], ["absent", "classifier.pt"]),
    # --- python -m analysis ----------------------------------------------------------------------
    "analysis: unknown experiment": Case("analysis", ["--mlflow-uri", "{store}", "--experiment", "nope"], ["'nope'"]),
    "analysis: empty experiment": Case("analysis", ["--mlflow-uri", "{store}", "--experiment", "empty"], ["'empty'"]),
    "analysis: unknown objective": Case("analysis", ["--mlflow-uri", "{store}", "--experiment", "one",
                                                     "--objectives", "clean_acc", "robust_acc_sen"], ["robust_acc_sen"]),
    "analysis: reference point of the wrong length": Case(
        "analysis", ["--mlflow-uri", "{store}", "--experiment", "one", "--ref-point", "0", "0"], ["ref"]),
    "analysis: unreachable tracking URI": Case("analysis", ["--mlflow-uri", "http://127.0.0.1:{port}",
                                                            "--experiment", "one"], ["127.0.0.1:{port}"]),
}

#: what every row of a CLI passes besides its own arguments ("{out}": the output that must stay empty)
BASE = {
    "run": ["--out", "{out}"],
    "evaluate": ["--out", "{out}", "--level", "screen", "--data-dir", "{data}"],
    "study": ["--storage-path", "{out}", "--study-name", "bad", "--data-dir", "{data}"],  # the default preset
    "analysis": ["--out", "{out}"],
}
#: each CLI as a process, for the one test per CLI that checks the real exit status
PROCESS = {
    "run": [sys.executable, "-m", "atop.run"],
    "evaluate": [sys.executable, "-m", "atop.evaluate"],
    "study": [sys.executable, str(REPO / "study" / "run.py")],
    "analysis": [sys.executable, "-m", "analysis"],
}


@functools.cache
def entry_point(cli: str) -> Callable[[list[str]], int]:
    """The CLI's `main` (study/run.py is a script: loaded under another name, so it does not run)."""
    if cli == "study":
        return runpy.run_path(str(REPO / "study" / "run.py"), run_name="study_run")["main"]
    module = {"run": "atop.run", "evaluate": "atop.evaluate", "analysis": "analysis.__main__"}[cli]
    return __import__(module, fromlist=["main"]).main


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    """A valid defense checkpoint, one of another model, a classifier checkpoint, an MLflow store, a
    folder whose classifier.pt is a state dict of another model."""
    import torch
    from mlflow import MlflowClient

    from atop.checkpoint import save_checkpoint
    from atop.config import Config
    from atop.models import CLASSIFIERS, UNetPurifier

    root = tmp_path_factory.mktemp("bad-input")
    cfg = Config.from_dict({"purifier": "unet", "purifier_width": 4, "classifier": "small_cnn", "n_eval": 4})
    ckpt = save_checkpoint(root / "defense.pt", kind="defense", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10),
                           purifier=UNetPurifier(4))
    other = save_checkpoint(root / "other.pt", kind="defense", cfg=cfg.replace(purifier_width=8),
                            classifier=CLASSIFIERS["small_cnn"](10), purifier=UNetPurifier(4))
    clf = save_checkpoint(root / "clf.pt", kind="classifier", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("empty", artifact_location=(root / "a-empty").as_uri())
    one = client.create_experiment("one", artifact_location=(root / "a-one").as_uri())
    parent = client.create_run(one, tags={ROLE_TAG: Role.STUDY.value}).info.run_id
    for trial in range(3):
        run = client.create_run(one, tags={ROLE_TAG: Role.TRIAL.value, PARENT_TAG: parent,
                                           "optuna.trial_number": str(trial)}).info.run_id
        client.log_param(run, "rt", "rt1")
        for m, v in (("clean_acc", 0.5 + trial / 10), ("robust_acc_seen", 0.4 - trial / 10), ("robust_acc_unseen", 0.2)):
            client.log_metric(run, m, v, step=1)
        client.set_terminated(run, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    (root / "foreign").mkdir()
    torch.save({"foo": torch.zeros(3)}, root / "foreign" / "classifier.pt")
    return {"foreign": str(root / "foreign"), "ckpt": str(ckpt), "other": str(other), "clf": str(clf), "store": uri, "truncated": ckpt.read_bytes()}


KNOWN_GAPS: dict[str, str] = {}  # case name -> why it fails today (strict xfail: fixing it shows)


def fill_in(case: Case, artifacts: dict, tmp_path: Path) -> tuple[list[str], Callable[[str], str], Path]:
    """Write the case's files and the per-test copies of the artifacts; returns (argv, fill, out)."""
    (tmp_path / "truncated.pt").write_bytes(artifacts["truncated"][: len(artifacts["truncated"]) // 2])
    (tmp_path / "clf.pt").write_bytes(Path(artifacts["clf"]).read_bytes())
    for rel, text in case.files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    out = tmp_path / "out"
    values = {"tmp": str(tmp_path), "data": str(data_dir()), "out": str(out), "port": str(free_port()),
              **{k: v for k, v in artifacts.items() if isinstance(v, str)}}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text

    return [fill(a) for a in BASE[case.cli] + case.args], fill, out


def assert_refused(name: str, code: object, stdout: str, stderr: str, needles: list[str], out: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, f"{name}: exit {code!r}; {stderr[-2000:]}"
    assert lines and lines[-1].startswith("error:"), stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in stderr and "pwned" not in stdout
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True))
                                  if n in KNOWN_GAPS else n for n in CASES])
def test_bad_input_is_refused_in_one_line(name, artifacts, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    argv, fill, out = fill_in(case, artifacts, tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative path a CLI might write lands here, where the check sees it
    try:
        code = entry_point(case.cli)(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    captured = capsys.readouterr()
    assert_refused(name, code, captured.out, captured.err, [fill(n) for n in case.needles], out)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), f"{name}: Ray was started before refusing"


@pytest.mark.parametrize("cli", list(PROCESS))
def test_each_cli_as_a_process_exits_2_with_one_line(cli, artifacts, tmp_path):
    name = next(n for n, c in CASES.items() if c.cli == cli and not c.files)
    argv, fill, out = fill_in(CASES[name], artifacts, tmp_path)
    done = subprocess.run(PROCESS[cli] + argv, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert_refused(name, done.returncode, done.stdout, done.stderr, [fill(n) for n in CASES[name].needles], out)


def test_the_table_covers_every_cli():
    by_cli = {cli: sum(c.cli == cli for c in CASES.values()) for cli in BASE}
    assert len(CASES) >= 20 and all(n >= 4 for n in by_cli.values()), by_cli


def test_a_new_study_never_joins_an_existing_experiment_or_a_changed_space(tmp_path, capsys):
    from tracking import mlflow_log

    storage = tmp_path / "studies"
    storage.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_log.ensure_experiment(uri, "bad")
    argv = ["--storage-path", str(storage), "--study-name", "bad", "--data-dir", str(data_dir())]
    captured = capsys.readouterr()  # the store's own set-up lines above are not the CLI's
    code = entry_point("study")([*argv, "--mlflow-uri", uri])
    captured = capsys.readouterr()
    assert_refused("existing experiment", code, captured.out, captured.err,
                   ["already has an experiment 'bad'", "--resume"], storage)

    folder = storage / "bad"
    folder.mkdir()
    (folder / "study.json").write_text(json.dumps({"settings": {"space": "tiny"}, "mlflow_uri": uri,
                                                    "space_fingerprint": "0123456789abcdef"}))
    code = entry_point("study")([*argv, "--resume"])
    captured = capsys.readouterr()
    assert_refused("changed space", code, captured.out, captured.err,
                   ["space 'tiny' changed since study 'bad' started (fingerprint 0123456789abcdef"], tmp_path / "none")
