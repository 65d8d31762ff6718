"""AToP fine-tuning: only the purifier learns, gradients reach it, resume is exact, NaN fails."""
import math

import pytest
import torch

from atop.config import Config
from atop.data import Split
from atop.defense import Defense
from atop.finetune import PurifierTrainer, finetune
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.transforms import RandomTransform
from tracking.contract import OBJECTIVES


def tiny_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g))


def models(seed=0):
    torch.manual_seed(seed)
    return CLASSIFIERS["small_cnn"](10), PURIFIERS["unet"](8), PatchDiscriminator(width=8)


CFG = {"n_train": 32, "n_eval": 8, "epochs": 2, "batch_size": 16, "purifier_width": 8, "unseen_attacks": "pgd_l2"}


@pytest.mark.parametrize("overrides", [
    {},  # the authors' code: FGSM against the classifier alone
    {"train_attack": "pgd", "train_steps": 2, "train_grad_path": "defense", "train_eot": 2, "rt": "rt3"},
    {"train_norm": "l2", "train_eps": 0.5, "l1_target": "clean", "ce_warmup_epochs": 1},
])
def test_only_the_purifier_learns(overrides):
    cfg = Config.from_dict({**CFG, **overrides})
    clf, pur, disc = models()
    clf_before = {k: v.clone() for k, v in clf.state_dict().items()}
    pur_before = {k: v.clone() for k, v in pur.state_dict().items()}
    reports = list(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8, seed=1)))
    assert [r.epoch for r in reports] == [1, 2]
    for k, v in clf.state_dict().items():  # running BN statistics included
        assert torch.equal(v, clf_before[k]), k
    assert any(not torch.equal(v, pur_before[k]) for k, v in pur.state_dict().items())
    m = reports[-1].metrics
    for name in OBJECTIVES:
        assert 0.0 <= m[name] <= 1.0
    assert all(math.isfinite(v) for v in m.values())
    if overrides.get("ce_warmup_epochs"):
        assert reports[0].metrics["ce_weight"] == 0.0 and reports[1].metrics["ce_weight"] == cfg.lambda_ce


def test_zero_epochs_scores_the_pretrained_defense_once_and_trains_nothing():
    cfg = Config.from_dict({**CFG, "epochs": 0})
    clf, pur, disc = models()
    pur_before = {k: v.clone() for k, v in pur.state_dict().items()}
    reports = list(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8, seed=1)))
    assert [r.epoch for r in reports] == [0]
    assert all(torch.equal(v, pur_before[k]) for k, v in pur.state_dict().items())
    assert 0.0 <= reports[0].metrics["clean_acc"] <= 1.0 and "loss/gen" not in reports[0].metrics
    assert set(reports[0].rates) >= set(OBJECTIVES)
    with pytest.raises(ValueError, match="epochs=-1"):
        Config.from_dict({**CFG, "epochs": -1})


def test_scoring_the_last_epoch_only_trains_the_same_purifier_and_scores_it_the_same():
    """What the confirm stage asks for: the epochs before the last report losses only, and skipping
    their evaluation changes neither the training (evaluation draws from generators of its own) nor
    the final figures."""
    cfg = Config.from_dict({**CFG, "epochs": 3, "rt": "rt3"})
    runs = {}
    for every in (True, False):
        clf, pur, disc = models()
        torch.manual_seed(0)
        runs[every] = (list(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8, seed=1), score_every_epoch=every)),
                       pur.state_dict())
    (scored, weights), (last_only, weights_last_only) = runs[True], runs[False]
    assert [r.epoch for r in last_only] == [1, 2, 3]
    assert all(name not in r.metrics and not r.rates for r in last_only[:2] for name in OBJECTIVES)
    assert all(r.metrics["loss/total"] == s.metrics["loss/total"] for r, s in zip(last_only, scored))
    assert all(torch.equal(v, weights[k]) for k, v in weights_last_only.items())
    assert {k: last_only[-1].metrics[k] for k in OBJECTIVES} == {k: scored[-1].metrics[k] for k in OBJECTIVES}


def test_ce_gradient_reaches_the_purifier_through_the_frozen_classifier():
    cfg = Config.from_dict({**CFG, "gan_weight": 0.0, "l1_weight": 0.0})
    clf, pur, disc = models()
    trainer = PurifierTrainer(cfg, pur, disc, clf, torch.device("cpu"))
    x, y = next(tiny_data().batches(16))
    trainer.opt_g.step = lambda: None  # keep the gradient for inspection instead of applying it
    trainer.step(RandomTransform.from_config(cfg), x, x, y, ce_weight=1.0)
    grads = [p.grad for p in pur.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in clf.parameters())


def test_resume_from_state_matches_an_uninterrupted_run():
    cfg = Config.from_dict({**CFG, "epochs": 2})
    clf, pur, disc = models()
    full = list(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8, seed=1)))
    clf2, pur2, disc2 = models()
    first = next(finetune(cfg, clf2, pur2, disc2, tiny_data(), tiny_data(8, seed=1)))
    clf3, pur3, disc3 = models()
    resumed = list(finetune(cfg, clf3, pur3, disc3, tiny_data(), tiny_data(8, seed=1), state=first.state, start_epoch=1))
    assert [r.epoch for r in resumed] == [2]
    for k, v in full[-1].state["purifier"].items():
        assert torch.allclose(v, resumed[0].state["purifier"][k], atol=1e-5), k


def test_non_finite_loss_raises():
    cfg = Config.from_dict({**CFG, "lr": 1.0, "epochs": 1})
    clf, pur, disc = models()
    with torch.no_grad():
        for p in pur.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        list(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8)))


def test_defense_is_one_module_with_fresh_seedable_randomness():
    cfg = Config.from_dict(CFG)
    clf, pur, _ = models()
    defense = Defense(RandomTransform.from_config(cfg), pur, clf, seed=3).eval()
    x = torch.rand(4, 3, 32, 32)
    a, b = defense.purify(x), defense.purify(x)
    assert not torch.equal(a, b)
    defense.reseed(3)
    assert torch.equal(defense.purify(x), a)
    defense.train()
    assert not defense.classifier.training and defense.purifier.training


def test_the_classifier_alone_is_a_deterministic_defense_with_nothing_to_fine_tune():
    cfg = Config.from_dict({**CFG, "defense": "classifier", "epochs": 0})
    clf, pur, disc = models()
    defense = Defense.from_config(cfg, pur, clf).eval()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(defense(x), clf(x)) and torch.equal(defense(x), defense(x))
    report = next(finetune(cfg, clf, pur, disc, tiny_data(), tiny_data(8, seed=1)))
    # no randomness: every scoring draw agrees, so the clean accuracy is the classifier's on these images
    x_eval = tiny_data(8, seed=1).x.float() / 255
    assert report.metrics["clean_acc"] == pytest.approx(
        (clf(x_eval).argmax(1) == tiny_data(8, seed=1).y).float().mean().item())
    with pytest.raises(ValueError, match="epochs=2 with defense='classifier'.*accepted: epochs=0"):
        Config.from_dict({**CFG, "defense": "classifier"})
