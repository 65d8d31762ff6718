"""The paper's own choices: RT1/RT2/RT3, FGSM l-inf 8/255 on the classifier, lambda in [0.05, 0.1], Adam.

Lin et al. (ICLR 2024) and the authors' code: one-step FGSM at eps 8/255 crafted against the
classifier alone, Adam with lr 1e-4 and betas (0.5, 0.999), noise std 0.25, 25% of the mask blocks
removed, L1 towards the adversarial image. Searched: the RT type, lambda, and for RT3 the number of
masks (the paper tried several).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atop.config import GradPath, L1Target, Norm, RTType, TrainAttack

if TYPE_CHECKING:  # a space only calls trial methods: listing or checking spaces needs no Optuna
    import optuna

#: the paper's RT families, named (not read from the registry): a new RT must not change this space,
#: or studies started on it could no longer resume (Optuna refuses changed categorical choices)
RTS: tuple[str, ...] = (RTType.RT1.value, RTType.RT2.value, RTType.RT3.value)

FIXED: dict[str, Any] = {
    "train_attack": TrainAttack.FGSM.value,
    "train_norm": Norm.LINF.value,
    "train_eps": 8 / 255,
    "train_steps": 1,
    "train_grad_path": GradPath.CLASSIFIER.value,
    "train_eot": 1,
    "train_random_start": False,
    "lr": 1e-4,
    "beta1": 0.5,
    "beta2": 0.999,
    "noise_std": 0.25,
    "mask_ratio": 0.25,
    "l1_target": L1Target.ADVERSARIAL.value,
}


def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    params: dict[str, Any] = {"rt": trial.suggest_categorical("rt", list(RTS))}
    params["lambda_ce"] = trial.suggest_float("lambda_ce", 0.05, 0.1)
    if params["rt"] == RTType.RT3.value:
        params["num_masks"] = trial.suggest_categorical("num_masks", [2, 4])
    return params
