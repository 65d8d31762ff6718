"""What a node checks before a cluster study starts (study.nodes), run here as the task runs it there.

The task on real nodes, one of them behind a dead proxy, is in tests/test_reliability_node.py.
"""
from __future__ import annotations

from pathlib import Path

from study.nodes import check_on_node, probe_folder
from tests.conftest import free_port


def test_a_file_store_is_probed_by_its_folder_or_the_storage_root_of_a_new_study(tmp_path: Path) -> None:
    existing = tmp_path / "mlflow"
    existing.mkdir()
    assert probe_folder(f"sqlite:///{existing}/mlflow.db", str(tmp_path)) == str(existing)
    assert probe_folder(f"sqlite:///{tmp_path}/new-study/mlflow.db", str(tmp_path)) == str(tmp_path)
    assert probe_folder(f"file://{existing}", None) == str(existing)
    assert probe_folder("http://127.0.0.1:5000", str(tmp_path)) is None


def test_the_node_task_says_why_its_trials_could_not_log(tmp_path: Path) -> None:
    assert check_on_node("sqlite:////x/mlflow.db", str(tmp_path)) is None
    assert check_on_node("sqlite:////x/mlflow.db", str(tmp_path / "absent")) == \
        f"folder {str(tmp_path / 'absent')!r} is not visible there"
    reason = check_on_node(f"http://127.0.0.1:{free_port()}", None)
    assert reason is not None and reason.startswith("is unreachable"), reason
