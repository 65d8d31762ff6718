"""Model registries: shapes, output ranges, RobustBench state-dict layout."""
import pytest
import torch

from atop.models import CLASSIFIERS, PURIFIERS, FastCNN, PatchDiscriminator, WideResNet


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "fast_cnn"])
def test_classifiers_give_logits(name):
    model = CLASSIFIERS[name](10).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_28_10_has_robustbench_layout():
    model = WideResNet(10, depth=28, widen=10)
    keys = model.state_dict().keys()
    for key in ("conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                "block2.layer.3.conv2.weight", "block3.layer.0.convShortcut.weight", "bn1.running_mean", "fc.weight"):
        assert key in keys
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.48e6, rel=0.01)


@pytest.mark.parametrize("name", list(PURIFIERS))
def test_purifiers_fill_images_in_unit_range(name):
    g = PURIFIERS[name](8)
    x, holes = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    out = g(x * (1 - holes), holes)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_discriminator_scores_patches_with_spectral_norm():
    d = PatchDiscriminator()
    scores = d(torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32))
    assert scores.shape == (2, 1, 4, 4)
    assert any("parametrizations" in name for name, _ in d.named_parameters())


def test_fast_cnn_size_and_channels_last_bf16():
    model = FastCNN(10)
    assert sum(p.numel() for p in model.parameters()) == 1_166_496
    x = torch.rand(3, 3, 32, 32)
    model = model.eval()
    fast = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (3, 10) and torch.allclose(out.float(), model(x), atol=0.1)
