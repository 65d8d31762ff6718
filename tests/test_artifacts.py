"""`atop.artifacts`: a trial's image grid and per-example Parquet, on tiny synthetic data."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from atop.artifacts import GRID_BOTTOM, GRID_GAP, GRID_LEFT, GRID_TOP, image_grid, write_parquet
from atop.config import Config
from atop.data import Split
from atop.defense import Defense
from atop.evaluate import AttackedExamples
from atop.models import CLASSIFIERS, PURIFIERS
from atop.transforms import RandomTransform

CFG = Config.from_dict({"n_train": 16, "n_eval": 8, "epochs": 2, "batch_size": 8, "purifier_width": 4,
                        "rt": "rt3", "num_masks": 2, "unseen_attacks": "fgsm_linf"})


def test_image_grid_shows_the_evaluation_s_attacked_images_and_leaves_no_temporary_file(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = Split(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (8,), generator=g))
    defense = Defense(RandomTransform.from_config(CFG), PURIFIERS["unet"](4), CLASSIFIERS["small_cnn"](10),
                      seed=0).eval()
    # stand-ins for what the evaluation scored: images no attack of the grid's own would produce
    scored = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    examples = AttackedExamples("pgd_linf", scored.float() / 255, np.array([True, False] * 4))
    path = image_grid(defense, examples, data, CFG, tmp_path / "g.png", n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
    grid = np.asarray(Image.open(path).convert("RGB"))
    # 4 columns and 4 rows of 32x32 images, each enlarged 3x, between the margins
    assert grid.shape == (GRID_TOP + 4 * (96 + GRID_GAP) + GRID_BOTTOM, GRID_LEFT + 4 * (96 + GRID_GAP), 3)
    # the clean row holds the images, the attacked row the evaluation's, pixel for pixel (nearest enlargement)
    for row, images in enumerate((data.x, scored)):
        top = GRID_TOP + row * (96 + GRID_GAP)
        for c in range(4):
            left = GRID_LEFT + c * (96 + GRID_GAP)
            tile = grid[top:top + 96, left:left + 96]
            assert np.array_equal(tile[::3, ::3], images[c].permute(1, 2, 0).numpy())


def test_image_grid_refuses_more_columns_than_the_evaluation_kept(tmp_path):
    data = Split(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    defense = Defense(RandomTransform.from_config(CFG), PURIFIERS["unet"](4), CLASSIFIERS["small_cnn"](10),
                      seed=0).eval()
    examples = AttackedExamples("pgd_linf", torch.zeros(2, 3, 32, 32), np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match="n=4 images for the grid; the evaluation kept 2"):
        image_grid(defense, examples, data, CFG, tmp_path / "g.png", n=4)
    assert not list(tmp_path.iterdir())


def test_parquet_has_a_leading_trial_number_column(tmp_path):
    write_parquet({"index": np.arange(3), "clean_correct": np.array([True, False, True])}, tmp_path / "p.parquet", 7)
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.column_names == ["trial_number", "index", "clean_correct"]
    assert table["trial_number"].to_pylist() == [7, 7, 7]
    assert table["clean_correct"].to_pylist() == [True, False, True]
