"""One AToP run end to end: pre-train what is missing, fine-tune, evaluate, write the defense.

    python -m atop.run --preset smoke --out runs/smoke --data-dir ../shared/data [--level screen]

Writes `OUT/defense.pt` (load it with `atop.load_defense`), `OUT/metrics.json` (the final
objectives, per-attack figures with 95% intervals and majority votes, the attack settings behind
every number, a one-line `evaluation` saying how they were obtained, and the same evaluation of the
pre-trained purifier before fine-tuning, as the baseline). Pre-trained weights go to the cache
(`--pretrained-cache`, default `$ATOP_CACHE_DIR` or `~/.cache/atop/pretrained`), keyed by their
settings, data and code, and are reused by every later run and study with the same ones. Files
appear only when complete; a failed run leaves no partial files behind.

The final evaluation (last epoch and baseline) runs at `--level`, default `full` (`atop.evaluate`:
PGD/APGD 100 steps, EOT 20, 5 draws, the gradient-masking audit); `--level screen` keeps the cheap
screening level for quick runs, and its figures are labelled "screening (...): not a final
robustness figure". Without `--level`, an `eval_level` given in `--config` or `--set` is used.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# No torch at import: the command line is checked before torch loads (tests/test_refusal.py);
# `run` and `_run` import what the work needs.
from atop.cli import (
    OneLineParser,
    UsageError,
    check_folder_to_create,
    naming_the_file,
    one_line_errors,
)
from atop.config import Config, ConfigError, EvalLevel, read_config_file
from atop.evaluate import config_budget, describe
from atop.io import atomic_write_text
from atop.presets import get_preset


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings from `--set` into a dict (values converted later by `Config.from_dict`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not key=value; accepted: e.g. --set lambda_ce=0.05")
        out[key.strip()] = value.strip()
    return out


def run(cfg: Config, preset_name: str, out: Path, *, data_dir: str | None, device: str,
        pretrained_cache: str | None = None) -> dict[str, Any]:
    """Pre-train (or reuse), evaluate the pre-trained purifier, fine-tune (evaluating), return metrics."""
    from atop.checkpoint import build_classifier, build_purifier, load_checkpoint, save_checkpoint
    from atop.checkpoint_file import CheckpointError
    from atop.data import load_split, subset, training_pool
    from atop.defense import Defense
    from atop.evaluate import evaluate
    from atop.finetune import finetune
    from atop.pretrain import ensure_pretrained

    preset = get_preset(preset_name)
    log = lambda msg: print(msg, flush=True)
    train_pool = training_pool(load_split(cfg.dataset, "train", data_dir))  # a study's pool: the same cache
    test = subset(load_split(cfg.dataset, "test", data_dir), cfg.n_eval)
    clf_path, pur_path = ensure_pretrained(cfg, preset.pretrain, pretrained_cache, device=device, log=log,
                                           train=subset(train_pool, preset.pretrain.n_train, seed=cfg.seed))
    classifier = build_classifier(load_checkpoint(clf_path, kind="classifier"))
    purifier, disc = build_purifier(load_checkpoint(pur_path, kind="purifier"))
    if disc is None:  # fine-tuning continues the GAN game that pre-training started
        raise CheckpointError(f"pre-trained purifier {str(pur_path)!r} holds no discriminator; "
                              "expected a purifier checkpoint written by atop.pretrain")

    started = time.perf_counter()
    baseline_defense = Defense.from_config(cfg, purifier, classifier).to(device).eval()
    baseline = evaluate(baseline_defense, test, cfg, device=device, split="test")
    log(f"before fine-tuning ({baseline.description}): {_summary(baseline.metrics)}")
    report = None
    for report in finetune(cfg, classifier, purifier, disc, subset(train_pool, cfg.n_train, seed=cfg.seed), test,
                           device=device):
        log(f"epoch {report.epoch}/{cfg.epochs}: {_summary(report.metrics)} "
            f"({report.metrics['images_per_s']:.0f} img/s, {report.metrics['epoch_s']:.0f} s)")
    assert report is not None  # cfg.epochs >= 1 is checked by Config
    save_checkpoint(out / "defense.pt", kind="defense", cfg=cfg, classifier=classifier, purifier=purifier,
                    discriminator=disc, optimizers=report.state["optimizers"], epoch=report.epoch,
                    metrics=report.metrics)
    # The last epoch already evaluated these weights at the config's level: its figures are final.
    budget = config_budget(cfg)
    return {"evaluation": describe(budget, len(test), "test"), "level": cfg.eval_level.value,
            "screening": cfg.eval_level is EvalLevel.SCREEN, "budget": budget, "split": "test", "n_eval": len(test),
            **report.metrics, "attacks": report.eval_settings, "preset": preset_name,
            "config": cfg.to_dict(), "baseline_before_finetune": baseline.metrics,
            "wall_s": time.perf_counter() - started,
            "how": "attacks differentiate the whole defense (RT + purifier + classifier) with EOT; each attacked "
                   f"image is classified by {budget['repeats']} fresh draw(s) of the defense; a draw counts as "
                   "robust only if the same draw classified the clean image correctly; <figure>_lo, _hi: Wilson "
                   "95% interval over images; <figure>_majority: images most draws classify correctly"}


def _summary(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {metrics[k]:.3f} [{metrics[k + '_lo']:.3f}, {metrics[k + '_hi']:.3f}]"
                    for k in ("clean_acc", "robust_acc_seen", "robust_acc_unseen"))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m atop.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smoke", help="named settings (atop.presets): smoke, tiny, paper-cifar10, ...")
    parser.add_argument("--config", help="YAML or JSON file of config fields, applied over the preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one config field, over --config")
    parser.add_argument("--out", required=True, help="output folder (created; existing defense.pt is replaced)")
    parser.add_argument("--data-dir", help="folder with <dataset>_<split>.npz (default $ATOP_DATA_DIR)")
    parser.add_argument("--level", choices=[level.value for level in EvalLevel],
                        help="level of the final evaluation (default full; screen: quick runs, not final figures)")
    parser.add_argument("--pretrained-cache", metavar="DIR",
                        help="cache of pre-trained weights (default $ATOP_CACHE_DIR or ~/.cache/atop/pretrained)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cuda where available, else cpu)")
    args = parser.parse_args(argv)
    refused = one_line_errors(lambda: _check_args(args), (ConfigError,))
    if refused:
        return refused
    from atop.checkpoint_file import CheckpointError
    from atop.data import DataError

    return one_line_errors(lambda: _run(args), (ConfigError, DataError, CheckpointError))


def _check_args(args: argparse.Namespace) -> int:
    """The checks of the command line and config file alone, before torch is imported."""
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; expected a folder to write defense.pt and metrics.json into")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise UsageError(f"--data-dir {args.data_dir!r} is not a folder; expected one holding <dataset>_train.npz "
                         "and <dataset>_test.npz")
    if args.pretrained_cache:
        check_folder_to_create("--pretrained-cache", args.pretrained_cache, "cached pre-trained weights")
    _config(args)
    return 0


def _config(args: argparse.Namespace) -> Config:
    """The run's config: preset < config file < --set flags (no torch import: checked before it)."""
    preset = get_preset(args.preset)
    overrides = parse_overrides(args.set)
    file_values = read_config_file(args.config) if args.config else {}
    # the final evaluation is `full` unless --level (or an eval_level in the config file or --set)
    # says otherwise, whatever the preset's
    level = args.level or overrides.get("eval_level") or file_values.get("eval_level") or "full"
    flags = {**overrides, "eval_level": level}
    return naming_the_file(lambda with_file: Config.from_dict({**preset.config, **(file_values if with_file else {}),
                                                               **flags}), "--config", args.config, ConfigError)


def _run(args: argparse.Namespace) -> int:
    """The command's work; a failure of any kind removes the --out folder if this run created it."""
    import torch

    out = Path(args.out).resolve()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    created = not out.exists()
    try:
        cfg = _config(args)
        out.mkdir(parents=True, exist_ok=True)
        metrics = run(cfg, args.preset, out, data_dir=args.data_dir, device=device,
                      pretrained_cache=args.pretrained_cache)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    except BaseException:
        if created and out.exists():
            shutil.rmtree(out)
        raise
    print(f"final ({metrics['evaluation']}): {_summary(metrics)}")
    print(f"wrote {out / 'defense.pt'} and {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
