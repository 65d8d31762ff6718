"""AToP, Adversarial Training on Purification (Lin et al., ICLR 2024), in pure PyTorch.

This package never imports Ray, Optuna or MLflow: `trainables/` adapts it to Ray Tune.
"""
from atop.checkpoint import CheckpointError, load_checkpoint, load_defense, save_checkpoint
from atop.config import Config, ConfigError

__all__ = ["CheckpointError", "Config", "ConfigError", "load_checkpoint", "load_defense", "save_checkpoint"]
