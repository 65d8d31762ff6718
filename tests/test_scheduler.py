"""MO-ASHA: the pure rung rule on hand-made vectors, the Ray wrapper on hand-made metric streams,
and what a STOP becomes in the searcher (PRUNED, off the Pareto table). No Ray cluster needed."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import TrialScheduler

from search_spaces import SPACES
from study.run import build_parser, make_scheduler, resolve_settings
from study.scheduler import MOASHAScheduler, crowding_distance, decide, rungs
from study.searcher import AskTellSearcher
from study.settings import StudyError, StudySettings
from study.tables import pareto_table

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def test_rungs_sit_below_the_last_epoch():
    assert rungs(1, 3, 10) == [1, 3, 9]
    assert rungs(1, 2, 3) == [1, 2]
    assert rungs(1, 3, 3) == [1]
    assert rungs(2, 2, 9) == [2, 4, 8]
    assert rungs(3, 2, 3) == []


def test_crowding_distance_by_hand():
    points = np.array([[0.0, 1.0], [0.25, 0.5], [1.0, 0.0], [0.1, 0.1]])
    ranks = np.array([0, 0, 0, 1])
    d = crowding_distance(points, ranks)
    # the middle point: (1.0 - 0.0) / 1 in objective 0, (1.0 - 0.0) / 1 in objective 1
    assert d[1] == pytest.approx(2.0)
    assert np.isinf(d[[0, 2, 3]]).all()


def test_first_trial_at_a_rung_continues():
    assert decide([], [0.0, 0.0, 0.0], eta=3)


def test_a_dominated_trial_is_stopped_and_a_non_dominated_one_is_not():
    recorded = [[0.8, 0.5, 0.4]]
    assert not decide(recorded, [0.7, 0.4, 0.3], eta=2)  # dominated: stopped
    assert not decide(recorded, [0.8, 0.5, 0.3], eta=2)  # weakly dominated (one objective worse): stopped
    assert decide(recorded, [0.9, 0.3, 0.3], eta=2)  # better in one objective: continues
    assert not decide(recorded, [0.8, 0.5, 0.4], eta=2)  # a duplicate adds no hypervolume: the earlier one holds it
    assert decide([[0.8, 0.5, 0.4], [0.1, 0.1, 0.1]], [0.8, 0.5, 0.4], eta=1.5)  # ... unless there is room (2 of 3)


def test_rank_comes_before_crowding():
    recorded = [[0.9, 0.9, 0.9], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]
    # rank 1 beside [0.5]*3 (neither dominates): only the rank-0 point beats it; 2 of 4 continue
    assert decide(recorded, [0.4, 0.6, 0.4], eta=2)
    # rank 2: beaten by two, not in the best 2 of 4
    assert not decide(recorded, [0.3, 0.3, 0.3], eta=2)
    # the same vector with eta=4/3 keeps 3 of 4
    assert decide(recorded, [0.3, 0.3, 0.3], eta=4 / 3)


def test_a_crowded_non_dominated_trial_is_stopped_when_the_front_is_larger_than_1_over_eta():
    # six mutually non-dominated points on x+y+z=1; the new one sits in the middle of all three
    # objectives (crowding 1.5), three others are the ends of some objective (crowding inf)
    recorded = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.5, 0, 0.5]]
    new = [0.34, 0.33, 0.33]
    assert not decide(recorded, new, eta=3)  # keeps 2 of 6: beaten by 3
    assert decide(recorded, new, eta=1.5)  # keeps 4 of 6: beaten by 3 (the tie at 1.5 goes to it)


@dataclass
class FakeTrial:
    trial_id: str
    config: dict = field(default_factory=lambda: {"epochs": 3})


def _result(epoch, c, s, u):
    return {"epoch": epoch, "clean_acc": c, "robust_acc_seen": s, "robust_acc_unseen": u}


def test_scheduler_stops_dominated_trials_at_their_rung_on_a_metric_stream():
    sched = MOASHAScheduler(max_t=3, grace_period=1, reduction_factor=2)
    t0, t1, t2 = FakeTrial("t0"), FakeTrial("t1"), FakeTrial("t2")
    stream = [
        (t0, _result(1, 0.5, 0.5, 0.5), CONTINUE),  # first at rung 1
        (t1, _result(1, 0.4, 0.4, 0.4), STOP),  # dominated by t0 at rung 1
        (t2, _result(1, 0.6, 0.3, 0.5), CONTINUE),  # non-dominated at rung 1
        (t0, _result(2, 0.6, 0.6, 0.6), CONTINUE),  # first at rung 2
        (t0, _result(3, 0.7, 0.7, 0.7), CONTINUE),  # last epoch: never stopped
        (t2, _result(2, 0.55, 0.55, 0.55), STOP),  # dominated by t0 at rung 2
        (t2, _result(2, 0.55, 0.55, 0.55), CONTINUE),  # a restored trial reporting again: no second decision
    ]
    got = [sched.on_trial_result(None, trial, result) for trial, result, _ in stream]
    assert got == [want for *_, want in stream]
    assert sched.stopped == {"t1": 1, "t2": 2}
    assert sorted(sched.records[1]) == ["t0", "t1", "t2"] and sorted(sched.records[2]) == ["t0", "t2"]
    assert "2 stopped" in sched.debug_string()


def test_scheduler_ignores_failed_and_incomplete_results(tmp_path):
    sched = MOASHAScheduler(max_t=3, reduction_factor=2)
    sched.on_trial_result(None, FakeTrial("a"), _result(1, 0.9, 0.9, 0.9))
    assert sched.on_trial_result(None, FakeTrial("b"), {"atop_failed": 1, "atop_error": "x", "epoch": 1}) == CONTINUE
    assert sched.on_trial_result(None, FakeTrial("c"), {"epoch": 1, "clean_acc": 0.1}) == CONTINUE
    assert sched.records == {1: {"a": [0.9, 0.9, 0.9]}}
    sched.save(str(tmp_path / "s.json"))
    other = MOASHAScheduler(max_t=3, reduction_factor=2)
    other.restore(str(tmp_path / "s.json"))
    assert other.on_trial_result(None, FakeTrial("d"), _result(1, 0.1, 0.1, 0.1)) == STOP


def test_a_scheduler_stop_is_told_pruned_and_kept_off_the_pareto_table():
    """What Ray does on STOP: searcher.on_trial_complete(trial_id, result=last result)."""
    study = optuna.create_study(directions=["maximize"] * 3, sampler=optuna.samplers.RandomSampler(seed=0))
    base = StudySettings(space="tiny", config={"epochs": 3}).base_config()
    settled = []
    searcher = AskTellSearcher(study, SPACES["tiny"], base, 3, lambda n: f"run{n}",
                               lambda n, st, sm: settled.append((n, st)))
    sched = MOASHAScheduler(max_t=3, reduction_factor=2)
    ids = ["a", "b", "c"]
    configs = {i: searcher.suggest(i) for i in ids}
    trials = {i: FakeTrial(i, configs[i]) for i in ids}

    def report(i, result):
        decision = sched.on_trial_result(None, trials[i], result)
        if decision == STOP:
            searcher.on_trial_complete(i, result=result)
        else:
            searcher.on_trial_result(i, result)
        return decision

    assert report("a", _result(1, 0.5, 0.5, 0.5)) == CONTINUE
    # b's partial values dominate a's final ones: told COMPLETE, they would corrupt the front
    assert report("b", {**_result(1, 0.4, 0.4, 0.4), "compute_s": 2.0}) == STOP
    assert report("c", _result(1, 0.6, 0.2, 0.2)) == CONTINUE  # non-dominated at rung 1
    for epoch in (2, 3):
        assert report("a", _result(epoch, 0.3, 0.3, 0.3)) == CONTINUE
    assert report("c", _result(2, 0.35, 0.2, 0.2)) == CONTINUE  # non-dominated at rung 2
    assert report("c", _result(3, 0.2, 0.2, 0.2)) == CONTINUE  # its last epoch
    searcher.on_trial_complete("a")
    searcher.on_trial_complete("c")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert study.trials[1].user_attrs["stopped_at_epoch"] == 1 and study.trials[1].user_attrs["compute_s"] == 2.0
    assert study.trials[1].values is None
    assert [t.number for t in study.best_trials] == [0]  # Optuna's front: COMPLETE trials only
    table = pareto_table(study)
    assert "run0" in table and "run1" not in table
    assert settled == [(1, TrialState.PRUNED), (0, TrialState.COMPLETE), (2, TrialState.COMPLETE)]


def test_scheduler_flags_and_settings():
    args = build_parser().parse_args(["--preset", "tiny", "--epochs", "3", "--scheduler", "mo-asha",
                                      "--grace-period", "1", "--reduction-factor", "2"])
    settings = resolve_settings(args)
    assert (settings.scheduler, settings.grace_period, settings.reduction_factor) == ("mo-asha", 1, 2)
    sched = make_scheduler(settings, 3)
    assert isinstance(sched, MOASHAScheduler) and sched.eta == 2
    assert make_scheduler(resolve_settings(build_parser().parse_args(["--preset", "tiny"])), 2) is None
    for bad, match in ((["--scheduler", "asha"], "unknown"), (["--scheduler", "mo-asha", "--grace-period", "2"],
                                                                "no rung"),
                       (["--reduction-factor", "1"], "out of range")):
        with pytest.raises(StudyError, match=match):
            resolve_settings(build_parser().parse_args(["--preset", "tiny", *bad]))
