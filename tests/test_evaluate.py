"""evaluate(): levels, metric names, worst case, audit; and the `python -m atop.evaluate` CLI,
bad inputs included."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from attack_fixtures import DATA_DIR, eval_images, need_data, tiny_defense

from atop.checkpoint import save_checkpoint
from atop.config import Config, EvalLevel
from atop.evaluate import LEVELS, evaluate, main, seen_attack

ROOT = Path(__file__).resolve().parents[1]
CFG = Config.from_dict({"n_eval": 4, "batch_size": 4, "unseen_attacks": "pgd_l2,apgd_dlr_linf"})


def test_screen_stays_cheap_and_reports_the_objectives() -> None:
    assert LEVELS[EvalLevel.SCREEN]["steps"] == 10 and LEVELS[EvalLevel.SCREEN]["eot"] == 2
    assert LEVELS[EvalLevel.FULL]["steps"] == 100 and LEVELS[EvalLevel.FULL]["eot"] >= 20
    result = evaluate(tiny_defense(), eval_images(4), CFG, level="screen", steps=2)
    assert set(result.metrics) == {"clean_acc", "robust_acc_seen", "robust_acc_unseen", "robust_acc/pgd_linf",
                                   "robust_acc/pgd_l2", "robust_acc/apgd_dlr_linf"}
    assert all(0 <= v <= 1 for v in result.metrics.values())
    assert result.audit is None and result.budget["eot"] == 2 and result.budget["steps"] == 2
    assert result.settings[seen_attack(CFG)]["level"] == "screen"
    assert len(result.per_example["clean_correct"]) == 4


def test_full_runs_autoattack_and_the_audit_and_takes_the_worst_case() -> None:
    result = evaluate(tiny_defense(), eval_images(4), CFG, level="full", steps=1, eot=1, queries=4, repeats=2)
    m = result.metrics
    assert "robust_acc/autoattack_rand_linf" in m and result.audit is not None
    assert "gradient_masking_suspected" in result.audit["flags"]
    robust = [v for k, v in m.items() if k.startswith("robust_acc/")]
    assert m["worst_case_acc"] <= min(robust + [m["clean_acc"]]) + 1e-9
    assert "robust_acc/square_linf" in m and "robust_acc/bpda_linf" in m  # audit runs count too
    assert result.per_example["worst_case_correct_rate"].shape == (4,)
    assert set(result.std) >= {"clean_acc", "worst_case_acc"}


def test_unknown_attack_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(tiny_defense(), eval_images(4), CFG, attacks=["pgd_linf2"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    defense = tiny_defense()
    cfg = CFG.replace(purifier_width=4)
    path = tmp_path_factory.mktemp("ckpt") / "defense.pt"
    # the tiny SmallCNN(width 8) does not match the registry's small_cnn: embed it by state dict only
    # where it fits, so use the registry classifier here
    from atop.models import CLASSIFIERS

    return save_checkpoint(path, kind="defense", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10),
                           purifier=defense.purifier)


def test_cli_writes_eval_json_and_parquet(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    need_data()
    out = tmp_path / "eval"
    code = main(["--checkpoint", str(checkpoint), "--level", "full", "--n-images", "3", "--out", str(out),
                 "--data-dir", str(DATA_DIR), "--steps", "1", "--eot", "1", "--queries", "3", "--repeats", "2",
                 "--attacks", "cw_l2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "WEAKENED" in printed and "steps 1 < 100" in printed
    report = json.loads((out / "eval.json").read_text())
    assert report["n_images"] == 3 and report["level"] == "full"
    assert report["budget"] == {"level": "full", "steps": 1, "eot": 1, "queries": 3, "repeats": 2}
    assert report["weakened"]["eot"] == "1 < 20"
    assert {"pgd_linf", "pgd_l2", "apgd_dlr_linf", "autoattack_rand_linf", "cw_l2", "square_linf",
            "bpda_linf"} <= set(report["attacks"])
    for entry in report["attacks"].values():
        assert 0 <= entry["robust_acc"] <= 1 and entry["robust_acc_std"] >= 0 and "eps" in entry["settings"]
    assert 0 <= report["worst_case_acc"] <= report["clean_acc"]
    assert isinstance(report["audit"]["flags"]["gradient_masking_suspected"], bool)
    table = pq.read_table(out / "per_image.parquet").to_pandas()
    assert len(table) == 3 and {"index", "label", "clean_correct", "worst_case_correct"} <= set(table.columns)
    assert table["clean_correct"].dtype == np.bool_
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize("args, message", [
    (["--attacks", "pgd_linf,nope"], "unknown attack"),
    (["--eps-linf", "-0.1"], "--eps-linf"),
    (["--n-images", "0"], "--n-images"),
    (["--data-dir", "/nonexistent/data"], "--data-dir"),
    (["--steps", "0"], "--steps"),
])
def test_cli_bad_input(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                       message: str) -> None:
    out = tmp_path / "eval"
    base = ["--checkpoint", str(checkpoint), "--out", str(out), "--data-dir", str(DATA_DIR)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_missing_and_corrupt_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "missing.pt", "does not exist"), (corrupt, "corrupt")):
        out = tmp_path / "eval"
        # the real command, as a user runs it
        proc = subprocess.run([sys.executable, "-m", "atop.evaluate", "--checkpoint", str(path), "--out", str(out)],
                              check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_cli_refuses_a_non_empty_out(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
