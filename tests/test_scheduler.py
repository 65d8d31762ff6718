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
from study.errors import StudyError
from study.phases import make_scheduler
from study.run import build_parser, resolve_settings
from study.scheduler import ATTR_EPOCH_OBJECTIVES, MOASHAScheduler, crowding_distance, decide, rungs
from study.searcher import AskTellSearcher
from study.settings import StudySettings
from study.tables import pareto_table
from tracking.contract import EPOCH, ERROR_KEY, FAILED_KEY, OBJECTIVES, TRIAL_NUMBER

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
    return {EPOCH: epoch, **dict(zip(OBJECTIVES, (c, s, u)))}


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
    assert sched.on_trial_result(None, FakeTrial("b"), {FAILED_KEY: 1, ERROR_KEY: "x", EPOCH: 1}) == CONTINUE
    assert sched.on_trial_result(None, FakeTrial("c"), {EPOCH: 1, OBJECTIVES[0]: 0.1}) == CONTINUE
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


# --- the grace period against the CE warm-up -----------------------------------------------------------------

@pytest.mark.parametrize("argv, smallest", [
    # paper scale: 2 CE warm-up epochs of 10; the default grace period (1) and 2 sit inside the warm-up
    (["--preset", "paper-cifar10", "--scheduler", "mo-asha"], 3),
    (["--preset", "paper-cifar10", "--scheduler", "mo-asha", "--grace-period", "2"], 3),
    # the wide space searches ce_warmup_epochs up to 2: the longest warm-up a trial can get counts
    (["--preset", "tiny", "--space", "wide", "--epochs", "5", "--scheduler", "mo-asha"], 3),
])
def test_a_grace_period_inside_the_ce_warmup_is_refused_naming_the_smallest_accepted(argv, smallest, capsys):
    from study.run import main

    with pytest.raises(StudyError, match=rf"^--grace-period \d is at or inside the CE warm-up .*"
                                         rf"accepted with --scheduler mo-asha: an integer from {smallest} to "):
        resolve_settings(build_parser().parse_args(argv))
    assert main([*argv, "--storage-path", "/nonexistent/never-made"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --grace-period") and f"from {smallest} " in err
    ok = resolve_settings(build_parser().parse_args([*argv, "--grace-period", str(smallest)]))
    assert ok.grace_period == smallest
    # without a scheduler the grace period is unused and nothing is refused
    assert resolve_settings(build_parser().parse_args([a for a in argv if a not in ("--scheduler", "mo-asha")]))


def test_a_warmup_that_leaves_no_rung_says_so():
    args = build_parser().parse_args(["--preset", "paper-cifar10", "--epochs", "3", "--scheduler", "mo-asha"])
    with pytest.raises(StudyError, match=r"accepted with --scheduler mo-asha: none with 3 epochs and 2 CE warm-up"):
        resolve_settings(args)


# --- rung records persist in Optuna and come back on --resume -----------------------------------------------

def test_the_searcher_keeps_each_epochs_objectives_in_the_optuna_trial_including_a_stop():
    study = optuna.create_study(directions=["maximize"] * 3)
    base = StudySettings(space="tiny", config={"epochs": 3}).base_config()
    searcher = AskTellSearcher(study, SPACES["tiny"], base, 2, lambda n: None, lambda *a: None)
    searcher.suggest("a")
    searcher.on_trial_result("a", _result(1, 0.5, 0.4, 0.3))
    searcher.on_trial_result("a", {"atop_failed": 1, "atop_error": "x", "epoch": 2})  # not a vector
    searcher.on_trial_complete("a", result=_result(2, 0.6, 0.5, 0.4))  # what a scheduler's STOP sends
    kept = study.trials[0].user_attrs[ATTR_EPOCH_OBJECTIVES]
    assert {e: v["values"] for e, v in kept.items()} == {"1": [0.5, 0.4, 0.3], "2": [0.6, 0.5, 0.4]}
    assert kept["1"]["at"] <= kept["2"]["at"]
    assert study.trials[0].state is TrialState.PRUNED


def test_restore_orders_records_as_met_and_hands_an_interrupted_trials_records_to_its_rerun():
    study = optuna.create_study(directions=["maximize"] * 3)

    def add(state, vectors, **attrs):
        kept = {str(e): {"at": at, "values": v} for e, (at, v) in vectors.items()}
        study.add_trial(optuna.trial.create_trial(
            state=state, values=[0.1] * 3 if state is TrialState.COMPLETE else None,
            user_attrs={ATTR_EPOCH_OBJECTIVES: kept, **attrs}))

    add(TrialState.COMPLETE, {1: (5.0, [0.5] * 3), 2: (6.0, [0.6] * 3), 3: (7.0, [0.7] * 3)})  # 0
    add(TrialState.PRUNED, {1: (1.0, [0.4] * 3)}, stopped_at_epoch=1)  # 1: met rung 1 before trial 0
    add(TrialState.FAIL, {1: (2.0, [0.9] * 3)}, interrupted=True)  # 2: rerun as 4, which starts over
    add(TrialState.FAIL, {1: (3.0, [0.8] * 3)}, interrupted=True)  # 3: never rerun
    add(TrialState.WAITING, {}, rerun_of=2)  # 4
    sched = MOASHAScheduler(max_t=3, grace_period=1, reduction_factor=2)
    sched.restore_trials(study.get_trials())
    assert list(sched.records) == [1, 2] and list(sched.records[1]) == ["1", "4", "0"]  # epoch 3 is no rung
    assert sched.records[1]["4"] == [0.9] * 3 and sched.records[2] == {"0": [0.6] * 3}
    assert sched.stopped == {"1": 1}
    # the rerun does not meet its own earlier vector at rung 1 (it would be stopped as a duplicate) ...
    assert sched.on_trial_result(None, FakeTrial("x", {"epochs": 3, TRIAL_NUMBER: 4}), _result(1, .9, .9, .9)) \
        == CONTINUE
    # ... and a newcomer meets all three restored vectors
    assert sched.on_trial_result(None, FakeTrial("y", {"epochs": 3, TRIAL_NUMBER: 5}), _result(1, .45, .45, .45)) \
        == STOP


EPOCHS, NUM_TRIALS = 3, 6


def _vectors(label: int) -> dict[int, list[float]]:
    """A fixed learning curve per trial: three objectives rising by 0.05 an epoch from a seeded start
    (one quality per trial plus a little spread between objectives, so that trials dominate others)."""
    rng = np.random.default_rng(label)
    start = (rng.uniform(0.1, 0.6) + rng.uniform(-0.05, 0.05, size=3)).round(2)
    return {e: (start + 0.05 * e).round(2).tolist() for e in range(1, EPOCHS + 1)}


def _drive(study, scheduler, searcher, kill_after: int | None = None) -> bool:
    """What Tune does, one trial at a time: ask, report each epoch to the scheduler, then to the searcher
    (a STOP goes to `on_trial_complete`); False when the driver is killed after `kill_after` reports.

    Trial k of the study gets `lambda_ce = 0.01 * (k + 1)` (enqueued just in time, so a rerun of an
    interrupted trial comes next, as in `study/run.py`), and the learning curve `_vectors(k)`."""
    reports = 0
    while True:
        trials = study.get_trials(deepcopy=False)
        if not any(t.state is TrialState.WAITING for t in trials):
            label = sum(1 for t in trials if "rerun_of" not in t.user_attrs)
            study.enqueue_trial({"rt": "rt2", "lambda_ce": 0.01 * (label + 1)})
        tune_id = f"tune-{len(trials)}"
        config = searcher.suggest(tune_id)
        if config == "FINISHED":
            return True
        trial, curve = FakeTrial(tune_id, config), _vectors(round(config["lambda_ce"] / 0.01) - 1)
        for epoch in range(1, EPOCHS + 1):
            result = _result(epoch, *curve[epoch])
            if scheduler.on_trial_result(None, trial, result) == STOP:
                searcher.on_trial_complete(tune_id, result=result)
                break
            searcher.on_trial_result(tune_id, result)
            reports += 1
            if reports == kill_after:
                return False  # the trial stays RUNNING in the Optuna storage
        else:
            searcher.on_trial_complete(tune_id)


def _outcome(study) -> dict[int, tuple[str, int | None]]:
    """lambda label -> (final state, stopped-at epoch) of every trial a killed driver did not interrupt."""
    return {round(t.params["lambda_ce"] / 0.01) - 1: (t.state.name, t.user_attrs.get("stopped_at_epoch"))
            for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
            if not t.user_attrs.get("interrupted")}


def _study(tmp_path, name):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / f'{name}.db'}")
    return optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * 3), storage


def _driver(study, settings, n_trials, restore=True):
    from study.resume import finished_count

    scheduler = make_scheduler(settings, EPOCHS, study if restore else None)
    remaining = n_trials - finished_count(study)
    searcher = AskTellSearcher(study, SPACES["tiny"], settings.base_config(), remaining,
                               lambda n: None, lambda *a: None, max_trials=scheduler.trials_for(remaining))
    return scheduler, searcher


@pytest.mark.parametrize("restore", [True, False])
def test_a_study_killed_after_rung_1_and_resumed_stops_the_trials_it_would_have_stopped(tmp_path, restore):
    from study.resume import finished_count, settle_interrupted
    from tracking import mlflow_log

    settings = StudySettings(space="tiny", scheduler="mo-asha", grace_period=1, reduction_factor=2,
                             config={"epochs": EPOCHS})
    whole, _ = _study(tmp_path, "whole")
    assert _drive(whole, *_driver(whole, settings, NUM_TRIALS))
    expected = _outcome(whole)
    # --num-trials counts the trials that ran to their last epoch; the pruned ones were replaced
    assert sum(s == "COMPLETE" for s, _ in expected.values()) == NUM_TRIALS
    assert sum(s == "PRUNED" for s, _ in expected.values()) >= 2, expected

    killed, storage = _study(tmp_path, "killed")
    kill_after = 7  # the 7th report a trial goes on after is a rung-1 report (epoch 1)
    assert not _drive(killed, *_driver(killed, settings, NUM_TRIALS), kill_after=kill_after)
    running = killed.get_trials(states=(TrialState.RUNNING,))
    assert len(running) == 1 and list(running[0].user_attrs[ATTR_EPOCH_OBJECTIVES]) == ["1"]
    assert killed.get_trials(states=(TrialState.PRUNED,)), "the kill comes after rung 1 has stopped trials"
    before_kill = finished_count(killed)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = mlflow_log.ensure_experiment(uri, "killed", (tmp_path / "art").as_uri())
    parent = mlflow_log.ensure_parent_run(uri, exp, "killed", {"space": "tiny"}, {})
    resumed = optuna.load_study(study_name="killed", storage=storage)
    assert settle_interrupted(resumed, storage, uri, exp, parent, log=lambda m: None) == 1
    assert finished_count(resumed) == before_kill  # neither the interrupted nor the pruned trials count
    assert _drive(resumed, *_driver(resumed, settings, NUM_TRIALS, restore=restore))
    if restore:
        assert _outcome(resumed) == expected
    else:  # rungs that start empty decide otherwise than the whole study did
        assert _outcome(resumed) != expected


def test_pruned_trials_are_replaced_up_to_the_cap_and_the_cap_ends_a_study_whose_rungs_pass_nothing():
    study = optuna.create_study(directions=["maximize"] * 3)
    base = StudySettings(space="tiny", config={"epochs": 3}).base_config()
    said = []
    assert MOASHAScheduler(max_t=3, grace_period=1, reduction_factor=2).trials_for(2) == 8  # rungs 1, 2
    searcher = AskTellSearcher(study, SPACES["tiny"], base, 2, lambda n: None, lambda *a: None, max_trials=5,
                               log=said.append)
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None  # a and b could still fill the 2 trials: wait, not FINISHED
    searcher.on_trial_complete("a", result=_result(1, 0.1, 0.1, 0.1))  # stopped at rung 1: replaced
    assert searcher.suggest("c")
    searcher.on_trial_complete("b", result=_result(3, 0.5, 0.5, 0.5))  # ran to its end: counts
    searcher.on_trial_complete("c", result=_result(1, 0.1, 0.1, 0.1))
    assert searcher.suggest("d") and searcher.suggest("e") is None  # 1 counted + 1 running fill the 2
    searcher.on_trial_complete("d", result=_result(2, 0.1, 0.1, 0.1))
    assert searcher.suggest("e")  # the 5th and last trial the cap allows
    assert searcher.suggest("f") is None and not said  # e may still run to its end
    searcher.on_trial_complete("e", result=_result(1, 0.1, 0.1, 0.1))
    assert searcher.suggest("f") == "FINISHED"
    assert said == [("search: stopped at the cap of 5 trials; 1 of 2 ran to their end, the others were "
                     "stopped early (PRUNED)")]
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE", "PRUNED", "PRUNED", "PRUNED"]
