"""Cycle-consistent abnormal<->normal translation shared by VANT-GAN and ANT-GAN.

Networks: a normal-producing generator (VANT-GAN: the map generator A2M with x_n = x_a + A2M(x_a);
ANT-GAN: A2N), N2A, and PatchGAN discriminators D_N and D_A. Objective (CycleGAN reference): LSGAN,
cycle L1 weight 10 per direction, identity 0.5 x cycle, discriminator loss halved, image pools of 50,
Adam 2e-4 (beta1 0.5) constant then linearly to zero over the second half, N(0, 0.02) init.

`generator="unet"` swaps the papers' ResNet generators for light U-Nets built from MONAI blocks
(:class:`~CounterfactualVALib.networks.vagan_networks.MapUNet`) that predict a *change*: the map generator
outputs the map, image generators output ``x + change``. Their last layer starts near zero, so training
starts at the identity (cycle and identity losses at their minimum, the map at zero) and the discriminators
decide what changes. Without normalisation layers they behave the same on a training patch and on the whole
volume, which patch training (`--patch-size`) needs. See docs/design.md ("3D on a CPU budget").
"""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss

from torch import nn

from ..networks import ImagePool, PatchGANDiscriminator, ResNetGenerator, init_normal_weights, linear_decay_schedule
from ..networks.vagan_networks import MapUNet
from .base import AttributionResult, Method, TrainingContext


class ChangeGenerator(nn.Module):
    """A U-Net that predicts a bounded change: the map itself (``"map"``) or ``x + map`` (``"image"``).

    The map is ``2 * tanh`` of the U-Net's output, so it can move any voxel in [-1, 1] to any other."""

    def __init__(self, spatial_dims: int, channels, role: str):
        super().__init__()
        self.unet = MapUNet(spatial_dims, 1, 1, channels=tuple(channels), norm=None, head_init_std=1e-3)
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = 2.0 * torch.tanh(self.unet(x))
        return change if self.role == "map" else x + change


class CycleTranslationMethod(Method):
    normal_generator = ""  # name of the network that makes the normal counterpart
    normal_generator_activation = "tanh"
    inference_networks: tuple[str, ...] = ()
    default_config = {
        "ngf": 64,
        "n_blocks": 9,
        "n_downsampling": 2,
        "ndf": 64,
        "n_layers_d": 3,
        "lr": 2e-4,
        "beta1": 0.5,
        "lambda_cycle": 10.0,
        "identity_fraction": 0.5,
        "pool_size": 50,
        "decay_start_fraction": 0.5,
        # "resnet": the papers' generators; "unet": light change-predicting U-Nets (CPU budgets, patch training)
        "generator": "resnet",
        "unet_channels": [8, 16, 32, 64],
    }
    training_defaults = {"batch_size": 1}

    @property
    def supports_patches(self) -> bool:
        # the papers' ResNet generators use instance norm, whose statistics differ between a patch and a volume
        return self.config["generator"] == "unet"

    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims

        if c["generator"] not in ("resnet", "unet"):
            raise ValueError(f"{self.name}: generator must be 'resnet' or 'unet', got {c['generator']!r}")

        def generator(activation):
            if c["generator"] == "unet":
                return ChangeGenerator(dims, c["unet_channels"], "map" if activation == "tanh2" else "image")
            return init_normal_weights(
                ResNetGenerator(dims, 1, 1, c["ngf"], c["n_downsampling"], c["n_blocks"], output_activation=activation)
            )

        nets = {self.normal_generator: generator(self.normal_generator_activation)}
        if training:
            nets["n2a"] = generator("tanh")
            nets["d_n"] = init_normal_weights(PatchGANDiscriminator(dims, 1, c["ndf"], c["n_layers_d"]))
            nets["d_a"] = init_normal_weights(PatchGANDiscriminator(dims, 1, c["ndf"], c["n_layers_d"]))
            self.pools = {"normal": ImagePool(c["pool_size"]), "abnormal": ImagePool(c["pool_size"])}
            self.adversarial = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)
        return nets

    def to_normal(self, x: torch.Tensor) -> torch.Tensor:
        """The healthy counterpart of `x`."""
        raise NotImplementedError

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        with torch.no_grad():
            counterfactual = self.to_normal(x)
        return AttributionResult(attribution=counterfactual - x, counterfactual=counterfactual)

    def configure_optimizers(self, total_steps: int):
        c = self.config
        betas = (c["beta1"], 0.999)
        schedule = linear_decay_schedule(total_steps, c["decay_start_fraction"])
        gens = list(self.networks[self.normal_generator].parameters()) + list(self.networks["n2a"].parameters())
        discs = list(self.networks["d_n"].parameters()) + list(self.networks["d_a"].parameters())
        return {
            "generators": (torch.optim.Adam(gens, lr=c["lr"], betas=betas), schedule),
            "discriminators": (torch.optim.Adam(discs, lr=c["lr"], betas=betas), schedule),
        }

    def training_step(self, batch, ctx: TrainingContext):
        x_a, x_n = batch["abnormal"], batch["normal"]
        nets, c = self.networks, self.config
        lam_cyc = c["lambda_cycle"]
        lam_id = c["identity_fraction"] * lam_cyc
        adv = self.adversarial

        # Generators: fool both discriminators, close both cycles, leave in-domain images unchanged.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(False)
        with ctx.autocast():
            fake_n = self.to_normal(x_a)
            fake_a = nets["n2a"](x_n)
            rec_a = nets["n2a"](fake_n)
            rec_n = self.to_normal(fake_a)
            loss_gan = adv(nets["d_n"](fake_n), target_is_real=True, for_discriminator=False) + adv(
                nets["d_a"](fake_a), target_is_real=True, for_discriminator=False
            )
            loss_cycle = (rec_a - x_a).abs().mean() + (rec_n - x_n).abs().mean()
            loss_identity = x_a.new_zeros(())
            if lam_id > 0:  # two generator passes saved when the identity term is off
                loss_identity = (self.to_normal(x_n) - x_n).abs().mean() + (nets["n2a"](x_a) - x_a).abs().mean()
            loss_g = loss_gan + lam_cyc * loss_cycle + lam_id * loss_identity
        ctx.optimize("generators", loss_g)

        # Discriminators: real vs pooled fakes, loss halved as in the CycleGAN reference.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(True)
        pooled_n = self.pools["normal"].query(fake_n.detach().float(), ctx.generator).to(x_a.dtype)
        pooled_a = self.pools["abnormal"].query(fake_a.detach().float(), ctx.generator).to(x_a.dtype)
        with ctx.autocast():
            loss_d_n = 0.5 * (
                adv(nets["d_n"](x_n), target_is_real=True, for_discriminator=True)
                + adv(nets["d_n"](pooled_n), target_is_real=False, for_discriminator=True)
            )
            loss_d_a = 0.5 * (
                adv(nets["d_a"](x_a), target_is_real=True, for_discriminator=True)
                + adv(nets["d_a"](pooled_a), target_is_real=False, for_discriminator=True)
            )
            loss_d = loss_d_n + loss_d_a
        ctx.optimize("discriminators", loss_d)
        return {
            "loss_g": loss_g.item(),
            "loss_gan": loss_gan.item(),
            "loss_cycle": loss_cycle.item(),
            "loss_identity": loss_identity.item(),
            "loss_d_n": loss_d_n.item(),
            "loss_d_a": loss_d_a.item(),
        }

    def training_state(self) -> dict:
        return {f"pool_{k}": v.state_dict()["images"] for k, v in self.pools.items()}

    def load_training_state(self, state: dict, device) -> None:
        for k, pool in self.pools.items():
            pool.load_state_dict({"images": state[f"pool_{k}"]}, device)
