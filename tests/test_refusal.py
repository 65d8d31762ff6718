"""Bad input is refused before the heavy imports and before Ray starts, checked by what was imported.

Each case calls one CLI's `main([...])` in a fresh interpreter (`python -c`), catches its exit and
prints which of torch, ray, mlflow and optuna are in `sys.modules` and whether Ray was started.
A case names the heavy modules its check genuinely needs (none needs torch: a checkpoint that is no
torch file is refused by its outside, `atop.checkpoint_file`; learning what a search space searches
runs it on an Optuna trial; an MLflow store is read with MLflow; a registry's names are in
`atop.names`, without torch);
no case may import more, and no case may start Ray. tests/test_bad_input.py checks the messages;
this file checks what refusing costs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, data_dir, free_port

HEAVY = ("mlflow", "optuna", "ray", "torch")
OPTUNA = frozenset({"optuna"})  # a check that runs a search space on a trial, or reads an Optuna storage
MLFLOW = frozenset({"mlflow"})

#: how each CLI's `main` is reached without running anything else (study/run.py is a script)
LOADERS = {
    "study": f"import runpy; main = runpy.run_path({str(REPO / 'study' / 'run.py')!r}, run_name='study_run')['main']",
    "run": "from atop.run import main",
    "evaluate": "from atop.evaluate import main",
    "analysis": "from analysis.__main__ import main",
}
BASE = {
    "study": ["--storage-path", "{tmp}/studies", "--study-name", "bad", "--preset", "tiny", "--data-dir", "{data}"],
    "run": ["--out", "{tmp}/out", "--preset", "tiny", "--data-dir", "{data}"],
    "evaluate": ["--out", "{tmp}/out", "--level", "screen", "--data-dir", "{data}"],
    "analysis": ["--out", "{tmp}/out"],
}
PROBE = """
import json, sys
{loader}
try:
    code = main({args!r})
except SystemExit as exc:
    code = exc.code
ray = sys.modules.get("ray")
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules),
                  "ray_started": bool(ray is not None and ray.is_initialized())}}))
"""


@dataclass(frozen=True)
class Case:
    cli: str
    args: list[str]
    needs: frozenset[str] = frozenset()  # heavy modules this check genuinely needs
    files: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # --- python study/run.py
    "study: unknown option": Case("study", ["--frobnicate", "3"]),
    "study: name escaping the study folder": Case("study", ["--study-name", "../escape"]),
    "study: resume of a missing study": Case("study", ["--resume"]),
    "study: missing data dir": Case("study", ["--data-dir", "{tmp}/no-data"]),
    "study: unreachable tracking URI": Case("study", ["--mlflow-uri", "http://127.0.0.1:{port}"]),
    "study: relative sqlite": Case("study", ["--mlflow-uri", "sqlite:///mlflow.db"]),
    "study: unreadable config file": Case("study", ["--config", "{tmp}/absent.yaml"]),
    "study: missing enqueue file": Case("study", ["--enqueue", "{tmp}/absent.yaml"]),
    "study: missing pretrained folder": Case("study", ["--pretrained", "{tmp}/absent"]),
    "study: GPUs this machine lacks": Case("study", ["--gpus", "1"]),
    "study: optuna storage of another kind": Case("study", ["--optuna-storage", "redis://127.0.0.1/0"]),
    # the settings' checks (study.settings): names, keys and values need neither torch nor Optuna
    "study: unknown preset": Case("study", ["--preset", "huge"]),
    "study: unknown space": Case("study", ["--space", "nope"]),
    "study: unknown sampler": Case("study", ["--sampler", "cmaes"]),
    "study: unknown scheduler": Case("study", ["--scheduler", "hyperband"]),
    "study: unknown settings key": Case("study", ["--config", "{tmp}/s.yaml"], files={"s.yaml": "frobnicate: 1\n"}),
    "study: unknown pretrain key": Case("study", ["--config", "{tmp}/s.yaml"], files={"s.yaml": "pretrain: {x: 1}\n"}),
    "study: bad pretrain value": Case("study", ["--config", "{tmp}/s.yaml"],
                                      files={"s.yaml": "pretrain: {purifier_rts: rt9}\n"}),
    "study: unknown config key": Case("study", ["--config", "{tmp}/s.yaml"], files={"s.yaml": "config: {x: 1}\n"}),
    "study: bad config value": Case("study", ["--epochs", "-1"]),
    "study: unknown classifier": Case("study", ["--config", "{tmp}/s.yaml"],
                                      files={"s.yaml": "config: {classifier: vgg}\n"}),
    "study: unknown unseen attack": Case("study", ["--config", "{tmp}/s.yaml"],
                                         files={"s.yaml": "config: {unseen_attacks: pgd_linf2}\n"}),
    "study: out-of-range trial count": Case("study", ["--num-trials", "0"]),
    "study: constraint on an unknown metric": Case("study", ["--constraint", "speed>=1"]),
    "study: unknown confirm_config key": Case("study", ["--config", "{tmp}/s.yaml"],
                                              files={"s.yaml": "confirm_config: {lr: 1}\n"}),
    # these run the space on an Optuna trial (what it searches is learnt by running it) or sit in
    # study.stopping, which the search shares (Optuna); none needs torch
    "study: config key the space searches": Case("study", ["--config", "{tmp}/s.yaml"], OPTUNA,
                                                 {"s.yaml": "config: {lambda_ce: 0.1}\n"}),
    "study: grace period past the last epoch": Case("study", ["--scheduler", "mo-asha", "--grace-period", "9"], OPTUNA),
    "study: negative time budget": Case("study", ["--time-budget", "-1"], OPTUNA),
    "study: plateau of zero trials": Case("study", ["--stop-on-plateau", "0,x"], OPTUNA),
    "study: enqueue a value outside the space": Case("study", ["--enqueue", "{tmp}/e.yaml"], OPTUNA,
                                                     {"e.yaml": "- {rt: rt9, lambda_ce: 0.1}\n"}),
    # a file that is no torch file (atop.checkpoint_file) is refused without torch (after the space's checks: Optuna)
    "study: corrupt pretrained classifier": Case("study", ["--pretrained", "{tmp}/corrupt"], OPTUNA,
                                                 {"corrupt/classifier.pt": "PK\x03\x04 not really a zip"}),
    "study: corrupt pretrain.classifier_checkpoint": Case(
        "study", ["--config", "{tmp}/s.yaml"], OPTUNA,
        {"s.yaml": "pretrain: {classifier_checkpoint: c.pt}\n", "c.pt": "PK\x03\x04 not really a zip"}),
    # --- python -m atop.run
    "run: unknown option": Case("run", ["--frobnicate"]),
    "run: unknown evaluation level": Case("run", ["--level", "quick"]),
    "run: not key=value": Case("run", ["--set", "epochs"]),
    "run: out is a file": Case("run", ["--out", "{tmp}/file"], files={"file": "x"}),
    "run: unsafe YAML tag": Case("run", ["--config", "{tmp}/u.yaml"],
                                 files={"u.yaml": "!!python/object/apply:os.system ['echo pwned']\n"}),
    "run: missing data dir": Case("run", ["--data-dir", "{tmp}/no-data"]),
    "run: unknown preset": Case("run", ["--preset", "huge"]),
    "run: bad config value": Case("run", ["--set", "epochs=-1"]),
    "run: unknown attack in the config": Case("run", ["--set", "unseen_attacks=pgd_linf2"]),
    # --- python -m atop.evaluate
    "evaluate: missing checkpoint": Case("evaluate", ["--checkpoint", "{tmp}/none.pt"]),
    "evaluate: zero images": Case("evaluate", ["--checkpoint", "{tmp}/none.pt", "--n-images", "0"]),
    "evaluate: negative eps": Case("evaluate", ["--checkpoint", "{tmp}/none.pt", "--eps-linf", "-1"]),
    "evaluate: out in the way": Case("evaluate", ["--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/file"],
                                     files={"file": "x"}),
    "evaluate: missing data dir": Case("evaluate", ["--checkpoint", "{tmp}/none.pt", "--data-dir", "{tmp}/no"]),
    "evaluate: unknown attack": Case("evaluate", ["--checkpoint", "{tmp}/c.pt", "--attacks", "pgd_linf2"],
                                     files={"c.pt": "x"}),
    "evaluate: corrupt checkpoint": Case("evaluate", ["--checkpoint", "{tmp}/c.pt"],
                                         files={"c.pt": "PK\x03\x04 not really a zip"}),
    "evaluate: checkpoint of another format": Case("evaluate", ["--checkpoint", "{tmp}/c.pt"],
                                                   files={"c.pt": "\x89PNG\r\n\x1a\n not a checkpoint"}),
    # --- python -m analysis
    "analysis: unknown option": Case("analysis", ["--frobnicate", "--mlflow-uri", "x", "--experiment", "e"]),
    "analysis: too few resamples": Case("analysis", ["--mlflow-uri", "x", "--experiment", "e", "--resamples", "9"]),
    "analysis: reference point of the wrong length": Case(
        "analysis", ["--mlflow-uri", "sqlite:///{tmp}/m.db", "--experiment", "e", "--ref-point", "0", "0"]),
    "analysis: unreachable tracking URI": Case("analysis", ["--mlflow-uri", "http://127.0.0.1:{port}",
                                                            "--experiment", "e"]),
    "analysis: an empty file as the store": Case("analysis", ["--mlflow-uri", "sqlite:///{tmp}/m.db",
                                                              "--experiment", "e"], files={"m.db": ""}),
    "analysis: unknown experiment": Case("analysis", ["--mlflow-uri", "{store}", "--experiment", "e"],
                                         MLFLOW),  # only the store knows its experiments
}


def machine_has_gpu() -> bool:
    from study.devices import visible_gpus

    return visible_gpus() > 0


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow sqlite store that holds no experiment but MLflow's own `Default`."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    names = [e.name for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()]
    assert names == ["Default"], names
    return uri


def probe(case: Case, tmp: Path, store: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run the case (`store`: what "{store}" means); returns (what the probe printed, the finished process)."""
    for rel, text in case.files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    values = {"{tmp}": str(tmp), "{data}": str(data_dir()), "{port}": str(free_port()), "{store}": store}

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace(key, value)
        return text

    args = [fill(a) for a in [*BASE[case.cli], *case.args]]
    code = textwrap.dedent(PROBE).format(loader=LOADERS[case.cli], args=args, heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # the --gpus case is about this machine, not a cluster's
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp,
                          env=env, check=False)
    return json.loads(done.stdout.strip().splitlines()[-1]), done


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_before_heavy_imports_and_ray(name: str, tmp_path: Path, mlflow_store: str) -> None:
    case = CASES[name]
    if name == "study: GPUs this machine lacks" and machine_has_gpu():
        pytest.skip("this machine has a GPU")
    seen, done = probe(case, tmp_path, mlflow_store)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert seen["code"] == 2 and len(errors) == 1, done.stderr[-2000:]
    assert not seen["ray_started"], errors
    assert set(seen["heavy"]) <= case.needs, f"{name}: imported {seen['heavy']} before refusing ({errors[0]})"
    assert "weights_only=False" not in errors[0]  # never advise unsafe loading of a file one does not trust


def test_every_cli_has_cases_that_need_no_heavy_import() -> None:
    light = {cli: sum(c.cli == cli and not c.needs for c in CASES.values()) for cli in LOADERS}
    assert all(n >= 4 for n in light.values()), light
