"""Search spaces: only suggest, conditional where they apply, every name a Config field."""
from __future__ import annotations

import dataclasses

import optuna
import pytest

from atop.config import Config, RTType
from atop.names import RT_PARAMS
from atop.transforms import TRANSFORMS
from search_spaces import SPACES, Space, config_values, searched_names
from search_spaces.reproduce import ARMS
from tracking.contract import Arm

CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


def _sampled(space: str, n: int = 200) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(SPACES[space].suggest(trial))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("space", list(SPACES))
def test_every_suggested_name_and_fixed_key_is_a_config_field(space):
    names = {k for params in _sampled(space) for k in params} | set(SPACES[space].fixed)
    assert names <= CONFIG_FIELDS, names - CONFIG_FIELDS
    # the searching spaces name their Optuna parameters after the fields; reproduce's one `arm` sets many
    expected = {"arm"} if space == "reproduce" else {k for params in _sampled(space) for k in params}
    assert searched_names(SPACES[space]) == expected


def test_reproduce_arms_are_named_as_the_claims_analysis_reads_them():
    assert list(ARMS) == [arm.value for arm in Arm]


def test_reproduce_arms_are_the_papers_claims_and_their_controls():
    arms = {arm: Config.from_dict({**SPACES["reproduce"].fixed, "epochs": 3,
                                   **config_values(SPACES["reproduce"], {"arm": arm})}) for arm in ARMS}
    assert (arms["classifier-alone"].defense.value, arms["classifier-alone"].epochs) == ("classifier", 0)
    assert [arms[f"rt{k}-no-ft"].rt.value for k in (1, 2, 3)] == ["rt1", "rt2", "rt3"]
    assert all(arms[f"rt{k}-no-ft"].epochs == 0 for k in (1, 2, 3))
    control, fgsm, pgd = arms["rt2-ft-lambda0"], arms["rt2-atop-fgsm"], arms["rt2-atop-pgd-eot"]
    # the lambda=0 control differs from the authors' AToP in the CE weight only
    assert {k for k, v in control.to_dict().items() if fgsm.to_dict()[k] != v} == {"lambda_ce"}
    assert (control.lambda_ce, fgsm.lambda_ce, fgsm.epochs) == (0.0, 0.1, 3)
    assert (fgsm.train_attack.value, fgsm.train_grad_path.value) == ("fgsm", "classifier")
    assert (pgd.train_attack.value, pgd.train_grad_path.value, pgd.train_eot) == ("pgd", "defense", 2)


@pytest.mark.parametrize("space", list(SPACES))
def test_every_suggestion_builds_a_valid_config(space):
    for params in _sampled(space, 100):
        Config.from_dict({**SPACES[space].fixed, **params})


def test_paper_space_fixed_trial():
    params = SPACES["paper"].suggest(optuna.trial.FixedTrial({"rt": "rt2", "lambda_ce": 0.07}))
    assert params == {"rt": "rt2", "lambda_ce": 0.07}
    params = SPACES["paper"].suggest(optuna.trial.FixedTrial({"rt": "rt3", "lambda_ce": 0.05, "num_masks": 4}))
    assert params["num_masks"] == 4
    cfg = Config.from_dict({**SPACES["paper"].fixed, **params})
    assert (cfg.train_attack.value, cfg.train_norm.value, cfg.train_grad_path.value) == ("fgsm", "linf", "classifier")
    assert cfg.train_eps == pytest.approx(8 / 255) and cfg.lr == 1e-4 and (cfg.beta1, cfg.beta2) == (0.5, 0.999)


def test_paper_lambda_range_is_the_papers():
    lambdas = [p["lambda_ce"] for p in _sampled("paper")]
    assert 0.05 <= min(lambdas) and max(lambdas) <= 0.1


WIDE_RT1_FGSM = {"rt": "rt1", "mask_ratio": 0.3, "block_size": 4, "train_attack": "fgsm", "train_norm": "linf",
                 "train_eps": 8 / 255, "train_grad_path": "classifier", "lambda_ce": 0.1, "gan_weight": 1.0,
                 "l1_weight": 10.0, "ce_warmup_epochs": 0, "l1_target": "clean", "lr": 1e-4}


def test_wide_space_conditionals_rt1_fgsm_classifier():
    params = SPACES["wide"].suggest(optuna.trial.FixedTrial(WIDE_RT1_FGSM))
    assert params == WIDE_RT1_FGSM  # no noise_std, num_masks, train_steps, train_eot
    assert not {"noise_std", "num_masks", "train_steps", "train_random_start", "train_eot"} & set(params)


def test_wide_space_conditionals_rt3_pgd_defense():
    fixed = {**WIDE_RT1_FGSM, "rt": "rt3", "noise_std": 0.25, "num_masks": 4, "train_attack": "pgd",
             "train_norm": "l2", "train_eps": 0.5, "train_steps": 5, "train_random_start": True,
             "train_grad_path": "defense", "train_eot": 2}
    del fixed["mask_ratio"]
    params = SPACES["wide"].suggest(optuna.trial.FixedTrial(fixed))
    assert params == fixed
    cfg = Config.from_dict({**SPACES["wide"].fixed, **params})
    assert cfg.train_eot == 2 and cfg.num_masks == 4 and cfg.rt.value == "rt3"


def test_wide_space_covers_the_registries():
    seen = _sampled("wide", 300)
    assert {p["rt"] for p in seen} == {"rt1", "rt2", "rt3"}
    assert {p["train_attack"] for p in seen} == {"fgsm", "pgd"}
    assert {p["train_norm"] for p in seen} == {"linf", "l2"}
    assert {p["train_grad_path"] for p in seen} == {"classifier", "defense"}
    for p in seen:
        assert ("noise_std" in p) == (p["rt"] in ("rt2", "rt3"))
        assert ("mask_ratio" in p) == (p["rt"] in ("rt1", "rt2"))
        assert ("train_eot" in p) == (p["train_grad_path"] == "defense")
        assert ("train_steps" in p) == (p["train_attack"] == "pgd")
        if p["train_norm"] == "linf":
            assert p["train_eps"] <= 16 / 255 + 1e-12


def test_searched_names_runs_every_categorical_branch():
    def suggest(trial):  # "deep" only behind a rare choice; "never" behind none of the choices
        kind = trial.suggest_categorical("kind", ["a", "b", "c"])
        if kind == "c":
            return {"kind": kind, "deep": trial.suggest_int("deep", 1, 2)}
        if kind == "z":
            return {"never": trial.suggest_int("never", 1, 2)}
        return {"kind": kind}

    assert searched_names(Space("toy", suggest, {}, "toy")) == {"kind", "deep"}


def test_the_rt_registry_matches_the_config_enum_and_config_fields():
    assert list(TRANSFORMS) == [rt.value for rt in RTType]
    fields = {f.name for f in dataclasses.fields(Config)}
    for name, spec in TRANSFORMS.items():
        assert set(spec.params) <= fields, name


def test_a_new_rt_changes_the_wide_space_but_not_paper_or_tiny(monkeypatch):
    monkeypatch.setitem(RT_PARAMS, "rt9", RT_PARAMS["rt1"])  # what the spaces read (atop.names)

    def rt_choices(space):
        study = optuna.create_study()
        trial = study.ask()
        SPACES[space].suggest(trial)
        return tuple(trial.distributions["rt"].choices)

    assert rt_choices("paper") == rt_choices("tiny") == ("rt1", "rt2", "rt3")
    assert rt_choices("wide") == ("rt1", "rt2", "rt3", "rt9")
