"""The Ray Tune function trainable of an AToP study: a thin adapter over `atop.finetune.finetune`.

The Tune config is a flat `atop.config.Config` dict plus the reserved keys in `TRIAL_KEYS`
(the Optuna trial number and the MLflow child run made for it by the driver). Everything shared by
all trials (data, pre-trained weights, MLflow coordinates) arrives once through the object store:

    trainable = tune.with_parameters(train_atop, ctx=StudyContext(...))

Per epoch: `tune.report(metrics, checkpoint=...)` and the same metrics to MLflow (step = epoch).
A restarted trial (Ray `FailureConfig`) resumes from its last Tune checkpoint and logs to the same
MLflow run. Failures that a retry cannot fix (NaN loss, bad config, bad checkpoint) end the trial
with a result carrying `atop_failed=1` and `atop_error` instead of raising, so Tune does not retry
them; anything else raises and is retried from the last checkpoint.
"""
from __future__ import annotations

import io
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atop.checkpoint import (
    CheckpointError,
    build_classifier,
    build_purifier,
    load_checkpoint,
    save_checkpoint,
)
from atop.config import Config, ConfigError
from atop.data import Split
from atop.finetune import finetune
from trainables.tracking import ERROR_TAG, LAST_ERROR_TAG, RunLogger, quiet_http

TRIAL_NUMBER, RUN_ID = "optuna_trial_number", "mlflow_run_id"
TRIAL_KEYS = (TRIAL_NUMBER, RUN_ID)
OBJECTIVES = ("clean_acc", "robust_acc_seen", "robust_acc_unseen")
#: errors a retry cannot fix: reported as a failed result, not raised (no Tune retry)
PERMANENT = (FloatingPointError, ConfigError, CheckpointError)
DEFENSE_FILE, STATE_FILE = "defense.pt", "trainer_state.pt"
#: test-only fault-injection hook, see `FaultPlan` and docs/RELIABILITY.md
FAULT_ENV = "ATOP_FAULT_INJECT"


@dataclass
class StudyContext:
    """What every trial of a study shares; sent once through the object store."""

    train: Split  # the fine-tuning images (already the study's `n_train` subset)
    test: Split  # the evaluation images (the first `n_eval` of the test split)
    classifier_ckpt: bytes  # pre-trained checkpoint files, as bytes (no shared file system needed)
    purifier_ckpt: bytes
    mlflow_uri: str
    spool_dir: str  # where a trial spools MLflow calls during an outage
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)  # git SHA, package versions, ... for every run
    grid_images: int = 8


def split_config(config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """(typed config, reserved trial keys); unknown keys raise `ConfigError`."""
    reserved = {k: config[k] for k in TRIAL_KEYS if k in config}
    return Config.from_dict({k: v for k, v in config.items() if k not in TRIAL_KEYS}), reserved


def _device(ctx: StudyContext) -> torch.device:
    return torch.device("cuda" if ctx.gpus_per_trial > 0 and torch.cuda.is_available() else "cpu")


def train_atop(config: dict[str, Any], ctx: StudyContext) -> None:
    """Fine-tune one purifier with AToP and report every epoch (see the module docstring)."""
    from ray import tune

    quiet_http()
    cfg, reserved = split_config(config)
    number, run_id = int(reserved.get(TRIAL_NUMBER, -1)), reserved.get(RUN_ID)
    torch.set_num_threads(max(1, round(ctx.cpus_per_trial)))
    device = _device(ctx)
    trial_dir = Path(tune.get_context().get_trial_dir())
    log = RunLogger(ctx.mlflow_uri, run_id, Path(ctx.spool_dir) / f"trial-{number:04d}.jsonl") if run_id else None

    checkpoint = tune.get_checkpoint()
    state, start_epoch, compute_s = None, 0, 0.0
    try:
        classifier = build_classifier(load_checkpoint(ctx.classifier_ckpt, kind="classifier"))
        purifier, discriminator = build_purifier(load_checkpoint(ctx.purifier_ckpt, kind="purifier"))
        if discriminator is None:
            raise CheckpointError("the pre-trained purifier checkpoint holds no discriminator")
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, start_epoch, compute_s = _restore(Path(d))
        if log:
            log.set_status("RUNNING")
            if checkpoint is None:
                log.log_params(cfg.to_dict())
                log.set_tags({**ctx.tags, "seed": cfg.seed, "device": _device_name(device),
                              "atop.resources": f"cpu={ctx.cpus_per_trial},gpu={ctx.gpus_per_trial}"})
            else:
                log.set_tags({"atop.restored_from_epoch": start_epoch})
        _check_sizes(cfg, ctx)
        faults = FaultPlan.from_env(number)
        faults.at(start_epoch, purifier)

        started = time.perf_counter()
        for report in finetune(cfg, classifier, purifier, discriminator, ctx.train, ctx.test, device=device,
                               state=state, start_epoch=start_epoch):
            metrics = {**report.metrics, "compute_s": compute_s + time.perf_counter() - started}
            if log:
                log.log_metrics(metrics, step=report.epoch)
            with tempfile.TemporaryDirectory(prefix="atop-ckpt-") as d:
                _save(Path(d), cfg, report, classifier, purifier, discriminator, metrics["compute_s"])
                tune.report({**metrics, "epoch": report.epoch, TRIAL_NUMBER: number},
                            checkpoint=tune.Checkpoint.from_directory(d))
            faults.at(report.epoch, purifier)
        final = report if cfg.epochs > start_epoch else None
        if log:
            _final_artifacts(log, number, cfg, ctx, classifier, purifier, discriminator, final, trial_dir, device)
            log.set_status("FINISHED")
            if not log.flush():
                print(f"MLflow unreachable ({log.last_error}); unsent calls kept in {log.spool}", flush=True)
    except PERMANENT as exc:
        message = f"{type(exc).__name__}: {exc}"
        if log:
            log.set_tags({ERROR_TAG: message})
            log.set_status("FAILED")
        tune.report({"atop_failed": 1, "atop_error": message, TRIAL_NUMBER: number})
    except BaseException as exc:
        if log:  # Tune may retry it from the last checkpoint; the driver settles the final status
            log.set_tags({LAST_ERROR_TAG: f"{type(exc).__name__}: {exc}"})
            log.flush()
        raise


class FaultPlan:
    """Test-only fault injection (`ATOP_FAULT_INJECT`); unset in normal use, then it does nothing.

    The reliability tests cause real faults through it without mocking Ray, MLflow or Optuna. The
    value is `;`-separated specs `KIND@trial=N[,epoch=E][,once=FILE][,seconds=S]`, each acting on
    Optuna trial N when it has finished E epochs (E=0: before the first epoch; default 1):

    - `raise`: raise `RuntimeError` (Tune retries it from the last checkpoint, then FAIL);
    - `transient`: the same, but only the first time (needs `once=FILE`, created when it fires;
      `once` makes any kind fire only once, across the attempts of a trial);
    - `nan`: fill the purifier's weights with NaN, so the next epoch's loss is really non-finite;
    - `sleep`: sleep S seconds (keeps a trial running while a test kills something).
    """

    KINDS = ("raise", "transient", "nan", "sleep")

    def __init__(self, specs: list[dict[str, str]]):
        self.specs = specs

    @classmethod
    def from_env(cls, number: int) -> FaultPlan:
        text = os.environ.get(FAULT_ENV, "").strip()
        specs = []
        for item in filter(None, (p.strip() for p in text.split(";"))):
            kind, _, args = item.partition("@")
            spec = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
            if kind not in cls.KINDS or "trial" not in spec:
                raise ValueError(f"{FAULT_ENV}={text!r}: bad spec {item!r}; accepted: "
                                 f"{'|'.join(cls.KINDS)}@trial=N[,epoch=E][,once=FILE][,seconds=S]")
            if spec["trial"] in ("*", str(number)):
                if "once" in spec:
                    spec["once"] = spec["once"].replace("{trial}", str(number))
                specs.append({"kind": kind, **spec})
        return cls(specs)

    def at(self, epoch: int, purifier: torch.nn.Module) -> None:
        for spec in self.specs:
            if int(spec.get("epoch", 1)) != epoch:
                continue
            kind = spec["kind"]
            if "once" in spec or kind == "transient":  # fire only the first time, across attempts
                try:
                    os.close(os.open(spec["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
            if kind == "sleep":
                time.sleep(float(spec.get("seconds", 10)))
            elif kind == "nan":
                with torch.no_grad():
                    for p in purifier.parameters():
                        p.fill_(float("nan"))
            elif kind == "raise":
                raise RuntimeError(f"injected fault ({FAULT_ENV}) after epoch {epoch}")
            elif kind == "transient":
                raise RuntimeError(f"injected transient fault ({FAULT_ENV}) after epoch {epoch}")


def _check_sizes(cfg: Config, ctx: StudyContext) -> None:
    if cfg.n_train and len(ctx.train) != cfg.n_train:
        raise ConfigError(f"n_train={cfg.n_train} but the study shared {len(ctx.train)} training images; "
                          "n_train is a study-level setting, not a searched one")
    if len(ctx.test) != cfg.n_eval:
        raise ConfigError(f"n_eval={cfg.n_eval} but the study shared {len(ctx.test)} evaluation images")


def _save(folder: Path, cfg: Config, report: Any, classifier: torch.nn.Module, purifier: torch.nn.Module,
          discriminator: torch.nn.Module, compute_s: float) -> None:
    """A Tune checkpoint: a self-contained defense checkpoint plus what resuming needs besides."""
    save_checkpoint(folder / DEFENSE_FILE, kind="defense", cfg=cfg, classifier=classifier, purifier=purifier,
                    discriminator=discriminator, optimizers=report.state["optimizers"], epoch=report.epoch,
                    metrics=report.metrics)
    extra = {"generator": report.state.get("generator"), "compute_s": compute_s}
    torch.save(extra, folder / STATE_FILE)


def _restore(folder: Path) -> tuple[dict[str, Any], int, float]:
    blob = load_checkpoint(folder / DEFENSE_FILE, kind="defense")
    extra = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    state = {"purifier": blob["purifier"]["state_dict"], "discriminator": blob["discriminator"]["state_dict"],
             "optimizers": blob["optimizers"]}
    if extra.get("generator") is not None:
        state["generator"] = extra["generator"]
    return state, int(blob["epoch"]), float(extra.get("compute_s", 0.0))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _final_artifacts(log: RunLogger, number: int, cfg: Config, ctx: StudyContext, classifier: torch.nn.Module,
                     purifier: torch.nn.Module, discriminator: torch.nn.Module, final: Any, trial_dir: Path,
                     device: torch.device) -> None:
    """Final checkpoint, image grid and per-example results, kept in the trial folder and logged."""
    from atop.defense import Defense
    from atop.evaluate import evaluate
    from atop.transforms import RandomTransform

    out = trial_dir / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    metrics = final.metrics if final is not None else {}
    save_checkpoint(out / DEFENSE_FILE, kind="defense", cfg=cfg, classifier=classifier, purifier=purifier,
                    discriminator=discriminator, epoch=cfg.epochs, metrics=metrics)
    defense = Defense(RandomTransform.from_config(cfg), purifier, classifier, seed=cfg.seed).to(device).eval()
    if final is not None:  # the last epoch's evaluation, at the config's level
        per_example = final.per_example
    else:  # resumed after its last epoch: nothing ran here, evaluate the restored purifier
        per_example = evaluate(defense, ctx.test, cfg, device=device).per_example
    write_parquet(per_example, out / "per_example.parquet", trial_number=number)
    image_grid(defense, ctx.test, cfg, out / "images.png", n=ctx.grid_images, device=device)
    for name in (DEFENSE_FILE, "per_example.parquet", "images.png"):
        log.log_artifact(out / name)


def write_parquet(per_example: dict[str, np.ndarray], path: Path, trial_number: int = -1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {k: np.asarray(v) for k, v in per_example.items()}
    n = len(next(iter(columns.values())))
    table = pa.table({"trial_number": np.full(n, trial_number, dtype=np.int64), **columns})
    pq.write_table(table, path)
    return path


def image_grid(defense: Any, test: Split, cfg: Config, path: Path, *, n: int = 8,
               device: str | torch.device = "cpu") -> Path:
    """PNG: rows clean / attacked (the seen attack) / transformed (first RT view) / purified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atop.attacks import ATTACKS
    from atop.evaluate import LEVELS, attack_eps, seen_attack

    x, y = next(test.batches(n, device=device))
    defense.reseed(cfg.seed)
    name = seen_attack(cfg)
    spec = ATTACKS[name]
    budget = spec.budget(**{k: v for k, v in LEVELS[cfg.eval_level].items() if k in ("steps", "eot", "queries")})
    attack = spec.build(defense, eps=attack_eps(cfg, name), seed=cfg.seed, **budget)
    x_adv = attack(x, y)
    with torch.no_grad():
        views, _ = defense.transform(x_adv, defense.generator(x_adv.device))
        purified = defense.purify(x_adv)
        pred_clean, pred_adv = defense(x).argmax(1), defense.classifier(purified).argmax(1)
    rows = [("clean", x), (f"attacked ({name})", x_adv), (f"transformed ({cfg.rt.value})", views[: len(x)]),
            ("purified", purified)]
    fig, axes = plt.subplots(len(rows), len(x), figsize=(1.2 * len(x), 1.35 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(len(x)):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"y={int(y[c])} p={int(pred_clean[c])}", fontsize=6)
            if r == len(rows) - 1:
                ax.set_xlabel(f"p={int(pred_adv[c])}", fontsize=6)
    fig.suptitle(f"{cfg.rt.value}, lambda={cfg.lambda_ce:.3g}: clean / attacked / transformed / purified", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path.write_bytes(buf.getvalue())
    return path


def trial_summary(result: dict[str, Any] | None) -> dict[str, Any]:
    """The objectives of a final result, or why there are none (used by the driver's searcher)."""
    if not result:
        return {"failed": True, "error": "no result reported"}
    if result.get("atop_failed"):
        return {"failed": True, "error": str(result.get("atop_error", "failed"))}
    missing = [m for m in OBJECTIVES if m not in result]
    if missing:
        return {"failed": True, "error": f"result lacks {', '.join(missing)}"}
    return {"failed": False, "values": [float(result[m]) for m in OBJECTIVES],
            "epoch": int(result.get("epoch", 0)), "compute_s": float(result.get("compute_s", 0.0)),
            "images_per_s": float(result.get("images_per_s", 0.0))}

