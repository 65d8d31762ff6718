"""Security promises checked here, most without running services (the services of the slow tests are
checked where they run: the driver-kill test checks a whole study's sockets, the node test the Ray
head's, the MLflow-outage test the MLflow server's; see docs/RELIABILITY.md).

- checkpoints load with `torch.load(..., weights_only=True)`, arrays with `np.load(allow_pickle=False)`;
- settings and config files parse with `yaml.safe_load` (or JSON), never `yaml.load`/`unsafe_load`;
- a malicious checkpoint (a pickle that would run code) is refused without running it;
- nothing from a settings file or a run can point outside the study folder: paths are command-line
  only, study and preset names are plain names, trial folders and spool files are named by numbers;
- the driver's embedded Ray listens on 127.0.0.1 only (started here, its sockets listed; slow tier).
"""
from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    LOOPBACK,
    REPO,
    listening,
    service_env,
    session_procs,
    stop_study,
    wait_for,
)

PACKAGES = ("atop", "trainables", "study", "analysis", "search_spaces", "bench")


def _calls(name: str):
    """(file, call node) of every call to `<anything>.name(...)` in the project's packages."""
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                    base = node.func.value
                    yield path.relative_to(REPO), base.id if isinstance(base, ast.Name) else "", node


def _kw(node: ast.Call, key: str):
    for kw in node.keywords:
        if kw.arg == key:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_torch_and_numpy_loads_run_no_code():
    torch_loads = [(p, n) for p, base, n in _calls("load") if base == "torch"]
    assert torch_loads, "expected the checkpoint loader"
    assert [(str(p), n.lineno) for p, n in torch_loads if _kw(n, "weights_only") is not True] == []
    np_loads = [(p, n) for p, base, n in _calls("load") if base == "np"]
    assert [(str(p), n.lineno) for p, n in np_loads if _kw(n, "allow_pickle") is not False] == []


def test_yaml_is_parsed_safely():
    unsafe = [(str(p), n.lineno) for attr in ("load", "unsafe_load", "full_load", "load_all")
              for p, base, n in _calls(attr) if base == "yaml"]
    assert unsafe == []
    assert any(base == "yaml" for _, base, _ in _calls("safe_load"))


def test_a_pickled_payload_is_refused_without_running(tmp_path):
    from atop.checkpoint import load_checkpoint
    from atop.checkpoint_file import CheckpointError

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import torch

    torch.save({"format": "atop-checkpoint", "version": 1, "kind": "defense", "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt", kind="defense")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl", kind="defense")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "a/b", "/etc", ".hidden", "x" * 101, "a b"])
def test_study_and_preset_names_cannot_leave_their_folder(name):
    from study.args import NAME_RE
    from study.errors import StudyError
    from study.settings import load_preset

    assert not NAME_RE.match(name)
    with pytest.raises(StudyError, match="accepted"):
        load_preset(name)


def test_settings_files_cannot_hold_paths():
    from study.errors import StudyError
    from study.settings import StudySettings, merge

    for key in ("storage_path", "data_dir", "mlflow_uri", "study_name", "folder"):
        with pytest.raises(StudyError, match=repr(key)):
            merge(StudySettings(), {key: "/etc"}, "a test file")


def test_trial_folders_and_spools_are_named_by_numbers():
    from types import SimpleNamespace

    from study.phases import _trial_name

    trial = SimpleNamespace(config={"optuna_trial_number": 7, "rt": "../../x"}, trial_id="abc_00001")
    assert _trial_name(trial) == "trial-0007-abc_00001"
    from trainables.atop_trainable import spool_file

    assert spool_file("search", 7, 3) == "trial-0007.jsonl"  # the spool file: the trial number, an int
    assert spool_file("confirm", 7, 3) == "confirm-0007-seed3.jsonl"
    with pytest.raises(ValueError):
        spool_file("search", "../../x", 0)  # type: ignore[arg-type]


#: the driver's own Ray start-up (`study.cluster.init_ray`, as `study/run.py` calls it), one task run so a
#: worker is up too; then it waits for its stdin to close before shutting Ray down
_EMBEDDED_RAY = """
import sys
from study.cluster import init_ray
init_ray(1, 0)
import ray
ray.get(ray.remote(num_cpus=0)(lambda: 1).remote())
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""


@pytest.mark.slow  # Ray's start-up: ~10 s on 2 cores
def test_the_embedded_ray_listens_on_loopback_only(tmp_path):
    """Every TCP socket the driver's embedded Ray opens (driver, GCS, raylet, agents, a worker)
    listens on 127.0.0.1: binding 0.0.0.0 or the machine's address fails here."""
    env = service_env()
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # what the code sets, not the shell
        env.pop(name, None)
    log = tmp_path / "ray.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _EMBEDDED_RAY], stdin=subprocess.PIPE, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    try:
        wait_for(lambda: "ready" in log.read_text(), 120, "the embedded Ray to start", every_s=0.5, proc=proc)
        addresses = listening({p.pid for p in session_procs(proc.pid)})
        proc.stdin.close()  # Ray shuts down
        proc.wait(timeout=60)
    finally:
        stop_study(proc)  # whatever of its session is left, by PID
    assert addresses, log.read_text()[-3000:]
    assert all(ip in LOOPBACK for ip, *_ in addresses), addresses
