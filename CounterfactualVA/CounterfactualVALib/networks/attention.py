"""Attention network of the attention-guided CycleGAN (Mejjati et al. 2018; seed paper ag-cyclegan.txt).

7x7 stride-2 conv (32) -> 3x3 stride-2 conv (64) -> residual block -> 2 x (nearest-neighbour upsampling +
3x3 conv: 64, then 32) -> 7x7 conv to one channel -> sigmoid. Instance norm (no affine parameters) and ReLU
follow every convolution but the last. Dimension-agnostic; the upsampling goes back to the exact sizes of the
encoder's feature maps, so any input size gives a map on the input grid, with values in [0, 1].

``held_open`` (a buffer, so it travels with the weights into checkpoints and model files): while set, the
network answers 1 everywhere without running, so that a translator can learn before its attention may close
(the attention CycleGAN's ``attention_warmup_steps``).
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
        self.register_buffer("held_open", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # model files written before `held_open` existed hold an attention that was never held open
        state_dict.setdefault(prefix + "held_open", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.down1(x)
        h = self.blocks(self.down2(h1))
        h = self.up1(F.interpolate(h, size=h1.shape[2:], mode="nearest"))
        h = self.up2(F.interpolate(h, size=x.shape[2:], mode="nearest"))
        return self.head(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.held_open:
            return torch.ones_like(x[:, :1])
        return torch.sigmoid(self.logits(x))
