"""Random transforms: shapes, ranges, masked fractions, noise statistics, disjoint RT3 masks."""
import pytest
import torch

from atop.config import RTType
from atop.transforms import RandomTransform, block_masks


def make(rt, **kw):
    params = {"mask_ratio": 0.25, "block_size": 4, "noise_std": 0.25, "num_masks": 4, **kw}
    return RandomTransform(RTType(rt), **params)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_rt1_removes_the_requested_fraction_of_blocks(ratio):
    x = torch.rand(8, 3, 32, 32)
    views, holes = make("rt1", mask_ratio=ratio)(x, torch.Generator().manual_seed(0))
    assert views.shape == x.shape and holes.shape == (8, 1, 32, 32)
    assert torch.allclose(holes.mean(dim=(1, 2, 3)), torch.full((8,), ratio))
    assert torch.equal(views, x * (1 - holes))  # no noise in RT1
    # holes are whole 4x4 blocks
    blocks = holes.unfold(2, 4, 4).unfold(3, 4, 4)
    assert torch.all(blocks.amin(dim=(-1, -2)) == blocks.amax(dim=(-1, -2)))


def test_rt2_noise_statistics_and_range():
    x = torch.full((16, 3, 32, 32), 0.5)
    views, _holes = make("rt2", mask_ratio=0.0, noise_std=0.1)(x, torch.Generator().manual_seed(0))
    noise = views - x
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.1) < 0.01
    assert views.min() >= 0 and views.max() <= 1


def test_rt3_masks_are_disjoint_cover_and_combine_picks_the_filler():
    x = torch.rand(3, 3, 32, 32)
    t = make("rt3", num_masks=4)
    views, holes = t(x, torch.Generator().manual_seed(0))
    assert views.shape == (12, 3, 32, 32)
    per_image = holes.unflatten(0, (4, 3)).sum(dim=0)
    assert torch.equal(per_image, torch.ones_like(per_image))  # each pixel filled by exactly one view
    filled = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 3, 3, 32, 32).flatten(0, 1)
    combined = t.combine(filled, holes)  # view k "paints" the value k
    assert combined.shape == x.shape
    assert torch.equal(combined, (holes.unflatten(0, (4, 3)) * torch.arange(4.0).view(4, 1, 1, 1, 1)).sum(0).expand_as(x))


def test_fresh_randomness_each_call_and_seedable():
    x = torch.rand(2, 3, 32, 32)
    t = make("rt2")
    g = torch.Generator().manual_seed(5)
    a, b = t(x, g)[1], t(x, g)[1]
    assert not torch.equal(a, b)
    assert torch.equal(t(x, torch.Generator().manual_seed(5))[1], a)


def test_block_masks_balanced_groups():
    m = block_masks(2, 32, 32, 8, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert m.shape == (4, 2, 1, 32, 32)
    assert torch.equal(m.mean(dim=(2, 3, 4)), torch.full((4, 2), 0.25))
