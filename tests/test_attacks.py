"""Attacks: norm bounds and [0,1] range for every registered attack, strength on a trained model,
EOT variance, BPDA, losses, APGD's schedule, and decisions on fresh draws of a random defense."""
from __future__ import annotations

import pytest
import torch
from attack_fixtures import MaskedDefense, batch, noisy_defense, tiny_defense, trained_classifier

from atop.attacks import APGD, ATTACKS, AutoAttack, BPDAWrapper, Square
from atop.attacks.apgd import checkpoints
from atop.attacks.base import Scored
from atop.attacks.losses import dlr, margin
from atop.threat import Norm

EPS = {Norm.LINF: 8 / 255, Norm.L2: 0.5}
TINY_BUDGET = {"steps": 3, "eot": 2, "queries": 8}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def scored(defense: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5) -> torch.Tensor:
    """(repeats, N) bool: draw r (seed 100 + r, none an attack's own) classifies image i correctly."""
    out = []
    for r in range(repeats):
        defense.reseed(100 + r)
        with torch.no_grad():
            out.append(defense(x).argmax(1) == y)
    return torch.stack(out)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_stays_in_its_ball_and_in_unit_range(name: str) -> None:
    spec = ATTACKS[name]
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    x[0] = 0.0  # saturated images: the [0,1] clip must hold at the edges
    x[1] = 1.0
    y = torch.arange(6) % 10
    extra = {"n_targets": 2} if "apgd_t" in name or "standard" in name else {}
    attack = spec.build(tiny_defense(), eps=EPS[spec.norm], seed=1, **spec.budget(**TINY_BUDGET), **extra)
    x_adv = attack(x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if spec.norm is Norm.LINF:
        assert delta.abs().amax() <= EPS[spec.norm] + 1e-6
    else:
        assert delta.norm(dim=1).max() <= EPS[spec.norm] + 1e-5
    settings = attack.settings()
    assert settings["eps"] == EPS[spec.norm] and settings["norm"] == spec.norm.value and settings["eot"] == 2


def test_attacks_reject_bad_arguments() -> None:
    model = tiny_defense()
    with pytest.raises(ValueError, match="negative"):
        ATTACKS["apgd_ce_linf"].build(model, eps=-0.1)
    with pytest.raises(ValueError, match="linf only"):
        Square(model, eps=0.5, norm=Norm.L2)
    with pytest.raises(ValueError, match="loss"):
        APGD(model, eps=0.1, loss="hinge")
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        ATTACKS["pgd_linf"].build(model, eps=0.1)(torch.full((1, 3, 32, 32), 2.0), torch.zeros(1, dtype=torch.long))


def test_same_seed_same_result_on_a_random_defense() -> None:
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    runs = []
    for _ in range(2):
        model = tiny_defense()
        runs.append(ATTACKS["apgd_ce_linf"].build(model, eps=8 / 255, steps=3, eot=2, seed=5)(x, y))
    assert torch.equal(runs[0], runs[1])


def test_apgd_schedule_matches_the_paper() -> None:
    # p_j = 0, .22, .41, .57, .70, .80, .87, .93, .99 of 100 iterations (Croce & Hein 2020, Sec. 3.2)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_losses() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    y = torch.tensor([0, 0])
    assert margin(logits, y).tolist() == [2.0, -2.0]
    # DLR is invariant to shifting and positive rescaling of the logits
    assert torch.allclose(dlr(logits, y), dlr(5 * logits + 3, y))
    assert (dlr(logits, y)[1] > 0) and (dlr(logits, y)[0] < 0)


def test_undefended_trained_classifier_falls_to_about_zero() -> None:
    model, (x, y) = trained_classifier(), batch(32)
    assert accuracy(model, x, y) > 0.3  # it learned something
    x_adv = ATTACKS["pgd_linf"].build(model, eps=8 / 255, steps=10)(x, y)
    # "about 0": at most 3 of 32 images; the survivors of this 2-epoch CNN are over-confident ones
    # whose float32 cross-entropy gradient underflows to 0 (APGD-DLR's scale-free loss gets them)
    assert accuracy(model, x_adv, y) <= 0.1


def test_apgd_at_least_as_strong_as_pgd_on_a_trained_model() -> None:
    model, (x, y) = trained_classifier(), batch(32)
    eps, steps = 1 / 255, 10  # small eps: neither attack reaches 0, so the comparison means something
    pgd = accuracy(model, ATTACKS["pgd_linf"].build(model, eps=eps, steps=steps)(x, y), y)
    apgd = accuracy(model, ATTACKS["apgd_ce_linf"].build(model, eps=eps, steps=steps)(x, y), y)
    clean = accuracy(model, x, y)
    assert pgd < clean  # the comparison is not vacuous
    assert apgd <= pgd + 1 / len(y)


def test_square_and_cw_lower_accuracy_of_a_trained_model() -> None:
    model, (x, y) = trained_classifier(), batch(32)
    clean = accuracy(model, x, y)
    assert accuracy(model, ATTACKS["square_linf"].build(model, eps=8 / 255, queries=100)(x, y), y) < clean - 0.1
    assert accuracy(model, ATTACKS["cw_l2"].build(model, eps=0.5, steps=30)(x, y), y) < clean - 0.1


def test_autoattack_no_weaker_than_its_first_attack_on_a_deterministic_model() -> None:
    model, (x, y) = trained_classifier(), batch(32)
    eps = 1 / 255
    first = accuracy(model, ATTACKS["apgd_ce_linf"].build(model, eps=eps, steps=5)(x, y), y)
    aa = accuracy(model, ATTACKS["autoattack_standard_linf"].build(model, eps=eps, steps=5, queries=20,
                                                                   n_targets=2)(x, y), y)
    assert aa <= first


def test_eot_gradient_variance_falls_as_samples_grow() -> None:
    model, (x, y) = trained_classifier(), batch(4)
    defense = noisy_defense(model, noise_std=0.1)
    variances = []
    for eot in (1, 4, 16):
        attack = ATTACKS["pgd_linf"].build(defense, eps=8 / 255, eot=eot)
        grads = []
        for seed in range(8):
            defense.reseed(seed)
            grads.append(attack.loss_and_grad(x, y)[1])
        variances.append(torch.stack(grads).var(dim=0).mean().item())
    assert variances[0] > 2 * variances[1] > 4 * variances[2]  # about 1/eot: 16x from 1 to 16


def test_eot_batched_and_looped_agree_on_a_deterministic_model() -> None:
    model, (x, y) = trained_classifier(), batch(4)
    a = ATTACKS["pgd_linf"].build(model, eps=8 / 255, eot=3, eot_batched=True).loss_and_grad(x, y)
    b = ATTACKS["pgd_linf"].build(model, eps=8 / 255, eot=3, eot_batched=False).loss_and_grad(x, y)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-5)


@pytest.mark.parametrize("eot_batched, sizes", [(None, [4, 4, 4]), (False, [4, 4, 4]), (True, [12])])
def test_eot_draws_are_looped_on_a_cpu_unless_batching_is_asked_for(eot_batched, sizes) -> None:
    model, (x, y) = trained_classifier(), batch(4)
    seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))  # a shared model: removed below
    try:
        ATTACKS["pgd_linf"].build(model, eps=8 / 255, eot=3, eot_batched=eot_batched).loss_and_grad(x, y)
    finally:
        hook.remove()
    assert seen == sizes


def test_bpda_forward_is_the_defense_and_backward_skips_the_purifier() -> None:
    model, (x, _) = trained_classifier(), batch(4)
    masked = MaskedDefense(model)
    wrapped = BPDAWrapper(masked)
    assert torch.equal(wrapped(x), masked(x))
    x1 = x.clone().requires_grad_(True)
    masked(x1).sum().backward()
    assert x1.grad.abs().max() == 0  # the masked defense hides its gradient
    x2 = x.clone().requires_grad_(True)
    wrapped(x2).sum().backward()
    purified = masked.purify(x).requires_grad_(True)
    model(purified).sum().backward()
    assert torch.allclose(x2.grad, purified.grad, atol=1e-6)  # identity backward through the purifier
    # and on the masked defense, BPDA succeeds where full-gradient PGD cannot move
    xb, yb = batch(32)
    bpda = accuracy(masked, ATTACKS["bpda_linf"].build(masked, eps=8 / 255, steps=10)(xb, yb), yb)
    assert bpda <= 0.1


def test_fresh_scores_leave_the_models_stream_as_it_was() -> None:
    defense, (x, y) = noisy_defense(trained_classifier()), batch(8)
    attack = ATTACKS["apgd_ce_linf"].build(defense, eps=8 / 255, steps=2)
    defense.reseed(3)
    expected = defense(x)
    defense.reseed(3)
    first, second = attack.fresh_scores(x, y), attack.fresh_scores(x, y)
    assert torch.equal(defense(x), expected)  # the EOT stream continues as if nothing was drawn
    assert torch.equal(first.accuracy, second.accuracy)  # the same draws for every candidate: paired
    rates = scored(defense, x, y, repeats=10).float().mean(0)
    assert not torch.equal(first.accuracy, rates)  # and not the evaluation's draws


def test_select_by_fresh_draws_keeps_the_most_misclassified_candidate() -> None:
    model, (x, y) = trained_classifier(), batch(16)
    attack = ATTACKS["pgd_linf"].build(model, eps=4 / 255, steps=5)
    x_adv = attack(x, y)
    chosen = attack.select_by_fresh_draws([x, x_adv], y)
    with torch.no_grad():
        margins = torch.stack([margin(model(x), y), margin(model(x_adv), y)])
    wrong = margins < 0
    # a deterministic model: accuracy 0/1; misclassified wins, else the lower margin (ties: first)
    expect = torch.where(wrong[1] & ~wrong[0], 1, torch.where(wrong[0] & ~wrong[1], 0,
                                                             (margins[1] < margins[0]).long()))
    assert torch.equal(chosen.x, torch.stack([x, x_adv])[expect, torch.arange(len(y))])
    assert torch.equal(chosen.accuracy, (~wrong[expect, torch.arange(len(y))]).float())
    assert isinstance(chosen, Scored) and chosen.accuracy.sum() < len(y)  # not vacuous


def test_apgd_on_a_random_defense_no_weaker_than_pgd_eot_with_the_same_budget() -> None:
    defense, (x, y) = noisy_defense(trained_classifier()), batch(32)
    budget = {"eps": 8 / 255, "steps": 5, "eot": 2, "seed": 0}
    clean = scored(defense, x, y).float().mean().item()
    pgd = scored(defense, ATTACKS["pgd_linf"].build(defense, **budget)(x, y), y).float().mean().item()
    assert pgd < clean - 0.05  # the comparison is not vacuous
    for name in ("apgd_ce_linf", "apgd_dlr_linf"):
        apgd = scored(defense, ATTACKS[name].build(defense, **budget)(x, y), y).float().mean().item()
        # tolerance: two images of 32 (draw noise on 5 fresh draws, different random starts)
        assert apgd <= pgd + 2 / len(y), (name, apgd, pgd)


def test_apgd_returns_no_weaker_images_than_its_first_misclassified_iterates() -> None:
    """The regression: the first iterate whose EOT-mean logits misclassify sits on the boundary;
    fresh draws classify it correctly again. Rebuild that old rule's output from the very
    trajectory the attack took (a forward hook records every EOT batch) and score both."""
    defense, (x, y) = noisy_defense(trained_classifier()), batch(32)
    eot, steps, n = 2, 5, len(y)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = defense.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    defense.reseed(0)
    # batched: each EOT step is one forward pass of eot * n images, which the hook can pick out
    ours = ATTACKS["apgd_ce_linf"].build(defense, eps=8 / 255, steps=steps, eot=eot, eot_batched=True,
                                         seed=0)(x, y)
    hook.remove()
    iterates = [(inp[:n], out.view(eot, n, -1)) for inp, out in seen if len(inp) == eot * n]
    assert len(iterates) == steps + 1  # the random start and one per step
    first, best_x, best_loss = x.clone(), None, None
    found = torch.zeros(n, dtype=torch.bool)
    for it, logits in iterates:
        wrong = (logits.mean(0).argmax(1) != y) & ~found
        first[wrong], found = it[wrong], found | wrong
        loss = torch.stack([torch.nn.functional.cross_entropy(z, y, reduction="none") for z in logits]).mean(0)
        if best_x is None:
            best_x, best_loss = it.clone(), loss
        better = loss > best_loss
        best_x[better], best_loss = it[better], torch.maximum(best_loss, loss)
    old = torch.where(found.view(-1, 1, 1, 1), first, best_x)
    assert found.sum() >= 4  # enough images flipped for the rule to matter
    ours_acc = scored(defense, ours, y).float().mean().item()
    old_acc = scored(defense, old, y).float().mean().item()
    assert ours_acc <= old_acc + 1 / n, (ours_acc, old_acc)


def test_autoattack_rand_between_the_per_draw_and_and_each_component() -> None:
    defense, (x, y) = noisy_defense(trained_classifier()), batch(32)
    def build() -> AutoAttack:  # a new one per call: the components' random starts begin anew
        return ATTACKS["autoattack_rand_linf"].build(defense, eps=8 / 255, steps=5, eot=2, seed=0)

    defense.reseed(0)
    outputs = build().outputs(x, y)
    defense.reseed(0)
    aa = build()
    x_aa = aa(x, y)
    assert list(outputs) == ["apgd_ce", "apgd_dlr"]
    # every image is attacked: none comes back clean because one draw misclassified it
    assert ((x_aa - x).flatten(1).abs().amax(1) > 0).all()
    # on AutoAttack's own fresh draws: exactly the per-image minimum over its components
    per_component = torch.stack([aa.fresh_scores(o, y).accuracy for o in outputs.values()])
    assert torch.equal(aa.fresh_scores(x_aa, y).accuracy, per_component.min(0).values)
    # on the evaluation's draws: never below the per-draw AND (exact), above no component (2 images)
    ours, parts = scored(defense, x_aa, y), [scored(defense, o, y) for o in outputs.values()]
    both = torch.stack(parts).all(0)
    assert (both <= ours).all()
    for name, part in zip(outputs, parts):
        assert ours.float().mean() <= part.float().mean() + 2 / len(y), name
    assert ours.float().mean() < scored(defense, x, y).float().mean() - 0.05  # not vacuous
