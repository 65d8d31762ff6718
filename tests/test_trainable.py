"""The trainable's adapter pieces on tiny synthetic data (no Ray needed)."""
from __future__ import annotations

import pytest
import torch

from atop.config import Config, ConfigError
from atop.data import Split
from atop.finetune import finetune
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from tracking.contract import RUN_ID, TRIAL_NUMBER
from trainables.atop_trainable import _restore, _save, split_config

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
