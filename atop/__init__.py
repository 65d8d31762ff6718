"""AToP, Adversarial Training on Purification (Lin et al., ICLR 2024), in pure PyTorch.

This package never imports Ray, Optuna or MLflow: `trainables/` adapts it to Ray Tune. Its
top-level names load on first use, so that torch-free modules (`atop.cli`, `atop.io`) can be
imported without torch (the `analysis` CLI uses `atop.cli`).
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"CheckpointError": "atop.checkpoint_file", "load_checkpoint": "atop.checkpoint",
         "load_defense": "atop.checkpoint", "save_checkpoint": "atop.checkpoint",
         "Config": "atop.config", "ConfigError": "atop.config"}

__all__ = ["CheckpointError", "Config", "ConfigError", "load_checkpoint", "load_defense", "save_checkpoint"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'atop' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
