"""Pre-training of what AToP fine-tunes from: the classifier and the purifier GAN.

    python -m atop.pretrain classifier --out runs/clf.pt --data-dir ../shared/data [--epochs 4]
    python -m atop.pretrain purifier --out runs/pur.pt --data-dir ../shared/data [--epochs 2]

The classifier learns by plain supervised training (SGD, crop + flip). The purifier learns L_gen
only (hinge GAN + L1 towards the clean image) on randomly transformed clean images, each batch
drawing its RT type from RT1, RT2 and RT3, so that one pre-trained purifier serves every trial of a
study whatever transform the trial searches. `ensure_pretrained` reuses files already made with the
same settings: a study pre-trains once, before any trial.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atop.checkpoint import build_classifier, load_checkpoint, save_checkpoint
from atop.cli import OneLineParser
from atop.config import Config, ConfigError, RTType
from atop.data import DATASETS, DataError, Split, load_split, subset
from atop.finetune import PurifierTrainer
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.transforms import RandomTransform


@dataclass(frozen=True)
class PretrainSettings:
    """How long and on how much data the shared artifacts pre-train (not searched by a study)."""

    classifier_epochs: int = 4
    purifier_epochs: int = 2
    n_train: int = 10_000  # seeded subset of the train split; 0 = all
    classifier_lr: float = 0.05
    # The purifier starts from scratch: a larger step than fine-tuning's 1e-4, and a GAN term kept
    # small against L1 so that short budgets (minutes on a CPU) first learn to reconstruct at all
    # (one CPU measurement, unet width 16: lr 2e-4, GAN 1.0, batch 128, 2 epochs of 5,000 images
    # left L1 at 0.18 and accuracy through the defense at 0.16; lr 1e-3, GAN 0.1, batch 32 after one
    # epoch of 3,000 images reached L1 0.12 and 0.23, the classifier alone scoring 0.48).
    purifier_lr: float = 1e-3
    purifier_gan_weight: float = 0.1
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("classifier_epochs", "purifier_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range; accepted: >= 1")
        if self.n_train < 0:
            raise ConfigError(f"n_train={self.n_train} is out of range; accepted: >= 0 (0 = all)")


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (pad 4, reflect) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = (torch.randint(0, 9, (2, n), generator=generator)).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_classifier(model: nn.Module, train: Split, settings: PretrainSettings, *, seed: int = 0,
                     device: str | torch.device = "cpu") -> Iterator[dict[str, float]]:
    """Standard training; yields {epoch, loss, train_acc, images_per_s} once per epoch."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=settings.classifier_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = settings.classifier_epochs * -(-len(train) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.classifier_lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(settings.classifier_epochs):
        started, loss_sum, correct = time.perf_counter(), torch.zeros(()), torch.zeros(())
        for x, y in train.batches(settings.batch_size, shuffle=True, generator=gen):
            x, y = _augment(x, gen).to(device), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().cpu() * len(y)
            correct += (logits.argmax(1) == y).sum().cpu()
        yield {"epoch": epoch + 1, "loss": float(loss_sum) / len(train), "train_acc": float(correct) / len(train),
               "images_per_s": len(train) / (time.perf_counter() - started)}


def train_purifier(cfg: Config, purifier: nn.Module, discriminator: nn.Module, classifier: nn.Module, train: Split,
                   settings: PretrainSettings, *, device: str | torch.device = "cpu") -> Iterator[dict[str, float]]:
    """L_gen on transformed clean images, RT type drawn per batch; yields losses once per epoch."""
    device = torch.device(device)
    cfg = cfg.replace(lr=settings.purifier_lr, gan_weight=settings.purifier_gan_weight)
    trainer = PurifierTrainer(cfg, purifier, discriminator, classifier, device)
    transforms = [RandomTransform.from_config(cfg.replace(rt=rt.value)) for rt in RTType]
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(settings.purifier_epochs):
        started, sums, batches = time.perf_counter(), torch.zeros(5, device=device), 0
        for x, y in train.batches(settings.batch_size, shuffle=True, generator=gen, device=device):
            rt = transforms[int(torch.randint(len(transforms), (), generator=gen))]
            sums += trainer.step(rt, x, x, y, ce_weight=0.0)
            batches += 1
        d, g, l1, _, total = (sums / batches).tolist()
        yield {"epoch": epoch + 1, "loss_d": d, "loss_g_gan": g, "loss_l1": l1, "loss_total": total,
               "images_per_s": len(train) / (time.perf_counter() - started)}


def pretrain_key(cfg: Config, settings: PretrainSettings, what: str) -> str:
    """A short hash of everything that shapes a pre-trained artifact (reuse only on a match)."""
    fields = {"what": what, "dataset": cfg.dataset, "classifier": cfg.classifier, "seed": cfg.seed,
              "settings": asdict(settings)}
    if what == "purifier":
        fields.update(purifier=cfg.purifier, width=cfg.purifier_width, block_size=cfg.block_size,
                      mask_ratio=cfg.mask_ratio, noise_std=cfg.noise_std, num_masks=cfg.num_masks)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def ensure_pretrained(cfg: Config, settings: PretrainSettings, folder: str | Path, *, data_dir: str | None = None,
                      device: str | torch.device = "cpu", log: Callable[[str], None] = print,
                      train: Split | None = None) -> tuple[Path, Path]:
    """Pre-train the classifier and the purifier unless files with the same settings exist.

    Returns:
        (classifier checkpoint, purifier checkpoint) under `folder`, named by `pretrain_key`.
    """
    folder = Path(folder)
    clf_path = folder / f"classifier-{cfg.classifier}-{pretrain_key(cfg, settings, 'classifier')}.pt"
    pur_path = folder / f"purifier-{cfg.purifier}-{pretrain_key(cfg, settings, 'purifier')}.pt"
    if clf_path.is_file() and pur_path.is_file():
        log(f"reusing pre-trained {clf_path.name} and {pur_path.name}")
        return clf_path, pur_path
    if train is None:
        train = subset(load_split(cfg.dataset, "train", data_dir), settings.n_train, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    classifier = CLASSIFIERS[cfg.classifier](DATASETS[cfg.dataset].num_classes)
    if clf_path.is_file():
        classifier = build_classifier(load_checkpoint(clf_path, kind="classifier"))
    else:
        for m in train_classifier(classifier, train, settings, seed=cfg.seed, device=device):
            log(f"pretrain classifier epoch {m['epoch']}/{settings.classifier_epochs}: loss {m['loss']:.3f} "
                f"train acc {m['train_acc']:.3f} ({m['images_per_s']:.0f} img/s)")
        save_checkpoint(clf_path, kind="classifier", cfg=cfg, classifier=classifier)
    purifier, disc = PURIFIERS[cfg.purifier](cfg.purifier_width), PatchDiscriminator()
    for m in train_purifier(cfg, purifier, disc, classifier, train, settings, device=device):
        log(f"pretrain purifier epoch {m['epoch']}/{settings.purifier_epochs}: L1 {m['loss_l1']:.4f} "
            f"D {m['loss_d']:.3f} G {m['loss_g_gan']:.3f} ({m['images_per_s']:.0f} img/s)")
    save_checkpoint(pur_path, kind="purifier", cfg=cfg, purifier=purifier, discriminator=disc)
    return clf_path, pur_path


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m atop.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["classifier", "purifier"])
    parser.add_argument("--out", required=True, help="checkpoint file to write")
    parser.add_argument("--data-dir", help="folder with <dataset>_<split>.npz (default $ATOP_DATA_DIR)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--classifier", default="small_cnn", help="classifier architecture")
    parser.add_argument("--purifier", default="unet")
    parser.add_argument("--width", type=int, default=16, help="purifier width")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        cfg = Config.from_dict({"dataset": args.dataset, "classifier": args.classifier, "purifier": args.purifier,
                                "purifier_width": args.width, "seed": args.seed})
        epochs = {} if args.epochs is None else {f"{args.what}_epochs": args.epochs}
        settings = PretrainSettings(n_train=args.n_train, **epochs)
        train = subset(load_split(cfg.dataset, "train", args.data_dir), settings.n_train, seed=cfg.seed)
        classifier = CLASSIFIERS[cfg.classifier](DATASETS[cfg.dataset].num_classes)
        if args.what == "classifier":
            for m in train_classifier(classifier, train, settings, seed=cfg.seed, device=args.device):
                print(f"epoch {m['epoch']}: loss {m['loss']:.3f} train acc {m['train_acc']:.3f}", flush=True)
            save_checkpoint(args.out, kind="classifier", cfg=cfg, classifier=classifier)
        else:
            purifier, disc = PURIFIERS[cfg.purifier](cfg.purifier_width), PatchDiscriminator()
            for m in train_purifier(cfg, purifier, disc, classifier, train, settings, device=args.device):
                print(f"epoch {m['epoch']}: L1 {m['loss_l1']:.4f} D {m['loss_d']:.3f}", flush=True)
            save_checkpoint(args.out, kind="purifier", cfg=cfg, purifier=purifier, discriminator=disc)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
