"""The paper's two claims, tested by paired differences between the ``reproduce`` study's arms.

    python -m analysis --mlflow-uri sqlite:////abs/path/mlflow.db --experiment NAME --claims

The ``reproduce-cpu`` study confirms each named reference configuration (an *arm*,
``tracking.contract.Arm``) on the same first N test images: one ``confirm`` run per arm (tag
``atop.reference=<arm>``) and below it one ``confirm_seed`` run per fine-tuning seed, each with a
``per_example.parquet``. From those files (checked against the logged ``test/<figure>`` by
``analysis.per_example``), every comparison is the difference of two arms on one figure:

- (a) "fine-tuning raises robust accuracy": each AToP arm minus ``rt2-no-ft`` and minus the
  lambda = 0 control ``rt2-ft-lambda0``, on ``robust_acc_seen`` (PGD-EOT in the training norm) and
  AutoAttack-rand where it was run; clean accuracy is shown too (the cost), not judged;
- (b) "RT keeps robustness against unseen attacks": each ``rtK-no-ft`` minus
  ``classifier-alone`` on ``robust_acc_unseen`` (the worst case over the unseen suite); clean shown.

An arm's figure is the mean over its seeds of the per-image rates (an arm with one seed: that
seed). The 95% interval is a two-stage paired bootstrap (``atop.stats.bootstrap`` with
``paired_draws=False``): the test images are resampled once for both arms, then within each image
each arm's seeds on their own. Compute (:func:`assess_claims`, pure numpy) then render
(:func:`render_claims`, Markdown); :func:`load_arms` reads the files from MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from mlflow.tracking import MlflowClient

from analysis.confirmed import FIGURES
from analysis.per_example import UnusableScores, align, run_scores
from atop.stats import bootstrap
from tracking.contract import TEST_PREFIX, Arm, Role

#: the figures compared, as the confirm runs name them (``analysis.confirmed.FIGURES``' order)
CLEAN, SEEN, AUTOATTACK, UNSEEN = (figure for _, figure in FIGURES)
#: bootstrap resamples of every interval, and the resampling's seed (the same study gives the
#: same intervals)
RESAMPLES = 2000
SEED = 0
#: a comparison's verdict from its 95% interval
HIGHER, LOWER, SAME = "higher", "lower", "no difference at this scale"
#: a claim's verdict
REPRODUCED, NOT_REPRODUCED, UNCLEAR, UNTESTED = (
    "reproduced",
    "not reproduced",
    "not distinguishable at this scale",
    "not tested",
)
NO_ARMS = (
    "No reference arms in this experiment (no confirm run tagged atop.reference="
    f"{', '.join(a.value for a in Arm)}): the claims are tested on the reproduce-cpu study's arms."
)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims as comparisons: each of ``arms`` minus each of ``baselines``.

    Attributes:
        key, text: ``a``/``b`` and what the paper says.
        arms, baselines: The arms compared.
        judged: Figures whose differences decide the verdict (must all be higher).
        shown: Figures shown beside them and not judged (the clean cost).
    """

    key: str
    text: str
    arms: tuple[Arm, ...]
    baselines: tuple[Arm, ...]
    judged: tuple[str, ...]
    shown: tuple[str, ...]


CLAIMS = (
    Claim(
        "a",
        "fine-tuning raises robust accuracy (over no fine-tuning and over the lambda=0 control)",
        (Arm.RT2_ATOP_FGSM, Arm.RT2_ATOP_PGD_EOT),
        (Arm.RT2_NO_FT, Arm.RT2_FT_LAMBDA0),
        (SEEN, AUTOATTACK),
        (CLEAN,),
    ),
    Claim(
        "b",
        "RT keeps robustness against unseen attacks (over the classifier alone)",
        (Arm.RT1_NO_FT, Arm.RT2_NO_FT, Arm.RT3_NO_FT),
        (Arm.CLASSIFIER_ALONE,),
        (UNSEEN,),
        (CLEAN,),
    ),
)


@dataclass(frozen=True)
class ArmScores:
    """One arm's usable seeds: per figure, each seed's ``(index, per-image rates)``.

    Attributes:
        name: The arm.
        seeds: Seed run id -> figure -> (image indices ``(n,)``, per-image rates ``(n,)`` in [0, 1]).
        eval_level: Its confirm run's tag ``atop.eval_level`` (None when absent).
        train_norm: Its seeds' ``train_norm`` param (the seen attack's norm).
        dropped: Seed runs not used, each with why.
    """

    name: str
    seeds: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]
    eval_level: str | None = None
    train_norm: str | None = None
    dropped: tuple[str, ...] = ()

    def has(self, figure: str) -> bool:
        """Every seed measured ``figure``."""
        return bool(self.seeds) and all(figure in s for s in self.seeds.values())


@dataclass(frozen=True)
class Comparison:
    """One paired difference: ``arm`` minus ``baseline`` on ``figure``, on the images both scored.

    Attributes:
        claim: The claim's key. judged: Whether it counts for the claim's verdict.
        arm_mean, baseline_mean: Each arm's mean over seeds and images.
        difference, lo, hi: ``arm_mean - baseline_mean`` and its 95% bootstrap interval.
        n_images: Images both arms scored. most_images: The most any seed's file holds.
        seeds: Seeds of ``arm`` and of ``baseline``.
    """

    claim: str
    arm: str
    baseline: str
    figure: str
    judged: bool
    arm_mean: float
    baseline_mean: float
    difference: float
    lo: float
    hi: float
    n_images: int
    most_images: int
    seeds: tuple[int, int]

    @property
    def verdict(self) -> str:
        return verdict(self.lo, self.hi)


@dataclass(frozen=True)
class Claims:
    """Every comparison of every claim, and what could not be compared.

    Attributes:
        comparisons: In claim, arm, baseline, figure order.
        arms: The arms found (name -> scores).
        missing: Arm -> why it has no scores.
        not_compared: ``(claim, figure, arms that did not measure it)``: comparisons left out.
        resamples, seed: The bootstrap's.
    """

    comparisons: tuple[Comparison, ...]
    arms: Mapping[str, ArmScores]
    missing: Mapping[str, str]
    not_compared: tuple[tuple[str, str, tuple[str, ...]], ...]
    resamples: int
    seed: int


def verdict(lo: float, hi: float) -> str:
    """A difference's verdict from its interval: wholly above 0, wholly below, or containing 0."""
    if lo > 0:
        return HIGHER
    if hi < 0:
        return LOWER
    return SAME


def claim_verdict(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its judged comparisons' verdicts: every one higher -> reproduced,
    any lower -> not reproduced, none at all -> not tested, else not distinguishable."""
    if not verdicts:
        return UNTESTED
    if LOWER in verdicts:
        return NOT_REPRODUCED
    if all(v == HIGHER for v in verdicts):
        return REPRODUCED
    return UNCLEAR


def difference(
    arm: np.ndarray, baseline: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float, float]:
    """Mean difference of two arms' per-image rates on the same images, with its 95% interval.

    Args:
        arm, baseline: ``(seeds, n_images)`` per-image rates in [0, 1], columns the same images
            (a 1-D array is one seed); the seed counts may differ.
        resamples, seed: The two-stage bootstrap's resamples and seed.

    Returns:
        ``(mean(arm) - mean(baseline), lo, hi)``: the difference of the means over seeds and images.
    """
    arm, baseline = np.atleast_2d(arm).astype(float), np.atleast_2d(baseline).astype(float)
    lo, hi = bootstrap(arm, baseline, n_boot=resamples, seed=seed, paired_draws=False)
    return float(arm.mean() - baseline.mean()), lo, hi


def assess_claims(
    arms: Mapping[str, ArmScores],
    missing: Mapping[str, str],
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Claims:
    """Every comparison of :data:`CLAIMS` between the arms present.

    Args:
        arms: The arms with usable seeds (:func:`load_arms`).
        missing: Arm -> why it has none.
        resamples, seed: See :func:`difference`.
    """
    comparisons: list[Comparison] = []
    not_compared = []
    for claim in CLAIMS:
        pairs = [
            (arms[a.value], arms[b.value])
            for a in claim.arms
            for b in claim.baselines
            if a.value in arms and b.value in arms
        ]
        for figure in (*claim.judged, *claim.shown):
            lacking = tuple(dict.fromkeys(x.name for p in pairs for x in p if not x.has(figure)))
            if lacking:
                not_compared.append((claim.key, figure, lacking))
            comparisons += [
                _compare(claim, figure, a, b, resamples, seed)
                for a, b in pairs
                if a.has(figure) and b.has(figure)
            ]
    order = {(c.key, f): k for c in CLAIMS for k, f in enumerate((*c.judged, *c.shown))}
    arm_order = {a.value: k for k, a in enumerate(Arm)}
    comparisons.sort(
        key=lambda c: (c.claim, arm_order[c.arm], arm_order[c.baseline], order[c.claim, c.figure])
    )
    return Claims(tuple(comparisons), arms, missing, tuple(not_compared), resamples, seed)


def _compare(
    claim: Claim, figure: str, arm: ArmScores, baseline: ArmScores, resamples: int, seed: int
) -> Comparison:
    # the seeds of both arms (the arm's first), on the images all of them hold
    found = {}
    for scores in (arm, baseline):
        for run, figures in scores.seeds.items():
            index, rates = figures[figure]
            found[run] = (index, rates[None])
    per = align(found, {}, 1)
    n_arm = len(arm.seeds)
    a, b = per.scores[:n_arm, 0], per.scores[n_arm:, 0]
    diff, lo, hi = difference(a, b, resamples=resamples, seed=seed)
    return Comparison(
        claim.key, arm.name, baseline.name, figure, figure in claim.judged,
        float(a.mean()), float(b.mean()), diff, lo, hi, per.n_images, per.most_images,
        (n_arm, len(baseline.seeds)),
    )  # fmt: skip


def load_arms(uri: str, runs: pa.Table) -> tuple[dict[str, ArmScores], dict[str, str]]:
    """Each arm's seeds' per-image rates, from the ``per_example.parquet`` of its seed runs.

    An arm's ``confirm`` run is the one tagged ``atop.reference=<arm>`` (a FINISHED one before
    others, then the latest started); its seeds are the FINISHED ``confirm_seed`` runs whose
    ``mlflow.parentRunId`` is that run. A seed's file must hold a column for each figure the seed
    logged (``test/<figure>``) whose mean is that figure, else the seed is dropped (and said).

    Args:
        uri: MLflow tracking URI of the study.
        runs: The study's runs table (``analysis.load``).

    Returns:
        ``(arms, missing)``: arm -> :class:`ArmScores` for arms with a usable seed; arm -> why for
        the others. Both empty when the study has no confirm run of any arm.
    """
    rows = runs.to_pylist()
    names = [a.value for a in Arm]
    confirms = [r for r in rows if r["role"] == Role.CONFIRM.value and r["reference"] in names]
    if not confirms:
        return {}, {}
    figures = (CLEAN, SEEN, AUTOATTACK, UNSEEN)
    client = MlflowClient(tracking_uri=uri)
    arms, missing = {}, {}
    with tempfile.TemporaryDirectory(prefix="claims-") as tmp:
        for name in names:
            mine = [r for r in confirms if r["reference"] == name]
            if not mine:
                missing[name] = f"no confirm run tagged atop.reference={name}"
                continue
            confirm = max(mine, key=lambda r: (r["status"] == "FINISHED", r["start_time"]))
            seeds, dropped, norms = {}, [], set()
            for r in rows:
                if r["role"] != Role.CONFIRM_SEED.value or r["parent_run_id"] != confirm["run_id"]:
                    continue
                if r["status"] != "FINISHED":
                    dropped.append(f"seed run {r['run_id']}: {r['status']}")
                    continue
                # the seed run logs the whole config; its confirm run the same less the seed
                params = {
                    "params.train_norm": r.get("params.train_norm")
                    or confirm.get("params.train_norm")
                }
                logged = {f: r.get(f"final.{TEST_PREFIX}{f}") for f in figures}
                measured = [f for f, v in logged.items() if v is not None]
                if not measured:
                    dropped.append(f"seed run {r['run_id']}: logged no {TEST_PREFIX} figure")
                    continue
                try:
                    index, scores = run_scores(
                        client, r["run_id"], measured, [logged[f] for f in measured], params,
                        Path(tmp),
                    )  # fmt: skip
                except UnusableScores as exc:
                    dropped.append(f"seed run {r['run_id']}: {exc}")
                    continue
                seeds[r["run_id"]] = {f: (index, scores[k]) for k, f in enumerate(measured)}
                norms.add(params["params.train_norm"])
            if not seeds:
                why = "; ".join(dropped) or "no confirm_seed run below it"
                missing[name] = f"confirm run {confirm['run_id']} has no usable seed ({why})"
                continue
            arms[name] = ArmScores(
                name, seeds, confirm["eval_level"], norms.pop() if len(norms) == 1 else None,
                tuple(dropped),
            )  # fmt: skip
    return arms, missing


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def _counts(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def header(claims: Claims) -> str:
    """The line that says how the numbers were obtained."""
    arms = claims.arms.values()
    levels = sorted({a.eval_level or "?" for a in arms})
    seeds = ", ".join(f"{a.name} {len(a.seeds)}" for a in arms)
    images = _counts([c.n_images for c in claims.comparisons]) if claims.comparisons else "no"
    return (
        f"Paired differences between the reference arms' confirm runs on {images} test images "
        f"(the images both arms of a comparison scored), eval level {'/'.join(levels)} "
        f"(tag atop.eval_level). Each arm's figure is the mean over its seeds of the per-image "
        f"rates (seeds: {seeds}). 95% interval: two-stage paired bootstrap (the same resample of "
        f"test images for both arms, then each arm's seeds within each image), "
        f"{claims.resamples} resamples, seed {claims.seed}."
    )


def render_claims(claims: Claims) -> str:
    """The Markdown table of comparisons, the notes, then one line per claim; :data:`NO_ARMS`
    when the study has no reference arm."""
    if not claims.arms and not claims.missing:
        return NO_ARMS
    heading = headings(claims)
    lines = [
        header(claims),
        "",
        "| claim | comparison (A - B) | figure | A / B | difference [95%] | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for c in claims.comparisons:
        figure = heading[c.figure] + ("" if c.judged else " (cost, not judged)")
        lines.append(
            f"| ({c.claim}) | {c.arm} - {c.baseline} | {figure} | "
            f"{c.arm_mean:.3f} / {c.baseline_mean:.3f} | "
            f"{_signed(c.difference)} [{_signed(c.lo)}, {_signed(c.hi)}] | {c.verdict} |"
        )
    lines.append("")
    lines += [f"Missing arm {name}: {why}." for name, why in claims.missing.items()]
    lines += [
        f"Not compared ({key}) {heading[figure]}: not measured by {', '.join(lacking)}."
        for key, figure, lacking in claims.not_compared
    ]
    lines += [
        f"Arm {a.name}: seeds left out: {'; '.join(a.dropped)}." for a in claims.arms.values()
        if a.dropped
    ]  # fmt: skip
    short = [c for c in claims.comparisons if c.most_images > c.n_images]
    if short:
        lines.append(
            f"{len(short)} comparisons use fewer images than a file holds (arms scored different "
            "images): compared on the images both arms scored."
        )
    lines += [claim_line(claim, claims, heading) for claim in CLAIMS]
    return "\n".join(lines)


def headings(claims: Claims) -> dict[str, str]:
    """Figure -> its column heading in ``--table`` (the seen one with the arms' training norm)."""
    norms = {a.train_norm for a in claims.arms.values()}
    norm = f" {norms.pop()}" if len(norms) == 1 and None not in norms else ""
    return {figure: h.format(norm=norm) for h, figure in FIGURES}


def claim_line(claim: Claim, claims: Claims, heading: Mapping[str, str]) -> str:
    """``**(a) <claim>: <verdict>**`` with how many judged comparisons were higher, and the arms
    it needs that are missing."""
    judged = [c for c in claims.comparisons if c.claim == claim.key and c.judged]
    result = claim_verdict([c.verdict for c in judged])
    needed = [a.value for a in (*claim.arms, *claim.baselines) if a.value not in claims.arms]
    figures = [heading[f] for f in claim.judged if any(c.figure == f for c in judged)]
    line = f"**({claim.key}) {claim.text}: {result}**"
    if judged:
        higher = sum(c.verdict == HIGHER for c in judged)
        lower = sum(c.verdict == LOWER for c in judged)
        line += (
            f" ({higher} of {len(judged)} comparisons higher, {lower} lower, on "
            f"{', '.join(figures)})"
        )
    if needed:
        line += f"; arms missing: {', '.join(needed)}" + (
            ", so this verdict covers the arms present only" if judged else ""
        )
    return line + "."
