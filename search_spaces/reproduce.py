"""The paper's claims as a fixed grid of named arms: baselines, no-FT and lambda=0 controls, AToP.

Not a search: one categorical parameter, `arm`, each choice a whole configuration over the paper's
fixed settings (`paper.FIXED`). Run every arm as an enqueued reference (the `reproduce-cpu` study)
so that the confirm stage scores each on test images:

- `classifier-alone`: no RT, no purifier (`defense: classifier`), nothing fine-tuned;
- `rt1-no-ft`, `rt2-no-ft`, `rt3-no-ft`: RT + the pre-trained purifier, no fine-tuning (`epochs: 0`);
- `rt2-ft-lambda0`: fine-tuned as AToP with the CE term off (`lambda_ce: 0`), same epochs and data:
  the control that tells AToP's CE term apart from more GAN + L1 training on adversarial images;
- `rt2-atop-fgsm`: AToP as the authors' code runs it (lambda 0.1, FGSM on the classifier alone);
- `rt2-atop-pgd-eot`: AToP as the paper's formula reads (lambda 0.1, PGD with EOT through the whole
  defense: 5 steps of 2.5 * eps / 5, random start, EOT 2 — a CPU-sized budget, stated here).

Arms that fine-tune use the preset's `epochs`; the no-FT arms set `epochs: 0`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atop.config import DefenseKind, GradPath, RTType, TrainAttack
from search_spaces.paper import FIXED as PAPER_FIXED
from tracking.contract import Arm

if TYPE_CHECKING:  # a space only calls trial methods: listing or checking spaces needs no Optuna
    import optuna

FIXED: dict[str, Any] = dict(PAPER_FIXED)

_NO_FT = {"epochs": 0}
_RT2 = {"rt": RTType.RT2.value}
#: arm name (`tracking.contract.Arm`: analysis/claims.py compares arms by these names) -> the config
#: fields it sets over `FIXED` and the preset
ARMS: dict[str, dict[str, Any]] = {
    Arm.CLASSIFIER_ALONE.value: {"defense": DefenseKind.CLASSIFIER.value, **_NO_FT},
    Arm.RT1_NO_FT.value: {"rt": RTType.RT1.value, **_NO_FT},
    Arm.RT2_NO_FT.value: {**_RT2, **_NO_FT},
    Arm.RT3_NO_FT.value: {"rt": RTType.RT3.value, **_NO_FT},
    Arm.RT2_FT_LAMBDA0.value: {**_RT2, "lambda_ce": 0.0},
    Arm.RT2_ATOP_FGSM.value: {**_RT2, "lambda_ce": 0.1},
    Arm.RT2_ATOP_PGD_EOT.value: {**_RT2, "lambda_ce": 0.1, "train_attack": TrainAttack.PGD.value, "train_steps": 5,
                                 "train_random_start": True, "train_grad_path": GradPath.DEFENSE.value,
                                 "train_eot": 2},
}


def suggest(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    return dict(ARMS[trial.suggest_categorical("arm", list(ARMS))])
