"""The reference FT step, written the way the authors' AToP code does it: the baseline of `bench`.

fp32, NCHW, eager, one forward pass per use and no fusion:

1. x' = FGSM against the classifier alone (one full-size signed-gradient step, eps 8/255);
2. the random transform t(x') (drawn from the same `torch.Generator` stream as ours);
3. D step: purifier forward (no graph: its output is detached anyway), D(real) and D(fake) as two
   separate forward passes, hinge loss, Adam step;
4. G step: the purifier forward *again* (now with a graph), D(fake) again, the classifier forward,
   L = gan_weight * hinge + l1_weight * L1(x_hat, x') + lambda * CE, Adam step.

It takes the same modules, optimizers and config as `atop.finetune.PurifierTrainer`, so a ratio of
the two compares the same math on the same weights: `tests/test_bench.py` checks that both give the
same losses and the same parameter updates from the same starting point.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from atop.config import Config, L1Target
from atop.losses import d_hinge_loss, g_hinge_loss, l1_loss
from atop.transforms import RandomTransform


def fgsm(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x + eps * sign(grad_x CE(f(x), y)), clipped to [0,1]: the authors' training attack."""
    x_req = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(classifier(x_req), y, reduction="sum")
    grad, = torch.autograd.grad(loss, x_req)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


@dataclass
class BaselineStep:
    """The authors'-style step over given modules (the caller moves them to the device, fp32 NCHW).

    Args:
        cfg: loss weights, eps, lr and betas are read from it (its speed switches are ignored).
        purifier, discriminator: trained; classifier: frozen (its parameters need no gradient).
        seed: seeds the transform's generator, as `PurifierTrainer` seeds its own with `cfg.seed`.
    """

    cfg: Config
    purifier: nn.Module
    discriminator: nn.Module
    classifier: nn.Module
    seed: int = 0

    def __post_init__(self) -> None:
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.opt_g = torch.optim.Adam(self.purifier.parameters(), lr=self.cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr, betas=betas)
        device = next(self.purifier.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)

    def __call__(self, transform: RandomTransform, x: torch.Tensor, y: torch.Tensor, ce_weight: float
                 ) -> torch.Tensor:
        """One FGSM + D + G update on clean images `x`; returns losses [d, g_gan, l1, ce, total]."""
        cfg = self.cfg
        x_adv = fgsm(self.classifier, x, y, cfg.train_eps)
        target = x if cfg.l1_target is L1Target.CLEAN else x_adv
        views, holes = transform(x_adv, self.generator)
        holes0 = holes[: len(x)]

        # D step: a fresh purifier forward, then D(real) and D(fake) as separate passes.
        with torch.no_grad():
            fake = transform.combine(self.purifier(views, holes), holes)
        d_real = self.discriminator(target, holes0)
        d_fake = self.discriminator(fake, holes0)
        d_loss = d_hinge_loss(d_real, d_fake)
        self.opt_d.zero_grad()
        d_loss.backward()
        self.opt_d.step()

        # G step: the purifier forward again, D(fake) again, then the classifier.
        x_hat = transform.combine(self.purifier(views, holes), holes)
        g_gan = g_hinge_loss(self.discriminator(x_hat, holes0))
        l1 = l1_loss(x_hat, target)
        ce = F.cross_entropy(self.classifier(x_hat), y) if ce_weight > 0 else x_hat.new_zeros(())
        total = cfg.gan_weight * g_gan + cfg.l1_weight * l1 + ce_weight * ce
        self.opt_g.zero_grad()
        total.backward()
        self.opt_g.step()
        return torch.stack([d_loss.detach(), g_gan.detach(), l1.detach(), ce.detach(), total.detach()])
