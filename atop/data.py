"""Data sets as uint8 tensors in memory, converted to float [0,1] NCHW one batch at a time.

Where a data set comes from, in order: `<data_dir>/<dataset>_<split>.npz` (arrays `x`: N x H x W x C
uint8 and `y`: N int), torchvision's own files under `data_dir`, then a torchvision download where
the network allows. The data dir is `--data-dir`, else `$ATOP_DATA_DIR`, else `~/.cache/atop/data`.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atop.names import NUM_CLASSES


class DataError(ValueError):
    """Data that cannot be found or read; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    image_size: int
    #: builds (x uint8 NHWC array, y int array) from torchvision's files; None where there are none
    torchvision_loader: Callable[[Path, str, bool], tuple[np.ndarray, np.ndarray]] | None


def _cifar(cls_name: str) -> Callable[[Path, str, bool], tuple[np.ndarray, np.ndarray]]:
    def load(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
        import torchvision

        ds = getattr(torchvision.datasets, cls_name)(root=str(root), train=split == "train", download=download)
        return np.asarray(ds.data), np.asarray(ds.targets)

    return load


def _imagenette(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision
    from torchvision.transforms import v2

    folder = root / "imagenette2-160" / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    resize = v2.Compose([v2.Resize(64), v2.CenterCrop(64)])
    ds = torchvision.datasets.ImageFolder(str(folder), transform=lambda im: np.asarray(resize(im.convert("RGB"))))
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return np.stack(xs), np.asarray(ys)


DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(NUM_CLASSES["cifar10"], 32, _cifar("CIFAR10")),
    "cifar100": DatasetSpec(NUM_CLASSES["cifar100"], 32, _cifar("CIFAR100")),
    "imagenette": DatasetSpec(NUM_CLASSES["imagenette"], 64, _imagenette),
}
SPLITS = ("train", "test")
#: validation images are carved out of the train split by a permutation with this fixed seed, so every
#: trial, every seed of a confirm run and every later study on the same data see the same ones
VALIDATION_SEED = 0
#: the permutation's first images kept out of training whatever a study's validation count (up to this):
#: studies with n_eval <= 512 (every preset) and `atop.run` then pre-train on the same pool of images,
#: and so share their cached pre-trained weights
VALIDATION_RESERVE = 512


@dataclass
class Split:
    """Images as uint8 NCHW (compact: 4x smaller than float) and int64 labels, on the CPU.

    `source` names the file split the rows come from (`train`, `test`; `val` rows come from `train`)
    and `indices` their row numbers there, so a run can record exactly which images it scored on.
    """

    x: torch.Tensor
    y: torch.Tensor
    source: str = ""
    indices: torch.Tensor = None  # type: ignore[assignment]  # None given: rows 0..N-1 of `source`

    def __post_init__(self) -> None:
        if self.indices is None:
            self.indices = torch.arange(len(self.y))

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: torch.Tensor) -> Split:
        """The rows `idx` of this split, keeping track of where they came from."""
        return Split(self.x[idx], self.y[idx], self.source, self.indices[idx])

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images float [0,1] NCHW, labels) batches; the last batch may be smaller."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield to_float(self.x[idx]).to(device), self.y[idx].to(device)


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir: the argument, else `$ATOP_DATA_DIR`, else `~/.cache/atop/data`."""
    chosen = data_dir or os.environ.get("ATOP_DATA_DIR") or Path.home() / ".cache" / "atop" / "data"
    return Path(chosen).expanduser().resolve()


def load_npz(path: str | os.PathLike) -> Split:
    """Load an `.npz` with `x` (N x H x W x C uint8) and `y` (N int); raise `DataError` if malformed."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read {str(path)!r} as an .npz with arrays x and y: {exc}") from None
    return _as_split(x, y, str(path))


def _as_split(x: np.ndarray, y: np.ndarray, source: str) -> Split:
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise DataError(f"{source}: x must be N x H x W x C uint8 with C in (1, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: y must be N integer labels matching x, got {y.dtype} {y.shape}")
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)))


def load_split(dataset: str, split: str, data_dir: str | os.PathLike | None = None) -> Split:
    """Load a whole split of a registered data set (see the module docstring for the search order).

    Raises:
        DataError: the data set or split is unknown, or none of the sources holds it.
    """
    if dataset not in DATASETS:
        raise DataError(f"dataset={dataset!r} is unknown; accepted: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"split={split!r} is unknown; accepted: {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    npz = root / f"{dataset}_{split}.npz"
    if npz.is_file():
        return dataclasses.replace(load_npz(npz), source=split)
    loader = DATASETS[dataset].torchvision_loader
    tried = [str(npz)]
    if loader is None:
        raise DataError(f"no {dataset} {split} data in {npz}; provide it there (--data-dir or $ATOP_DATA_DIR)")
    for download in (False, True):
        try:
            data = _as_split(*loader(root, split, download), f"{dataset} {split} from torchvision")
            return dataclasses.replace(data, source=split)
        except (RuntimeError, OSError, FileNotFoundError) as exc:  # torchvision: missing files, no network
            tried.append(f"torchvision {'download into' if download else 'files in'} {root} ({type(exc).__name__})")
    raise DataError(
        f"no {dataset} {split} data; tried: {'; '.join(tried)}. Provide {npz.name} in --data-dir "
        f"or $ATOP_DATA_DIR (e.g. --data-dir ../shared/data), or allow the torchvision download"
    )


def subset(data: Split, n: int, *, seed: int | None = None) -> Split:
    """The first `n` items (seed None: a fair prefix of a pre-shuffled split) or a seeded random `n`.

    `n` = 0 or `n` >= len keeps everything.
    """
    if n <= 0 or n >= len(data):
        return data
    if seed is None:
        idx = torch.arange(n)
    else:
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.take(idx)


@dataclass(frozen=True)
class Holdout:
    """The train split cut in two: a pool that models may train on, and validation images none does."""

    pool: Split
    val: Split


def carve_validation(train: Split, n_val: int, *, seed: int = VALIDATION_SEED) -> Holdout:
    """Set `n_val` images of the train split aside for validation (a seeded, fixed choice).

    The choice depends only on `seed` and the split's size, never on the run's own seed: searches,
    confirm runs with new seeds and later studies all score on the same validation images, and
    every training subset must be drawn from `pool`. The validation images are the first `n_val` of a
    fixed permutation, and `pool` is what follows its first `max(n_val, VALIDATION_RESERVE)` (the
    reserve is capped at half of a smaller split): the pool is the same for every `n_val` up to the
    reserve, so is the pre-training drawn from it (`training_pool`).

    Args:
        train: the whole train split (`source` "train").
        n_val: validation images, 1 <= n_val < len(train).
        seed: seed of the permutation (default `VALIDATION_SEED`).

    Raises:
        DataError: `n_val` leaves no training image or is below 1.
    """
    if not 1 <= n_val < len(train):
        raise DataError(f"n_val={n_val} validation images out of a train split of {len(train)}; "
                        f"accepted: 1..{len(train) - 1}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    reserved = max(n_val, min(VALIDATION_RESERVE, len(train) // 2))
    val_rows, pool_rows = order[:n_val].sort().values, order[reserved:].sort().values
    val = train.take(val_rows)
    return Holdout(pool=train.take(pool_rows), val=dataclasses.replace(val, source="val"))


def training_pool(train: Split) -> Split:
    """The train split less its validation reserve: what a run outside a study (`atop.run`) trains on,
    the same pool as a study's with `n_eval` up to `VALIDATION_RESERVE`, so that both share cached
    pre-trained weights and no run ever trains on a validation image."""
    return carve_validation(train, 1).pool
