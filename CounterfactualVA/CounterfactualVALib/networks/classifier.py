"""A dimension-agnostic CNN classifier for the saliency baselines (and as medXGAN's classifier / the judge).

VANT-GAN (vant-gan.txt, section 5) builds its CAM baselines from the PatchGAN discriminator it uses
elsewhere, with "the last two layers replaced by a global average pooling layer followed by a dense
prediction". We read that literally: the PatchGAN's 4x4 stride-2 convolution blocks (LeakyReLU 0.2, no
normalisation on the first block) are kept; its stride-1 block and its 1-channel output convolution are
replaced by global average pooling and one linear layer. So the last feature map (`features`, the layer
CAM and Grad-CAM read) sits at 1/2**n_layers of the input grid, and the logits are linear in its
spatial average: CAM at a location is exactly that location's share of the logits.

Built from MONAI blocks (`Convolution`, pooling factory) so one class serves 2D and 3D; no size is
hard-wired (any grid of at least 2**n_layers voxels per axis).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn

_NORMS = {"batch": "BATCH", "instance": ("INSTANCE", {"affine": True}), "none": None}


class ConvClassifier(nn.Module):
    """PatchGAN-style conv blocks -> global average pooling -> linear logits.

    channels: width of the first block, doubled per block up to `max_channels` (PatchGAN: 64, 128, 256).
    norm: "batch" (default), "instance" (the CycleGAN PatchGAN's choice) or "none". Batch norm because
        instance norm removes each image's own feature statistics, which hurts localisation: on the 32 x 32
        synthetic boxes (8 channels, 100 steps) the Grad-CAM mean |map| inside/outside the boxes was 0.28
        with instance norm and 1.7 with batch norm, at similar accuracy (0.98 / 0.94).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: int = 64,
        n_layers: int = 3,
        norm: str = "batch",
        max_channels: int = 512,
        dropout: float = 0.0,
    ):
        super().__init__()
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        blocks = []
        c_in, c_out = in_channels, channels
        for i in range(n_layers):
            block_norm = None if i == 0 else _NORMS[norm]
            blocks.append(
                Convolution(
                    spatial_dims,
                    c_in,
                    c_out,
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    act=("LEAKYRELU", {"negative_slope": 0.2}),
                    norm=block_norm,
                    bias=block_norm is None,
                )
            )
            c_in, c_out = c_out, min(2 * c_out, max_channels)
        self.features = nn.Sequential(*blocks)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c_in, out_channels)
        self.spatial_dims = spatial_dims
        self.n_layers = n_layers
        self.feature_channels = c_in

    #: the module whose output CAM / Grad-CAM read (the last conv block, before pooling)
    target_layer = "features"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s < 2**self.n_layers for s in x.shape[2:]):
            raise ValueError(
                f"ConvClassifier with {self.n_layers} stride-2 blocks needs at least {2**self.n_layers} voxels per axis, "
                f"got {tuple(x.shape[2:])}."
            )
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


class LogOdds(nn.Module):
    """Wraps a 2-logit classifier; outputs (l0 - l1, l1 - l0): the log-odds of each class against the other.

    With a softmax over two logits only their difference matters (P(abnormal) = sigmoid(l1 - l0)), so the
    saliency targets use this contrast rather than one raw logit, which carries an arbitrary common part.
    Channel 1 is the evidence for class 1 (abnormal), channel 0 its negative.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @staticmethod
    def contrast(logits: torch.Tensor) -> torch.Tensor:
        d = logits[:, 1:2] - logits[:, 0:1]
        return torch.cat([-d, d], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contrast(self.net(x))
