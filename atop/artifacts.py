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

from atop.config import Config
from atop.data import Split
from atop.evaluate import AttackedExamples
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


def image_grid(defense: Any, examples: AttackedExamples, test: Split, cfg: Config, path: str | Path, *,
               n: int | None = None, device: str | torch.device = "cpu") -> Path:
    """PNG of the first `n` evaluation images: rows clean / attacked / transformed (first RT view) /
    purified, each image enlarged 3x (nearest); above each column its label and the defense's
    prediction on the clean image, below it the prediction on the attacked one.

    The attacked row is the evaluation's own: `examples` holds the seen attack's outputs that the
    evaluation scored, so the grid shows those images and runs no attack of its own. An image the
    evaluation did not attack (every clean draw misclassified it) is shown as it is, its prediction
    marked with a `*` that the title explains.

    Drawn with Pillow rather than matplotlib: a trial makes one at its end, on its critical path, and
    matplotlib took ~0.4 s per grid and ~25 MB in every trial worker (measured on the smoke preset).

    Args:
        defense: an `atop.defense.Defense` (reseeded with `cfg.seed` here).
        examples: `EvalResult.examples` of the evaluation of `defense` on `test`.
        test: the evaluation images (the first `n` are drawn).
        cfg: the trial's config (RT name and lambda for the title).
        path: the PNG file to write.
        n: images (columns), at most the examples kept (default: all of them, `EXAMPLE_IMAGES` unless
            fewer images were evaluated).
        device: where the defense runs.

    Raises:
        ValueError: `n` above the examples kept.
    """
    from PIL import Image, ImageDraw, ImageFont

    n = len(examples.images) if n is None else n
    if not 1 <= n <= len(examples.images):
        raise ValueError(f"n={n} images for the grid; the evaluation kept {len(examples.images)} (1 to that many)")
    x, y = next(test.batches(n, device=device))
    x_adv, attacked = examples.images[:n].to(device), examples.attacked[:n]
    defense.reseed(cfg.seed)
    with torch.no_grad():
        views, _ = defense.transform(x_adv, defense.generator(x_adv.device))
        purified = defense.purify(x_adv)
        pred_clean, pred_adv = defense(x).argmax(1), defense.classifier(purified).argmax(1)
    rows = [("clean", x), (f"attacked ({examples.attack})", x_adv), (f"transformed ({cfg.rt.value})", views[: len(x)]),
            ("purified", purified)]
    side = x.shape[-1] * GRID_SCALE
    lefts = [GRID_LEFT + c * (side + GRID_GAP) for c in range(len(x) + 1)]  # each column's left edge, then the width
    bottom = GRID_TOP + len(rows) * (side + GRID_GAP)  # where the predictions on the attacked images go
    grid = Image.new("RGB", (lefts[-1], bottom + GRID_BOTTOM), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default(size=11)
    title = f"{cfg.rt.value}, lambda={cfg.lambda_ce:.3g}: clean / attacked / transformed / purified"
    if not attacked.all():
        title += " (* not attacked: every clean draw misclassified it)"
    draw.text((4, 2), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        top = GRID_TOP + r * (side + GRID_GAP)
        draw.text((4, top + side // 2 - 6), label, fill="black", font=font)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c, left in enumerate(lefts[:-1]):
            grid.paste(Image.fromarray(pixels[c]).resize((side, side), Image.Resampling.NEAREST), (left, top))
    for c, left in enumerate(lefts[:-1]):
        draw.text((left, GRID_TOP - 14), f"y={int(y[c])} p={int(pred_clean[c])}", fill="black", font=font)
        draw.text((left, bottom), f"p={int(pred_adv[c])}" + ("" if attacked[c] else " *"), fill="black", font=font)
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
