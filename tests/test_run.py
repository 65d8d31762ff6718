"""`python -m atop.run` end to end on the `tiny` preset: what its metrics.json and printed lines say
about how the figures were obtained (the real command, in a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from attack_fixtures import DATA_DIR, need_data

from tracking.contract import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]
LABEL = "screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 8 test images"


def test_screen_run_labels_its_figures_as_screening(tmp_path: Path) -> None:
    need_data()
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "atop.run", "--preset", "tiny", "--level", "screen", "--out", str(out),
                           "--data-dir", str(DATA_DIR), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"final ({LABEL}): clean_acc" in done.stdout and f"before fine-tuning ({LABEL})" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluation"] == LABEL and metrics["screening"] is True and metrics["level"] == "screen"
    assert metrics["budget"] == {"level": "screen", "steps": 10, "eot": 2, "queries": 100, "repeats": 1,
                                 "precision": "fp32"}
    assert metrics["split"] == "test" and metrics["n_eval"] == 8 and metrics["config"]["eval_level"] == "screen"
    for name in (*OBJECTIVES, "robust_acc/fgsm_linf"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"]
        assert metrics[f"{name}_majority"] == metrics[name]  # one draw
        assert f"{name}_majority" in metrics["baseline_before_finetune"]
    assert {"eps", "norm", "eot", "steps", "repeats", "level"} <= set(metrics["attacks"]["pgd_linf"])


def test_bad_input_is_one_line_and_leaves_no_out_folder(tmp_path: Path, capsys) -> None:
    from atop.run import main

    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cifar10_train.npz").write_bytes(b"PK\x03\x04 truncated zip")
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    cases = [(["--out", str(tmp_path / "a-file")], ["a-file", "is a file"]),
             (["--preset", "huge"], ["'huge'", "accepted"]),
             (["--set", "rt=rt9"], ["rt9", "rt1"]),
             (["--config", str(tmp_path / "bad.yaml")], ["bad.yaml"]),
             (["--preset", "tiny", "--data-dir", str(tmp_path / "junk")], ["cifar10_train.npz"])]
    for args, needles in cases:
        out = tmp_path / "run"
        assert main(["--out", str(out), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert all(n in err for n in needles), err
        assert not out.exists() and (tmp_path / "a-file").read_text() == "mine"
