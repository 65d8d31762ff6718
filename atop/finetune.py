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
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from atop.attacks import PGD, Attack
from atop.config import Config, EvalLevel, GradPath, L1Target, Precision, TrainAttack
from atop.data import Split
from atop.defense import Defense, freeze
from atop.evaluate import AttackedExamples, evaluate
from atop.losses import d_hinge_loss, g_hinge_loss, l1_loss
from atop.progress import step
from atop.transforms import RandomTransform


@dataclass
class EpochReport:
    epoch: int  # epochs finished so far (1-based)
    metrics: dict[str, float]
    state: dict[str, Any]  # purifier/discriminator/optimizer states: what a checkpoint needs to resume
    per_example: dict[str, Any] = field(default_factory=dict)  # this epoch's per-image evaluation outcomes
    eval_settings: dict[str, Any] = field(default_factory=dict)  # attack name -> settings behind each number
    rates: dict[str, Any] = field(default_factory=dict)  # figure -> per-image rate (`EvalResult.rates`)
    audit: dict[str, Any] | None = None  # the gradient-masking audit, where this epoch's level ran it
    examples: AttackedExamples | None = None  # the seen attack's scored outputs on the first images (`EvalResult`)


class PurifierTrainer:
    """One GAN + CE update of the purifier per batch; shared by pre-training (lambda = 0) and AToP.

    The math is the authors' (see `bench/baseline.py`, which `tests/test_bench.py` checks it against);
    the speed comes from doing less of it and from three config switches, each measured in `bench/`:
    `precision=bf16` (autocast), `channels_last` (NHWC memory format) and `compile` (torch.compile).
    """

    def __init__(self, cfg: Config, purifier: nn.Module, discriminator: nn.Module, classifier: nn.Module | None,
                 device: torch.device):
        """`classifier`: the frozen classifier of the CE term; None where no step has one (a purifier
        pre-trained at `purifier_ce_weight` 0 needs no classifier, so it can train beside it)."""
        self.cfg, self.device = cfg, device
        # NHWC: oneDNN (CPU) and cuDNN (GPU) run 3x3 convolutions faster on it than on NCHW
        # (on the project's CPU: 470 against 200 GFLOP/s in fp32, 880 in bf16).
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.purifier = purifier.to(device).to(memory_format=self.memory_format).train()
        self.discriminator = discriminator.to(device).to(memory_format=self.memory_format).train()
        self.classifier = None if classifier is None else freeze(classifier.to(device).to(memory_format=self.memory_format))
        betas = (cfg.beta1, cfg.beta2)
        self._g_params = [p for p in self.purifier.parameters() if p.requires_grad]
        self._d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(self._g_params, lr=cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self._d_params, lr=cfg.lr, betas=betas)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        # The attributes above stay the plain modules (state dicts without `_orig_mod.` prefixes,
        # and the defense built from them in `finetune`); the step calls these, compiled or not.
        # Compilation fuses the elementwise tails (GroupNorm + SiLU, LeakyReLU, the losses) that
        # eager runs as separate memory-bound kernels; its first calls are slow (warm-up).
        wrap = _compiled if cfg.compile else (lambda module: module)
        self._purifier, self._discriminator = wrap(self.purifier), wrap(self.discriminator)
        self._classifier = None if self.classifier is None else wrap(self.classifier)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the config asks for it (a real lever on this CPU and on GPUs)."""
        if self.cfg.precision is Precision.BF16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, transform: RandomTransform, x_in: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
             ce_weight: float) -> torch.Tensor:
        """Update D then G on one batch; returns the detached losses [d, g_gan, l1, ce, total]."""
        cfg, n = self.cfg, len(x_in)
        x_in = x_in.contiguous(memory_format=self.memory_format)  # no-op when already in that format
        target = target.contiguous(memory_format=self.memory_format)
        with self.autocast():
            views, holes = transform(x_in, self.generator)
            # One purifier forward serves both steps (the authors run it twice): D learns from
            # x_hat.detach(), G's loss backpropagates through the same graph afterwards.
            x_hat = transform.combine(self._purifier(views, holes), holes).float()
            holes0 = holes[:n]  # the discriminator sees the first view's holes as context
            # Real and fake in one discriminator forward: one batch of 2N instead of two calls of N
            # (fewer kernel launches, larger GEMMs, and one spectral-norm power iteration, not two).
            scores = self._discriminator(torch.cat([target, x_hat.detach()]), torch.cat([holes0, holes0]))
            d_loss = d_hinge_loss(scores[:n], scores[n:])
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward(inputs=self._d_params)  # D's parameters only: no input gradients are needed
        self.opt_d.step()

        with self.autocast():
            g_gan = g_hinge_loss(self._discriminator(x_hat, holes0))
            l1 = l1_loss(x_hat, target)
            if ce_weight <= 0:
                ce = x_hat.new_zeros(())
            elif self._classifier is None:
                raise ValueError(f"ce_weight={ce_weight} needs the classifier, and this trainer has none")
            else:
                ce = F.cross_entropy(self._classifier(x_hat), y)
            total = cfg.gan_weight * g_gan + cfg.l1_weight * l1 + ce_weight * ce
        self.opt_g.zero_grad(set_to_none=True)
        # G's parameters only: D's weight gradients, which a plain `total.backward()` computes and
        # the next D step throws away, are never computed (a third of D's backward convolutions).
        total.backward(inputs=self._g_params)
        self.opt_g.step()
        # Stays on the device: the caller sums these and syncs once per epoch (no `.item()` here).
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


def _compiled(module: nn.Module) -> nn.Module:
    """`torch.compile` the module (dynamic=False: our batch shapes are fixed but for the last batch)."""
    return cast(nn.Module, torch.compile(module, dynamic=False))


LOSS_NAMES = ("loss/d", "loss/g_gan", "loss/l1", "loss/ce", "loss/total")


def training_attack(cfg: Config, classifier: nn.Module, defense: Defense) -> Attack:
    """The attack that crafts x' during fine-tuning; FGSM is one full-size PGD step."""
    through_defense = cfg.train_grad_path is GradPath.DEFENSE
    return PGD(defense if through_defense else classifier, eps=cfg.train_eps, norm=cfg.train_norm,
               steps=1 if cfg.train_attack is TrainAttack.FGSM else cfg.train_steps, step_size=cfg.step_size,
               random_start=cfg.train_random_start, eot=cfg.train_eot if through_defense else 1, seed=cfg.seed)


def finetune(cfg: Config, classifier: nn.Module, purifier: nn.Module, discriminator: nn.Module, train: Split,
             test: Split, *, device: str | torch.device = "cpu", state: dict[str, Any] | None = None,
             start_epoch: int = 0, score_every_epoch: bool = True) -> Iterator[EpochReport]:
    """Fine-tune the purifier with AToP, yielding metrics once per epoch.

    Args:
        cfg: the run's config (`cfg.epochs` is the total, `start_epoch` of them already done; 0 epochs:
            no training, one report at epoch 0 scoring the pre-trained defense at `cfg.eval_level`).
        classifier: the pre-trained classifier; frozen here and never updated.
        purifier, discriminator: pre-trained GAN, updated in place.
        train: training images (the caller picks the subset); test: evaluation images.
        state: `EpochReport.state` of an earlier epoch, to resume exactly where it stopped.
        start_epoch: epochs already done (from the checkpoint that `state` came from).
        score_every_epoch: False: only the last epoch is evaluated; the others report their losses
            and speed only (what is scored is the final purifier, e.g. in a study's confirm stage).

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
    # the trainer froze `classifier` and moved it to the device in place (`nn.Module.to` returns the module)
    defense = Defense.from_config(cfg, trainer.purifier, classifier, transform)
    attack = training_attack(cfg, classifier, defense)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    if cfg.epochs == 0 and start_epoch == 0:  # no fine-tuning: the pre-trained defense, scored once (a control)
        defense.eval()
        started = time.perf_counter()
        result = evaluate(defense, test, cfg, level=cfg.eval_level, device=device)
        yield EpochReport(0, {**result.metrics, "epoch_s": time.perf_counter() - started}, trainer.state_dict(),
                          result.per_example, result.settings, result.rates, result.audit, result.examples)
    for epoch in range(start_epoch, cfg.epochs):
        shuffle.manual_seed(cfg.seed + epoch)  # the same batches on resume as in an uninterrupted run
        ce_weight = cfg.lambda_ce if epoch >= cfg.ce_warmup_epochs else 0.0
        sums, batches, images = torch.zeros(len(LOSS_NAMES), device=device), 0, 0
        started = time.perf_counter()
        defense.train()
        with step(f"finetune epoch {epoch + 1}/{cfg.epochs}", total=-(-len(train) // cfg.batch_size),
                  unit="batch") as progress:
            for x, y in train.batches(cfg.batch_size, shuffle=True, generator=shuffle, device=device):
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with trainer.autocast():  # the attack's forward/backward passes gain from bf16 as much
                    x_adv = attack(x, y)
                target = x if cfg.l1_target is L1Target.CLEAN else x_adv
                sums += trainer.step(transform, x_adv, target, y, ce_weight)  # stays on device: no sync
                batches, images = batches + 1, images + len(y)
                progress.advance()
            train_s = time.perf_counter() - started
            losses = (sums / max(batches, 1)).tolist()  # CPU-GPU sync point, once per epoch
            progress.finish(f"loss {losses[-1]:.3f}, {images / train_s:.0f} img/s")
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError(f"loss became non-finite in epoch {epoch + 1}: "
                                     + ", ".join(f"{n}={v:.4g}" for n, v in zip(LOSS_NAMES, losses)))
        defense.eval()
        trained = {**dict(zip(LOSS_NAMES, losses)), "ce_weight": ce_weight, "images_per_s": images / train_s}
        if epoch + 1 < cfg.epochs and not score_every_epoch:
            yield EpochReport(epoch + 1, {**trained, "epoch_s": time.perf_counter() - started}, trainer.state_dict())
            continue
        # Screen-level attacks every epoch keep trials cheap; the config's level runs on the last epoch.
        level = cfg.eval_level if epoch + 1 == cfg.epochs else EvalLevel.SCREEN
        result = evaluate(defense, test, cfg, level=level, device=device)
        yield EpochReport(epoch + 1, {**result.metrics, **trained, "epoch_s": time.perf_counter() - started},
                          trainer.state_dict(), result.per_example, result.settings, result.rates, result.audit,
                          result.examples)
