"""Shared models for the attack, evaluation and audit tests (cached: trained once per session).

Not a test module: `tests/test_attacks*.py`, `test_evaluate*.py` and `test_audit*.py` import it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from atop.config import RTType
from atop.data import Split, load_split, subset
from atop.defense import Defense, freeze
from atop.models import SmallCNN
from atop.presets import PretrainSettings
from atop.pretrain import train_classifier
from atop.transforms import RandomTransform

DATA_DIR = Path(os.environ.get("ATOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def need_data() -> None:
    if not (DATA_DIR / "cifar10_test.npz").is_file():
        pytest.skip(f"real CIFAR-10 .npz not found in {DATA_DIR} (set ATOP_DATA_DIR)")


@functools.lru_cache(maxsize=1)
def trained_classifier() -> nn.Module:
    """SmallCNN trained on 4,000 real CIFAR-10 images for 3 epochs (about 26 s on 2 quiet CPU cores; ~0.5 test accuracy)."""
    need_data()
    torch.manual_seed(0)
    model = SmallCNN(10)
    train = subset(load_split("cifar10", "train", DATA_DIR), 4000, seed=0)
    for _ in train_classifier(model, train, PretrainSettings(classifier_epochs=3, n_train=4000, batch_size=64)):
        pass
    return freeze(model)


@functools.lru_cache(maxsize=4)
def eval_images(n: int) -> Split:
    """The first `n` real CIFAR-10 test images."""
    need_data()
    return subset(load_split("cifar10", "test", DATA_DIR), n)


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(eval_images(n).batches(n))
    return x, y


class PassThrough(nn.Module):
    """A "purifier" that returns the transformed views unchanged (fast, differentiable)."""

    def forward(self, views: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        return views


class ZeroGradRound(torch.autograd.Function):
    """Quantise to `levels` grey levels; backward returns zero (a gradient-masking purifier)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8) / 8

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


class MaskedDefense(nn.Module):
    """A deliberately gradient-masked toy defense: `classifier(quantise(x))`, zero gradient.

    It has `.purify` and `.classifier` like `atop.defense.Defense`, so BPDA can attack it.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return ZeroGradRound.apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x))


def noisy_defense(classifier: nn.Module, noise_std: float = 0.1, seed: int = 0) -> Defense:
    """A random defense (RT2: noise + 25% block mask) with a pass-through purifier."""
    rt = RandomTransform(RTType.RT2, mask_ratio=0.25, block_size=4, noise_std=noise_std, num_masks=4)
    return Defense(rt, PassThrough(), classifier, seed=seed).eval()


def tiny_defense(seed: int = 0) -> Defense:
    """An untrained tiny U-Net purifier and SmallCNN behind RT2: for shape and bound checks."""
    from atop.models import UNetPurifier

    torch.manual_seed(seed)
    rt = RandomTransform(RTType.RT2, mask_ratio=0.25, block_size=4, noise_std=0.25, num_masks=4)
    return Defense(rt, UNetPurifier(4), SmallCNN(10, width=8), seed=seed).eval()
