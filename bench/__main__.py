"""Speed benchmarks of the AToP fine-tuning step and attacks, each against a baseline, as ratios.

    python -m bench [--quick] [--device cpu|cuda] [--data-dir ../shared/data] --out DIR

Prints a table (row | ours | baseline | ratio | unit | repeats | notes) and writes `DIR/bench.json`
with the rows, their raw samples and the machine's facts. Every row times ours and its baseline
interleaved in this one process (median of `--repeats` after warm-up), so the load of a shared
machine cancels out of the ratio. `--quick` (CI) keeps to a few minutes on a 2-core CPU and skips
the torch.compile row on CPU (its compilation alone takes minutes there); `--compile` forces it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from atop.cli import OneLineParser
from atop.data import DataError, load_split
from bench import ROWS, TINY, Context, Sizes
from bench.core import QUICK, machine_facts


def format_table(rows: list[dict]) -> str:
    def num(v: float) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"

    header = ["row", "ours", "baseline", "ratio", "unit", "repeats", "notes"]
    lines = [[r["row"], num(r["ours"]), num(r["baseline"]), num(r["ratio"]) + ("" if "share" in r["row"] else "x"),
              r["unit"], str(r["repeats"]), r["notes"]] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: a few minutes on a 2-core CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", required=True, help="folder for bench.json")
    parser.add_argument("--data-dir", help="folder with cifar10_train.npz and cifar10_test.npz (default: random images)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per function (>= 5 for the note)")
    parser.add_argument("--rows", help="comma-separated row names to run (default: all)")
    parser.add_argument("--compile", action="store_true", help="run the torch.compile row even with --quick")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny models
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    names = [name for name, _ in ROWS]
    chosen = names if not args.rows else [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        print(f"error: unknown row(s) {', '.join(unknown)}; accepted: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.data_dir:  # a bad data file is refused now, not as a traceback once the first rows have run
        if not Path(args.data_dir).expanduser().is_dir():
            print(f"error: --data-dir {args.data_dir!r} is not a folder; expected one holding cifar10_train.npz "
                  "and cifar10_test.npz", file=sys.stderr)
            return 2
        try:
            for split in ("train", "test"):  # the precision row scores test images
                load_split("cifar10", split, args.data_dir)
        except DataError as exc:
            print(f"error: --data-dir {args.data_dir!r}: {exc}", file=sys.stderr)
            return 2
    device = torch.device(args.device)
    ctx = Context(device=device, quick=args.quick, sizes=TINY if args.tiny else QUICK if args.quick else Sizes(), repeats=args.repeats,
                  data_dir=args.data_dir, compile=args.compile or not (args.quick or args.tiny) or device.type == "cuda",
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    rows: list[dict] = []
    for name, fn in ROWS:
        if name in chosen:
            row_started = time.perf_counter()
            rows += [r.to_dict() for r in fn(ctx)]
            ctx.log(f"{name}: {time.perf_counter() - row_started:.0f} s")
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_facts(device), "quick": args.quick, "tiny": args.tiny, "elapsed_s": elapsed,
              "rows": rows}
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=float))
    print(format_table(rows))
    print(f"\n{report['machine']['device_name']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {' '.join(report['machine'].get('loadavg', []))}; {elapsed:.0f} s; wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
