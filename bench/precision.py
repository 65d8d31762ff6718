"""Is a bf16 evaluation as strong as an fp32 one on this defense? (`Config.eval_precision`)

    python -m bench.precision --checkpoint DEFENSE.pt [--n-images 128] [--level light] [--data-dir DIR]

Evaluates one defense checkpoint twice on the same first N test images with the same seeds and
scoring draws, once with `eval_precision: fp32` and once with `bf16` (the audit off: it is not what
is compared), and prints each figure under both, the paired difference bf16 - fp32 with its 95%
interval (bootstrap over images, 2000 resamples) and the wall time of each. bf16 is safe to use for
a figure when its robust accuracy is not above fp32's beyond the interval (a weaker attack would
leave more images standing); the clean row shows what bf16 arithmetic alone changes.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from atop.cli import OneLineParser, UsageError, one_line_errors
from atop.config import EvalLevel, Precision
from atop.stats import bootstrap
from tracking.contract import AUTOATTACK_FIGURE, OBJECTIVES

#: the figures compared, in print order
FIGURES = (*OBJECTIVES, AUTOATTACK_FIGURE)
N_BOOT = 2000


def paired_difference(fp32: np.ndarray, bf16: np.ndarray) -> tuple[float, float, float]:
    """Mean of bf16 - fp32 per-image rates and its 95% bootstrap interval over images."""
    lo, hi = bootstrap(bf16, fp32, n_boot=N_BOOT)
    return float(np.mean(bf16) - np.mean(fp32)), lo, hi


def compare(checkpoint: str, n_images: int, level: str, data_dir: str | None) -> str:
    """Both evaluations and the table (see the module docstring)."""
    from atop.checkpoint import load_checkpoint, load_defense
    from atop.data import load_split, subset
    from atop.evaluate import evaluate

    cfg = load_checkpoint(checkpoint, kind="defense")["config"]
    data = subset(load_split(cfg.dataset, "test", data_dir), n_images)
    results, seconds = {}, {}
    for precision in Precision:
        started = time.perf_counter()
        results[precision] = evaluate(load_defense(checkpoint), data, cfg.replace(eval_precision=precision.value),
                                      level=level, audit=False)
        seconds[precision] = time.perf_counter() - started
    fp32, bf16 = results[Precision.FP32], results[Precision.BF16]
    lines = [f"{fp32.description} (fp32) vs the same in bf16, one defense ({checkpoint})",
             f"{'figure':34s} {'fp32':>6s} {'bf16':>6s} {'bf16 - fp32 [95%]':>24s}"]
    for name in FIGURES:
        if name not in fp32.rates:
            continue
        diff, lo, hi = paired_difference(fp32.rates[name], bf16.rates[name])
        lines.append(f"{name:34s} {fp32.metrics[name]:6.3f} {bf16.metrics[name]:6.3f} "
                     f"{diff:+8.3f} [{lo:+.3f}, {hi:+.3f}]")
    fast = seconds[Precision.FP32] / seconds[Precision.BF16]
    lines.append(f"wall time: fp32 {seconds[Precision.FP32]:.0f} s, bf16 {seconds[Precision.BF16]:.0f} s "
                 f"({fast:.2f}x); intervals: paired bootstrap over {len(data)} images, {N_BOOT} resamples")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m bench.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="defense checkpoint (kind 'defense')")
    p.add_argument("--n-images", type=int, default=128, help="first N test images (default 128)")
    p.add_argument("--level", default=EvalLevel.LIGHT.value, choices=[lv.value for lv in EvalLevel])
    p.add_argument("--data-dir", help="folder with <dataset>_test.npz (default $ATOP_DATA_DIR)")
    args = p.parse_args(argv)

    def run() -> int:
        if args.n_images < 1:
            raise UsageError(f"--n-images={args.n_images} must be >= 1")
        print(compare(args.checkpoint, args.n_images, args.level, args.data_dir), flush=True)
        return 0

    from atop.checkpoint_file import CheckpointError
    from atop.data import DataError

    return one_line_errors(run, (CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main())
