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
    # Real trade-offs on a 2-core CPU: fast_cnn pre-trained on all 50,000 images (5 epochs: 84.7% on
    # the 10,000 test images; about 5 minutes at the 975 img/s of its bf16 channels-last step on 2
    # quiet cores). The unet purifier learns with the frozen classifier's CE (lr 2e-3, batch 32: more
    # steps, not larger ones; lr 4e-3 or CE weight 0.5 did worse), but does not yet keep clean
    # accuracy within 10 points of the classifier (83.5% on the first 1,000 test images). Through
    # RT2: 3 epochs on 10,000 images gave 50.5% (RT1 70.1%, RT3 37.2%); 6 epochs on 20,000 images
    # (~10 min at 200 img/s on 2 quiet cores) gave 59.5% (RT1 75.1%, RT3 45.4%), its CE still falling.
    "cifar10-cpu": Preset(
        config={"classifier": "fast_cnn", "purifier": "unet", "purifier_width": 16, "n_train": 1024, "n_eval": 512,
                "epochs": 2, "batch_size": 64, "precision": "bf16", "channels_last": True},
        pretrain=PretrainSettings(classifier_epochs=5, n_train=0, classifier_batch_size=512, classifier_lr=0.2,
                                  label_smoothing=0.2, crop_pad=2, purifier_epochs=6, purifier_n_train=20_000,
                                  batch_size=32, purifier_lr=2e-3, purifier_gan_weight=0.01, purifier_ce_weight=0.1,
                                  bf16=True, channels_last=True),
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
        raise ConfigError(f"preset={name!r} is unknown; accepted: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
