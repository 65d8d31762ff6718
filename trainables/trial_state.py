"""What a trial keeps to resume from, and the defense it leaves: its checkpoint files.

A trial's Tune checkpoint (once per epoch, `checkpoint_<k>/` in its trial folder) is the two files
of `tracking.contract.CHECKPOINT_FILES`: `defense.pt`, a defense checkpoint (purifier,
discriminator, both Adam states, epochs done, last metrics), and `trainer_state.pt`, what resuming
needs besides (the fine-tuning generator's state, compute seconds so far). Its final `defense.pt`
holds the same without the optimizers. Both name the frozen classifier by sha256
(`classifier_ref`) instead of holding it: the study stores it once (docs/CHECKPOINTS.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from atop.checkpoint import load_checkpoint, save_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.config import Config
from atop.finetune import EpochReport
from tracking.contract import CHECKPOINT_FILES

DEFENSE_FILE, STATE_FILE = CHECKPOINT_FILES


def save_state(folder: Path, cfg: Config, report: EpochReport, classifier_ref: dict[str, Any],
               purifier: torch.nn.Module, discriminator: torch.nn.Module, compute_s: float) -> None:
    """A Tune checkpoint: a defense checkpoint naming the classifier by sha256 (the study holds it;
    a copy per epoch per trial would be most of the bytes), plus what resuming needs besides."""
    save_checkpoint(folder / DEFENSE_FILE, kind="defense", cfg=cfg, classifier_ref=classifier_ref, purifier=purifier,
                    discriminator=discriminator, optimizers=report.state["optimizers"], epoch=report.epoch,
                    metrics=report.metrics)
    extra = {"generator": report.state.get("generator"), "compute_s": compute_s}
    torch.save(extra, folder / STATE_FILE)


def restore_state(folder: Path, classifier_ref: dict[str, Any]) -> tuple[dict[str, Any], int, float]:
    """(state, epochs done, compute seconds) of a Tune checkpoint made with this trial's classifier.

    Raises:
        CheckpointError: the checkpoint names another classifier (the study's changed under it).
    """
    blob = load_checkpoint(folder / DEFENSE_FILE, kind="defense")
    made_with = blob.get("classifier_ref", {}).get("sha256")
    if made_with is not None and made_with != classifier_ref["sha256"]:
        raise CheckpointError(f"Tune checkpoint {blob['path']!r} was made with classifier sha256 {made_with}; "
                              f"the study now shares sha256 {classifier_ref['sha256']}")
    extra = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    state = {"purifier": blob["purifier"]["state_dict"], "discriminator": blob["discriminator"]["state_dict"],
             "optimizers": blob["optimizers"]}
    if extra.get("generator") is not None:
        state["generator"] = extra["generator"]
    return state, int(blob["epoch"]), float(extra.get("compute_s", 0.0))


def save_final(path: Path, cfg: Config, classifier_ref: dict[str, Any], purifier: torch.nn.Module,
               discriminator: torch.nn.Module, metrics: dict[str, float]) -> Path:
    """The trial's final `defense.pt`: purifier and discriminator, the classifier by reference."""
    return save_checkpoint(path, kind="defense", cfg=cfg, classifier_ref=classifier_ref, purifier=purifier,
                           discriminator=discriminator, epoch=cfg.epochs, metrics=metrics)
