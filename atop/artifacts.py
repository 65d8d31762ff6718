"""A trial's artifacts besides its checkpoint: per-example results as Parquet, an image grid as PNG.

Pure: torch, numpy, pyarrow and Pillow; no Ray or MLflow (the trainable logs the files).
Both files are written atomically (`atop.io`).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atop.attacks import ATTACKS
from atop.config import Config
from atop.data import Split
from atop.evaluate import LEVELS, attack_eps, seen_attack
from atop.io import atomic_write, atomic_write_bytes


def write_parquet(per_example: dict[str, np.ndarray], path: str | Path, trial_number: int = -1) -> Path:
    """Per-example results (one row per evaluated image) as a Parquet file.

    Args:
        per_example: equal-length columns (e.g. `EvalResult.per_example`: index, correctness per
            attack).
        path: the file to write.
        trial_number: the Optuna trial number, written as a leading `trial_number` column (int64)
            so that files of several trials concatenate.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {k: np.asarray(v) for k, v in per_example.items()}
    n = len(next(iter(columns.values())))
    table = pa.table({"trial_number": np.full(n, trial_number, dtype=np.int64), **columns})
    return atomic_write(path, lambda f: pq.write_table(table, f))


#: pixels per image pixel in the grid, and the grid's margins (row labels left, predictions above and below)
GRID_SCALE, GRID_LEFT, GRID_TOP, GRID_BOTTOM, GRID_GAP = 3, 150, 34, 16, 4


def image_grid(defense: Any, test: Split, cfg: Config, path: str | Path, *, n: int = 8,
               device: str | torch.device = "cpu") -> Path:
    """PNG of the first `n` test images: rows clean / attacked (the seen attack at the config's
    evaluation level) / transformed (first RT view) / purified, each image enlarged 3x (nearest);
    above each column its label and the defense's prediction on the clean image, below it the
    prediction on the attacked one.

    Drawn with Pillow rather than matplotlib: a trial makes one at its end, on its critical path, and
    matplotlib took ~0.4 s per grid and ~25 MB in every trial worker (measured on the smoke preset).

    Args:
        defense: an `atop.defense.Defense` (reseeded with `cfg.seed` here).
        test: the evaluation images.
        cfg: the trial's config (attack, eps, level, RT name, lambda for the title).
        path: the PNG file to write.
        n: images (columns).
        device: where the defense runs.
    """
    from PIL import Image, ImageDraw, ImageFont

    x, y = next(test.batches(n, device=device))
    defense.reseed(cfg.seed)
    name = seen_attack(cfg)
    spec = ATTACKS[name]
    budget = spec.budget(**{k: v for k, v in LEVELS[cfg.eval_level].items() if k in ("steps", "eot", "queries")})
    attack = spec.build(defense, eps=attack_eps(cfg, name), seed=cfg.seed, **budget)
    x_adv = attack(x, y)
    with torch.no_grad():
        views, _ = defense.transform(x_adv, defense.generator(x_adv.device))
        purified = defense.purify(x_adv)
        pred_clean, pred_adv = defense(x).argmax(1), defense.classifier(purified).argmax(1)
    rows = [("clean", x), (f"attacked ({name})", x_adv), (f"transformed ({cfg.rt.value})", views[: len(x)]),
            ("purified", purified)]
    side = x.shape[-1] * GRID_SCALE
    lefts = [GRID_LEFT + c * (side + GRID_GAP) for c in range(len(x) + 1)]  # each column's left edge, then the width
    bottom = GRID_TOP + len(rows) * (side + GRID_GAP)  # where the predictions on the attacked images go
    grid = Image.new("RGB", (lefts[-1], bottom + GRID_BOTTOM), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    draw.text((4, 2), f"{cfg.rt.value}, lambda={cfg.lambda_ce:.3g}: clean / attacked / transformed / purified",
              fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = GRID_TOP + r * (side + GRID_GAP)
        draw.text((4, top + side // 2 - 6), label, fill="black", font=font)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c, left in enumerate(lefts[:-1]):
            grid.paste(Image.fromarray(pixels[c]).resize((side, side), Image.Resampling.NEAREST), (left, top))
    for c, left in enumerate(lefts[:-1]):
        draw.text((left, GRID_TOP - 14), f"y={int(y[c])} p={int(pred_clean[c])}", fill="black", font=font)
        draw.text((left, bottom), f"p={int(pred_adv[c])}", fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
