"""The trainable's adapter pieces on tiny synthetic data (no Ray needed)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from atop.config import Config, ConfigError
from atop.data import Split
from atop.defense import Defense
from atop.finetune import finetune
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.transforms import RandomTransform
from trainables.atop_trainable import (
    RUN_ID,
    TRIAL_NUMBER,
    _restore,
    _save,
    image_grid,
    split_config,
    trial_summary,
    write_parquet,
)

CFG = Config.from_dict({"n_train": 16, "n_eval": 8, "epochs": 2, "batch_size": 8, "purifier_width": 4,
                        "rt": "rt3", "num_masks": 2, "unseen_attacks": "fgsm_linf"})


def _data(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _models():
    torch.manual_seed(0)
    return CLASSIFIERS["small_cnn"](10), PURIFIERS["unet"](4), PatchDiscriminator()


def test_split_config_rejects_unknown_keys_and_keeps_trial_keys():
    cfg, reserved = split_config({**CFG.to_dict(), TRIAL_NUMBER: 3, RUN_ID: "abc"})
    assert cfg == CFG and reserved == {TRIAL_NUMBER: 3, RUN_ID: "abc"}
    with pytest.raises(ConfigError, match="lamda"):
        split_config({**CFG.to_dict(), "lamda": 1})


def test_checkpoint_roundtrip_resumes_to_the_same_result(tmp_path):
    train, test = _data(16, 0), _data(8, 1)
    clf, pur, disc = _models()
    reports = list(finetune(CFG, clf, pur, disc, train, test))
    clf2, pur2, disc2 = _models()
    first = next(finetune(CFG, clf2, pur2, disc2, train, test))
    _save(tmp_path, CFG, first, clf2, pur2, disc2, compute_s=1.5)
    state, start, compute_s = _restore(tmp_path)
    assert (start, compute_s) == (1, 1.5)
    clf3, pur3, disc3 = _models()
    resumed = list(finetune(CFG, clf3, pur3, disc3, train, test, state=state, start_epoch=start))
    assert len(resumed) == 1 and resumed[0].epoch == 2
    assert resumed[0].metrics["loss/total"] == pytest.approx(reports[1].metrics["loss/total"], rel=1e-4)


def test_image_grid_and_parquet(tmp_path):
    clf, pur, _ = _models()
    defense = Defense(RandomTransform.from_config(CFG), pur, clf, seed=0).eval()
    path = image_grid(defense, _data(8, 1), CFG, tmp_path / "g.png", n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import numpy as np

    write_parquet({"index": np.arange(3), "clean_correct": np.array([True, False, True])}, tmp_path / "p.parquet", 7)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["trial_number", "index", "clean_correct"] and table["trial_number"][0].as_py() == 7


def test_trial_summary():
    ok = trial_summary({"clean_acc": 0.5, "robust_acc_seen": 0.25, "robust_acc_unseen": 0.125, "epoch": 2})
    assert ok["values"] == [0.5, 0.25, 0.125] and not ok["failed"]
    assert trial_summary({"atop_failed": 1, "atop_error": "boom"}) == {"failed": True, "error": "boom"}
    assert trial_summary(None)["failed"] and trial_summary({"clean_acc": 1.0})["failed"]
