"""Model registries: name -> factory. Search spaces and configs draw their choices from these."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from atop.models.classifiers import FastCNN, ResNet18, SmallCNN, WideResNet
from atop.models.purifiers import GatedPurifier, PatchDiscriminator, UNetPurifier

#: name -> factory(num_classes) -> classifier taking [0,1] NCHW images
CLASSIFIERS: dict[str, Callable[[int], nn.Module]] = {
    "small_cnn": lambda num_classes: SmallCNN(num_classes),
    "fast_cnn": lambda num_classes: FastCNN(num_classes),
    "resnet18": lambda num_classes: ResNet18(num_classes),
    "wrn28_10": lambda num_classes: WideResNet(num_classes, depth=28, widen=10),
}

#: name -> factory(width) -> generator(x_transformed, holes) -> image in [0,1]
PURIFIERS: dict[str, Callable[[int], nn.Module]] = {
    "unet": lambda width: UNetPurifier(width),
    "gated": lambda width: GatedPurifier(width),
}

__all__ = [
    "CLASSIFIERS",
    "PURIFIERS",
    "FastCNN",
    "GatedPurifier",
    "PatchDiscriminator",
    "ResNet18",
    "SmallCNN",
    "UNetPurifier",
    "WideResNet",
]
