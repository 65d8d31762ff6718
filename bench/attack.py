"""Attack-throughput row: PGD-EOT on the whole defense, EOT draws batched into one forward pass
against a Python loop over draws (`atop.attacks.Attack.loss_and_grad`, `eot_batched`)."""
from __future__ import annotations

import torch

from atop.attacks import PGD
from atop.config import Config
from atop.defense import Defense
from atop.transforms import RandomTransform
from bench.core import Context, Result, interleaved, median, row
from bench.ft_step import build_models


@row("attack")
def attack_rows(ctx: Context) -> list[Result]:
    """Attacked images/s of PGD-EOT, same seeds and models; random weights (speed only)."""
    sizes = ctx.sizes
    classifier, purifier, _ = build_models(sizes, ctx.device)
    cfg = Config.from_dict({"purifier": sizes.purifier, "purifier_width": sizes.purifier_width})
    defense = Defense(RandomTransform.from_config(cfg), purifier.eval(), classifier).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(sizes.attack_batch, 3, 32, 32, generator=g).to(ctx.device)
    y = torch.randint(0, 10, (sizes.attack_batch,), generator=g).to(ctx.device)

    def attack(batched: bool) -> PGD:
        return PGD(defense, eps=8 / 255, steps=sizes.attack_steps, eot=sizes.attack_eot, eot_batched=batched, seed=0)

    batched, looped = attack(True), attack(False)
    samples = interleaved(ctx, {"batched": lambda: batched(x, y), "looped": lambda: looped(x, y)})
    n = sizes.attack_batch
    return [Result("attack PGD-EOT batched", n / median(samples["batched"]), n / median(samples["looped"]),
                   "img/s", ctx.repeats,
                   f"PGD-{sizes.attack_steps} eot {sizes.attack_eot}, batch {n}, RT2+{sizes.purifier} "
                   f"w{sizes.purifier_width}+small_cnn, random weights; baseline = loop over EOT draws",
                   extra={"ours_s": samples["batched"], "baseline_s": samples["looped"]})]
