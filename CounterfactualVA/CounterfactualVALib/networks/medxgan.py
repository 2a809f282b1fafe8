"""medXGAN's networks (medxgan.txt section 3): a two-code generator G(z1, z2) and a discriminator.

Generator: z = concat(z1, z2) -> Linear -> reshape -> stride-2 transposed convolutions with batch norm and
ReLU -> a last transposed convolution to one channel -> tanh (DCGAN layout, as the reference code). It is
MONAI's `Generator` (Linear + reshape + transposed `Convolution` blocks) with 4x4 kernels (DCGAN's; MONAI's
default 3x3 is replaced in `_get_layer`). The output follows the model grid instead of a fixed 64 x 64:
the number of up-samplings is chosen so that the start grid is about 4 voxels on its shortest side
(64 -> 4 x 4 start, 4 transposed convolutions, as DCGAN), the start grid is the target grid divided by
2**n (rounded up) and the output is centre-cropped to the grid when the grid is not a multiple of 2**n.
Widths: ngf at the last hidden layer, doubled towards the start, capped at 8 * ngf (64x64: 512, 256,
128, 64, 1).

Discriminator: the classifier trunk (:class:`ConvClassifier`: 4x4 stride-2 conv blocks with LeakyReLU 0.2,
batch norm except on the first block, global average pooling, one linear output), one logit per image,
with as many blocks as the generator has up-samplings (DCGAN's discriminator mirrors its generator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import Generator as MonaiGenerator
from torch import nn

from .classifier import ConvClassifier


def upsampling_plan(grid_shape: Sequence[int], n_up: int | None = None, min_start: int = 4) -> tuple[int, tuple[int, ...]]:
    """(number of stride-2 up-samplings, start grid) for a generator that must cover `grid_shape`."""
    grid_shape = tuple(int(s) for s in grid_shape)
    if n_up is None or n_up <= 0:
        n_up = max(1, int(math.floor(math.log2(max(1, min(grid_shape)) / min_start))))
    start = tuple(int(math.ceil(s / 2**n_up)) for s in grid_shape)
    return n_up, start


class _DCGANUpsampler(MonaiGenerator):
    """MONAI's Generator with DCGAN's 4x4 stride-2 transposed convolutions (padding 1: exact doubling)."""

    def _get_layer(self, in_channels: int, out_channels: int, strides: int, is_last: bool):
        return Convolution(
            spatial_dims=self.dimensions,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=strides,
            kernel_size=4,
            padding=1,
            output_padding=0,
            is_transposed=True,
            conv_only=is_last,
            act=self.act,
            norm=self.norm,
            bias=is_last,  # batch norm follows every other layer
        )


class MedXGenerator(nn.Module):
    """G(z1, z2) -> image (B, 1, *grid_shape) in [-1, 1]. z2 = 0 is the negative (normal) realisation."""

    def __init__(
        self,
        grid_shape: Sequence[int],
        z1_dim: int = 1000,
        z2_dim: int = 100,
        ngf: int = 64,
        n_up: int | None = None,
        max_channels: int | None = None,
    ):
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.z1_dim, self.z2_dim = int(z1_dim), int(z2_dim)
        self.n_up, start = upsampling_plan(self.grid_shape, n_up)
        cap = max_channels or 8 * ngf
        widths = [min(ngf * 2 ** (self.n_up - 1 - i), cap) for i in range(self.n_up)]  # input width of each layer
        channels = widths[1:] + [1]
        self.net = _DCGANUpsampler(
            latent_shape=(self.z1_dim + self.z2_dim,),
            start_shape=(widths[0], *start),
            channels=channels,
            strides=[2] * self.n_up,
            kernel_size=4,
            num_res_units=0,
            act="RELU",
            norm="BATCH",
        )
        self.out_shape = tuple(s * 2**self.n_up for s in start)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.net(torch.cat([z1, z2], dim=1)))
        if self.out_shape != self.grid_shape:
            crop = [slice(None), slice(None)]
            for full, want in zip(self.out_shape, self.grid_shape):
                lo = (full - want) // 2
                crop.append(slice(lo, lo + want))
            y = y[tuple(crop)]
        return y


def medxgan_discriminator(spatial_dims: int, n_layers: int, ndf: int = 64, max_channels: int = 512) -> ConvClassifier:
    """One real/fake logit per image (see the module docstring)."""
    return ConvClassifier(spatial_dims, in_channels=1, out_channels=1, channels=ndf, n_layers=n_layers, norm="batch", max_channels=max_channels)


class FrozenNetwork(nn.Module):
    """Holds a network that must never train: parameters frozen and eval mode kept even when a parent module
    is switched to training (so batch-norm statistics cannot drift either)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
