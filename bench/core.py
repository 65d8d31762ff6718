"""What every bench row shares: the run context, the result of a row, the registry, interleaved timing.

A row is one function `fn(ctx: Context) -> list[Result]` registered with `@row("name")`; `python -m
bench` runs the registered rows in order. Timing is always interleaved: in each repeat every
function of a group (ours, the baseline, a peak kernel) runs once, so a burst of load from the other
users of a shared machine hits all of them alike and the ratio of medians stays meaningful.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes of the FT-step and attack rows (`--tiny` shrinks them for tests)."""

    batch: int = 64  # FT step images per batch (the smoke preset's batch)
    purifier: str = "unet"
    purifier_width: int = 16  # the smoke preset's purifier
    disc_width: int = 32  # PatchDiscriminator's default
    attack_batch: int = 16
    attack_steps: int = 2
    attack_eot: int = 8
    matmul: int = 2048  # side of the bf16 matmul that measures the machine's peak


QUICK = Sizes(attack_steps=1)
TINY = Sizes(batch=4, purifier_width=8, disc_width=8, attack_batch=4, attack_steps=1, attack_eot=2, matmul=512)


@dataclass
class Context:
    """Settings of one bench run, handed to every row."""

    device: torch.device
    quick: bool = False
    sizes: Sizes = field(default_factory=Sizes)
    repeats: int = 5  # timed repeats per function (the median is reported)
    warmup: int = 1  # untimed calls first (compilation happens here and is reported apart)
    data_dir: str | None = None
    compile: bool = True  # whether the torch.compile row runs (slow to compile on a small CPU)
    log: Callable[[str], None] = print

    def sync(self) -> None:
        """Wait for queued device work, so a timer around it measures the work (no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Result:
    """One line of the table: what was measured, ours against the baseline, as a ratio.

    `ratio` is ours / baseline for throughputs (higher is better) and a share for `share` rows.
    """

    row: str
    ours: float
    baseline: float
    unit: str
    repeats: int
    notes: str = ""
    ratio: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)  # samples and per-row facts for bench.json

    def __post_init__(self) -> None:
        if self.ratio != self.ratio:  # NaN: derive it
            self.ratio = self.ours / self.baseline if self.baseline else float("nan")
        ours_s, base_s = self.extra.get("ours_s"), self.extra.get("baseline_s")
        if ours_s and base_s:
            # On a saturated shared machine single calls vary 10x; the fastest call of each is
            # the least disturbed one, so the ratio of minimums is reported beside the medians'.
            self.extra["ratio_of_min"] = min(base_s) / min(ours_s)
            self.notes = f"min-ratio {self.extra['ratio_of_min']:.2f}x; {self.notes}"

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "ours": self.ours, "baseline": self.baseline, "ratio": self.ratio,
                "unit": self.unit, "repeats": self.repeats, "notes": self.notes, **self.extra}


RowFn = Callable[[Context], list[Result]]
#: the rows `python -m bench` runs, in order: (name, function). Add one with `@row("name")`.
ROWS: list[tuple[str, RowFn]] = []


def row(name: str) -> Callable[[RowFn], RowFn]:
    """Register a row function under `name` (names select rows with `--rows`)."""
    def register(fn: RowFn) -> RowFn:
        if any(existing == name for existing, _ in ROWS):
            raise ValueError(f"bench row {name!r} is registered twice")
        ROWS.append((name, fn))
        return fn
    return register


def interleaved(ctx: Context, fns: dict[str, Callable[[], Any]], warmup: int | None = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each function, `ctx.repeats` samples each, after `warmup` calls each
    (default `ctx.warmup`; 0 where the caller has already called them).

    The functions take turns inside each repeat (never all repeats of one, then the next).
    Returns:
        name -> list of wall-clock seconds; `first_s` holds the first (warm-up) call of each.
    """
    first: dict[str, float] = {}
    for name, fn in fns.items():
        for i in range(ctx.warmup if warmup is None else warmup):
            started = time.perf_counter()
            fn()
            ctx.sync()
            if i == 0:
                first[name] = time.perf_counter() - started
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ctx.repeats):
        for name, fn in fns.items():
            ctx.sync()
            started = time.perf_counter()
            fn()
            ctx.sync()
            samples[name].append(time.perf_counter() - started)
    samples["first_s"] = [first.get(name, float("nan")) for name in fns]
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_facts(device: torch.device) -> dict[str, Any]:
    """What makes figures comparable: versions, threads, device and CPU model."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
             "cpu_model": cpu, "mkldnn": torch.backends.mkldnn.is_available()}
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
    else:
        facts["device_name"] = cpu
    try:
        facts["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return facts
