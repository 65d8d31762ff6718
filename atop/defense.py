"""The whole defense as one `nn.Module`: random transform -> purifier -> frozen classifier.

Input: images float in [0,1], NCHW. Output: logits. Every call draws fresh randomness from the
module's own seedable `torch.Generator`, so an attack that differentiates `forward` attacks the whole
stochastic defense, and EOT is just averaging over calls. `Config.defense = classifier` makes the
same module the classifier alone (no transform, no purifier): the baseline a study scores beside it.
"""
from __future__ import annotations

import torch
from torch import nn

from atop.config import Config, DefenseKind
from atop.transforms import RandomTransform


class Defense(nn.Module):
    def __init__(self, transform: RandomTransform, purifier: nn.Module, classifier: nn.Module, seed: int = 0,
                 classifier_alone: bool = False):
        super().__init__()
        self.transform, self.purifier, self.classifier = transform, purifier, classifier
        freeze(classifier)
        self.seed = seed
        self.classifier_alone = classifier_alone
        self._generator: torch.Generator | None = None

    @classmethod
    def from_config(cls, cfg: Config, purifier: nn.Module, classifier: nn.Module,
                    transform: RandomTransform | None = None) -> Defense:
        """The defense `cfg` describes (its RT, `cfg.defense`, seeded with `cfg.seed`) around these models."""
        return cls(transform or RandomTransform.from_config(cfg), purifier, classifier, seed=cfg.seed,
                   classifier_alone=cfg.defense is DefenseKind.CLASSIFIER)

    def reseed(self, seed: int) -> None:
        """Restart the random transforms' stream (reproducible evaluations)."""
        self.seed, self._generator = seed, None

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        """t(x) -> g -> combined: the purified images in [0,1], same shape as `x` (`x` itself for the
        classifier alone)."""
        if self.classifier_alone:
            return x
        views, holes = self.transform(x, self.generator(x.device))
        return self.transform.combine(self.purifier(views, holes), holes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purify(x))

    def train(self, mode: bool = True) -> Defense:
        """Switch the purifier's mode; the classifier always stays in eval mode (frozen)."""
        super().train(mode)
        self.classifier.eval()
        return self


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters: the classifier never learns during AToP."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
