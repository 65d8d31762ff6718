"""The data loader on the real CIFAR-10 files in ../shared/data, and its errors."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from atop.data import (
    VALIDATION_RESERVE,
    DataError,
    carve_validation,
    load_npz,
    load_split,
    resolve_data_dir,
    subset,
    training_pool,
)

DATA_DIR = Path(os.environ.get("ATOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_real_cifar10_test_split():
    data = load_split("cifar10", "test", DATA_DIR)
    assert data.x.shape == (10_000, 3, 32, 32) and data.x.dtype == torch.uint8
    assert data.y.dtype == torch.int64 and set(data.y.unique().tolist()) == set(range(10))
    x, y = next(data.batches(16))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    assert torch.equal(y, data.y[:16])


def test_subsets_are_prefixes_or_seeded():
    data = load_split("cifar10", "test", DATA_DIR)
    assert torch.equal(subset(data, 100).y, data.y[:100])
    a, b, c = subset(data, 50, seed=1), subset(data, 50, seed=1), subset(data, 50, seed=2)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert len(subset(data, 0)) == len(data)


def test_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ATOP_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    assert resolve_data_dir("/x") == Path("/x")


def test_missing_data_names_the_paths_tried(tmp_path):
    with pytest.raises(DataError) as info:
        load_split("cifar10", "test", tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar10_test.npz" in message and "--data-dir" in message and "\n" not in message


def test_any_npz_and_malformed_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", x=rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8), y=np.arange(5))
    data = load_npz(tmp_path / "mine.npz")
    assert data.x.shape == (5, 3, 8, 8)
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 8, 8, 3), dtype=np.float32), y=np.arange(5))
    with pytest.raises(DataError, match="uint8"):
        load_npz(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="dataset='mnist' is unknown"):
        load_split("mnist", "test", tmp_path)


def test_validation_is_carved_from_train_and_disjoint_from_what_trains():
    train = load_split("cifar10", "train", DATA_DIR)
    assert train.source == "train" and torch.equal(train.indices, torch.arange(len(train)))
    held = carve_validation(train, 500)
    # 500 validation images; the pool is the split less the whole reserve (512 images), so the reserve's
    # other 12 images are in neither
    assert VALIDATION_RESERVE == 512
    assert held.val.source == "val" and len(held.val) == 500 and len(held.pool) == len(train) - VALIDATION_RESERVE
    val_rows, pool_rows = set(held.val.indices.tolist()), set(held.pool.indices.tolist())
    assert not val_rows & pool_rows and len(val_rows | pool_rows) == len(train) - (VALIDATION_RESERVE - 500)
    assert torch.equal(held.val.x, train.x[held.val.indices])  # rows are what the indices say
    # fixed per data set: the same images on every call, whatever seed the run itself uses
    assert torch.equal(carve_validation(train, 500).val.indices, held.val.indices)
    assert len(set(held.val.y.tolist())) == 10  # a class-mixed sample
    picked = subset(held.pool, 300, seed=7)  # training subsets keep their provenance
    assert picked.source == "train" and not set(picked.indices.tolist()) & val_rows


def test_studies_with_any_validation_count_up_to_the_reserve_train_on_one_pool():
    """Pre-trained weights are cached by their data: a study scoring on 256 validation images, one on 512
    and `atop.run` must pre-train on the same images to share them, and none on a validation image."""
    train = load_split("cifar10", "train", DATA_DIR)
    small, large = carve_validation(train, 256), carve_validation(train, VALIDATION_RESERVE)
    pool = training_pool(train)
    assert torch.equal(small.pool.indices, large.pool.indices) and torch.equal(pool.indices, large.pool.indices)
    assert set(small.val.indices.tolist()) < set(large.val.indices.tolist())  # the same images, fewer
    assert not set(large.val.indices.tolist()) & set(pool.indices.tolist())
    # more validation images than the reserve: the pool shrinks by exactly as many, none shared
    more = carve_validation(train, VALIDATION_RESERVE + 100)
    assert len(more.pool) == len(train) - VALIDATION_RESERVE - 100
    assert not set(more.val.indices.tolist()) & set(more.pool.indices.tolist())


def test_validation_size_out_of_range_is_one_line_error():
    train = subset(load_split("cifar10", "test", DATA_DIR), 10)
    for n in (0, 10, -1):
        with pytest.raises(DataError, match=f"n_val={n} .*accepted: 1..9"):
            carve_validation(train, n)
