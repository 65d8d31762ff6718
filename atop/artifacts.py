"""A trial's artifacts besides its checkpoint: per-example results as Parquet, an image grid as PNG.

Pure: torch, numpy, pyarrow and matplotlib (Agg); no Ray or MLflow (the trainable logs the files).
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


def image_grid(defense: Any, test: Split, cfg: Config, path: str | Path, *, n: int = 8,
               device: str | torch.device = "cpu") -> Path:
    """PNG of the first `n` test images: rows clean / attacked (the seen attack at the config's
    evaluation level) / transformed (first RT view) / purified, with labels and predictions.

    Args:
        defense: an `atop.defense.Defense` (reseeded with `cfg.seed` here).
        test: the evaluation images.
        cfg: the trial's config (attack, eps, level, RT name, lambda for the title).
        path: the PNG file to write.
        n: images (columns).
        device: where the defense runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(len(rows), len(x), figsize=(1.2 * len(x), 1.35 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(len(x)):
            ax = axes[r][c]
            ax.imshow(images[c].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0:
                ax.set_title(f"y={int(y[c])} p={int(pred_clean[c])}", fontsize=6)
            if r == len(rows) - 1:
                ax.set_xlabel(f"p={int(pred_adv[c])}", fontsize=6)
    fig.suptitle(f"{cfg.rt.value}, lambda={cfg.lambda_ce:.3g}: clean / attacked / transformed / purified", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
