"""`--constraint`: parsing, and trials that break one kept in the study but off the front."""
from __future__ import annotations

import optuna
import pytest

from atop.config import Config
from search_spaces import SPACES
from study.constraints import Constraint, infeasible, parse, violations
from study.errors import StudyError
from study.searcher import AskTellSearcher
from study.settings import StudySettings
from tracking.contract import DIRECTIONS, OBJECTIVES


def test_constraints_parse_and_measure_violation():
    c = parse(["clean_acc>=0.7", " robust_acc_unseen <= 0.5 "])
    assert c == (Constraint("clean_acc", ">=", 0.7), Constraint("robust_acc_unseen", "<=", 0.5))
    assert violations(c, (0.8, 0.1, 0.6)) == pytest.approx([-0.1, 0.1])
    assert str(c[0]) == "clean_acc>=0.7"


@pytest.mark.parametrize("text, needle", [
    ("clean_acc>0.7", "OBJECTIVE>=NUMBER"),
    ("unknown_metric>=1", "unknown objective 'unknown_metric'; accepted: clean_acc"),
    ("clean_acc>=1.5", "outside [0, 1]"),
    ("clean_acc>=abc", "OBJECTIVE>=NUMBER"),
])
def test_bad_constraints_are_one_line_errors(text, needle):
    with pytest.raises(StudyError, match=None) as err:
        parse([text])
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StudyError):
        StudySettings(space="tiny", constraints=[text]).validate()


def test_a_trial_that_breaks_a_constraint_is_complete_but_never_on_the_front():
    study = optuna.create_study(directions=list(DIRECTIONS))
    searcher = AskTellSearcher(study, SPACES["tiny"], Config(epochs=1), 3, lambda n: None, lambda *a: None,
                               parse(["clean_acc>=0.5"]))
    for i, values in enumerate([(0.9, 0.1, 0.1), (0.4, 0.8, 0.8), (0.6, 0.2, 0.2)]):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result={**dict(zip(OBJECTIVES, values)), "epoch": 1})
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # trial 1 dominates nothing it is allowed to: without the constraint it would be on the front
    assert sorted(t.number for t in study.best_trials) == [0, 2]
    assert infeasible(study.trials[1]) and not infeasible(study.trials[0])
    assert list(study.trials[1].constraints.values()) == [pytest.approx(0.1)]
