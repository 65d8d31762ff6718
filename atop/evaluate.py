"""Robustness evaluation of the whole stochastic defense, at a cheap `screen` or a strong `full` level.

    python -m atop.evaluate --checkpoint runs/defense.pt --level full --n-images 64 --out runs/eval \\
        --data-dir ../shared/data [--steps 20 --eot 4 --queries 200]   # lowered budget: CPU runs

Every attack differentiates the whole defense (RT + purifier + classifier) and averages its gradient
over EOT draws of the random transform (BPDA alone replaces the purifier's backward by the identity,
on purpose); the attacked image is then classified by fresh draws of the defense, as a deployed
defense would, `repeats` times (mean and std over these draws are reported). Objectives (fractions
in [0,1]):
- `clean_acc`: accuracy on the clean images through the defense;
- `robust_acc_seen`: PGD in the training attack's norm (the strongest member of the FGSM/PGD family
  it was trained on) at the evaluation eps;
- `robust_acc_unseen`: per image, correct under every attack of `cfg.unseen_attacks` (worst case).
Secondary: `robust_acc/<attack>` and, at `full`, `worst_case_acc` (correct on the clean image and
under every attack run, audit runs included) and the gradient-masking audit (`atop.audit`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from atop.attacks import ATTACKS, Attack
from atop.cli import OneLineParser
from atop.config import Config, EvalLevel, Norm
from atop.data import Split

#: attack budget per level: `screen` is cheap enough to run inside every trial's epochs. `steps`:
#: iterations of gradient attacks; `eot`: model draws per gradient (or per Square query); `queries`:
#: Square's budget; `repeats`: fresh draws of the defense classifying each attacked image
LEVELS: dict[EvalLevel, dict[str, int]] = {
    EvalLevel.SCREEN: {"steps": 10, "eot": 2, "queries": 100, "repeats": 1},
    EvalLevel.FULL: {"steps": 100, "eot": 20, "queries": 1000, "repeats": 5},
}
#: attacks a level runs besides the seen attack and the config's unseen suite
LEVEL_ATTACKS: dict[EvalLevel, tuple[str, ...]] = {
    EvalLevel.SCREEN: (),
    EvalLevel.FULL: ("autoattack_rand_linf",),
}
#: levels that run the gradient-masking audit (`atop.audit`) by default
AUDITED = (EvalLevel.FULL,)


@dataclass
class EvalResult:
    metrics: dict[str, float]  # clean_acc, robust_acc_seen, robust_acc_unseen, robust_acc/<attack>, ...
    settings: dict[str, dict[str, Any]]  # attack name -> its settings (eps, norm, steps, eot, ...)
    per_example: dict[str, np.ndarray] = field(default_factory=dict)  # index, label, <name>_correct
    std: dict[str, float] = field(default_factory=dict)  # metric -> std over the repeated draws
    budget: dict[str, Any] = field(default_factory=dict)  # level, steps, eot, queries, repeats
    audit: dict[str, Any] | None = None  # `atop.audit.AuditReport.to_dict()` where audited


def seen_attack(cfg: Config) -> str:
    return f"pgd_{cfg.train_norm.value}"


def attack_eps(cfg: Config, name: str) -> float:
    return cfg.eval_eps_linf if ATTACKS[name].norm is Norm.LINF else cfg.eval_eps_l2


def _reseed(model: nn.Module, seed: int) -> None:
    if hasattr(model, "reseed"):
        model.reseed(seed)


def measure(model: nn.Module, data: Split, attack: Attack | None, *, repeats: int = 1, seed: int = 0,
            batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Attack every image once, then classify each attacked image with `repeats` fresh model draws.

    The model's randomness is reseeded (where it has `.reseed`) to `seed` for the attack and to
    `seed + 1 + r` for draw r, so every attack (and the clean images, `attack=None`) is judged by
    the same draws: differences between attacks are paired, not draw noise.

    Returns:
        Bool array (repeats, N): whether draw r classified attacked image i correctly.
    """
    _reseed(model, seed)
    batches = list(data.batches(batch_size, device=device))
    attacked = [x if attack is None else attack(x, y) for x, y in batches]
    out = np.zeros((repeats, len(data)), dtype=bool)
    for r in range(repeats):
        _reseed(model, seed + 1 + r)
        start = 0
        with torch.no_grad():
            for x_adv, (_, y) in zip(attacked, batches):
                out[r, start:start + len(y)] = (model(x_adv).argmax(dim=1) == y).cpu().numpy()
                start += len(y)
    return out


def evaluate(defense: nn.Module, data: Split, cfg: Config, *, level: EvalLevel | str | None = None,
             device: str | torch.device = "cpu", batch_size: int | None = None, attacks: Sequence[str] = (),
             steps: int | None = None, eot: int | None = None, queries: int | None = None,
             repeats: int | None = None, audit: bool | None = None,
             log: Callable[[str], None] | None = None) -> EvalResult:
    """Clean, seen and unseen robust accuracy of `defense` on `data` (all of it, in order).

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
        log: called with one line per finished attack (progress of long runs).

    Returns:
        EvalResult; metrics are means over the `repeats` draws, `std` their standard deviations.

    Raises:
        ValueError: an unknown attack name or a budget below 1.
    """
    level = EvalLevel(level or cfg.eval_level)
    overrides = {"steps": steps, "eot": eot, "queries": queries, "repeats": repeats}
    budget = {**LEVELS[level], **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in budget.items():
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    names = list(dict.fromkeys([seen_attack(cfg), *cfg.unseen_attack_names, *LEVEL_ATTACKS[level], *attacks]))
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; accepted: {', '.join(ATTACKS)}")
    opts = {"repeats": budget["repeats"], "seed": cfg.seed, "batch_size": batch_size or cfg.batch_size,
            "device": device}
    attack_budget = {k: budget[k] for k in ("steps", "eot", "queries")}
    per: dict[str, np.ndarray] = {"clean": measure(defense, data, None, **opts)}
    settings: dict[str, dict[str, Any]] = {}
    for name in names:
        spec, started = ATTACKS[name], time.perf_counter()
        attack = spec.build(defense, eps=attack_eps(cfg, name), seed=cfg.seed, **spec.budget(**attack_budget))
        per[name] = measure(defense, data, attack, **opts)
        settings[name] = {**attack.settings(), "level": level.value}
        if log:
            log(f"{name}: robust acc {per[name].mean():.3f} ({time.perf_counter() - started:.0f} s)")
    report = None
    if audit if audit is not None else level in AUDITED:
        from atop.audit import run_audit

        started = time.perf_counter()
        report = run_audit(defense, data, cfg, **attack_budget, measured={n: per[n] for n in names},
                           repeats=opts["repeats"], batch_size=opts["batch_size"], device=device)
        per.update(report.runs)
        settings.update({n: {**s, "level": level.value, "audit": 1} for n, s in report.settings.items()})
        if log:
            log(f"audit: {time.perf_counter() - started:.0f} s, flags "
                + ", ".join(k for k, v in report.flags.items() if v is True) or "none")
    attacked = [n for n in per if n != "clean"]
    per["unseen"] = np.logical_and.reduce([per[n] for n in cfg.unseen_attack_names])
    per["worst_case"] = np.logical_and.reduce([per["clean"], *(per[n] for n in attacked)])
    means = {n: float(v.mean()) for n, v in per.items()}
    stds = {n: float(v.mean(axis=1).std()) for n, v in per.items()}
    key = {"clean": "clean_acc", seen_attack(cfg): "robust_acc_seen", "unseen": "robust_acc_unseen",
           "worst_case": "worst_case_acc"}
    metrics = {"clean_acc": means["clean"], "robust_acc_seen": means[seen_attack(cfg)],
               "robust_acc_unseen": means["unseen"], **{f"robust_acc/{n}": means[n] for n in attacked}}
    std = {"clean_acc": stds["clean"], "robust_acc_seen": stds[seen_attack(cfg)],
           "robust_acc_unseen": stds["unseen"], **{f"robust_acc/{n}": stds[n] for n in attacked}}
    if report is not None or level is EvalLevel.FULL:
        metrics[key["worst_case"]], std[key["worst_case"]] = means["worst_case"], stds["worst_case"]
    per_example: dict[str, np.ndarray] = {"index": np.arange(len(data)), "label": data.y.numpy()}
    for name, values in per.items():
        per_example[f"{name}_correct"] = values[0]
        if budget["repeats"] > 1:
            per_example[f"{name}_correct_rate"] = values.mean(axis=0)
    return EvalResult(metrics, settings, per_example, std, {"level": level.value, **budget},
                      report.to_dict() if report is not None else None)


# --- command line ----------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad command-line input: reported as one `error: ...` line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m atop.evaluate",
                                description="Evaluate a fine-tuned defense checkpoint against adaptive attacks.")
    p.add_argument("--checkpoint", required=True, help="defense checkpoint (kind 'defense')")
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


def _prepare(args: argparse.Namespace) -> tuple[nn.Module, Split, Config, list[str], Path]:
    """Check every input before any work; raise UsageError (or a one-line library error)."""
    from atop.checkpoint import load_checkpoint, load_defense
    from atop.data import load_split, subset

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
    extra = [n.strip() for n in args.attacks.split(",") if n.strip()]
    unknown = [n for n in extra if n not in ATTACKS]
    if unknown:
        raise UsageError(f"unknown attack(s) {', '.join(unknown)}; accepted: {', '.join(ATTACKS)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} exists and is not an empty folder; pick a new one")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir!r} is not a folder")
    blob = load_checkpoint(args.checkpoint, kind="defense")
    changes = {k: v for k, v in {"eval_eps_linf": args.eps_linf, "eval_eps_l2": args.eps_l2,
                                 "seed": args.seed}.items() if v is not None}
    cfg = blob["config"].replace(**changes)
    data = load_split(cfg.dataset, "test", args.data_dir)
    data = subset(data, args.n_images if args.n_images is not None else cfg.n_eval)
    defense = load_defense(args.checkpoint, device=args.device, seed=cfg.seed)
    return defense, data, cfg, extra, out


def _write(out: Path, report: dict[str, Any], per_example: dict[str, np.ndarray]) -> None:
    """Write into a temporary sibling folder, then rename: never a half-written --out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        pq.write_table(pa.table({k: np.asarray(v) for k, v in per_example.items()}), tmp / "per_image.parquet")
        if out.is_dir():
            out.rmdir()  # checked empty in _prepare
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    from atop.checkpoint import CheckpointError
    from atop.config import ConfigError
    from atop.data import DataError

    args = _parser().parse_args(argv)
    try:
        defense, data, cfg, extra, out = _prepare(args)
    except (UsageError, CheckpointError, ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    level = EvalLevel(args.level)
    budget = {**LEVELS[level], **{k: getattr(args, k) for k in ("steps", "eot", "queries", "repeats")
                                  if getattr(args, k) is not None}}
    weakened = {k: f"{budget[k]} < {LEVELS[level][k]}" for k in ("steps", "eot", "queries", "repeats")
                if budget[k] < LEVELS[level][k]}
    header = (f"level {level.value}: steps {budget['steps']}, eot {budget['eot']}, queries {budget['queries']}, "
              f"repeats {budget['repeats']}, eps linf {cfg.eval_eps_linf:.5g}, l2 {cfg.eval_eps_l2:.5g}, "
              f"{len(data)} images")
    print(header, flush=True)
    if weakened:
        print("WEAKENED: budget below the level's standard (" + "; ".join(f"{k} {v}" for k, v in weakened.items())
              + "): these numbers overstate robustness against the standard evaluation", flush=True)
    started = time.perf_counter()
    result = evaluate(defense, data, cfg, level=level, device=args.device, batch_size=args.batch_size,
                      attacks=extra, audit=False if args.no_audit else None,
                      log=lambda line: print(line, flush=True), **{k: budget[k] for k in budget})
    seconds = time.perf_counter() - started
    attacks = {name[len("robust_acc/"):]: {"robust_acc": value, "robust_acc_std": result.std[name],
                                           "settings": result.settings[name[len("robust_acc/"):]]}
               for name, value in result.metrics.items() if name.startswith("robust_acc/")}
    report = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "dataset": cfg.dataset, "split": "test",
        "n_images": len(data), "level": level.value, "seed": cfg.seed, "device": str(args.device),
        "budget": result.budget, "standard_budget": LEVELS[level], "weakened": weakened,
        "threat_models": {"linf": cfg.eval_eps_linf, "l2": cfg.eval_eps_l2},
        "clean_acc": result.metrics["clean_acc"], "clean_acc_std": result.std["clean_acc"],
        "robust_acc_seen": result.metrics["robust_acc_seen"], "robust_acc_unseen": result.metrics["robust_acc_unseen"],
        "worst_case_acc": result.metrics.get("worst_case_acc"), "worst_case_acc_std": result.std.get("worst_case_acc"),
        "attacks": attacks, "audit": result.audit, "seconds": seconds,
        "torch": torch.__version__, "config": cfg.to_dict(),
    }
    _write(out, report, result.per_example)
    print(f"clean {report['clean_acc']:.3f} ± {report['clean_acc_std']:.3f}")
    for name, entry in attacks.items():
        print(f"{name:32s} {entry['robust_acc']:.3f} ± {entry['robust_acc_std']:.3f}")
    if report["worst_case_acc"] is not None:
        print(f"{'worst case':32s} {report['worst_case_acc']:.3f} ± {report['worst_case_acc_std']:.3f}")
    if result.audit is not None:
        flagged = [k for k, v in result.audit["flags"].items() if v is True and k != "gradient_masking_suspected"]
        print("audit: " + ("gradient masking suspected: " + ", ".join(flagged) if flagged else "no flags"))
    print(f"wrote {out}/eval.json and per_image.parquet in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
