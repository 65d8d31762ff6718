"""Robustness evaluation of the whole stochastic defense, at a `screen` level (screening figures for
comparing trials, not final robustness figures) or a strong `full` level.

    python -m atop.evaluate --checkpoint runs/defense.pt --level full --n-images 64 --out runs/eval \\
        --data-dir ../shared/data [--steps 20 --eot 4 --queries 200]   # lowered budget: CPU runs

Every attack differentiates the whole defense (RT + purifier + classifier) and averages its gradient
over EOT draws of the random transform (BPDA alone replaces the purifier's backward by the identity,
on purpose); the attacked image is then classified by fresh draws of the defense, as a deployed
defense would, `repeats` times. A draw counts as robust only if that same draw classified the clean
image correctly (as reference AutoAttack counts). Objectives (fractions in [0,1], means over draws):
- `clean_acc`: accuracy on the clean images through the defense;
- `robust_acc_seen`: PGD in the training attack's norm (the strongest member of the FGSM/PGD family
  it was trained on) at the evaluation eps;
- `robust_acc_unseen`: per image, correct under every attack of `cfg.unseen_attacks` (worst case).
Secondary: `robust_acc/<attack>` and, at `full`, `worst_case_acc` (correct on the clean image and
under every attack run, audit runs included) and the gradient-masking audit (`atop.audit`). Every
figure comes with `_lo`, `_hi` (Wilson 95% interval over images) and `_majority` (majority vote over
draws); every result with a one-line `describe(...)` of how it was obtained.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# No torch at import: `python -m atop.evaluate` refuses bad input before torch loads
# (tests/test_refusal.py); `evaluate` and the command import the torch modules they use.
from atop.checkpoint_file import ACCEPTED, CheckpointError, check_torch_file
from atop.cli import OneLineParser, UsageError, one_line_errors
from atop.config import Config, ConfigError, EvalLevel, Precision
from atop.io import atomic_folder
from atop.names import ATTACKS as ATTACK_NAMES
from atop.progress import step
from atop.stats import wilson

if TYPE_CHECKING:
    import torch
    from torch import nn

    from atop.data import Split
    from atop.scoring import attack_eps, measure, seen_attack  # offered here through __getattr__

__all__ = ["AUDITED", "EXAMPLE_IMAGES", "LEVELS", "LEVEL_ATTACKS", "AttackedExamples", "EvalResult", "accuracy",
           "attack_eps", "config_budget", "describe", "evaluate", "how_obtained", "level_budget", "main", "measure",
           "seen_attack", "weakened"]
#: names this module offers from `atop.scoring` (which imports torch), loaded on first use
_FROM_SCORING = ("attack_eps", "measure", "seen_attack")


def __getattr__(name: str) -> Any:
    if name in _FROM_SCORING:
        from atop import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: attack budget per level: `screen` is cheap enough to run inside every trial's epochs. `steps`:
#: iterations of gradient attacks; `eot`: model draws per gradient (or per Square query); `queries`:
#: Square's budget (5000 at `full`, as reference AutoAttack); `repeats`: fresh draws of the defense
#: classifying each attacked image
LEVELS: dict[EvalLevel, dict[str, int]] = {
    EvalLevel.SCREEN: {"steps": 10, "eot": 2, "queries": 100, "repeats": 1},
    EvalLevel.LIGHT: {"steps": 20, "eot": 4, "queries": 1000, "repeats": 3},
    EvalLevel.FULL: {"steps": 100, "eot": 20, "queries": 5000, "repeats": 5},
}
#: attacks a level runs besides the seen attack and the config's unseen suite
LEVEL_ATTACKS: dict[EvalLevel, tuple[str, ...]] = {
    EvalLevel.SCREEN: (),
    EvalLevel.LIGHT: ("autoattack_rand_linf",),
    EvalLevel.FULL: ("autoattack_rand_linf",),
}
#: levels that run the gradient-masking audit (`atop.audit`) by default
AUDITED = (EvalLevel.LIGHT, EvalLevel.FULL)
#: how many of the first images' seen-attack outputs an evaluation keeps (`EvalResult.examples`)
EXAMPLE_IMAGES = 8
_BUDGET_KEYS = ("steps", "eot", "queries", "repeats")


def level_budget(level: EvalLevel | str, **overrides: int | None) -> dict[str, Any]:
    """The level's budget with the given (not None) `steps`, `eot`, `queries`, `repeats` in place.

    Returns:
        {"level": level name, "steps", "eot", "queries", "repeats"}.

    Raises:
        ValueError: an unknown level or budget key, or a budget below 1.
    """
    level = EvalLevel(level)
    unknown = set(overrides) - set(_BUDGET_KEYS)
    if unknown:
        raise ValueError(f"unknown budget key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(_BUDGET_KEYS)}")
    budget = {**LEVELS[level], **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in budget.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    return {"level": level.value, **budget}


def weakened(budget: Mapping[str, Any]) -> dict[str, str]:
    """Budget entries below the level's standard: {key: "<given> < <standard>"} (empty: standard)."""
    standard = LEVELS[EvalLevel(budget["level"])]
    return {k: f"{budget[k]} < {standard[k]}" for k in _BUDGET_KEYS if budget[k] < standard[k]}


def config_budget(cfg: Config) -> dict[str, Any]:
    """The budget `cfg` evaluates with: its level's (`level_budget`) and its precision."""
    return {**level_budget(cfg.eval_level), "precision": cfg.eval_precision.value}


def how_obtained(cfg: Config, n_images: int, split: str) -> str:
    """`describe` of `cfg`'s own evaluation, with its eps: the line a trial's figures carry."""
    return f"{describe(config_budget(cfg), n_images, split)}; eps linf {cfg.eval_eps_linf:.4g}, l2 {cfg.eval_eps_l2:.4g}"


def describe(budget: Mapping[str, Any], n_images: int, split: str) -> str:
    """One line saying how a set of figures was obtained, for every printed or logged report.

    Args:
        budget: `EvalResult.budget` (or `level_budget(...)`): level, steps, eot, queries, repeats.
        n_images: images evaluated; split: which split they came from (e.g. "test").

    Returns:
        e.g. "screening (PGD-10, EOT 2, 1 draw): not a final robustness figure; 64 test images".
    """
    draws = f"{budget['repeats']} draw{'' if budget['repeats'] == 1 else 's'}"
    if EvalLevel(budget["level"]) is EvalLevel.SCREEN:
        text = f"screening (PGD-{budget['steps']}, EOT {budget['eot']}, {draws}): not a final robustness figure"
    else:
        name = "full" if EvalLevel(budget["level"]) is EvalLevel.FULL else "light (CPU-sized, weaker than full)"
        text = (f"{name} evaluation (PGD/APGD {budget['steps']} steps, EOT {budget['eot']}, "
                f"Square {budget['queries']} queries, {draws})")
    text += f"; {n_images} {split} images"
    if budget.get("precision", Precision.FP32.value) != Precision.FP32.value:
        text += f"; the defense run in {budget['precision']} (autocast) while attacked and scored"
    if low := weakened(budget):
        text += ("; WEAKENED below the level's standard budget (" + ", ".join(f"{k} {v}" for k, v in low.items())
                 + "): overstates robustness")
    return text


def accuracy(name: str, correct: np.ndarray) -> dict[str, float]:
    """An accuracy from (R, N) per-draw, per-image correctness, with its 95% interval and majority vote.

    Returns:
        `name`: the mean over the R draws and N images; `name_lo`, `name_hi`: the Wilson 95% interval
        of that mean taken as a count of N images (the variance of a mean of per-image rates in
        [0,1] is at most that of a proportion with the same mean, so the interval is exact at R = 1
        and conservative above); `name_majority`: the fraction of images that more than half of the
        R draws classify correctly (a tie counts as wrong).
    """
    draws, n = correct.shape
    mean = float(correct.mean())
    lo, hi = wilson(mean * n, n)
    majority = float((2 * correct.sum(axis=0) > draws).mean())
    return {name: mean, f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_majority": majority}


@dataclass(frozen=True)
class AttackedExamples:
    """The seen attack's output on an evaluation's first images: the very images it scored.

    An image that every clean draw misclassified is not attacked (`atop.scoring.measure`); it is kept
    as the clean image, and `attacked` says which were.
    """

    attack: str  # registry name of the seen attack
    images: torch.Tensor  # (n, C, H, W) float in [0,1], on the CPU
    attacked: np.ndarray  # (n,) bool


@dataclass
class EvalResult:
    #: clean_acc, robust_acc_seen, robust_acc_unseen, robust_acc/<attack>, worst_case_acc (means over
    #: draws), each with `_lo`, `_hi` (95% interval) and `_majority` (majority vote over draws)
    metrics: dict[str, float]
    settings: dict[str, dict[str, Any]]  # attack name -> its settings (eps, norm, steps, eot, ...)
    budget: dict[str, Any]  # level, steps, eot, queries, repeats
    n_images: int
    split: str  # which split the images came from, e.g. "test"
    per_example: dict[str, np.ndarray] = field(default_factory=dict)  # index, label, <name>_correct
    std: dict[str, float] = field(default_factory=dict)  # figure -> std over the repeated draws
    audit: dict[str, Any] | None = None  # `atop.audit.AuditReport.to_dict()` where audited
    #: figure (a key of `metrics` without suffix) -> per-image rate of correct draws, shape (N,): what
    #: a bootstrap over images (e.g. across seeds, `study.confirm`) resamples
    rates: dict[str, np.ndarray] = field(default_factory=dict)
    examples: AttackedExamples | None = None  # the seen attack's output on the first `EXAMPLE_IMAGES` images

    @property
    def level(self) -> EvalLevel:
        return EvalLevel(self.budget["level"])

    @property
    def screening(self) -> bool:
        """True at `screen`: a screening figure for comparing trials, not a final robustness figure."""
        return self.level is EvalLevel.SCREEN

    @property
    def description(self) -> str:
        """`describe(...)` of this result: level, budget, images and split in one line."""
        return describe(self.budget, self.n_images, self.split)


def evaluate(defense: nn.Module, data: Split, cfg: Config, *, level: EvalLevel | str | None = None,
             device: str | torch.device = "cpu", batch_size: int | None = None, attacks: Sequence[str] = (),
             steps: int | None = None, eot: int | None = None, queries: int | None = None,
             repeats: int | None = None, audit: bool | None = None, split: str | None = None) -> EvalResult:
    """Clean, seen and unseen robust accuracy of `defense` on `data` (all of it, in order).

    A draw counts as robust on an image only if that same draw also classified the clean image
    correctly (as reference AutoAttack counts robust accuracy): per draw r, clean[r] & attacked[r].
    So an image that every clean draw misclassifies is not attacked (`atop.scoring.measure`): its
    figures are the same without the attack's cost.

    Args:
        defense: the whole defense (`atop.defense.Defense`), called on images in [0,1].
        data: evaluation images; callers pass the first `cfg.n_eval` test images.
        cfg: names the training norm (seen attack), the unseen suite and the eval eps.
        level: `screen` or `full` (budget in `LEVELS`, extra attacks in `LEVEL_ATTACKS`); default
            `cfg.eval_level`.
        attacks: more registry names to run besides the level's.
        steps, eot, queries, repeats: override the level's budget (lowering it weakens the
            evaluation: the budget is returned in `EvalResult.budget` so reports can say so).
        audit: run the gradient-masking audit (default: at `full` only).
        split: the name of the split `data` came from, for the result's description (default
            `data.source`, e.g. "test"; pass "val" for validation images carved from train).

    Each attack (and the audit) shows its progress over batches (`atop.progress`).

    Returns:
        EvalResult; metrics are means over the `repeats` draws with 95% intervals and majority
        votes (`accuracy`), `std` the standard deviations of the per-draw accuracies.

    Raises:
        ValueError: an unknown attack name or a budget below 1.
    """
    import torch

    from atop.attacks import ATTACKS
    from atop.audit import run_audit
    from atop.data import subset, to_float
    from atop.scoring import (
        attack_batches,
        attack_eps,
        attacked_count,
        measure,
        measure_attack,
        seen_attack,
    )

    level = EvalLevel(level or cfg.eval_level)
    budget = {**level_budget(level, steps=steps, eot=eot, queries=queries, repeats=repeats),
              "precision": cfg.eval_precision.value}
    seen = seen_attack(cfg)
    names = list(dict.fromkeys([seen, *cfg.unseen_attack_names, *LEVEL_ATTACKS[level], *attacks]))
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; accepted: {', '.join(sorted(ATTACKS))}")
    opts = {"repeats": budget["repeats"], "seed": cfg.seed, "batch_size": batch_size or cfg.batch_size,
            "device": device}
    attack_budget = {k: budget[k] for k in ("steps", "eot", "queries")}
    what = f"evaluate ({level.value}, {len(data)} images)"
    kept = to_float(data.x[:EXAMPLE_IMAGES])  # the seen attack's outputs replace the clean images it attacks
    was_attacked = np.zeros(len(kept), dtype=bool)

    def keep(rows: torch.Tensor, images: torch.Tensor) -> None:
        first = rows < len(kept)
        where = rows[first].cpu()
        kept[where] = images[first].detach().float().cpu()
        was_attacked[where.numpy()] = True

    # bf16: the defense's own forward passes under autocast; inputs, gradients and attack steps stay fp32
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                        enabled=cfg.eval_precision is Precision.BF16):
        per: dict[str, np.ndarray] = {"clean": measure(defense, data, None, **opts)}
        settings: dict[str, dict[str, Any]] = {}
        for name in names:
            spec = ATTACKS[name]
            attack = spec.build(defense, eps=attack_eps(cfg, name), seed=cfg.seed, **spec.budget(**attack_budget))
            total = attack_batches(attack, attacked_count(data, per["clean"]), opts["batch_size"])
            with step(f"{what} {name}", total=total, unit="batch") as progress:
                per[name] = measure_attack(defense, data, attack, clean=per["clean"], on_batch=progress.advance,
                                           on_attacked=keep if name == seen else None, **opts)
                progress.finish(f"robust acc {per[name].mean():.3f}")
            settings[name] = {**attack.settings(), "level": level.value, "repeats": budget["repeats"]}
        report, audit_dict = None, None
        if audit if audit is not None else level in AUDITED:
            audited = subset(data, cfg.audit_images)  # a prefix: the measured columns are its images
            n = len(audited)
            with step(f"{what} gradient-masking audit on {n} images", unit="batch") as progress:
                report = run_audit(defense, audited, cfg, **attack_budget,
                                   measured={k: per[k][:, :n] for k in ["clean", *names]}, repeats=opts["repeats"],
                                   batch_size=opts["batch_size"], device=device, on_batch=progress.advance)
                progress.finish("flags " + (", ".join(k for k, v in report.flags.items() if v is True) or "none"))
            settings.update({k: {**s, "level": level.value, "repeats": budget["repeats"], "audit": 1, "images": n}
                             for k, s in report.settings.items()})
            if n == len(data):  # the audit's runs count for the worst case only where they cover every image
                per.update(report.runs)
            audit_dict = {**report.to_dict(), "images": n}
    attacked = [n for n in per if n != "clean"]
    per["unseen"] = np.logical_and.reduce([per[n] for n in cfg.unseen_attack_names])
    per["worst_case"] = np.logical_and.reduce([per["clean"], *(per[n] for n in attacked)])
    figures = {"clean_acc": "clean", "robust_acc_seen": seen, "robust_acc_unseen": "unseen",
               **{f"robust_acc/{n}": n for n in attacked}}
    if report is not None or level is not EvalLevel.SCREEN:
        figures["worst_case_acc"] = "worst_case"
    metrics: dict[str, float] = {}
    for metric, source in figures.items():
        metrics.update(accuracy(metric, per[source]))
    std = {metric: float(per[source].mean(axis=1).std()) for metric, source in figures.items()}
    rates = {metric: per[source].mean(axis=0) for metric, source in figures.items()}
    # index: the row in the source split, so results of different runs can be joined per image
    per_example: dict[str, np.ndarray] = {"index": data.indices.numpy(), "label": data.y.numpy()}
    for name, values in per.items():
        per_example[f"{name}_correct"] = values[0]
        if budget["repeats"] > 1:
            per_example[f"{name}_correct_rate"] = values.mean(axis=0)
    return EvalResult(metrics, settings, budget, len(data), split or data.source or "unnamed", per_example, std,
                      audit_dict, rates, AttackedExamples(seen, kept, was_attacked))


# --- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m atop.evaluate",
                                description="Evaluate a fine-tuned defense checkpoint against adaptive attacks.")
    p.add_argument("--checkpoint", required=True, help="defense checkpoint (kind 'defense')")
    p.add_argument("--classifier", help="the classifier checkpoint (file or folder) that a study trial's checkpoint "
                   "names by sha256 (default: searched beside it and in the caches; docs/CHECKPOINTS.md)")
    p.add_argument("--level", default="full", choices=[lv.value for lv in EvalLevel])
    p.add_argument("--n-images", type=int, default=None, help="first N test images (default: the config's n_eval)")
    p.add_argument("--out", required=True, help="folder to create with eval.json and per_image.parquet")
    p.add_argument("--data-dir", help="folder with <dataset>_test.npz (default $ATOP_DATA_DIR)")
    p.add_argument("--attacks", default="", help="more attacks, comma-separated, besides the level's")
    p.add_argument("--steps", type=int, help="lower the level's attack steps (weakens the evaluation)")
    p.add_argument("--eot", type=int, help="lower the level's EOT samples (weakens the evaluation)")
    p.add_argument("--queries", type=int, help="lower Square's query budget (weakens the evaluation)")
    p.add_argument("--repeats", type=int, help="fresh draws of the defense per attacked image")
    p.add_argument("--eps-linf", type=float, help="l-inf eval eps (default: the checkpoint config's)")
    p.add_argument("--eps-l2", type=float, help="l2 eval eps (default: the checkpoint config's)")
    p.add_argument("--no-audit", action="store_true", help="skip the gradient-masking audit")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="default: the checkpoint config's seed")
    p.add_argument("--device", default="cpu")
    return p


def _check_args(args: argparse.Namespace) -> int:
    """The checks of the command line and of its files' outside, before torch is imported; raise
    UsageError or CheckpointError."""
    if args.n_images is not None and args.n_images < 1:
        raise UsageError(f"--n-images={args.n_images} must be >= 1")
    for name in ("steps", "eot", "queries", "repeats", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value} must be >= 1")
    for name in ("eps_linf", "eps_l2"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')}={value} must be a number >= 0")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} exists and is not an empty folder; pick a new one")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir!r} is not a folder")
    if not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint!r} does not exist; expected a defense checkpoint file")
    unknown = [n for n in _extra_attacks(args) if n not in ATTACK_NAMES]
    if unknown:
        raise UsageError(f"unknown attack(s) {', '.join(unknown)}; accepted: {', '.join(sorted(ATTACK_NAMES))}")
    # that a file can be a torch file at all is checked here, without torch; what it holds is `load_checkpoint`'s
    check_torch_file(Path(args.checkpoint), "checkpoint", ACCEPTED)
    if args.classifier is not None and Path(args.classifier).is_file():  # a folder is searched, later
        check_torch_file(Path(args.classifier), "classifier", ACCEPTED)
    return 0


def _extra_attacks(args: argparse.Namespace) -> list[str]:
    """The names of `--attacks`, in order."""
    return [n.strip() for n in args.attacks.split(",") if n.strip()]


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, Split, Config, list[str], Path]:
    """Check what the files hold (this needs torch); load the defense and data."""
    from atop.checkpoint import load_checkpoint, load_defense
    from atop.data import load_split, subset

    extra = _extra_attacks(args)
    blob = load_checkpoint(args.checkpoint, kind="defense")
    changes = {k: v for k, v in {"eval_eps_linf": args.eps_linf, "eval_eps_l2": args.eps_l2,
                                 "seed": args.seed}.items() if v is not None}
    cfg = blob["config"].replace(**changes)
    data = load_split(cfg.dataset, "test", args.data_dir)
    data = subset(data, args.n_images if args.n_images is not None else cfg.n_eval)
    defense = load_defense(args.checkpoint, device=args.device, seed=cfg.seed, classifier=args.classifier)
    return defense, data, cfg, extra, Path(args.out)


def _write(out: Path, report: dict[str, Any], per_example: dict[str, np.ndarray]) -> None:
    """Fill a temporary sibling folder, then rename it to `out`: never a half-written --out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_folder(out) as tmp:  # `out` was checked absent or empty in _prepare
        (tmp / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        pq.write_table(pa.table({k: np.asarray(v) for k, v in per_example.items()}), tmp / "per_image.parquet")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    refused = one_line_errors(lambda: _check_args(args), (CheckpointError,))
    if refused:
        return refused
    from atop.data import DataError

    return one_line_errors(lambda: _run(args), (CheckpointError, ConfigError, DataError))


def _run(args: argparse.Namespace) -> int:
    """The command's work: check the inputs, evaluate, write --out, print the figures."""
    import torch

    from atop.scoring import seen_attack

    defense, data, cfg, extra, out = _prepare(args)
    budget = level_budget(args.level, **{k: getattr(args, k) for k in _BUDGET_KEYS})
    low = weakened(budget)
    description = describe(budget, len(data), "test")
    print(f"{description}; eps linf {cfg.eval_eps_linf:.5g}, l2 {cfg.eval_eps_l2:.5g}", flush=True)
    if low:
        print("WEAKENED: budget below the level's standard (" + "; ".join(f"{k} {v}" for k, v in low.items())
              + "): these numbers overstate robustness against the standard evaluation", flush=True)
    started = time.perf_counter()
    result = evaluate(defense, data, cfg, level=args.level, device=args.device, batch_size=args.batch_size,
                      attacks=extra, audit=False if args.no_audit else None, split="test",
                      **{k: budget[k] for k in _BUDGET_KEYS})
    seconds = time.perf_counter() - started
    m = result.metrics

    def figure(name: str) -> dict[str, float]:
        return {"acc": m[name], "lo": m[f"{name}_lo"], "hi": m[f"{name}_hi"], "majority": m[f"{name}_majority"],
                "std_over_draws": result.std[name]}

    attacks = {name[len("robust_acc/"):]: {**figure(name), "settings": result.settings[name[len("robust_acc/"):]]}
               for name in result.std if name.startswith("robust_acc/")}
    report: dict[str, Any] = {
        "description": result.description, "screening": result.screening,
        "checkpoint": str(Path(args.checkpoint).resolve()), "dataset": cfg.dataset, "split": result.split,
        "n_images": result.n_images, "level": result.level.value, "seed": cfg.seed, "device": str(args.device),
        "budget": result.budget, "standard_budget": LEVELS[result.level], "weakened": low,
        "threat_models": {"linf": cfg.eval_eps_linf, "l2": cfg.eval_eps_l2},
        "scoring": "a draw counts as robust only if the same draw classified the clean image correctly; acc: mean "
                   "over draws and images; lo, hi: Wilson 95% interval of acc as a count of n_images; majority: "
                   "images most draws classify correctly",
        "clean_acc": figure("clean_acc"), "robust_acc_seen": figure("robust_acc_seen"),
        "robust_acc_unseen": figure("robust_acc_unseen"),
        "worst_case_acc": figure("worst_case_acc") if "worst_case_acc" in m else None,
        "attacks": attacks, "metrics": m, "audit": result.audit, "seconds": seconds,
        "torch": torch.__version__, "config": cfg.to_dict(),
    }
    _write(out, report, result.per_example)
    print(description)
    print(f"{'figure':32s} {'acc':>6s} {'95% interval':>15s} {'majority':>8s} {'std/draws':>9s}")
    rows = {"clean": report["clean_acc"], f"seen ({seen_attack(cfg)})": report["robust_acc_seen"],
            f"unseen (all of {cfg.unseen_attacks})": report["robust_acc_unseen"], **attacks}
    if report["worst_case_acc"] is not None:
        rows["worst case"] = report["worst_case_acc"]
    for name, entry in rows.items():
        print(f"{name:32s} {entry['acc']:6.3f} [{entry['lo']:.3f}, {entry['hi']:.3f}] {entry['majority']:8.3f} "
              f"{entry['std_over_draws']:9.3f}")
    if result.audit is not None:
        flagged = [k for k, v in result.audit["flags"].items() if v is True and k != "gradient_masking_suspected"]
        print("audit: " + ("gradient masking suspected: " + ", ".join(flagged) if flagged else "no flags"))
    print(f"wrote {out}/eval.json and per_image.parquet in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
