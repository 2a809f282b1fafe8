"""Attention network of the attention-guided CycleGAN (Mejjati et al. 2018; seed paper ag-cyclegan.txt).

7x7 stride-2 conv (32) -> 3x3 stride-2 conv (64) -> residual block -> 2 x (nearest-neighbour upsampling +
3x3 conv: 64, then 32) -> 7x7 conv to one channel -> sigmoid. Instance norm (no affine parameters) and ReLU
follow every convolution but the last. Dimension-agnostic; the upsampling goes back to the exact sizes of the
encoder's feature maps, so any input size gives a map on the input grid, with values in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CONV, INSTANCE_NORM

from .resnet_generator import ResidualBlock


class AttentionNetwork(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int = 1, channels: tuple[int, int] = (32, 64), n_blocks: int = 1):
        super().__init__()
        conv = CONV[spatial_dims]
        c1, c2 = channels

        def norm_act(c):
            return [INSTANCE_NORM[spatial_dims](c, affine=False), nn.ReLU(inplace=True)]

        self.down1 = nn.Sequential(conv(in_channels, c1, 7, stride=2, padding=3, padding_mode="reflect"), *norm_act(c1))
        self.down2 = nn.Sequential(conv(c1, c2, 3, stride=2, padding=1), *norm_act(c2))
        self.blocks = nn.Sequential(*[ResidualBlock(spatial_dims, c2, "instance") for _ in range(n_blocks)])
        self.up1 = nn.Sequential(conv(c2, c2, 3, padding=1), *norm_act(c2))
        self.up2 = nn.Sequential(conv(c2, c1, 3, padding=1), *norm_act(c1))
        self.head = conv(c1, 1, 7, padding=3, padding_mode="reflect")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.down1(x)
        h = self.blocks(self.down2(h1))
        h = self.up1(F.interpolate(h, size=h1.shape[2:], mode="nearest"))
        h = self.up2(F.interpolate(h, size=x.shape[2:], mode="nearest"))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))
