"""Progress of long steps (`atop.progress`): one line per finished step when stderr is not a
terminal, a bar with the time left on a terminal, nothing where `ATOP_PROGRESS=off` (Tune trials)."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from attack_fixtures import DATA_DIR, eval_images, need_data, tiny_defense

from atop import progress
from atop.config import Config
from atop.data import load_split, subset
from atop.evaluate import evaluate
from atop.models import PatchDiscriminator, SmallCNN, UNetPurifier
from atop.presets import PretrainSettings
from atop.pretrain import train_classifier, train_purifier

REPO = Path(__file__).resolve().parents[1]
SECONDS = r"\d+(\.\d)? s"  # 0.4 s below ten seconds, 62 s above


@pytest.fixture(autouse=True)
def default_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(progress.ENV, raising=False)  # a developer's own setting must not decide the test


def _train(n: int):
    need_data()
    return subset(load_split("cifar10", "train", DATA_DIR), n, seed=0)


def test_pretraining_prints_one_line_per_finished_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    settings = PretrainSettings(classifier_epochs=2, purifier_epochs=1, n_train=96, batch_size=32)
    classifier = SmallCNN(10, width=8)
    reports = list(train_classifier(classifier, _train(96), settings))
    cfg = Config.from_dict({"purifier_width": 4, "batch_size": 32})
    (pur,) = train_purifier(cfg, UNetPurifier(4), PatchDiscriminator(), classifier, _train(64), settings)
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws in a log
    lines = err.splitlines()
    assert len(lines) == 3, err
    for epoch, (line, m) in enumerate(zip(lines, reports), start=1):
        assert re.fullmatch(rf"pretrain classifier epoch {epoch}/2: loss {m['loss']:.3f}, train acc "
                            rf"{m['train_acc']:.3f}, \d+ img/s, {SECONDS}", line), line
    assert re.fullmatch(rf"pretrain purifier epoch 1/1: L1 {pur['loss_l1']:.4f}, CE 0.000, D -?\d+\.\d{{3}}, "
                        rf"G -?\d+\.\d{{3}}, \d+ img/s, {SECONDS}", lines[2]), lines[2]


def test_evaluation_prints_one_line_per_attack(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config.from_dict({"n_eval": 4, "batch_size": 2, "unseen_attacks": "pgd_l2,apgd_dlr_linf"})
    result = evaluate(tiny_defense(), eval_images(4), cfg, level="screen", steps=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"evaluate (screen, 4 images) {name}" for name in ("pgd_linf", "pgd_l2", "apgd_dlr_linf")]
    for line, name in zip(lines, ("pgd_linf", "pgd_l2", "apgd_dlr_linf")):
        acc = result.metrics[f"robust_acc/{name}"]
        assert re.fullmatch(rf"evaluate \(screen, 4 images\) {name}: robust acc {acc:.3f}, {SECONDS}", line), line


def test_off_prints_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.ENV, "off")
    assert list(progress.track(range(3), "bootstrap")) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv(progress.ENV, "lines")
    assert list(progress.track(range(3), "bootstrap", unit="resample")) == [0, 1, 2]
    assert re.fullmatch(rf"bootstrap: 3 resample, {SECONDS}\n", capsys.readouterr().err)


def _snippet(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    return subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          timeout=120, **kwargs)


STEPS = ("from atop import progress\n"
         "import time\n"
         "with progress.step('demo', total=3, unit='batch') as p:\n"
         "    for _ in range(3):\n"
         "        time.sleep(0.05)\n"
         "        p.advance()\n"
         "    p.finish('loss 0.5')\n"
         "print('done')\n")


def test_a_terminal_gets_a_bar_with_the_time_left() -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 wide
    try:
        proc = _snippet(STEPS, stderr=follower, stdout=subprocess.PIPE, text=True)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal's far end closed: all read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0 and proc.stdout == "done\n"
    text = shown.decode()
    assert "\r" in text and "demo" in text and "3/3" in text and "loss 0.5" in text
    assert re.search(r"<\d\d:\d\d", text), text  # tqdm's estimate of the time left


def test_nothing_breaks_when_stderr_is_a_file_or_closed(tmp_path: Path) -> None:
    err = tmp_path / "err.txt"
    with err.open("w") as f:
        proc = _snippet(STEPS, stderr=f, stdout=subprocess.PIPE, text=True)
    assert proc.returncode == 0 and proc.stdout == "done\n"
    assert re.fullmatch(rf"demo: loss 0.5, {SECONDS}\n", err.read_text())
    closed = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$0" 2>&-', STEPS], check=False, cwd=REPO,
                            timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert closed.returncode == 0 and closed.stdout == "done\n"


def test_pretrain_command_logs_epochs_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    need_data()
    proc = _snippet(f"import sys; from atop.pretrain import main; sys.exit(main({['classifier', '--out', str(tmp_path / 'c.pt'), '--epochs', '1', '--n-train', '64', '--data-dir', str(DATA_DIR)]!r}))",
                    capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(rf"pretrain classifier epoch 1/1: loss \d\.\d{{3}}, train acc \d\.\d{{3}}, \d+ img/s, "
                        rf"{SECONDS}\n", proc.stderr), proc.stderr
    assert (tmp_path / "c.pt").is_file()
