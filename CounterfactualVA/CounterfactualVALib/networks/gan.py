"""Parts every adversarial method shares: PatchGAN discriminator, weight init, image pool, LR schedule."""

from __future__ import annotations

import torch
from torch import nn


class PatchGANDiscriminator(nn.Module):
    """MONAI's PatchDiscriminator (CycleGAN's 70x70 PatchGAN for 2D) with instance norm, returning the logits.

    MONAI returns every intermediate feature map; adversarial losses here only need the last one.
    """

    def __init__(self, spatial_dims: int, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: str = "INSTANCE"):
        super().__init__()
        from monai.networks.nets import PatchDiscriminator  # training only: MONAI's import is slow (see networks.layers)

        self.net = PatchDiscriminator(
            spatial_dims=spatial_dims, channels=ndf, in_channels=in_channels, out_channels=1, num_layers_d=n_layers, norm=norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def init_normal_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """CycleGAN's init: conv weights N(0, std), biases 0, affine norm weights N(1, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.InstanceNorm3d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module


def linear_decay_schedule(total_steps: int, decay_start_fraction: float = 0.5):
    """Multiplier for LambdaLR: 1 until `decay_start_fraction` of training, then linearly to 0 at the end."""
    decay_start = int(total_steps * decay_start_fraction)
    span = max(1, total_steps - decay_start)

    def factor(step: int) -> float:
        return 1.0 if step < decay_start else max(0.0, 1.0 - (step - decay_start) / span)

    return factor


class ImagePool:
    """Shrivastava et al.'s history buffer: the discriminator sees earlier fakes half of the time.

    Randomness comes from a generator passed per call, and the buffer is part of the training state,
    so a resumed run makes exactly the choices an uninterrupted one would.
    """

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=generator).item() > 0.5:
                idx = int(torch.randint(0, self.size, (), generator=generator).item())
                out.append(self.images[idx].clone())
                self.images[idx] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict:
        if not self.images:
            return {"images": torch.zeros(0)}
        return {"images": torch.cat(self.images, 0).cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        images = state["images"]
        self.images = [] if images.numel() == 0 else [img.unsqueeze(0).to(device) for img in images]
