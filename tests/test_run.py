"""`python -m atop.run` end to end on the `tiny` preset: what its metrics.json and printed lines say
about how the figures were obtained (the real command, in a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from attack_fixtures import DATA_DIR, need_data

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
    assert metrics["budget"] == {"level": "screen", "steps": 10, "eot": 2, "queries": 100, "repeats": 1}
    assert metrics["split"] == "test" and metrics["n_eval"] == 8 and metrics["config"]["eval_level"] == "screen"
    for name in ("clean_acc", "robust_acc_seen", "robust_acc_unseen", "robust_acc/fgsm_linf"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"]
        assert metrics[f"{name}_majority"] == metrics[name]  # one draw
        assert f"{name}_majority" in metrics["baseline_before_finetune"]
    assert {"eps", "norm", "eot", "steps", "repeats", "level"} <= set(metrics["attacks"]["pgd_linf"])
