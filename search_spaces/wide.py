"""Everything the method exposes: RT and its parameters, training attack, loss weights, warm-up, lr.

The RT choices are every RT of `atop.names.RT_PARAMS`, the keys of `atop.transforms.TRANSFORMS` (a
new RT joins this space; a wide study started before it cannot be resumed after it). Conditional
parameters only where they apply (`RT_PARAMS`): `mask_ratio` for RT1/RT2 (RT3's masks partition the
image), `noise_std` for RT2/RT3, `num_masks` for RT3, `train_steps` and random start for PGD,
`train_eot` when the attack's gradient passes the random defense. The eps range follows the norm
(l-inf on the [0,1] pixel scale, l2 as a norm); both are log-uniform so that Optuna sees one
compatible distribution for `train_eps` whatever the norm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atop.config import GradPath, L1Target, Norm, TrainAttack
from atop.names import RT_PARAMS

if TYPE_CHECKING:  # a space only calls trial methods: listing or checking spaces needs no Optuna
    import optuna

FIXED: dict[str, Any] = {"beta1": 0.5, "beta2": 0.999}

#: train_eps range per norm
EPS_RANGE = {Norm.LINF.value: (2 / 255, 16 / 255), Norm.L2.value: (0.125, 1.0)}


def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    p: dict[str, Any] = {}
    p["rt"] = trial.suggest_categorical("rt", list(RT_PARAMS))
    rt_params = RT_PARAMS[p["rt"]]
    if "mask_ratio" in rt_params:
        p["mask_ratio"] = trial.suggest_float("mask_ratio", 0.1, 0.6)
    if "noise_std" in rt_params:
        p["noise_std"] = trial.suggest_float("noise_std", 0.05, 0.5)
    if "num_masks" in rt_params:
        p["num_masks"] = trial.suggest_int("num_masks", 2, 8)
    p["block_size"] = trial.suggest_categorical("block_size", [2, 4, 8])

    p["train_attack"] = trial.suggest_categorical("train_attack", [a.value for a in TrainAttack])
    p["train_norm"] = trial.suggest_categorical("train_norm", [n.value for n in Norm])
    p["train_eps"] = trial.suggest_float("train_eps", *EPS_RANGE[p["train_norm"]], log=True)
    if p["train_attack"] == TrainAttack.PGD.value:
        p["train_steps"] = trial.suggest_int("train_steps", 2, 10)
        p["train_random_start"] = trial.suggest_categorical("train_random_start", [False, True])
    p["train_grad_path"] = trial.suggest_categorical("train_grad_path", [g.value for g in GradPath])
    if p["train_grad_path"] == GradPath.DEFENSE.value:
        p["train_eot"] = trial.suggest_int("train_eot", 1, 4)

    p["lambda_ce"] = trial.suggest_float("lambda_ce", 0.01, 1.0, log=True)
    p["gan_weight"] = trial.suggest_float("gan_weight", 0.01, 2.0, log=True)
    p["l1_weight"] = trial.suggest_float("l1_weight", 0.5, 50.0, log=True)
    p["ce_warmup_epochs"] = trial.suggest_int("ce_warmup_epochs", 0, 2)
    p["l1_target"] = trial.suggest_categorical("l1_target", [t.value for t in L1Target])
    p["lr"] = trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    return p
