"""Pre-training of what AToP fine-tunes from: the classifier and the purifier GAN.

    python -m atop.pretrain classifier --out runs/clf.pt --data-dir ../shared/data [--epochs 4]
    python -m atop.pretrain purifier --out runs/pur.pt --data-dir ../shared/data [--epochs 2]

The classifier learns by supervised training (SGD-Nesterov, linear one-cycle, label smoothing,
random translate + flip; bf16 and channels-last where the settings ask). The purifier learns L_gen
(hinge GAN + L1 towards the clean image), plus, where `purifier_ce_weight` > 0, the frozen
classifier's CE on the purified image, on randomly transformed clean images, each batch drawing its
RT type from `purifier_rts`, so that one pre-trained purifier serves every trial of a study whatever
transform the trial searches. `ensure_pretrained` keeps both in a cache keyed by settings, data and
code (`atop.pretrained_cache`): a study or run with the same ones starts without pre-training.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atop.checkpoint import build_classifier, load_checkpoint, save_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.cli import OneLineParser, UsageError, one_line_errors
from atop.config import Config, ConfigError
from atop.data import DATASETS, DataError, Split, load_split, subset
from atop.finetune import PurifierTrainer
from atop.io import atomic_write_bytes
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.presets import PretrainSettings
from atop.pretrained_cache import cache_paths, check_entry, import_classifier
from atop.progress import step
from atop.transforms import RandomTransform


def _autocast(settings: PretrainSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `settings.bf16`, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()


def _memory_format(settings: PretrainSettings) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format


def _augment(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation (up to `pad` pixels, reflect padding) and horizontal flip, per image."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator).to(x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        # One gather for the whole batch (a per-image crop loop costs more than the net on a CPU).
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, settings: PretrainSettings, *, device: str | torch.device = "cpu",
             batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (in eval mode) on all of `data`."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=device)
    for x, y in data.batches(batch_size, device=device):
        with _autocast(settings, device):
            correct += (model(x.contiguous(memory_format=_memory_format(settings))).argmax(1) == y).sum()
    model.train(was_training)
    return float(correct) / len(data)


def train_classifier(model: nn.Module, train: Split, settings: PretrainSettings, *, seed: int = 0,
                     device: str | torch.device = "cpu", test: Split | None = None,
                     resume: dict[str, Any] | None = None,
                     save: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, float]]:
    """Supervised training: SGD-Nesterov, one-cycle schedule (linear warm-up then linear decay).

    Args:
        resume: a state `save` was given earlier: training goes on after its epoch, as if never stopped.
        save: called with the whole training state after every epoch (`EpochCheckpoint.save`).

    Yields:
        {epoch, loss, train_acc, images_per_s} once per epoch, plus test_acc (on all of `test`,
        outside the timed part) when `test` is given.
    """
    device = torch.device(device)
    model.to(device).to(memory_format=_memory_format(settings)).train()
    batch_size = settings.classifier_batch_size or settings.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=settings.classifier_lr, momentum=0.9,
                          weight_decay=settings.classifier_weight_decay, nesterov=True)
    steps = settings.classifier_epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.classifier_lr, total_steps=steps,
                                                pct_start=0.25, anneal_strategy="linear")
    gen = torch.Generator().manual_seed(seed)
    parts = {"model": model, "optimizer": opt, "scheduler": sched}
    start = _resume(parts, gen, resume)
    for epoch in range(start, settings.classifier_epochs):
        started = time.perf_counter()
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        with step(f"pretrain classifier epoch {epoch + 1}/{settings.classifier_epochs}",
                  total=steps // settings.classifier_epochs, unit="batch") as progress:
            for x, y in train.batches(batch_size, shuffle=True, generator=gen, device=device):
                x = _augment(x, settings.crop_pad, gen).contiguous(memory_format=_memory_format(settings))
                with _autocast(settings, device):
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=settings.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(y)  # stays on the device: one sync per epoch
                correct += (logits.argmax(1) == y).sum()
                progress.advance()
            report = {"epoch": epoch + 1, "loss": float(loss_sum) / len(train),
                      "train_acc": float(correct) / len(train),
                      "images_per_s": len(train) / (time.perf_counter() - started)}
            if test is not None:
                report["test_acc"] = accuracy(model, test, settings, device=device)
            progress.finish(f"loss {report['loss']:.3f}, train acc {report['train_acc']:.3f}"
                            + (f", test acc {report['test_acc']:.3f}" if test is not None else "")
                            + f", {report['images_per_s']:.0f} img/s")
        if save is not None:
            save(_state(epoch + 1, parts, gen))
        yield report


def train_purifier(cfg: Config, purifier: nn.Module, discriminator: nn.Module, classifier: nn.Module | None, train: Split,
                   settings: PretrainSettings, *, device: str | torch.device = "cpu",
                   resume: dict[str, Any] | None = None,
                   save: Callable[[dict[str, Any]], None] | None = None) -> Iterator[dict[str, float]]:
    """L_gen (+ CE of the frozen classifier) on transformed clean images, RT type drawn per batch.

    Args:
        classifier: the frozen classifier of the CE term; None where `purifier_ce_weight` is 0.
        resume, save: as `train_classifier`'s.

    Yields:
        {epoch, loss_d, loss_g_gan, loss_l1, loss_ce, loss_total, images_per_s} once per epoch.
    """
    device = torch.device(device)
    cfg = cfg.replace(lr=settings.purifier_lr, gan_weight=settings.purifier_gan_weight,
                      precision="bf16" if settings.bf16 else "fp32", channels_last=settings.channels_last)
    trainer = PurifierTrainer(cfg, purifier, discriminator, classifier, device)
    transforms = [RandomTransform.from_config(cfg.replace(rt=rt.value)) for rt in settings.rt_types]
    gen = torch.Generator().manual_seed(cfg.seed)
    train = subset(train, settings.purifier_n_train)
    parts = {"trainer": trainer}  # purifier, discriminator, optimizers and the RT draws' generator
    start = _resume(parts, gen, resume)
    for epoch in range(start, settings.purifier_epochs):
        started, sums, batches = time.perf_counter(), torch.zeros(5, device=device), 0
        with step(f"pretrain purifier epoch {epoch + 1}/{settings.purifier_epochs}",
                  total=-(-len(train) // settings.batch_size), unit="batch") as progress:
            for x, y in train.batches(settings.batch_size, shuffle=True, generator=gen, device=device):
                rt = transforms[int(torch.randint(len(transforms), (), generator=gen))]
                sums += trainer.step(rt, x, x, y, ce_weight=settings.purifier_ce_weight)
                batches += 1
                progress.advance()
            d, g, l1, ce, total = (sums / batches).tolist()
            report = {"epoch": epoch + 1, "loss_d": d, "loss_g_gan": g, "loss_l1": l1, "loss_ce": ce,
                      "loss_total": total, "images_per_s": len(train) / (time.perf_counter() - started)}
            progress.finish(f"L1 {l1:.4f}, CE {ce:.3f}, D {d:.3f}, G {g:.3f}, {report['images_per_s']:.0f} img/s")
        if save is not None:
            save(_state(epoch + 1, parts, gen))
        yield report


class EpochCheckpoint:
    """A pre-training stage's whole state after its last finished epoch, in `<entry>.partial` beside
    the cache entry it will become, so a killed pre-training (a lost node, a stopped job) goes on
    from there instead of from epoch 1. Written atomically; removed once the entry exists."""

    def __init__(self, entry: Path):
        self.path = entry.with_name(entry.name + ".partial")

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (none, or unreadable: the stage starts again)."""
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file costs its epochs, not the study
            return None

    def save(self, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _state(epoch: int, parts: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    """Everything that decides the epochs after `epoch`: the states of `parts` (models, optimizers,
    schedule; a `PurifierTrainer` with its RT generator), the data order's generator and torch's
    global RNG."""
    return {"epoch": epoch, **{name: part.state_dict() for name, part in parts.items()},
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}


def _resume(parts: dict[str, Any], gen: torch.Generator, state: dict[str, Any] | None) -> int:
    """Load `state` (from `_state`) into `parts` and the RNGs; returns the epochs already done."""
    if state is None:
        return 0
    for name, part in parts.items():
        part.load_state_dict(state[name])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"])


def ensure_pretrained(cfg: Config, settings: PretrainSettings, folder: str | Path | None = None, *,
                      data_dir: str | None = None, device: str | torch.device = "cpu",
                      log: Callable[[str], None] = print, train: Split | None = None) -> tuple[Path, Path]:
    """Reuse the cached classifier and purifier for these settings, data and code, or make them
    (`ensure_classifier`, then `ensure_purifier`).

    Args:
        folder: the cache folder; None = `atop.checkpoint.default_cache_dir()`.
        train: the pre-training subset; None = `settings.n_train` seeded images of the train split.

    Returns:
        (classifier checkpoint, purifier checkpoint), named by `atop.pretrained_cache.cache_paths`.

    Raises:
        CheckpointError: a cached entry or `settings.classifier_checkpoint` is corrupt or foreign.
    """
    if train is None:
        train = subset(load_split(cfg.dataset, "train", data_dir), settings.n_train, seed=cfg.seed)
    return (ensure_classifier(cfg, settings, train, folder, device=device, log=log),
            ensure_purifier(cfg, settings, train, folder, device=device, log=log))


def purifier_needs_classifier(settings: PretrainSettings) -> bool:
    """Whether the purifier's pre-training runs the classifier (its CE term): if not, the two can
    pre-train at once (`study.pretrained.pretrain_once`)."""
    return settings.purifier_ce_weight > 0


def ensure_classifier(cfg: Config, settings: PretrainSettings, train: Split, folder: str | Path | None = None, *,
                      device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> Path:
    """The classifier's cache entry: reused, imported from `settings.classifier_checkpoint`, or trained,
    going on after the last epoch a stopped run saved.

    Args:
        train: the pre-training subset (its fingerprint names the entry).
        folder: the cache folder; None = `atop.checkpoint.default_cache_dir()`.

    Raises:
        CheckpointError: the entry or `settings.classifier_checkpoint` is corrupt or foreign.
    """
    clf_path = cache_paths(cfg, settings, train, folder)[0]
    if clf_path.is_file():
        check_entry(clf_path, "classifier")
        log(f"reusing pre-trained {clf_path}")
    elif settings.classifier_checkpoint:
        import_classifier(settings.classifier_checkpoint, cfg, clf_path)
        log(f"checked {settings.classifier_checkpoint} and cached it as {clf_path}")
    else:
        torch.manual_seed(cfg.seed)
        classifier = CLASSIFIERS[cfg.classifier](DATASETS[cfg.dataset].num_classes)
        partial = EpochCheckpoint(clf_path)
        resume = _announce(partial, "classifier", settings.classifier_epochs, f"{len(train)} images", log)
        for _ in train_classifier(classifier, train, settings, seed=cfg.seed, device=device, resume=resume,
                                  save=partial.save):
            pass  # each epoch shows its own progress (atop.progress)
        save_checkpoint(clf_path, kind="classifier", cfg=cfg, classifier=classifier)
        partial.remove()
    return clf_path


def ensure_purifier(cfg: Config, settings: PretrainSettings, train: Split, folder: str | Path | None = None, *,
                    device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> Path:
    """The purifier's cache entry: reused, or trained, going on after the last epoch a stopped run
    saved. Where its CE term needs the classifier (`purifier_needs_classifier`), the classifier's
    entry must be in the cache already.

    Args:
        train: the pre-training subset (its fingerprint names the entry).
        folder: the cache folder; None = `atop.checkpoint.default_cache_dir()`.

    Raises:
        CheckpointError: an entry is corrupt or foreign, or the classifier's is missing where needed.
    """
    clf_path, pur_path = cache_paths(cfg, settings, train, folder)
    if pur_path.is_file():
        check_entry(pur_path, "purifier")
        log(f"reusing pre-trained {pur_path}")
        return pur_path
    classifier = None
    if purifier_needs_classifier(settings):
        if not clf_path.is_file():
            raise CheckpointError(f"the purifier's CE term needs the pre-trained classifier {str(clf_path)!r}, "
                                  "which is not in the cache; pre-train the classifier first (ensure_pretrained)")
        classifier = build_classifier(load_checkpoint(clf_path, kind="classifier"))
    torch.manual_seed(cfg.seed)
    purifier, disc = PURIFIERS[cfg.purifier](cfg.purifier_width), PatchDiscriminator()
    images = min(settings.purifier_n_train or len(train), len(train))
    partial = EpochCheckpoint(pur_path)
    resume = _announce(partial, "purifier", settings.purifier_epochs, f"{images} images", log)
    for _ in train_purifier(cfg, purifier, disc, classifier, train, settings, device=device, resume=resume,
                            save=partial.save):
        pass  # each epoch shows its own progress (atop.progress)
    save_checkpoint(pur_path, kind="purifier", cfg=cfg, purifier=purifier, discriminator=disc)
    partial.remove()
    return pur_path


def _announce(partial: EpochCheckpoint, what: str, epochs: int, data: str,
              log: Callable[[str], None]) -> dict[str, Any] | None:
    """Say what pre-training of `what` does now; returns the state to resume from, if any."""
    resume = partial.load()
    if resume is None:
        log(f"pretrain {what}: {epochs} epoch(s) on {data}")
    else:
        log(f"pretrain {what}: resuming after epoch {resume['epoch']}/{epochs} on {data} ({partial.path})")
    return resume


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
    return one_line_errors(lambda: _run(args), (ConfigError, DataError, CheckpointError))


def _run(args: argparse.Namespace) -> int:
    """The command's work: train what `args.what` names and write its checkpoint (atomically)."""
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a folder; expected a checkpoint file to write")
    cfg = Config.from_dict({"dataset": args.dataset, "classifier": args.classifier, "purifier": args.purifier,
                            "purifier_width": args.width, "seed": args.seed})
    epochs = {} if args.epochs is None else {f"{args.what}_epochs": args.epochs}
    settings = PretrainSettings(n_train=args.n_train, **epochs)
    train = subset(load_split(cfg.dataset, "train", args.data_dir), settings.n_train, seed=cfg.seed)
    classifier = CLASSIFIERS[cfg.classifier](DATASETS[cfg.dataset].num_classes)
    if args.what == "classifier":
        for _ in train_classifier(classifier, train, settings, seed=cfg.seed, device=args.device):
            pass  # each epoch shows its own progress (atop.progress)
        save_checkpoint(args.out, kind="classifier", cfg=cfg, classifier=classifier)
    else:
        purifier, disc = PURIFIERS[cfg.purifier](cfg.purifier_width), PatchDiscriminator()
        for _ in train_purifier(cfg, purifier, disc, classifier, train, settings, device=args.device):
            pass  # each epoch shows its own progress (atop.progress)
        save_checkpoint(args.out, kind="purifier", cfg=cfg, purifier=purifier, discriminator=disc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
