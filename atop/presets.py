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


_PAPER = {"n_train": 0, "n_eval": 1000, "classifier": "wrn28_10", "purifier": "gated", "purifier_width": 32,
          "rt": "rt2", "train_attack": "fgsm", "train_eps": 8 / 255, "lambda_ce": 0.1, "ce_warmup_epochs": 2,
          "epochs": 10, "batch_size": 128, "lr": 1e-4, "beta1": 0.5, "beta2": 0.999, "eval_level": "screen",
          "precision": "bf16", "channels_last": True}

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        config={"n_train": 1024, "n_eval": 128, "epochs": 3, "batch_size": 64, "purifier_width": 16,
                "lr": 2e-4, "lambda_ce": 0.1},
        pretrain=PretrainSettings(classifier_epochs=4, purifier_epochs=2, n_train=5000, batch_size=32),
    ),
    "tiny": Preset(
        config={"n_train": 64, "n_eval": 16, "epochs": 1, "batch_size": 32, "purifier_width": 8},
        pretrain=PretrainSettings(classifier_epochs=1, purifier_epochs=1, n_train=512),
    ),
    "paper-cifar10": Preset(config={**_PAPER, "dataset": "cifar10"},
                            pretrain=PretrainSettings(classifier_epochs=100, purifier_epochs=50, n_train=0)),
    "paper-cifar100": Preset(config={**_PAPER, "dataset": "cifar100"},
                             pretrain=PretrainSettings(classifier_epochs=100, purifier_epochs=50, n_train=0)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]
