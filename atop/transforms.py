"""Random transforms (RT1, RT2, RT3) that destroy adversarial perturbations before purification.

`TRANSFORMS` maps each RT name (`atop.config.RTType`) to its `RTSpec`: whether it adds noise,
how it draws its hole masks, and which config fields it reads. Adding an RT is one enum member, its
fields in `atop.names.RT_PARAMS` (torch-free, for search spaces and checks) and one entry here;
search spaces that name their RT list explicitly (`paper`) stay unchanged.

A transform turns a batch of N images into K*N transformed views plus their hole masks (1 = pixel
removed), so the purifier fills all views in one batched forward; `combine` turns the K*N purified
views back into N images. RT1 and RT2 have K = 1; RT3 has K = `num_masks` disjoint masks that
together cover the image, and keeps from each view only the pixels that view had to inpaint
(x_hat = sum_k m_k * g(t_k(x))). All randomness comes from the `torch.Generator` passed in.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atop.config import Config, RTType
from atop.names import RT_PARAMS


def block_masks(n: int, height: int, width: int, block_size: int, groups: int, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Partition each image's grid of blocks at random into `groups` near-equal disjoint masks.

    Returns:
        Float tensor (groups, n, 1, height, width): 1 where a pixel belongs to that group's blocks.
    """
    gh, gw = -(-height // block_size), -(-width // block_size)
    order = torch.rand(n, gh * gw, generator=generator, device=device).argsort(dim=1)
    group_of_block = torch.empty_like(order)
    # Block order[i, j] belongs to group j % groups: a random, balanced, disjoint partition.
    group_of_block.scatter_(1, order, (torch.arange(gh * gw, device=device) % groups).expand(n, -1))
    groups_grid = group_of_block.view(n, 1, gh, gw)
    masks = torch.stack([(groups_grid == k).float() for k in range(groups)])
    masks = masks.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return masks[..., :height, :width]


def random_block_mask(n: int, height: int, width: int, block_size: int, ratio: float,
                      generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A hole mask (n, 1, H, W) removing round(ratio * number of blocks) blocks per image."""
    gh, gw = -(-height // block_size), -(-width // block_size)
    n_holes = round(ratio * gh * gw)
    order = torch.rand(n, gh * gw, generator=generator, device=device).argsort(dim=1)
    holes = (order < n_holes).float().view(n, 1, gh, gw)
    return holes.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)[..., :height, :width]


#: (transform, n, height, width, generator, device) -> hole masks (views*n, 1, height, width)
HoleFn = Callable[["RandomTransform", int, int, int, torch.Generator, torch.device], torch.Tensor]


def _one_mask(t: RandomTransform, n: int, h: int, w: int, generator: torch.Generator,
              device: torch.device) -> torch.Tensor:
    return random_block_mask(n, h, w, t.block_size, t.mask_ratio, generator, device)


def _partition(t: RandomTransform, n: int, h: int, w: int, generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    return block_masks(n, h, w, t.block_size, t.views, generator, device).flatten(0, 1)


@dataclass(frozen=True)
class RTSpec:
    """One RT family.

    Attributes:
        noise: adds Gaussian noise (`noise_std`) before masking.
        multi_view: makes `num_masks` views whose masks partition the image (each view inpainted,
            `RandomTransform.combine` keeps the pixels each view filled); else one view.
        holes: draws the hole masks of all views.
        params: the config fields it reads (`atop.names.RT_PARAMS`: what a search space may suggest for it).
        doc: one line.
    """

    noise: bool
    multi_view: bool
    holes: HoleFn
    params: tuple[str, ...]
    doc: str


#: RT name -> spec; the keys are the values of `atop.config.RTType`
TRANSFORMS: dict[str, RTSpec] = {
    RTType.RT1.value: RTSpec(False, False, _one_mask, RT_PARAMS[RTType.RT1.value], "random mask"),
    RTType.RT2.value: RTSpec(True, False, _one_mask, RT_PARAMS[RTType.RT2.value], "Gaussian noise, then a random mask"),
    RTType.RT3.value: RTSpec(True, True, _partition, RT_PARAMS[RTType.RT3.value],
                             "noise, then disjoint masks covering the image, each inpainted"),
}


class RandomTransform(nn.Module):
    """One RT family with its parameters; no learnable weights."""

    def __init__(self, rt: RTType, *, mask_ratio: float, block_size: int, noise_std: float, num_masks: int):
        super().__init__()
        self.rt, self.mask_ratio, self.block_size = RTType(rt), mask_ratio, block_size
        self.spec = TRANSFORMS[self.rt.value]
        self.noise_std = noise_std if self.spec.noise else 0.0
        self.views = num_masks if self.spec.multi_view else 1

    @classmethod
    def from_config(cls, cfg: Config) -> RandomTransform:
        return cls(cfg.rt, mask_ratio=cfg.mask_ratio, block_size=cfg.block_size, noise_std=cfg.noise_std,
                   num_masks=cfg.num_masks)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform images in [0,1] (N,C,H,W).

        Returns:
            (views, holes): views (K*N, C, H, W) with holes set to 0, holes (K*N, 1, H, W), view-major
            (the N images of view 0 first).
        """
        n, _, h, w = x.shape
        if self.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = (x + self.noise_std * noise).clamp(0.0, 1.0)
        holes = self.spec.holes(self, n, h, w, generator, x.device).to(x.dtype)
        if self.views > 1:
            x = x.repeat(self.views, 1, 1, 1)
        return x * (1 - holes), holes

    def combine(self, purified: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        """Purified views (K*N, ...) back to N images; a multi-view RT (RT3) takes each pixel from the
        view that filled it."""
        if self.views == 1:
            return purified
        k = self.views
        return (purified * holes).unflatten(0, (k, -1)).sum(dim=0)
