"""analysis.claims: the verdict rules, the two-stage paired bootstrap on made-up per-image arrays,
and ``python -m analysis --claims`` on reference arms logged here into a real sqlite MLflow store
as the confirm stage logs them (tracking/contract.py; files in ``atop.artifacts.write_parquet``'s
column layout, written with pyarrow so that this test needs no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from analysis.__main__ import main
from analysis.claims import (
    AUTOATTACK,
    CLEAN,
    HIGHER,
    LOWER,
    NO_ARMS,
    NOT_REPRODUCED,
    REPRODUCED,
    SAME,
    SEEN,
    UNCLEAR,
    UNSEEN,
    UNTESTED,
    ArmScores,
    assess_claims,
    claim_verdict,
    difference,
    render_claims,
    verdict,
)
from atop.stats import bootstrap
from tracking.contract import (
    CONFIRM_SEED_TAG,
    EVAL_LEVEL_TAG,
    PARENT_TAG,
    REFERENCE_TAG,
    ROLE_TAG,
    STAGE_TAG,
    Arm,
    Role,
    Stage,
)

N = 200  # test images every arm scored


def right(k: int, start: int = 0) -> np.ndarray:
    """Correct on the k images from ``start`` on (wrapping), wrong on the others."""
    return np.isin(np.arange(N), (np.arange(k) + start) % N)


# --- verdict rules ----------------------------------------------------------------------------


def test_verdict_of_an_interval():
    assert verdict(0.01, 0.2) == HIGHER
    assert verdict(-0.2, -0.01) == LOWER
    assert verdict(-0.1, 0.1) == SAME
    assert verdict(0.0, 0.0) == SAME  # touching 0 is not wholly above it


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([HIGHER, HIGHER], REPRODUCED),
        ([HIGHER, SAME], UNCLEAR),
        ([HIGHER, LOWER], NOT_REPRODUCED),
        ([SAME, LOWER, SAME], NOT_REPRODUCED),
        ([SAME], UNCLEAR),
        ([], UNTESTED),
    ],
)
def test_claim_verdict(verdicts, expected):
    assert claim_verdict(verdicts) == expected


# --- the paired bootstrap -----------------------------------------------------------------------


def test_a_clear_gain_is_higher_and_the_estimate_is_the_mean_over_seeds():
    arm = np.stack([right(120), right(100)])  # seeds at 0.60 and 0.50: mean 0.55
    baseline = right(40)[None]  # one seed at 0.20, nested in both: every change is a gain
    diff, lo, hi = difference(arm, baseline)
    assert diff == pytest.approx(0.35)
    assert 0 < lo < diff < hi
    assert verdict(lo, hi) == HIGHER
    assert difference(arm, baseline) == (diff, lo, hi)  # fixed seed: the same interval


def test_a_zero_difference_on_other_images_is_no_difference():
    # the same count right, on disjoint images: a difference of 0 whose interval is wide
    diff, lo, hi = difference(right(60), right(60, start=100))
    assert diff == 0.0 and lo < -0.05 and hi > 0.05
    assert verdict(lo, hi) == SAME
    # identical arms: every resample gives exactly 0
    assert difference(right(60), right(60)) == (0.0, 0.0, 0.0)


def test_one_seed_against_two_and_the_seeds_widen_the_interval():
    # the baseline's two seeds disagree on every image (each right on half, the other half), so
    # its per-image mean is 1/2 everywhere: resampling images alone sees no spread, the seeds do
    even = np.arange(N) % 2 == 0
    baseline = np.stack([even, ~even])
    arm = np.full((1, N), 0.5)  # one seed at 1/2 on every image (a rate over draws)
    diff, lo, hi = difference(arm, baseline)
    assert diff == 0.0 and lo < 0 < hi
    assert bootstrap(arm, baseline.mean(axis=0)[None], paired_draws=False) == (0.0, 0.0)


def test_unpaired_seeds_need_the_same_images():
    with pytest.raises(ValueError, match="differ in shape"):
        bootstrap(np.ones((2, 5)), np.ones((1, 6)), paired_draws=False)
    with pytest.raises(ValueError, match="differ in shape"):  # paired draws: same count of draws
        bootstrap(np.ones((2, 5)), np.ones((1, 5)))


# --- claims from arms (compute, then render) ------------------------------------------------------


def arm(name: Arm, *seeds: dict[str, np.ndarray]) -> ArmScores:
    index = np.arange(N) + 1000
    return ArmScores(
        name.value,
        {f"{name.value}-{k}": {f: (index, v.astype(float)) for f, v in s.items()}
         for k, s in enumerate(seeds)},
        "light",
        "linf",
    )  # fmt: skip


def figures(clean: int, seen: int, unseen: int, aa: int | None = None, start: int = 0) -> dict:
    out = {CLEAN: right(clean), SEEN: right(seen, start), UNSEEN: right(unseen, start)}
    return out | ({AUTOATTACK: right(aa, start)} if aa is not None else {})


def test_assess_claims_judges_robust_figures_only_and_names_what_is_missing():
    arms = {
        a.name: a
        for a in [
            arm(Arm.CLASSIFIER_ALONE, figures(180, 0, 20)),
            arm(Arm.RT1_NO_FT, figures(150, 40, 100)),
            arm(Arm.RT2_NO_FT, figures(150, 40, 100)),
            arm(Arm.RT2_ATOP_FGSM, figures(140, 100, 40), figures(140, 90, 40)),
        ]
    }
    missing = {Arm.RT2_FT_LAMBDA0.value: "why"}
    claims = assess_claims(arms, missing, resamples=500)
    by = {(c.arm, c.baseline, c.figure): c for c in claims.comparisons}
    gain = by[Arm.RT2_ATOP_FGSM.value, Arm.RT2_NO_FT.value, SEEN]
    assert gain.difference == pytest.approx(0.275) and gain.verdict == HIGHER and gain.judged
    cost = by[Arm.RT2_ATOP_FGSM.value, Arm.RT2_NO_FT.value, CLEAN]
    assert cost.verdict == LOWER and not cost.judged  # a clean cost does not decide the claim
    assert by[Arm.RT1_NO_FT.value, Arm.CLASSIFIER_ALONE.value, UNSEEN].verdict == HIGHER
    assert gain.seeds == (2, 1) and gain.n_images == N
    # no arm measured AutoAttack-rand: it is listed, not compared
    assert ("a", AUTOATTACK, (Arm.RT2_ATOP_FGSM.value, Arm.RT2_NO_FT.value)) in claims.not_compared
    assert not any(c.figure == AUTOATTACK for c in claims.comparisons)
    text = render_claims(claims)
    assert "Missing arm rt2-ft-lambda0: why." in text
    assert (
        "**(a) fine-tuning raises robust accuracy (over no fine-tuning and over the lambda=0 "
        "control): reproduced** (1 of 1 comparisons higher, 0 lower, on seen (PGD-EOT linf)); "
        "arms missing: rt2-atop-pgd-eot, rt2-ft-lambda0, so this verdict covers the arms present "
        "only." in text
    )
    assert "**(b) RT keeps robustness against unseen attacks (over the classifier alone): " \
        "reproduced** (2 of 2 comparisons higher" in text


def test_a_loss_on_one_robust_figure_is_not_reproduced():
    arms = {
        a.name: a
        for a in [
            arm(Arm.CLASSIFIER_ALONE, figures(180, 0, 120)),
            arm(Arm.RT2_NO_FT, figures(150, 40, 60)),
            arm(Arm.RT3_NO_FT, figures(150, 40, 120, start=50)),
        ]
    }
    claims = assess_claims(arms, {}, resamples=500)
    verdicts = {c.arm: c.verdict for c in claims.comparisons if c.figure == UNSEEN}
    assert verdicts == {Arm.RT2_NO_FT.value: LOWER, Arm.RT3_NO_FT.value: SAME}
    assert "(over the classifier alone): not reproduced** (0 of 2 comparisons higher, 1 lower" \
        in render_claims(claims)
    assert "(over no fine-tuning and over the lambda=0 control): not tested**; arms missing: " \
        "rt2-atop-fgsm, rt2-atop-pgd-eot, rt2-ft-lambda0." in render_claims(claims)


def test_no_reference_arms_is_one_line():
    assert render_claims(assess_claims({}, {})) == NO_ARMS
    assert "\n" not in NO_ARMS


# --- end to end, from a real MLflow store ------------------------------------------------------

#: arm -> its seeds' per-image outcomes (column stem -> correct per image); the AToP-FGSM arm's
#: seen attack was scored over several draws (rates), and the lambda=0 control has a third seed
#: whose logged clean figure its file contradicts. rt3-no-ft is not logged at all.
COLUMNS = {"clean": CLEAN, "pgd_linf": SEEN, "autoattack_rand_linf": AUTOATTACK, "unseen": UNSEEN}


def outcomes(clean: int, seen: int, aa: int, unseen: int, start: int = 0) -> dict[str, np.ndarray]:
    return {"clean": right(clean), "pgd_linf": right(seen, start),
            "autoattack_rand_linf": right(aa, start), "unseen": right(unseen, start)}  # fmt: skip


ARMS = {
    Arm.CLASSIFIER_ALONE: [outcomes(180, 0, 0, 20)],
    Arm.RT1_NO_FT: [outcomes(150, 40, 30, 100)],
    Arm.RT2_NO_FT: [outcomes(150, 40, 30, 100)],
    Arm.RT2_FT_LAMBDA0: [outcomes(150, 40, 30, 100), outcomes(150, 40, 30, 100, start=10),
                         outcomes(150, 40, 30, 100)],
    Arm.RT2_ATOP_FGSM: [outcomes(140, 100, 80, 110), outcomes(140, 100, 80, 110)],
    Arm.RT2_ATOP_PGD_EOT: [outcomes(150, 40, 30, 100, start=100)] * 2,
}


def log_seed(client, exp, confirm, name, seed, columns, tmp: Path) -> str:
    tags = {PARENT_TAG: confirm, ROLE_TAG: Role.CONFIRM_SEED.value, REFERENCE_TAG: name,
            STAGE_TAG: Stage.CONFIRM.value, CONFIRM_SEED_TAG: str(seed)}  # fmt: skip
    run = client.create_run(exp, run_name=f"{name}-seed{seed}", tags=tags).info.run_id
    layout = {f"{stem}_correct": v for stem, v in columns.items()}
    rates = {}
    if name == Arm.RT2_ATOP_FGSM.value:  # 3 draws: the seen attack fooled 20 more in one of them
        rates = {f"{stem}_correct_rate": v.astype(float) for stem, v in columns.items()}
        rates["pgd_linf_correct_rate"][100:120] = 1 / 3
    layout |= rates
    logged = {f"test/{figure}": float((rates or layout).get(f"{stem}_correct_rate",
                                                           layout[f"{stem}_correct"]).mean())
              for stem, figure in COLUMNS.items()}  # fmt: skip
    if name == Arm.RT2_FT_LAMBDA0.value and seed == 3:
        logged["test/clean_acc"] = 0.9  # its file says 0.75
    path = tmp / run / "per_example.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(
        pa.table({"trial_number": np.full(N, 4, np.int64), "index": np.arange(N) + 1000,
                  "label": np.arange(N) % 10, **layout}),
        path,
    )  # fmt: skip
    client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in logged.items()],
                     params=[Param("train_norm", "linf"), Param("seed", str(seed))])  # fmt: skip
    client.log_artifact(run, str(path))
    client.set_terminated(run, "FINISHED")
    return run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("claims")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("reproduce", artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp, tags={ROLE_TAG: Role.STUDY.value}).info.run_id
    for number, (name, seeds) in enumerate(ARMS.items()):
        tags = {PARENT_TAG: parent, ROLE_TAG: Role.CONFIRM.value, REFERENCE_TAG: name.value,
                STAGE_TAG: Stage.CONFIRM.value, EVAL_LEVEL_TAG: "light"}  # fmt: skip
        confirm = client.create_run(exp, run_name=f"confirm-{number}", tags=tags).info.run_id
        for seed, columns in enumerate(seeds, start=1):
            log_seed(client, exp, confirm, name.value, seed, columns, root)
        client.set_terminated(confirm, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    bare = client.create_experiment("bare", artifact_location=(root / "bare").as_uri())
    client.set_terminated(client.create_run(bare, tags={ROLE_TAG: Role.TRIAL.value}).info.run_id)
    return uri


def test_claims_from_mlflow(store, capsys):
    assert main(["--mlflow-uri", store, "--experiment", "reproduce", "--claims"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Paired differences between the reference arms' confirm runs on "
                               f"{N} test images")  # fmt: skip
    assert ("seeds: classifier-alone 1, rt1-no-ft 1, rt2-no-ft 1, rt2-ft-lambda0 2, "
            "rt2-atop-fgsm 2, rt2-atop-pgd-eot 2)") in lines[0]  # fmt: skip
    assert "eval level light" in lines[0] and "2000 resamples, seed 0." in lines[0]
    assert lines[2] == "| claim | comparison (A - B) | figure | A / B | difference [95%] | verdict |"
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in lines
            if line.startswith("| (")}  # fmt: skip
    # the AToP-FGSM arm's seen figure is read from its rates: (100 + 20/3) / 200 = 0.533
    fgsm = rows["(a)", "rt2-atop-fgsm - rt2-no-ft", "seen (PGD-EOT linf)"]
    assert "| 0.533 / 0.200 | +0.333 [" in fgsm and fgsm.endswith("| higher |")
    assert rows["(a)", "rt2-atop-fgsm - rt2-ft-lambda0", "AutoAttack-rand"].endswith("| higher |")
    clean = rows["(a)", "rt2-atop-fgsm - rt2-no-ft", "clean (cost, not judged)"]
    assert "| 0.700 / 0.750 | -0.050 [" in clean and clean.endswith("| lower |")
    pgd = rows["(a)", "rt2-atop-pgd-eot - rt2-ft-lambda0", "seen (PGD-EOT linf)"]
    assert "0.000 [" in pgd and pgd.endswith("| no difference at this scale |")
    assert rows["(b)", "rt2-no-ft - classifier-alone", "unseen"].endswith("| higher |")
    assert len(rows) == 2 * 2 * 3 + 2 * 2  # (a): 2 x 2 arms x 3 figures; (b): 2 arms x 2 figures
    text = "\n".join(lines)
    assert "Missing arm rt3-no-ft: no confirm run tagged atop.reference=rt3-no-ft." in text
    assert ("Arm rt2-ft-lambda0: seeds left out: seed run " in text
            and ": mean of clean_correct 0.7500 is not the logged clean_acc 0.9000." in text)
    assert ("**(a) fine-tuning raises robust accuracy (over no fine-tuning and over the lambda=0 "
            "control): not distinguishable at this scale** (4 of 8 comparisons higher, 0 lower, "
            "on seen (PGD-EOT linf), AutoAttack-rand).") in text  # fmt: skip
    assert ("**(b) RT keeps robustness against unseen attacks (over the classifier alone): "
            "reproduced** (2 of 2 comparisons higher, 0 lower, on unseen); arms missing: "
            "rt3-no-ft, so this verdict covers the arms present only.") in text  # fmt: skip


def test_claims_without_reference_arms(store, capsys):
    assert main(["--mlflow-uri", store, "--experiment", "bare", "--claims"]) == 0
    assert capsys.readouterr().out == NO_ARMS + "\n"


def test_claims_bad_input_and_help(store, capsys):
    assert main(["--mlflow-uri", store, "--experiment", "nope", "--claims"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    expected = f"error: experiment 'nope' does not exist at {store}; existing: Default, bare, "
    assert errors == [expected + "reproduce"]
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--claims" in capsys.readouterr().out
