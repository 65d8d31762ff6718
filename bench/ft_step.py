"""FT-step rows: our fine-tuning step against the authors'-style eager step, and its share of peak.

Both sides start from the same weights (random: speed does not depend on them), the same batch and
the same transform draws, and do the same math: FGSM against the classifier, a D update, a G update
with lambda * CE switched on (see `bench/baseline.py`; `tests/test_bench.py` checks the equality).
Ours is `atop.finetune.PurifierTrainer.step` after the training attack `atop.finetune` builds, with
one config switch set per row.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from atop.config import Config
from atop.defense import Defense, freeze
from atop.finetune import PurifierTrainer, training_attack
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.transforms import RandomTransform
from bench.baseline import BaselineStep
from bench.core import Context, Result, Sizes, interleaved, median, row

#: the config switches of the rows: row label -> overrides of the fp32 NCHW config
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}
#: one FT step on a batch (x, y) -> its losses; `OursStep` and `BaselineRun` are both called so
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a bf16 row's losses may differ from fp32's by this much (relative, see `loss_difference`)
BF16_TOLERANCE = 0.05
#: fp32 rows (and the baseline against our fp32 step) must agree to float rounding
FP32_TOLERANCE = 1e-3


def bench_config(sizes: Sizes, **overrides: Any) -> Config:
    """The smoke preset's fine-tuning setting at the bench's sizes, CE switched on."""
    return Config.from_dict({"batch_size": sizes.batch, "purifier": sizes.purifier,
                             "purifier_width": sizes.purifier_width, "lambda_ce": 0.1, **overrides})


def settle_spectral_norm(discriminator: nn.Module, iters: int = 100) -> None:
    """Run spectral norm's power iteration to convergence (one iteration per training forward).

    Then one more iteration changes nothing, so a step that runs D twice per D update (the
    baseline) and one that runs it once on the concatenated batch (ours) do the same math.
    """
    p = next(discriminator.parameters())
    x = torch.zeros(1, 3, 32, 32, device=p.device)
    holes = torch.zeros(1, 1, 32, 32, device=p.device)
    discriminator.train()
    with torch.no_grad():
        for _ in range(iters):
            discriminator(x, holes)


def build_models(sizes: Sizes, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(classifier, purifier, discriminator) with random weights, D's spectral norm settled."""
    torch.manual_seed(seed)
    classifier = freeze(CLASSIFIERS["small_cnn"](10).to(device))
    purifier = PURIFIERS[sizes.purifier](sizes.purifier_width).to(device)
    discriminator = PatchDiscriminator(width=sizes.disc_width).to(device)
    settle_spectral_norm(discriminator)
    return classifier, purifier, discriminator


class OursStep:
    """The FT step as `atop.finetune` runs it: training attack (under the trainer's autocast), then
    `PurifierTrainer.step`. The L1 target is x' (the config's default)."""

    def __init__(self, cfg: Config, models: tuple[nn.Module, nn.Module, nn.Module], device: torch.device):
        classifier, purifier, discriminator = (copy.deepcopy(m) for m in models)
        self.trainer = PurifierTrainer(cfg, purifier, discriminator, classifier, device)
        self.transform = RandomTransform.from_config(cfg)
        # the trainer froze `classifier` and moved it to the device in place
        defense = Defense.from_config(cfg, self.trainer.purifier, classifier, self.transform)
        self.attack = training_attack(cfg, classifier, defense)
        self.channels_last, self.ce_weight = cfg.channels_last, cfg.lambda_ce

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.trainer.autocast():
            x_adv = self.attack(x, y)
        return self.trainer.step(self.transform, x_adv, x_adv, y, self.ce_weight)


class BaselineRun:
    """`BaselineStep` on fresh copies of the same weights, called like `OursStep`."""

    def __init__(self, cfg: Config, models: tuple[nn.Module, nn.Module, nn.Module]):
        classifier, purifier, discriminator = (copy.deepcopy(m) for m in models)
        self.step = BaselineStep(cfg, purifier.train(), discriminator.train(), freeze(classifier), seed=cfg.seed)
        self.transform = RandomTransform.from_config(cfg)
        self.ce_weight = cfg.lambda_ce

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(self.transform, x, y, self.ce_weight)


def loss_difference(losses: torch.Tensor, reference: torch.Tensor) -> float:
    """max over the 5 losses of |a - b| / max(|b|, 0.01): relative, without blowing up near 0."""
    a, b = losses.detach().float().cpu(), reference.detach().float().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(0.01)).max())


class _FlopCount(TorchDispatchMode):
    """`torch.utils.flop_counter`'s formulas without its per-module tracker, whose backward hooks
    refuse `torch.autograd.grad` on leaf inputs (what every attack calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def bench_batch(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One batch of real CIFAR-10 training images when `--data-dir` has them, else random images."""
    n = ctx.sizes.batch
    if ctx.data_dir:
        from atop.data import load_split

        x, y = next(load_split("cifar10", "train", ctx.data_dir).batches(n))
        return x.to(ctx.device), y.to(ctx.device), "CIFAR-10 batch"
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 32, 32, generator=g).to(ctx.device), torch.randint(0, 10, (n,), generator=g).to(ctx.device),
            "random images")


def peak_matmul(ctx: Context) -> tuple[Any, float, int]:
    """A large bf16 matmul (the machine's practical peak), its FLOPs and its side."""
    n = ctx.sizes.matmul if ctx.device.type == "cpu" else max(ctx.sizes.matmul, 8192)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16)
    return (lambda: a @ b), 2.0 * n ** 3, n


@row("ft_step")
def ft_step_rows(ctx: Context) -> list[Result]:
    """FT step rows (one per config switch) and the share-of-peak row, all timed interleaved."""
    sizes = ctx.sizes
    x, y, source = bench_batch(ctx)
    models = build_models(sizes, ctx.device)
    variants = {k: v for k, v in VARIANTS.items() if ctx.compile or not v.get("compile")}
    if ctx.device.type == "cpu" and not ctx.compile:
        ctx.log("ft_step: the compile row is skipped (slow to compile here; run without --quick or add --compile)")

    baseline = BaselineRun(bench_config(sizes), models)
    ours = {name: OursStep(bench_config(sizes, **over), models, ctx.device) for name, over in variants.items()}
    # Accuracy first, from the identical start: every side's first step on the same batch.
    # These calls are also the first warm-up (torch.compile compiles here).
    # FLOPs are counted on the same first calls of the baseline and of our fp32 step.
    first_s, losses, flops = {}, {}, {}
    steps: dict[str, Step] = {"baseline": baseline, **ours}
    for name, fn in steps.items():
        counter = _FlopCount() if name in ("baseline", "fp32") else contextlib.nullcontext()
        ctx.sync()
        started = time.perf_counter()
        with counter:
            losses[name] = fn(x, y)
        ctx.sync()
        first_s[name] = time.perf_counter() - started
        if isinstance(counter, _FlopCount):
            flops[name] = counter.total
        ctx.log(f"ft_step: first call of {name}: {first_s[name]:.1f} s")
    flops_ours, flops_base = flops["fp32"], flops["baseline"]
    peak_fn, peak_flops, side = peak_matmul(ctx)

    fns = {"baseline": lambda: baseline(x, y), **{n: (lambda f=f: f(x, y)) for n, f in ours.items()},
           "peak_matmul": peak_fn}
    samples = interleaved(ctx, fns, warmup=0 if ctx.quick else ctx.warmup)  # first calls warmed up
    base_s = median(samples["baseline"])
    results = []
    for name in ours:
        s = median(samples[name])
        tol = BF16_TOLERANCE if "bf16" in name else FP32_TOLERANCE
        diff = loss_difference(losses[name], losses["fp32"] if name != "fp32" else losses["baseline"])
        against = "baseline" if name == "fp32" else "our fp32"
        note = f"loss diff vs {against} {diff:.1e} ({'ok' if diff <= tol else 'ABOVE'} tol {tol:g})"
        if VARIANTS[name].get("compile"):
            note += f"; compile+first call {first_s[name]:.0f} s"
        results.append(Result(
            f"FT step {name}", sizes.batch / s, sizes.batch / base_s, "img/s", ctx.repeats, note,
            extra={"ours_s": samples[name], "baseline_s": samples["baseline"], "loss_diff": diff, "tolerance": tol,
                   "first_call_s": first_s[name], "config": VARIANTS[name],
                   "sizes": f"batch {sizes.batch}, {sizes.purifier} w{sizes.purifier_width}, small_cnn, "
                            f"D w{sizes.disc_width}, {source}, random weights"}))
    best = max(ours, key=lambda n: -median(samples[n]))
    peak = peak_flops / median(samples["peak_matmul"])
    achieved = flops_ours / median(samples[best])
    base_achieved = flops_base / base_s
    results.append(Result(
        f"share of peak ({best})", achieved / 1e9, peak / 1e9, "GFLOP/s", ctx.repeats,
        f"ours/peak; at fastest calls {flops_ours / min(samples[best]) / (peak_flops / min(samples['peak_matmul'])):.0%}; "
        f"baseline reaches {base_achieved / peak:.0%}; {flops_ours / 1e9:.1f} GFLOP/step "
        f"(baseline {flops_base / 1e9:.1f}); peak = bf16 matmul {side}x{side}",
        extra={"share_at_min": flops_ours / min(samples[best]) / (peak_flops / min(samples["peak_matmul"])),
               "flops_ours": flops_ours, "flops_baseline": flops_base, "peak_s": samples["peak_matmul"],
               "ours_s": samples[best], "baseline_achieved_gflops": base_achieved / 1e9}))
    return results
