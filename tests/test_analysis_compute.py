"""analysis.compute: exact answers on hand-made tables, and property tests against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.compute import (
    Objective,
    analyse,
    attainment,
    compare,
    default_ref_point,
    eaf_difference,
    front_analysis,
    knee_point,
)
from analysis.errors import AnalysisError

MAX2 = (Objective("clean_acc"), Objective("robust_acc_unseen"))


def table(points, objectives=MAX2, extra=()):
    """A runs table as analysis.load builds it: one FINISHED trial per point, then ``extra``."""
    rows = [
        {
            "run_id": f"r{i}",
            "status": "FINISHED",
            "role": "trial",
            "trial_number": i,
            "stopped": False,
            "space": "paper",
            "params.rt": f"rt{i % 3 + 1}",
            **{f"final.{o.name}": float(v) for o, v in zip(objectives, p)},
        }
        for i, p in enumerate(points)
    ]
    return pa.Table.from_pylist(rows + list(extra))


# ---------------------------------------------------------------- brute-force references


def dominates(a, b, maximise):
    better = np.where(maximise, a >= b, a <= b)
    strictly = np.where(maximise, a > b, a < b)
    return bool(better.all() and strictly.any())


def brute_hypervolume(points, ref, maximise):
    """Volume of the union of the boxes between each point and ``ref``, summed over the cells of
    the grid that every coordinate spans (exact)."""
    sign = np.where(maximise, -1.0, 1.0)
    q, r = np.asarray(points, float) * sign, np.asarray(ref, float) * sign
    q = q[(q < r).all(axis=1)]
    if len(q) == 0:
        return 0.0
    grids = [np.unique(np.append(q[:, k], r[k])) for k in range(q.shape[1])]
    total = 0.0
    for cell in itertools.product(*(range(len(g) - 1) for g in grids)):
        lo = np.array([g[c] for g, c in zip(grids, cell)])
        hi = np.array([g[c + 1] for g, c in zip(grids, cell)])
        if (q <= lo).all(axis=1).any():
            total += float(np.prod(hi - lo))
    return total


# ---------------------------------------------------------------- exact answers


def test_two_objectives_ties_duplicates_and_exclusions():
    points = [(0.8, 0.2), (0.5, 0.5), (0.5, 0.5), (0.2, 0.8), (0.4, 0.4), (0.8, 0.1)]
    base = {
        "role": "trial",
        "stopped": False,
        "final.clean_acc": 0.99,
        "final.robust_acc_unseen": 0.99,
    }
    extra = [
        {
            **base,
            "run_id": "parent",
            "status": "FINISHED",
            "role": "study",
            "final.clean_acc": None,
            "final.robust_acc_unseen": None,
        },
        {**base, "run_id": "failed", "status": "FAILED"},
        {**base, "run_id": "killed", "status": "KILLED"},
        {**base, "run_id": "running", "status": "RUNNING"},
        {**base, "run_id": "stopped", "status": "FINISHED", "stopped": True},
        {**base, "run_id": "stopped-killed", "status": "KILLED", "stopped": True},
        {**base, "run_id": "no-unseen", "status": "FINISHED", "final.robust_acc_unseen": None},
    ]
    info = analyse(table(points, extra=extra), MAX2)
    assert info.run_ids == ("r0", "r1", "r2", "r3", "r4", "r5")
    assert info.ranks.tolist() == [0, 0, 0, 0, 1, 1]
    np.testing.assert_allclose(info.ref_point, [0, 0])
    assert info.hypervolume == pytest.approx(0.8 * 0.2 + 0.5 * 0.3 + 0.2 * 0.3)
    # The duplicated point contributes nothing: removing one copy loses no volume.
    np.testing.assert_allclose(info.contributions, [0.06, 0, 0, 0.06, 0, 0], atol=1e-12)
    assert info.knee == 1  # (0.5, 0.5): the middle of the front; its first copy
    np.testing.assert_allclose(info.convergence, [0.16, 0.31, 0.31, 0.37, 0.37, 0.37])
    assert info.excluded == {
        "study parent run": 1,
        "status FAILED": 1,
        "status KILLED": 2,
        "status RUNNING": 1,
        "stopped early": 1,
        "missing objective metric": 1,
    }
    assert info.groups == ("rt1", "rt2", "rt3", "rt1", "rt2", "rt3")


def test_one_objective_minimised():
    objectives = (Objective("clean_acc"), Objective.parse("loss:min"))
    points = [(0.9, 0.5), (0.7, 0.2), (0.6, 0.3), (0.9, 0.6)]
    info = analyse(table(points, objectives), objectives, ref_point=[0.0, 1.0])
    assert info.ranks.tolist() == [0, 0, 1, 1]
    assert info.hypervolume == pytest.approx(0.9 * 0.5 + 0.7 * 0.3)
    np.testing.assert_allclose(info.contributions, [0.2 * 0.5, 0.7 * 0.3, 0, 0])
    # Default reference: 0 for the maximised one; worst loss + 10% of its range.
    default = analyse(table(points, objectives), objectives).ref_point
    np.testing.assert_allclose(default, [0.0, 0.6 + 0.1 * 0.4])


def test_three_objectives_exact():
    objectives = (*MAX2, Objective("robust_acc_seen"))
    points = [(0.5, 0.5, 0.5), (1.0, 0.2, 0.2), (0.4, 0.4, 0.4)]
    info = analyse(table(points, objectives), objectives)
    assert info.ranks.tolist() == [0, 0, 1]
    assert info.hypervolume == pytest.approx(0.125 + 0.04 - 0.02)
    np.testing.assert_allclose(info.contributions, [0.105, 0.02, 0.0])


def test_knee_constant_objective_and_single_point():
    # Objective 2 is the same on the whole front: only objective 1 decides (ties: first).
    front = np.array([[0.2, 0.7], [0.9, 0.7], [0.9, 0.7]])
    assert knee_point(front, np.array([True, True])) == 1
    assert knee_point(np.array([[0.3, 0.3]]), np.array([True, False])) == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("clean_acc", Objective("clean_acc", True)),
        ("clean_acc:max", Objective("clean_acc", True)),
        ("loss/ce:min", Objective("loss/ce", False)),
    ],
)
def test_objective_parse(text, expected):
    assert Objective.parse(text) == expected


@pytest.mark.parametrize("text", ["", ":min", "clean_acc:up", "clean_acc:"])
def test_objective_parse_rejects(text):
    with pytest.raises(AnalysisError, match="accepted: NAME, NAME:min or NAME:max"):
        Objective.parse(text)


def test_attainment_exact():
    sets = [np.array([[0.5, 0.5]]), np.array([[0.6, 0.6], [0.2, 0.8]])]
    surfaces = attainment(sets, np.array([True, True]))
    rows = {tuple(r) for r in surfaces.tolist()}
    # 50%: attained by one of the two studies; 100%: by both.
    assert rows == {(0.6, 0.6, 50.0), (0.2, 0.8, 50.0), (0.5, 0.5, 100.0)}


def test_eaf_difference_signs():
    maximise = np.array([True, True])
    better = [np.array([[0.5, 0.5]]), np.array([[0.6, 0.6]])]
    worse = [np.array([[0.4, 0.4]]), np.array([[0.3, 0.3]])]
    rects = eaf_difference(better, worse, maximise)
    assert rects[:, -1].min() > 0 and rects[:, -1].max() == 1.0
    # The region only the better side's best study attains is attained by half of it.
    assert 0.5 in rects[:, -1].tolist()
    np.testing.assert_allclose(eaf_difference(worse, better, maximise)[:, -1].max(), -0.5)
    with pytest.raises(AnalysisError, match="same number of studies on each side, got 2 and 1"):
        eaf_difference(better, worse[:1], maximise)


def test_compare_sides_by_search_space():
    infos = [analyse(table(p), MAX2) for p in ([(0.5, 0.5)], [(0.6, 0.3)], [(0.4, 0.4)])]
    cmp = compare(infos, ["a", "b", "c"], ["paper", "wide", "paper"])
    assert (cmp.left, cmp.right) == ((0, 2), (1,))
    assert cmp.eaf_diff is None and "got 2 and 1" in cmp.eaf_note
    same = compare(infos[:2], ["a", "b"], ["paper", "paper"])
    assert (same.left, same.right) == ((0,), (1,)) and same.eaf_diff is not None
    assert same.hypervolumes == pytest.approx((0.25, 0.18))


@pytest.mark.parametrize(
    "ref, message",
    [
        ([0.0], "reference point [0.0] has 1 values; accepted: one per objective (2)"),
    ],
)
def test_bad_reference_point(ref, message):
    with pytest.raises(AnalysisError) as err:
        analyse(table([(0.5, 0.5)]), MAX2, ref)
    assert str(err.value) == message


def test_default_ref_point_maximise_is_zero():
    np.testing.assert_allclose(
        default_ref_point(np.array([[0.3, 2.0], [0.5, 1.0]]), np.array([True, False])), [0.0, 2.1]
    )


# ---------------------------------------------------------------- properties

# A coarse grid of values, so that ties and duplicates are common.
GRID = st.sampled_from([round(0.1 * k, 1) for k in range(11)])


@st.composite
def point_sets(draw):
    m = draw(st.sampled_from([2, 3]))
    n = draw(st.integers(1, 9))
    points = np.array(
        draw(st.lists(st.lists(GRID, min_size=m, max_size=m), min_size=n, max_size=n))
    )
    maximise = np.array(draw(st.lists(st.booleans(), min_size=m, max_size=m)))
    ref = np.where(maximise, 0.0, 1.1)
    return points, maximise, ref


@settings(max_examples=60, deadline=None)
@given(point_sets())
def test_front_properties_against_brute_force(case):
    points, maximise, ref = case
    ranks, hv, contributions, knee, convergence = front_analysis(points, maximise, ref)
    front = np.flatnonzero(ranks == 0)
    for i in front:
        assert not any(dominates(p, points[i], maximise) for p in points)
    for i in np.flatnonzero(ranks > 0):
        assert any(dominates(points[j], points[i], maximise) for j in front)
        assert any(
            dominates(points[j], points[i], maximise) for j in np.flatnonzero(ranks == ranks[i] - 1)
        )
    assert hv == pytest.approx(brute_hypervolume(points, ref, maximise), abs=1e-9)
    for i in front:
        rest = np.delete(points[front], np.flatnonzero(front == i)[0], axis=0)
        expected = hv - brute_hypervolume(rest, ref, maximise)
        assert contributions[i] == pytest.approx(expected, abs=1e-9)
    assert ranks[knee] == 0
    assert np.all(np.diff(convergence) >= -1e-12) and convergence[-1] == pytest.approx(hv)


def test_only_search_trials_make_the_front():
    # confirm runs carry test-image figures (and their seeds may report the objectives too): even
    # far above every trial they must not enter the front, its hypervolume or the knee
    points = [(0.8, 0.2), (0.2, 0.8)]
    best = {"status": "FINISHED", "stopped": False, "final.clean_acc": 0.99,
            "final.robust_acc_unseen": 0.99}  # fmt: skip
    extra = [
        {**best, "run_id": "confirm", "role": "confirm"},
        {**best, "run_id": "seed", "role": "confirm_seed"},
        {**best, "run_id": "untagged", "role": None},
    ]
    info = analyse(table(points, extra=extra), MAX2)
    assert info.run_ids == ("r0", "r1") and info.ranks.tolist() == [0, 0]
    assert info.hypervolume == pytest.approx(0.8 * 0.2 + 0.2 * 0.6)
    assert info.excluded == {"role confirm": 1, "role confirm_seed": 1, "no atop.role tag": 1}


def test_intervals_and_error_bars():
    from analysis.draw import error_bars, extent, has_intervals

    rows = table([(0.5, 0.3), (0.6, 0.2)]).to_pylist()
    rows[0] |= {"final.clean_acc_lo": 0.4, "final.clean_acc_hi": 0.65}
    info = analyse(pa.Table.from_pylist(rows), MAX2)
    np.testing.assert_allclose(info.lo, [[0.4, np.nan], [np.nan, np.nan]])
    np.testing.assert_allclose(info.hi, [[0.65, np.nan], [np.nan, np.nan]])
    # down to lo, up to hi; 0 where a run logged no interval
    np.testing.assert_allclose(error_bars(info, 0), [[0.1, 0.0], [0.15, 0.0]])
    np.testing.assert_allclose(error_bars(info, 1), [[0.0, 0.0], [0.0, 0.0]])
    assert has_intervals(info, [0]) and not has_intervals(info, [1])
    assert sorted(extent(info, 0)) == [0.4, 0.5, 0.6, 0.65]  # the axis shows the bars whole


def test_the_report_says_how_the_kept_runs_figures_were_obtained_and_when_they_differ() -> None:
    import pyarrow as pa

    from analysis.report import _how, evaluations

    table = pa.table({"run_id": ["a", "b", "c", "d"], "evaluation": ["screen; 64 val", "screen; 64 val", "full", None]})
    assert evaluations(table, ["a", "b", "d"]) == ["screen; 64 val"]
    assert evaluations(table, ["a", "c"]) == ["full", "screen; 64 val"]
    assert evaluations(pa.table({"run_id": ["a"]}), ["a"]) == []
    assert "differs between the kept runs" in _how(["full", "screen; 64 val"])
    assert "not recorded" in _how([])


def test_every_png_carries_its_caption_below_the_plot(tmp_path) -> None:
    """The caption (how the objectives were obtained) is drawn under each figure: the saved image
    is taller than the same figure without it, and the pixels added are not blank."""
    import matplotlib.image as mpimg

    from analysis.draw import write_figures
    from analysis.report import figure_caption
    from tracking.contract import OBJECTIVES

    objectives = tuple(Objective(o) for o in OBJECTIVES)
    info = analyse(table(np.random.default_rng(0).uniform(0.2, 0.8, (6, 3)), objectives), objectives)
    caption = figure_caption(["screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 64 val images"])
    assert caption.startswith("Objectives: screening (PGD-10") and "not comparable" in figure_caption(["a", "b"])
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    written = write_figures(info, tmp_path / "with", "s", caption=caption)
    write_figures(info, tmp_path / "without", "s")
    for name in (n for n in written if n.endswith(".png")):
        with_caption, without = mpimg.imread(tmp_path / "with" / name), mpimg.imread(tmp_path / "without" / name)
        assert with_caption.shape[0] > without.shape[0], name
        added = with_caption[without.shape[0]:, :, :3]
        assert added.min() < 0.9, name  # dark pixels: text, not white margin
