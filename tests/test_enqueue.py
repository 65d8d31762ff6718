"""`--enqueue FILE`: reference configurations checked against the real spaces, run by real Optuna."""
from __future__ import annotations

import json
import warnings

import optuna
import pytest
import yaml

from atop.config import Config
from search_spaces import SPACES, Space
from study.enqueue import Reference, enqueue_references, read_enqueue
from study.errors import StudyError
from study.settings import StudySettings, make_sampler
from tracking.contract import ATTR_REFERENCE

PAPER = [{"name": "rt2-paper", "rt": "rt2", "lambda_ce": 0.1},
         {"rt": "rt3", "lambda_ce": 0.05, "num_masks": 4}]
#: one entry per branch of the wide space: RT1/RT2/RT3, FGSM/PGD, l-inf/l2, classifier/defense gradient
WIDE = [
    {"name": "fgsm-clf", "rt": "rt1", "mask_ratio": 0.25, "block_size": 4, "train_attack": "fgsm",
     "train_norm": "linf", "train_eps": 8 / 255, "train_grad_path": "classifier", "lambda_ce": 0.1,
     "gan_weight": 1.0, "l1_weight": 1.0, "ce_warmup_epochs": 2, "l1_target": "adversarial", "lr": 1e-4},
    {"name": "pgd-eot-l2", "rt": "rt3", "noise_std": 0.25, "num_masks": 4, "block_size": 8,
     "train_attack": "pgd", "train_norm": "l2", "train_eps": 0.5, "train_steps": 10, "train_random_start": True,
     "train_grad_path": "defense", "train_eot": 4, "lambda_ce": 1.0, "gan_weight": 0.01, "l1_weight": 50.0,
     "ce_warmup_epochs": 0, "l1_target": "clean", "lr": 1e-3},
    {"name": "rt2-pgd-linf", "rt": "rt2", "mask_ratio": 0.6, "noise_std": 0.05, "block_size": 2,
     "train_attack": "pgd", "train_norm": "linf", "train_eps": 16 / 255, "train_steps": 2,
     "train_random_start": False, "train_grad_path": "classifier", "lambda_ce": 0.01, "gan_weight": 2.0,
     "l1_weight": 0.5, "ce_warmup_epochs": 1, "l1_target": "adversarial", "lr": 1e-5},
]


def _base(space: str) -> Config:
    return StudySettings(space=space).base_config()


def _write(tmp_path, entries, name="refs.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(entries) if name.endswith(".json") else yaml.safe_dump(entries))
    return path


def _asked(space: Space, refs: list[Reference]) -> list[tuple[dict, dict]]:
    """Enqueue `refs` into an in-memory study with the study's own sampler; ask as many trials."""
    study = optuna.create_study(directions=["maximize"] * 3, sampler=make_sampler("nsga2", 0, 4, 0))
    assert enqueue_references(study, refs) == refs
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns (and still uses the value) for an out-of-range fixed one
        for _ in refs:
            trial = study.ask()
            out.append((space.suggest(trial), trial.user_attrs))
            study.tell(trial, [0.5, 0.5, 0.5])
    return out


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_paper_references_reach_the_trials_unchanged(tmp_path, suffix):
    refs = read_enqueue(_write(tmp_path, PAPER, f"refs.{suffix}"), SPACES["paper"], _base("paper"))
    assert refs == [Reference("rt2-paper", {"rt": "rt2", "lambda_ce": 0.1}),
                    Reference("ref-2", {"rt": "rt3", "lambda_ce": 0.05, "num_masks": 4})]
    for ref, (params, attrs) in zip(refs, _asked(SPACES["paper"], refs)):
        assert params == ref.params and attrs[ATTR_REFERENCE] == ref.name


def test_wide_references_on_every_branch_reach_the_trials_unchanged(tmp_path):
    refs = read_enqueue(_write(tmp_path, WIDE), SPACES["wide"], _base("wide"))
    assert [r.name for r in refs] == [e["name"] for e in WIDE]
    assert [r.params for r in refs] == [{k: v for k, v in e.items() if k != "name"} for e in WIDE]
    for ref, (params, _) in zip(refs, _asked(SPACES["wide"], refs)):
        assert params == ref.params
        Config.from_dict({**_base("wide").to_dict(), **params})


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-4` as the string "1e-4"; the float distribution still gets a float
    text = yaml.safe_dump([WIDE[0]]).replace("lr: 0.0001", "lr: 1e-4")
    assert "lr: 1e-4" in text and yaml.safe_load(text)[0]["lr"] == "1e-4"
    (tmp_path / "r.yaml").write_text(text)
    (ref,) = read_enqueue(tmp_path / "r.yaml", SPACES["wide"], _base("wide"))
    assert ref.params["lr"] == 1e-4 and isinstance(ref.params["lr"], float)


def test_enqueue_skips_references_a_resumed_study_holds(tmp_path):
    refs = read_enqueue(_write(tmp_path, PAPER), SPACES["paper"], _base("paper"))
    study = optuna.create_study(directions=["maximize"] * 3)
    assert enqueue_references(study, refs[:1]) == refs[:1]
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # held in any state: not queued again
    assert enqueue_references(study, refs) == refs[1:]
    assert enqueue_references(study, refs) == []
    assert [t.user_attrs[ATTR_REFERENCE] for t in study.trials] == ["rt2-paper", "ref-2"]


def _lambda_space() -> Space:
    """A space whose range is wider than the config's (lambda_ce accepts 0..100)."""
    return Space("loose", lambda trial: {"lambda_ce": trial.suggest_float("lambda_ce", 0.0, 500.0)}, {}, "loose")


WIDE_LINF = WIDE[0]
BAD = [
    # (space, file content or None for no file, expected fragments)
    ("paper", None, ["cannot be read", "accepted"]),
    ("paper", {"rt": "rt2", "lambda_ce": 0.1}, ["holds dict, not a list"]),
    ("paper", [], ["empty list", "at least one"]),
    ("paper", "", ["holds NoneType, not a list"]),
    ("paper", "- [unclosed", ["does not parse"]),
    ("paper", ["rt2"], ["entry 1 is str", "accepted: a mapping"]),
    ("paper", [{"rt": "rt2", "lambda_ce": 0.1, "lambda": 0.1}],
     ["entry 1 (ref-1)", "unknown parameter(s) 'lambda'", "accepted: name, lambda_ce, num_masks, rt"]),
    ("paper", [{"rt": "rt2", "lambda_ce": 0.1, "epochs": 1}],
     ["unknown parameter(s) 'epochs'", "(epochs: not searched; the study's config sets it"]),
    ("paper", [{"rt": "rt2", "lambda_ce": 0.0}], ["lambda_ce=0.0 is outside space 'paper'", "0.05..0.1"]),
    ("paper", [{"rt": "RT2", "lambda_ce": 0.1}], ["rt='RT2' is outside", "one of rt1, rt2, rt3"]),
    ("paper", [{"rt": "rt3", "lambda_ce": 0.1, "num_masks": 3}], ["num_masks=3 is outside", "one of 2, 4"]),
    ("paper", [{"rt": "rt2", "lambda_ce": 0.1, "num_masks": 4}],
     ["num_masks do not apply with rt='rt2'", "accepted here: rt, lambda_ce"]),
    ("paper", [{"rt": "rt3", "lambda_ce": 0.1}], ["lacks parameter(s) num_masks", "rt='rt3'"]),
    ("paper", [{"lambda_ce": 0.1}], ["lacks parameter(s) rt"]),
    ("paper", [{"name": "x", "rt": "rt1", "lambda_ce": 0.1}, {"name": "x", "rt": "rt2", "lambda_ce": 0.1}],
     ["entry 2 (x)", "name 'x' is already entry 1's"]),
    ("paper", [{"name": "ref-2", "rt": "rt1", "lambda_ce": 0.1}, {"rt": "rt2", "lambda_ce": 0.1}],
     ["entry 2 (ref-2)", "already entry 1's"]),
    ("paper", [{"name": "a b", "rt": "rt1", "lambda_ce": 0.1}], ["entry 1 has name 'a b'", "letters, digits"]),
    ("wide", [{**WIDE_LINF, "train_eps": 0.5}], ["train_eps=0.5 is outside space 'wide'", "0.00784"]),
    ("wide", [{**WIDE_LINF, "train_attack": "pgd", "train_steps": 11, "train_random_start": False}],
     ["train_steps=11 is outside", "an integer in 2..10"]),
    ("wide", [{**WIDE_LINF, "train_attack": "pgd", "train_steps": 2.5, "train_random_start": False}],
     ["train_steps=2.5 is outside", "an integer"]),
    ("wide", [{**WIDE_LINF, "train_attack": "pgd", "train_steps": 2, "train_random_start": 1}],
     ["train_random_start=1 is outside", "one of false, true"]),
    ("wide", [{**WIDE_LINF, "lr": "fast"}], ["lr='fast' is outside", "a number in 1e-05..0.001"]),
    ("wide", [{**WIDE_LINF, "train_steps": 3}], ["train_steps do not apply with", "train_attack='fgsm'"]),
    ("wide", [{**WIDE_LINF, "rt": "rt3", "num_masks": 2, "noise_std": 0.1}], ["mask_ratio do not apply with rt='rt3'"]),
    ("wide", [{**WIDE_LINF, "train_grad_path": "defense"}], ["lacks parameter(s) train_eot"]),
    ("loose", [{"lambda_ce": 150.0}], ["config with these values is invalid", "lambda_ce=150.0 is out of range"]),
]


@pytest.mark.parametrize("space, content, expected", BAD, ids=[f"{i}-{b[2][0][:30]}" for i, b in enumerate(BAD)])
def test_bad_enqueue_files_are_one_line_errors(tmp_path, space, content, expected):
    path = tmp_path / "refs.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(yaml.safe_dump(content))
    the_space = _lambda_space() if space == "loose" else SPACES[space]
    base = Config() if space == "loose" else _base(space)
    with pytest.raises(StudyError) as info:
        read_enqueue(path, the_space, base)
    msg = str(info.value)
    assert msg.startswith(f"--enqueue {str(path)!r}") and "\n" not in msg, msg
    for fragment in expected:
        assert fragment in msg, msg


def test_file_must_be_yaml_or_json(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text(yaml.safe_dump(PAPER))
    with pytest.raises(StudyError, match=r"refs.txt' must end in .json, .yaml or .yml"):
        read_enqueue(path, SPACES["paper"], _base("paper"))
