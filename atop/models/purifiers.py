"""Purifier generators (inpainting networks) and the GAN discriminator.

A generator takes the transformed image (holes set to 0) and its hole mask (1 = removed) and returns
a full image in [0,1]: it inpaints the holes and, where the transform added noise, denoises the rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class UNetPurifier(nn.Module):
    """A small U-Net autoencoder: two down-sampling stages with skip connections."""

    def __init__(self, width: int = 16, channels: int = 3):
        super().__init__()

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())

        w = width
        self.enc1 = nn.Sequential(conv(channels + 1, w), conv(w, w))
        self.enc2 = nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w))
        self.mid = nn.Sequential(conv(2 * w, 4 * w, 2), conv(4 * w, 4 * w), nn.Upsample(scale_factor=2))
        self.dec2 = nn.Sequential(conv(6 * w, 2 * w), nn.Upsample(scale_factor=2))
        self.dec1 = nn.Sequential(conv(3 * w, w), nn.Conv2d(w, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(torch.cat([x, holes], dim=1))
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.mid(e2), e2], dim=1))
        return torch.sigmoid(self.dec1(torch.cat([d2, e1], dim=1)))


class GatedConv(nn.Module):
    """Gated convolution (Yu et al., DeepFillv2): features * sigmoid(gate), learnt per pixel."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1):
        super().__init__()
        # One conv computes features and gates together: half the kernel launches of two convs.
        self.conv = nn.Conv2d(cin, 2 * cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, gate = self.conv(x).chunk(2, dim=1)
        return F.elu(features) * torch.sigmoid(gate)


def _gated_stage(cin: int, w: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        GatedConv(cin, w, 5), GatedConv(w, 2 * w, 3, stride=2), GatedConv(2 * w, 2 * w),
        GatedConv(2 * w, 2 * w, dilation=2), GatedConv(2 * w, 2 * w, dilation=4), GatedConv(2 * w, 2 * w),
        nn.Upsample(scale_factor=2), GatedConv(2 * w, w), nn.Conv2d(w, channels, 3, padding=1),
    )


class GatedPurifier(nn.Module):
    """DeepFillv2-style coarse-to-fine inpainting with gated convolutions (no contextual attention).

    The coarse stage fills the holes; the refine stage sees the coarse result pasted into the holes.
    """

    def __init__(self, width: int = 16, channels: int = 3):
        super().__init__()
        self.coarse = _gated_stage(channels + 1, width, channels)
        self.refine = _gated_stage(channels + 1, width, channels)

    def forward(self, x: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        coarse = torch.sigmoid(self.coarse(torch.cat([x, holes], dim=1)))
        pasted = x * (1 - holes) + coarse * holes
        return torch.sigmoid(self.refine(torch.cat([pasted, holes], dim=1)))


class PatchDiscriminator(nn.Module):
    """Spectral-norm PatchGAN: one real/fake score per patch, for the hinge GAN loss."""

    def __init__(self, width: int = 32, channels: int = 3):
        super().__init__()
        layers, cin = [], channels + 1
        for cout in (width, 2 * width, 4 * width):
            layers += [spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers.append(spectral_norm(nn.Conv2d(cin, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, holes], dim=1))
