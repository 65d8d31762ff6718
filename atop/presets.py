"""Named settings: config overrides plus how to pre-train, shared by `atop.run` and the study.

`smoke` runs on this project's 2-core CPU in minutes on real CIFAR-10 images; the `paper-*` presets
are the paper-size setting (WRN-28-10, gated purifier, full train split) meant for GPUs.
Torch-free (`PretrainSettings` lives here, not in `atop.pretrain`), so a bad preset or pre-training
setting is refused before torch loads (tests/test_refusal.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atop.config import ConfigError, RTType


@dataclass(frozen=True)
class PretrainSettings:
    """How long and on how much data the shared artifacts pre-train (not searched by a study)."""

    classifier_epochs: int = 4
    purifier_epochs: int = 2
    n_train: int = 10_000  # seeded subset of the train split; 0 = all
    classifier_lr: float = 0.05
    # The purifier starts from scratch: a larger step than fine-tuning's 1e-4, and a GAN term kept
    # small against L1 so that short budgets (minutes on a CPU) first learn to reconstruct at all
    # (one CPU measurement, unet width 16: lr 2e-4, GAN 1.0, batch 128, 2 epochs of 5,000 images
    # left L1 at 0.18 and accuracy through the defense at 0.16; lr 1e-3, GAN 0.1, batch 32 after one
    # epoch of 3,000 images reached L1 0.12 and 0.23, the classifier alone scoring 0.48).
    purifier_lr: float = 1e-3
    purifier_gan_weight: float = 0.1
    batch_size: int = 128  # the purifier's, and the classifier's unless classifier_batch_size is set
    classifier_batch_size: int = 0  # 0 = batch_size
    classifier_weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    crop_pad: int = 4  # random translation of up to this many pixels (reflect padding)
    # CE of the frozen classifier on the purified image: teaches the purifier to keep what the
    # classifier needs, which L1 alone does not (it blurs away texture under RT2's noise).
    purifier_ce_weight: float = 0.0
    purifier_rts: str = "rt1,rt2,rt3"  # the RT types the purifier's batches draw from
    purifier_n_train: int = 0  # the purifier sees the first this many of the n_train images; 0 = all
    bf16: bool = False  # bf16 autocast in both pre-trainings (AMX on this project's CPU, GPUs)
    channels_last: bool = False  # NHWC tensors: faster 3x3 convolutions in oneDNN and cuDNN
    # A classifier file to start from instead of training one (an atop checkpoint or a plain state
    # dict such as RobustBench's): checked, then cached under its sha256.
    classifier_checkpoint: str = ""

    def __post_init__(self) -> None:
        for name in ("classifier_epochs", "purifier_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range; accepted: >= 1")
        for name in ("n_train", "purifier_n_train", "classifier_batch_size", "crop_pad", "purifier_ce_weight", "classifier_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range; accepted: >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is out of range; accepted: 0 <= x < 1")
        accepted = ", ".join(rt.value for rt in RTType)
        names = [name.strip() for name in self.purifier_rts.split(",") if name.strip()]
        if not names or any(name not in {rt.value for rt in RTType} for name in names):
            raise ConfigError(f"purifier_rts={self.purifier_rts!r} is not a list of RT types; accepted: {accepted}")

    @property
    def rt_types(self) -> list[RTType]:
        return [RTType(name.strip()) for name in self.purifier_rts.split(",") if name.strip()]


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
    # steps, not larger ones; lr 4e-3, or CE weight 0.5 or 1.0, did worse), but does not yet keep clean
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
