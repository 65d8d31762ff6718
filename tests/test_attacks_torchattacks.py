"""Our attacks against torchattacks 3.5.1 on the same trained classifier, deterministic and behind
a random defense (EOT).

torchattacks is installed with `pip install --no-deps torchattacks==3.5.1` (it pins an old
`requests`); without it these tests fail, on purpose. What differs is documented in
docs/EVALUATION.md ("Compared with torchattacks").
"""
from __future__ import annotations

import pytest
import torch
import torchattacks
from attack_fixtures import batch, noisy_defense, trained_classifier

from atop.attacks import ATTACKS


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_matches_torchattacks_exactly_without_random_start() -> None:
    model, (x, y) = trained_classifier(), batch(16)
    ours = ATTACKS["pgd_linf"].build(model, eps=4 / 255, steps=5, step_size=1 / 255, random_start=False)(x, y)
    theirs = torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=5, random_start=False)(x, y)
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("name, loss", [("apgd_ce_linf", "ce"), ("apgd_dlr_linf", "dlr")])
def test_apgd_robust_accuracy_close_to_torchattacks(name: str, loss: str) -> None:
    model, (x, y) = trained_classifier(), batch(32)
    eps, steps = 1 / 255, 10
    ours = accuracy(model, ATTACKS[name].build(model, eps=eps, steps=steps, seed=0)(x, y), y)
    theirs = accuracy(model, torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss=loss,
                                               seed=0)(x, y), y)
    # different random starts (their torch.manual_seed vs our generator): a few images may differ
    assert abs(ours - theirs) <= 3 / len(y), (ours, theirs)


def test_square_robust_accuracy_close_to_torchattacks() -> None:
    model, (x, y) = trained_classifier(), batch(32)
    ours = accuracy(model, ATTACKS["square_linf"].build(model, eps=4 / 255, queries=100, seed=0)(x, y), y)
    theirs = accuracy(model, torchattacks.Square(model, norm="Linf", eps=4 / 255, n_queries=100, n_restarts=1,
                                                 p_init=0.8, loss="margin", seed=0)(x, y), y)
    assert abs(ours - theirs) <= 4 / len(y), (ours, theirs)


@pytest.mark.parametrize("name, loss", [("apgd_ce_linf", "ce"), ("apgd_dlr_linf", "dlr")])
def test_apgd_eot_on_a_random_defense_no_weaker_than_torchattacks(name: str, loss: str) -> None:
    defense, (x, y) = noisy_defense(trained_classifier()), batch(32)
    eps, steps, eot = 8 / 255, 5, 2
    defense.reseed(0)
    ours = ATTACKS[name].build(defense, eps=eps, steps=steps, eot=eot, seed=0)(x, y)
    defense.reseed(0)
    theirs = torchattacks.APGD(defense, norm="Linf", eps=eps, steps=steps, n_restarts=1, loss=loss, eot_iter=eot,
                               seed=0)(x, y)

    def fresh_accuracy(x_adv: torch.Tensor) -> float:  # the same 5 draws, none either attack used
        rates = []
        for r in range(5):
            defense.reseed(100 + r)
            rates.append(accuracy(defense, x_adv, y))
        return sum(rates) / len(rates)

    # theirs decides "fooled" on one draw (the clean check, each step's last EOT draw) and keeps the
    # clean image where a draw misclassified it; ours decides on fresh draws, so it should be no
    # weaker: tolerance two images of 32 (draw noise, different random starts)
    assert fresh_accuracy(ours) <= fresh_accuracy(theirs) + 2 / len(y), (fresh_accuracy(ours), fresh_accuracy(theirs))
