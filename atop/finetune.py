"""AToP fine-tuning: the purifier learns L = L_gen(x') + lambda * CE(y, f(g(t(x')))).

x' = x + delta is crafted by the training attack (FGSM or PGD, l-inf or l2) either against the
classifier alone (the authors' code) or through the whole random defense with EOT (the paper's
formula). L_gen is the hinge GAN loss against a spectral-norm PatchGAN plus L1 towards the clean
image or x'. Only the purifier and the discriminator learn; the classifier is frozen.

`finetune(...)` is a generator: it yields one `EpochReport` (metrics + a state to checkpoint) per
epoch and imports nothing of Ray or MLflow, so the trainable only loops and reports.

    for report in finetune(cfg, classifier, purifier, discriminator, train, test):
        print(report.epoch, report.metrics)
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atop.attacks import PGD, Attack
from atop.config import Config, GradPath, L1Target, Precision, TrainAttack
from atop.data import Split
from atop.defense import Defense, freeze
from atop.evaluate import evaluate
from atop.losses import d_hinge_loss, g_hinge_loss, l1_loss
from atop.transforms import RandomTransform


@dataclass
class EpochReport:
    epoch: int  # epochs finished so far (1-based)
    metrics: dict[str, float]
    state: dict[str, Any]  # purifier/discriminator/optimizer states: what a checkpoint needs to resume


class PurifierTrainer:
    """One GAN + CE update of the purifier per batch; shared by pre-training (lambda = 0) and AToP."""

    def __init__(self, cfg: Config, purifier: nn.Module, discriminator: nn.Module, classifier: nn.Module,
                 device: torch.device):
        self.cfg, self.device = cfg, device
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.purifier = purifier.to(device, memory_format=memory_format).train()
        self.discriminator = discriminator.to(device, memory_format=memory_format).train()
        self.classifier = freeze(classifier.to(device, memory_format=memory_format))
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.purifier.parameters(), lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=betas)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the config asks for it (a real lever on this CPU and on GPUs)."""
        if self.cfg.precision is Precision.BF16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, transform: RandomTransform, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
             ce_weight: float) -> torch.Tensor:
        """Update D then G on one batch; returns the detached losses [d, g_gan, l1, ce, total]."""
        cfg = self.cfg
        with self.autocast():
            views, holes = transform(x_in, self.generator)
            x_hat = transform.combine(self.purifier(views, holes), holes).float()
            holes0 = holes[: len(x_in)]  # the discriminator sees the first view's holes as context
            d_loss = d_hinge_loss(self.discriminator(target, holes0), self.discriminator(x_hat.detach(), holes0))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        with self.autocast():
            g_gan = g_hinge_loss(self.discriminator(x_hat, holes0))
            l1 = l1_loss(x_hat, target)
            ce = F.cross_entropy(self.classifier(x_hat), y) if ce_weight > 0 else x_hat.new_zeros(())
            total = cfg.gan_weight * g_gan + cfg.l1_weight * l1 + ce_weight * ce
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        self.opt_g.step()
        return torch.stack([d_loss.detach(), g_gan.detach(), l1.detach(), ce.detach(), total.detach()]).float()

    def state_dict(self) -> dict[str, Any]:
        return {"purifier": self.purifier.state_dict(), "discriminator": self.discriminator.state_dict(),
                "optimizers": {"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.purifier.load_state_dict(state["purifier"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["optimizers"]["g"])
        self.opt_d.load_state_dict(state["optimizers"]["d"])
        if "generator" in state:
            self.generator.set_state(state["generator"])


LOSS_NAMES = ("loss/d", "loss/g_gan", "loss/l1", "loss/ce", "loss/total")


def training_attack(cfg: Config, classifier: nn.Module, defense: Defense) -> Attack:
    """The attack that crafts x' during fine-tuning; FGSM is one full-size PGD step."""
    through_defense = cfg.train_grad_path is GradPath.DEFENSE
    return PGD(defense if through_defense else classifier, eps=cfg.train_eps, norm=cfg.train_norm,
               steps=1 if cfg.train_attack is TrainAttack.FGSM else cfg.train_steps, step_size=cfg.step_size,
               random_start=cfg.train_random_start, eot=cfg.train_eot if through_defense else 1, seed=cfg.seed)


def finetune(cfg: Config, classifier: nn.Module, purifier: nn.Module, discriminator: nn.Module, train: Split,
             test: Split, *, device: str | torch.device = "cpu", state: dict[str, Any] | None = None,
             start_epoch: int = 0) -> Iterator[EpochReport]:
    """Fine-tune the purifier with AToP, yielding metrics once per epoch.

    Args:
        cfg: the run's config (`cfg.epochs` is the total, `start_epoch` of them already done).
        classifier: the pre-trained classifier; frozen here and never updated.
        purifier, discriminator: pre-trained GAN, updated in place.
        train: training images (the caller picks the subset); test: evaluation images.
        state: `EpochReport.state` of an earlier epoch, to resume exactly where it stopped.
        start_epoch: epochs already done (from the checkpoint that `state` came from).

    Yields:
        EpochReport: `metrics` holds `clean_acc`, `robust_acc_seen`, `robust_acc_unseen` (fractions),
        `robust_acc/<attack>`, mean losses `loss/*`, `images_per_s` of training and `epoch_s`.

    Raises:
        FloatingPointError: a loss became NaN or infinite (the trial should be marked failed).
    """
    device = torch.device(device)
    trainer = PurifierTrainer(cfg, purifier, discriminator, classifier, device)
    if state is not None:
        trainer.load_state_dict(state)
    transform = RandomTransform.from_config(cfg)
    defense = Defense(transform, trainer.purifier, trainer.classifier, seed=cfg.seed)
    attack = training_attack(cfg, trainer.classifier, defense)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(start_epoch, cfg.epochs):
        shuffle.manual_seed(cfg.seed + epoch)  # the same batches on resume as in an uninterrupted run
        ce_weight = cfg.lambda_ce if epoch >= cfg.ce_warmup_epochs else 0.0
        sums, batches, images = torch.zeros(len(LOSS_NAMES), device=device), 0, 0
        started = time.perf_counter()
        defense.train()
        for x, y in train.batches(cfg.batch_size, shuffle=True, generator=shuffle, device=device):
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x_adv = attack(x, y)
            target = x if cfg.l1_target is L1Target.CLEAN else x_adv
            sums += trainer.step(transform, x_adv, target, y, ce_weight)  # stays on device: no sync
            batches, images = batches + 1, images + len(y)
        train_s = time.perf_counter() - started
        losses = (sums / max(batches, 1)).tolist()  # CPU-GPU sync point, once per epoch
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError(f"loss became non-finite in epoch {epoch + 1}: "
                                     + ", ".join(f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, losses)))
        defense.eval()
        result = evaluate(defense, test, cfg, device=device)
        metrics = {**result.metrics, **dict(zip(LOSS_NAMES, losses)), "ce_weight": ce_weight,
                   "images_per_s": images / train_s, "epoch_s": time.perf_counter() - started}
        yield EpochReport(epoch + 1, metrics, trainer.state_dict())
