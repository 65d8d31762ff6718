"""Named settings: config overrides plus how to pre-train, shared by `atop.run` and the study.

`smoke` runs on this project's 2-core CPU in minutes on real CIFAR-10 images; the `paper-*` presets
are the paper-size setting (WRN-28-10, gated purifier, full train split) meant for GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atop.config import ConfigError
from atop.pretrain import PretrainSettings


@dataclass(frozen=True)
class Preset:
    config: dict[str, Any]
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)


# Presets name the scale of a run (data, models, budget), never the method's hyperparameters: those
# are Config defaults for `atop.run`, and a study's search space fixes or searches them.
_PAPER = {"n_train": 0, "n_eval": 512, "classifier": "wrn28_10", "purifier": "gated", "purifier_width": 64,
          "block_size": 4, "ce_warmup_epochs": 2, "epochs": 10, "batch_size": 128, "eval_level": "full",
          "precision": "bf16", "channels_last": True}
_PAPER_PRETRAIN = PretrainSettings(classifier_epochs=100, purifier_epochs=40, n_train=0, batch_size=128)

PRESETS: dict[str, Preset] = {
    # minutes on a 2-core CPU, real CIFAR-10
    "smoke": Preset(
        config={"n_train": 1024, "n_eval": 128, "epochs": 3, "batch_size": 64, "purifier_width": 16},
        pretrain=PretrainSettings(classifier_epochs=4, purifier_epochs=2, n_train=5000, batch_size=32),
    ),
    # seconds: plumbing only (load and fault tests); its accuracies mean nothing
    "tiny": Preset(
        config={"n_train": 32, "n_eval": 8, "epochs": 2, "batch_size": 32, "purifier_width": 4,
                "unseen_attacks": "fgsm_linf"},
        pretrain=PretrainSettings(classifier_epochs=1, purifier_epochs=1, n_train=256),
    ),
    # the paper-size setting, for GPUs
    "paper-cifar10": Preset(config={**_PAPER, "dataset": "cifar10"}, pretrain=_PAPER_PRETRAIN),
    "paper-cifar100": Preset(config={**_PAPER, "dataset": "cifar100"}, pretrain=_PAPER_PRETRAIN),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]
