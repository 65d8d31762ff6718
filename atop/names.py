"""The names atop's torch registries are keyed by, importable without torch.

A config, a preset, a search space or a command line names datasets, models, attacks and random
transforms; checking such a name against these tuples costs no torch import, so bad input is
refused before torch loads (tests/test_refusal.py). Each registry is keyed by exactly one tuple
here, in the same order (tests/test_names.py checks): `atop.data.DATASETS`, `atop.models.CLASSIFIERS`
and `PURIFIERS`, `atop.attacks.ATTACKS`, `atop.transforms.TRANSFORMS`. A leaf module: it imports
nothing from `atop`.
"""
from __future__ import annotations

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenette")
#: dataset -> its number of classes (`atop.data.DATASETS` reads it; an error message about a file names it)
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100, "imagenette": 10}
CLASSIFIERS: tuple[str, ...] = ("small_cnn", "fast_cnn", "resnet18", "wrn28_10")
PURIFIERS: tuple[str, ...] = ("unet", "gated")
ATTACKS: tuple[str, ...] = (
    "fgsm_linf", "pgd_linf", "pgd_l2", "bpda_linf", "apgd_ce_linf", "apgd_dlr_linf", "apgd_t_linf", "apgd_ce_l2",
    "apgd_dlr_l2", "square_linf", "cw_l2", "autoattack_standard_linf", "autoattack_rand_linf",
)
#: RT name (an `atop.config.RTType` value) -> the config fields that RT reads (what a space may suggest for it)
RT_PARAMS: dict[str, tuple[str, ...]] = {
    "rt1": ("mask_ratio", "block_size"),
    "rt2": ("mask_ratio", "noise_std", "block_size"),
    "rt3": ("noise_std", "num_masks", "block_size"),
}
