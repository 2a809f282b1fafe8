"""ICAM's networks (Bass et al., NeurIPS 2020; icam.txt section 3 and reference-notes "ICAM"), 2D or 3D.

* :class:`ContentEncoder` E_c: a 3x3 convolution (LeakyReLU), stride-2 convolutions with instance norm and
  ReLU (16 -> 32 -> 64 channels by default, so z_c sits at grid / 4), residual blocks with instance norm, and
  additive Gaussian noise while training (icam.txt: "Gaussian noise was added to the last layer of the content
  encoder to prevent vanishing of the content latent space").
* :class:`AttributeEncoder` E_a: reflection padding and a 4x4 stride-2 convolution, then residual blocks that
  halve the grid by mean pooling (DRIT's "basic blocks", no normalisation; 16 -> 32 -> 48 channels), and two
  such blocks as the mu and log-variance heads. The attribute latent is *spatial*: ``latent_channels`` x
  grid / 16 by default (3D 128 x 160 x 128: 1 x 8 x 10 x 8 = 640 numbers; 2D 128 x 128: 1 x 8 x 8 = 64).
* :class:`Generator` G: the attribute map is upsampled (nearest) to z_c's grid, lifted to 16 channels by a
  convolution and concatenated with z_c (64 + 16 = 80 channels), passed through residual blocks (instance norm)
  and transposed-convolution up-blocks (80 -> 40 -> 20) with layer norm (group norm with one group: normalises
  over channels and space, per-channel affine) and LeakyReLU back to the input grid, the attribute map being
  concatenated again in front of each up-block; a 1x1 convolution and tanh give the image.
* :class:`DomainDiscriminator`: strided 4x4 convolutions with LeakyReLU, then two heads: a patch map of
  real/fake logits and a 2-class logit pair (global average pooling + linear).
* :class:`ContentDiscriminator` D_c: strided convolutions on z_c, global average pooling, one logit for
  P(abnormal | z_c).
* :class:`LatentClassifier`: one linear layer from the flattened attribute latent to 2 logits (icam.txt: "a fully
  connected layer applied to the shared attribute latent space"). Its input size is the latent's size and so
  depends on the model grid; when the grid is not known at construction a lazy linear layer takes its size
  from the first latent it sees (or from the weights it is loaded with).

Sizes follow the input: every network accepts any grid whose sides are multiples of 2**(number of stride-2
levels); :func:`pad_to_multiple` / :func:`crop_to` let the method handle other grids. Nothing is hard-wired to
a size (the public code's defect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ADAPTIVE_AVG_POOL, AVG_POOL, CONV, CONV_TRANSPOSE, INSTANCE_NORM

from .resnet_generator import ResidualBlock


def _leaky(slope: float = 0.2) -> nn.Module:
    return nn.LeakyReLU(negative_slope=slope, inplace=False)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad the spatial axes of `x` at their far ends up to multiples of `multiple`.

    Returns the padded tensor and the original spatial shape (for :func:`crop_to`).
    """
    shape = tuple(x.shape[2:])
    extra = [(-s) % multiple for s in shape]
    if not any(extra):
        return x, shape
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pad += [0, e]
    return F.pad(x, pad, mode="replicate"), shape


def crop_to(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, int(s)) for s in shape)]


def latent_grid(image_shape: Sequence[int], levels: int) -> tuple[int, ...]:
    """Spatial shape of the attribute latent for a model grid (tensor axis order), after padding."""
    return tuple(math.ceil(int(s) / 2**levels) for s in image_shape)


class ContentEncoder(nn.Module):
    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        n_res_blocks: int = 4,
        noise_std: float = 1.0,
    ):
        super().__init__()
        conv = CONV[spatial_dims]
        channels = list(channels)
        layers: list[nn.Module] = [conv(in_channels, channels[0], 3, padding=1, padding_mode="reflect"), _leaky()]
        for c_in, c_out in pairwise(channels):
            layers += [
                conv(c_in, c_out, 3, stride=2, padding=1),
                INSTANCE_NORM[spatial_dims](c_out, affine=False),
                nn.ReLU(inplace=True),
            ]
        layers += [ResidualBlock(spatial_dims, channels[-1], "instance") for _ in range(n_res_blocks)]
        self.model = nn.Sequential(*layers)
        self.noise_std = noise_std
        self.out_channels = channels[-1]
        self.levels = len(channels) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if self.training and self.noise_std > 0:
            z = z + self.noise_std * torch.randn_like(z)
        return z


class MeanPoolBlock(nn.Module):
    """Pre-activation residual block that halves the grid: LeakyReLU, 3x3 conv, LeakyReLU, 3x3 conv, mean pool;
    shortcut mean pool + 1x1 conv (DRIT's attribute-encoder basic block, without normalisation)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        conv = CONV[spatial_dims]
        pool = AVG_POOL[spatial_dims]
        self.body = nn.Sequential(
            _leaky(),
            conv(in_channels, in_channels, 3, padding=1, padding_mode="reflect"),
            _leaky(),
            conv(in_channels, out_channels, 3, padding=1, padding_mode="reflect"),
            pool(2),
        )
        self.shortcut = nn.Sequential(pool(2), conv(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class AttributeEncoder(nn.Module):
    """Returns (mu, logvar), each (B, latent_channels, *grid / 2**(len(channels) + 1)).

    Stride-2 stem (channels[0]), a mean-pool block per further width, and mean-pool blocks as the mu and
    log-variance heads (the public code's layout: 16 -> 32 -> 48, heads to one channel, grid / 16).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, channels: Sequence[int] = (16, 32, 48), latent_channels: int = 1):
        super().__init__()
        conv = CONV[spatial_dims]
        channels = list(channels)
        layers: list[nn.Module] = [conv(in_channels, channels[0], 4, stride=2, padding=1, padding_mode="reflect")]
        layers += [MeanPoolBlock(spatial_dims, a, b) for a, b in pairwise(channels)]
        self.trunk = nn.Sequential(*layers)
        self.mu = MeanPoolBlock(spatial_dims, channels[-1], latent_channels)
        self.logvar = MeanPoolBlock(spatial_dims, channels[-1], latent_channels)
        self.levels = len(channels) + 1
        self.latent_channels = latent_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.mu(h), self.logvar(h)


class Generator(nn.Module):
    """G(z_c, z_a) -> image on the grid of 2**len(up_channels) x z_c's grid.

    The attribute map is upsampled (nearest) to z_c's grid, lifted to `code_channels` by a 3x3 convolution and
    LeakyReLU, and concatenated with z_c; residual blocks (instance norm) follow, then one transposed-convolution
    up-block per entry of `up_channels` (layer norm, LeakyReLU), each fed the attribute map again (upsampled to
    its input grid), then a 1x1 convolution and tanh. No instance norm acts on the attribute features before
    they join the residual stream: it would erase a code that is constant over space (a one-voxel latent, or
    the smooth part of any latent); layer norm keeps per-channel offsets.
    """

    def __init__(
        self,
        spatial_dims: int,
        content_channels: int = 64,
        latent_channels: int = 1,
        code_channels: int = 16,
        up_channels: Sequence[int] = (40, 20),
        n_res_blocks: int = 3,
        out_channels: int = 1,
    ):
        super().__init__()
        conv = CONV[spatial_dims]
        conv_t = CONV_TRANSPOSE[spatial_dims]
        self.code = nn.Sequential(conv(latent_channels, code_channels, 3, padding=1, padding_mode="replicate"), _leaky())
        c = content_channels + code_channels
        self.blocks = nn.Sequential(*[ResidualBlock(spatial_dims, c, "instance") for _ in range(n_res_blocks)])
        self.up = nn.ModuleList()
        for c_out in up_channels:
            self.up.append(
                nn.Sequential(
                    conv_t(c + latent_channels, c_out, 3, stride=2, padding=1, output_padding=1),
                    nn.GroupNorm(1, c_out),  # layer norm over channels and space, per-channel affine
                    _leaky(),
                )
            )
            c = c_out
        self.head = conv(c, out_channels, 1)
        self.levels = len(up_channels)

    @staticmethod
    def _upsampled(z_a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z_a.to(like.dtype), size=like.shape[2:], mode="nearest")

    def forward(self, z_c: torch.Tensor, z_a: torch.Tensor) -> torch.Tensor:
        if z_a.shape[0] != z_c.shape[0]:
            raise ValueError(f"Generator: {z_c.shape[0]} content codes but {z_a.shape[0]} attribute codes")
        h = self.blocks(torch.cat([z_c, self.code(self._upsampled(z_a, z_c))], dim=1))
        for up in self.up:
            h = up(torch.cat([h, self._upsampled(z_a, h)], dim=1))
        return torch.tanh(self.head(h))


class DomainDiscriminator(nn.Module):
    """Strided conv trunk (no normalisation) with a real/fake patch head and a 2-class head.

    forward returns (patch logits (B, 1, *patch grid), class logits (B, 2)).
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, ndf: int = 16, n_layers: int = 4, max_channels: int = 256, n_classes: int = 2):
        super().__init__()
        conv = CONV[spatial_dims]
        layers: list[nn.Module] = []
        c_in, c_out = in_channels, ndf
        for _ in range(n_layers):
            layers += [conv(c_in, c_out, 4, stride=2, padding=1), _leaky()]
            c_in, c_out = c_out, min(2 * c_out, max_channels)
        self.trunk = nn.Sequential(*layers)
        self.adv = conv(c_in, 1, 3, padding=1)
        self.pool = ADAPTIVE_AVG_POOL[spatial_dims](1)
        self.cls = nn.Linear(c_in, n_classes)
        self.min_size = 2**n_layers

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(s < self.min_size for s in x.shape[2:]):
            raise ValueError(f"DomainDiscriminator needs at least {self.min_size} voxels per axis, got {tuple(x.shape[2:])}")
        h = self.trunk(x)
        return self.adv(h), self.cls(self.pool(h).flatten(1))


class ContentDiscriminator(nn.Module):
    """D_c: strided 3x3 convs on z_c (LeakyReLU, no normalisation), global average pool, one logit P(abnormal)."""

    def __init__(self, spatial_dims: int, in_channels: int = 64, channels: int = 64, n_layers: int = 3):
        super().__init__()
        conv = CONV[spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(n_layers):
            layers += [conv(c_in, channels, 3, stride=2, padding=1), _leaky()]
            c_in = channels
        self.trunk = nn.Sequential(*layers)
        self.pool = ADAPTIVE_AVG_POOL[spatial_dims](1)
        self.fc = nn.Linear(c_in, 1)

    def forward(self, z_c: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.trunk(z_c)).flatten(1))


class LatentClassifier(nn.Module):
    """Linear layer from the flattened attribute latent to 2 logits (0 = normal, 1 = abnormal).

    `in_features` None: a lazy layer, sized by the first latent it sees or by the weights loaded into it.
    """

    def __init__(self, in_features: int | None, n_classes: int = 2):
        super().__init__()
        self.fc = nn.LazyLinear(n_classes) if in_features is None else nn.Linear(in_features, n_classes)

    @property
    def in_features(self) -> int | None:
        weight = self.fc.weight
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return None
        return int(weight.shape[1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1)
        expected = self.in_features
        if expected is not None and flat.shape[1] != expected:
            raise ValueError(
                f"The attribute classifier expects a latent of {expected} numbers, got {flat.shape[1]} "
                f"(latent {tuple(z.shape[1:])}): the image is not on the model grid this model was trained on."
            )
        return self.fc(flat)


__all__ = [
    "AttributeEncoder",
    "ContentDiscriminator",
    "ContentEncoder",
    "DomainDiscriminator",
    "Generator",
    "LatentClassifier",
    "MeanPoolBlock",
    "crop_to",
    "latent_grid",
    "pad_to_multiple",
]
