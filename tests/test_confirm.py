"""The confirm stage's planning and aggregation (`study.confirm`): targets, spread, figures over seeds."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from atop.config import Config
from search_spaces import SPACES
from study.confirm import (
    Confirmed,
    Figure,
    Target,
    aggregate,
    confirm_config,
    run_confirm,
    spread,
    table,
    targets,
    verdict,
)
from study.errors import StudyError
from study.settings import StudySettings
from study.storage import Storage, parse
from tracking.contract import (
    ATTR_INTERVALS,
    ATTR_REFERENCE,
    ATTR_RUN_ID,
    CONFIRM_OF_TAG,
    DIRECTIONS,
    INTERRUPTED_TAG,
    OBJECTIVES,
    ROLE_TAG,
    Role,
)


@dataclass(frozen=True)
class StageBed:
    """What `run_confirm` needs, real: an Optuna study with two configurations on its front (both
    confirmed with `top=2`), an MLflow sqlite store with an experiment and parent run, a study folder.
    A test's `fit` stands in for Ray Tune (tests/test_confirm_study.py runs the stage under Ray)."""

    study: optuna.Study
    client: Any
    uri: str
    experiment: str
    parent: str
    store: Storage
    folder: Path

    def confirm(self, fit: Callable, **more: Any) -> tuple[list[Confirmed], bool]:
        """Run the stage (2 seeds per configuration) with `fit` as Ray Tune; `more`: `run_confirm`'s other arguments."""
        return run_confirm(study=self.study, space=SPACES["paper"], base=Config(epochs=1, seed=0), overrides={},
                           top=2, seeds=2, folder=self.folder / "local", store=self.store, uri=self.uri,
                           experiment_id=self.experiment, parent_id=self.parent, start=lambda: ({}, fit),
                           note="test", log=lambda line: None, **more)


def stage_bed(tmp_path: Path) -> StageBed:
    from mlflow import MlflowClient

    study = optuna.create_study(directions=list(DIRECTIONS))
    for i, values in enumerate([(0.9, 0.1, 0.1), (0.1, 0.9, 0.1)]):  # both on the front: both confirmed
        study.add_trial(optuna.trial.create_trial(
            values=list(values), params={"rt": "rt1", "lambda_ce": 0.05 + 0.05 * i},
            distributions={"rt": optuna.distributions.CategoricalDistribution(["rt1", "rt2"]),
                           "lambda_ce": optuna.distributions.FloatDistribution(0, 1)}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("confirm", artifact_location=(tmp_path / "artifacts").as_uri())
    store = parse(str(tmp_path / "study"))
    store.fs.create_dir(store.base)
    return StageBed(study, client, uri, experiment, client.create_run(experiment).info.run_id, store, tmp_path)

def _study(points: list[tuple[float, float, float]], refs: dict[int, str] | None = None) -> optuna.Study:
    study = optuna.create_study(directions=list(DIRECTIONS))
    for i, values in enumerate(points):
        attrs = {ATTR_RUN_ID: f"run{i}", ATTR_INTERVALS: {o: [v - 0.05, v + 0.05] for o, v in zip(OBJECTIVES, values)}}
        if refs and i in refs:
            attrs[ATTR_REFERENCE] = refs[i]
        study.add_trial(optuna.trial.create_trial(values=list(values), params={"lambda_ce": 0.1 * i},
                                                  distributions={"lambda_ce": optuna.distributions.FloatDistribution(0, 1)},
                                                  user_attrs=attrs))
    return study


def test_spread_starts_from_the_best_mean_and_adds_the_farthest_points():
    points = np.array([[0.9, 0.1], [0.85, 0.2], [0.6, 0.6], [0.1, 0.9]])
    assert spread(points, 1) == [2]  # best mean 0.6
    assert spread(points, 2) == [0, 2]  # 0 and 3 are equally far from 2: the first wins
    assert spread(points, 3) == [0, 2, 3]  # the near-duplicate [0.85, 0.2] is left out
    assert spread(points, 9) == [0, 1, 2, 3]
    assert spread(np.array([[0.5, 0.5]] * 3), 2) == [0, 1]  # equal points: still distinct rows


def test_targets_are_spread_front_members_plus_every_reference():
    # trials 0-2 are on the front; 3 is dominated but a reference; 4 is dominated
    study = _study([(0.9, 0.1, 0.1), (0.5, 0.5, 0.5), (0.1, 0.9, 0.2), (0.2, 0.2, 0.2), (0.1, 0.1, 0.1)],
                   refs={3: "no-ft"})
    chosen = targets(study, top=2)
    assert [t.number for t in chosen] == [0, 1, 3] or [t.number for t in chosen] == [1, 2, 3]
    ref = chosen[-1]
    assert ref.reference == "no-ft" and ref.label == "no-ft" and ref.run_id == "run3"
    assert ref.intervals["clean_acc"] == pytest.approx([0.15, 0.25])
    assert targets(optuna.create_study(directions=list(DIRECTIONS)), top=3) == []


def test_a_confirm_config_is_the_search_trials_with_a_new_seed_and_the_confirm_scoring():
    base = Config(seed=7, n_eval=64, epochs=2)
    t = Target(3, "r", {"rt": "rt3", "lambda_ce": 0.08, "num_masks": 2}, (0.5, 0.2, 0.1), {})
    cfg = confirm_config(base, SPACES["paper"], t, {"eval_level": "light", "n_eval": 100}, seed=9)
    assert (cfg.lambda_ce, cfg.num_masks, cfg.seed, cfg.n_eval, cfg.eval_level.value, cfg.epochs) == \
        (0.08, 2, 9, 100, "light", 2)


def test_a_confirm_config_maps_a_spaces_parameters_to_config_fields():
    # reproduce's one parameter, `arm`, names a whole configuration: the confirm trial must run that
    base = Config(seed=7, n_eval=64, epochs=2)
    t = Target(0, "r", {"arm": "rt2-atop-pgd-eot"}, (0.5, 0.2, 0.1), {})
    cfg = confirm_config(base, SPACES["reproduce"], t, {}, seed=8)
    assert (cfg.train_attack.value, cfg.train_grad_path.value, cfg.train_eot, cfg.epochs) == ("pgd", "defense", 2, 2)
    alone = confirm_config(base, SPACES["reproduce"], Target(1, "c", {"arm": "classifier-alone"}, (0, 0, 0), {}),
                           {}, seed=8)
    assert (alone.defense.value, alone.epochs) == ("classifier", 0)


def test_figures_over_seeds_have_the_seed_mean_its_spread_and_an_interval_over_images_and_seeds():
    rng = np.random.default_rng(0)
    seed_a = (rng.random(400) < 0.6).astype(float)
    seed_b = (rng.random(400) < 0.7).astype(float)
    figures = aggregate([{"clean_acc": seed_a, "only_a": seed_a}, {"clean_acc": seed_b}])
    assert set(figures) == {"clean_acc"}  # a figure one seed lacks is dropped, not half-averaged
    f = figures["clean_acc"]
    assert f.mean == pytest.approx((seed_a.mean() + seed_b.mean()) / 2)
    assert f.sd == pytest.approx(np.std([seed_a.mean(), seed_b.mean()], ddof=1))
    assert f.lo < f.mean < f.hi and f.hi - f.lo < 0.2
    # one seed's images alone: a narrower spread (no seed variance), the interval still covers the mean
    one = aggregate([{"clean_acc": seed_a}])["clean_acc"]
    assert one.sd == 0.0 and one.lo < seed_a.mean() < one.hi


def test_the_audit_verdict_over_seeds_names_every_raised_flag():
    assert verdict(["", ""]) == "no flags"
    assert verdict(["steps_not_converged", "", "bpda_stronger,steps_not_converged"]) == (
        "flags: bpda_stronger, steps_not_converged")
    assert verdict(["not audited", "not audited"]) == "not audited"
    assert verdict([]) == "not audited"


def test_the_confirm_table_shows_validation_next_to_test_the_gap_and_the_audit():
    c = Confirmed(number=4, label="trial 4", params={}, seeds=[1, 2], n_images=1000,
                  figures={o: Figure(0.5, 0.01, 0.47, 0.53) for o in OBJECTIVES}, val=dict.fromkeys(OBJECTIVES, 0.56),
                  audit="no flags")
    text = table([c, Confirmed.from_dict({**c.__dict__, "figures": {"clean_acc": {"mean": 0.4, "sd": 0.0, "lo": 0.3,
                                                                                   "hi": 0.5}}, "label": "no-ft",
                                          "failed_seeds": [2]})], "light level")
    assert "2/1 seeds per config" in text or "1/2 seeds per config" in text
    assert "0.560 -> 0.500 [0.470, 0.530]  (gap +0.060)" in text and "no flags" in text
    assert "no-ft: seeds [2] failed" in text and text.endswith("test figures at light level")
    assert table([], "x") == "Confirmed on test: none"


def test_confirm_settings_are_checked():
    with pytest.raises(StudyError, match="--confirm-top 0 .* >= 1 \\(or --no-confirm\\)"):
        StudySettings(space="tiny", confirm_top=0).validate()
    with pytest.raises(StudyError, match="'epochs'.*accepted: eval_level, n_eval"):
        StudySettings(space="tiny", confirm_config={"epochs": 3}).validate()
    with pytest.raises(StudyError, match="confirm_config: .*eval_level"):
        StudySettings(space="tiny", confirm_config={"eval_level": "medium"}).validate()
    assert StudySettings(space="tiny").confirm_base().eval_level.value == "full"


def test_each_configuration_is_kept_as_soon_as_its_seeds_end_and_a_resumed_stage_skips_it(tmp_path):
    """`confirm.json` is written as each configuration's last seed ends, not when the stage ends: a
    driver stopped in the middle of the stage (here: the `fit` raises after the first configuration)
    keeps what it confirmed. Real Optuna, MLflow (sqlite) and study folder; `fit` stands in for
    Ray Tune (tests/test_confirm_study.py runs the stage under Ray)."""
    import json

    from study.confirm import load_state
    from trainables.atop_trainable import AUDIT_KEY, PER_IMAGE_KEY

    bed = stage_bed(tmp_path)
    rates = {o: [1.0, 0.0, 1.0, 1.0] for o in OBJECTIVES}
    kept_when_first_ended: list[dict] = []

    def stopped_after_the_first(jobs, ended):
        first = [j for j in jobs if j["number"] == jobs[0]["number"]]
        for job in first:
            ended(job, {PER_IMAGE_KEY: json.dumps(rates), AUDIT_KEY: ""})
        kept_when_first_ended.append(load_state(bed.store))
        raise KeyboardInterrupt  # the driver is stopped with the second configuration's seeds running

    with pytest.raises(KeyboardInterrupt):
        bed.confirm(stopped_after_the_first)
    assert list(kept_when_first_ended[0]) == [0] and list(load_state(bed.store)) == [0]
    assert load_state(bed.store)[0].figures["clean_acc"].mean == pytest.approx(0.75)

    asked: list[dict] = []

    def all_fail(jobs, ended):
        asked.extend(jobs)
        for job in jobs:
            ended(job, {})

    confirmed, ran = bed.confirm(all_fail)
    assert ran and {j["number"] for j in asked} == {1} and len(asked) == 2  # trial 0 is not confirmed again
    assert [c.number for c in confirmed] == [0, 1] and confirmed[1].failed_seeds == [1, 2]
    runs_of_1 = [r for r in bed.client.search_runs([bed.experiment]) if r.data.tags.get(CONFIRM_OF_TAG) == "1"]
    # the stopped driver's runs of trial 1 (a confirm run and two seed runs) ended KILLED, the new ones ran
    assert sorted(r.info.status for r in runs_of_1) == ["FAILED"] * 3 + ["KILLED"] * 3
    assert all(r.data.tags.get(INTERRUPTED_TAG) == "true" for r in runs_of_1 if r.info.status == "KILLED")
    # trial 0's confirm run was ended when its seeds ended, and nothing of it was killed on resume (its seed
    # runs are ended by the trainable, which this test's `fit` does not run)
    assert [r.info.status for r in bed.client.search_runs([bed.experiment]) if r.data.tags.get(CONFIRM_OF_TAG) == "0"
            and r.data.tags.get(ROLE_TAG) == Role.CONFIRM.value] == ["FINISHED"]


def test_a_study_searched_without_confirm_is_confirmed_by_a_resume_with_confirm_flags():
    from study.run import _resumed_settings, build_parser
    from study.settings import StudySettings

    saved = {"settings": StudySettings(confirm=False).to_dict(), "mlflow_uri": "sqlite:////tmp/none.db"}

    def confirm(*flags: str) -> bool:
        args = build_parser().parse_args(["--study-name", "s", "--resume", *flags])
        return _resumed_settings(args, "s", saved)[0].confirm

    assert not confirm() and not confirm("--num-trials", "9")
    assert confirm("--confirm-top", "2") and confirm("--confirm-seeds", "1")
    assert not confirm("--confirm-top", "2", "--no-confirm")
