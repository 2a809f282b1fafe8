"""Cycle-consistent abnormal<->normal translation shared by VANT-GAN and ANT-GAN.

Networks: a normal-producing generator (VANT-GAN: the map generator A2M with x_n = x_a + A2M(x_a);
ANT-GAN: A2N), N2A, and PatchGAN discriminators D_N and D_A. Objective (CycleGAN reference): LSGAN,
cycle L1 weight 10 per direction, identity 0.5 x cycle, discriminator loss halved, image pools of 50,
Adam 2e-4 (beta1 0.5) constant then linearly to zero over the second half, N(0, 0.02) init.

`generator="unet"` swaps the papers' ResNet generators for light U-Nets built from MONAI blocks
(:class:`~CounterfactualVALib.networks.vagan.MapUNet`) that predict a *change*: the map generator
outputs the map, image generators output ``x + change``. Their last layer starts near zero, so training
starts at the identity (cycle and identity losses at their minimum, the map at zero) and the discriminators
decide what changes. Without normalisation layers they behave the same on a training patch and on the whole
volume, which patch training (`--patch-size`) needs. `position_channels=True` (U-Net generators only) gives
every network the voxels' model-grid coordinates as extra input channels (:mod:`..networks.position`), so
that what is normal *at a place* is learnt directly. See docs/design.md ("3D on a CPU budget").
"""

from __future__ import annotations

import torch

from torch import nn

from ..networks import ImagePool, PatchGANDiscriminator, ResNetGenerator, init_normal_weights, linear_decay_schedule
from ..networks.change_generator import ChangeGenerator
from ..networks.position import with_position
from ..method_options import OptionSpec
from .base import AttributionResult, Method, TrainingContext
from .losses import AdversarialLoss
from .shared_specs import (adam_beta, cycle_weight, decay_start_fraction, image_pool, learning_rate, patchgan_specs, resnet_generator_specs,
                           unet_generator_specs, weight_average)


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
        # model-grid coordinates as extra input channels of every network (generator="unet" only)
        "position_channels": False,
        # the coordinates for the discriminators only: they learn where a change is abnormal, while the
        # generators, which never see a coordinate, cannot print one into the map
        "discriminator_position_channels": False,
        # std of the U-Net generators' last layer at initialisation: ~0 starts at the identity
        "unet_head_init_std": 1e-3,
        "unet_upsample": "transposed",
        # "relu" (earlier model files) or "leaky_relu": see MapUNet.ACTIVATIONS
        "unet_activation": "relu",
        # L1 weight on the change made to an abnormal image, |counterfactual - input| (0: the papers' losses)
        "lambda_change": 0.0,
        # discriminators' learning rate as a multiple of `lr` (1: the papers; > 1: two time-scale updates)
        "lr_d_ratio": 1.0,
        # exponential moving average of the counterfactual generator's weights, validated and exported
        # instead of the last weights (0: off, the papers)
        "ema_decay": 0.0,
    }
    config_specs = (
        *resnet_generator_specs(),
        *patchgan_specs(),
        learning_rate("lr", 2e-4, "the generators (the discriminators: lr x lr_d_ratio)"),
        adam_beta("beta1", 0.5, 1),
        cycle_weight(),
        OptionSpec("identity_fraction", "float", 0.5, minimum=0.0, maximum=1.0,
                   tooltip="identity-loss weight as a fraction of lambda_cycle (generators leave in-domain images unchanged; 0: off)"),
        image_pool(),
        decay_start_fraction(),
        *unet_generator_specs(),
        OptionSpec("position_channels", "bool", False,
                   tooltip="give every network the voxels' model-grid coordinates as extra input channels (generator=unet only)"),
        OptionSpec("discriminator_position_channels", "bool", False,
                   tooltip="give only the discriminators the voxels' grid coordinates: they can learn where a change is "
                   "abnormal, the generators cannot print a coordinate into the map (measured: slows the map's learning, docs/design.md)"),
        OptionSpec("lambda_change", "float", 0.0, minimum=0.0,
                   tooltip="L1 weight on the change made to an abnormal image (0: the papers' losses)"),
        OptionSpec("lr_d_ratio", "float", 1.0, minimum=0.01, maximum=100.0,
                   tooltip="discriminators' learning rate as a multiple of lr (1: the papers)"),
        weight_average(),
    )
    training_defaults = {"batch_size": 1}

    @property
    def supports_patches(self) -> bool:
        # the papers' ResNet generators use instance norm, whose statistics differ between a patch and a volume
        return self.config["generator"] == "unet"

    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims

        if c["position_channels"] and c["generator"] != "unet":
            raise ValueError(f"{self.name}: position_channels needs generator=unet (the ResNet generators take one channel).")
        position = bool(c["position_channels"])

        def generator(activation, residual=False):
            if c["generator"] == "unet":
                role = "map" if activation == "tanh2" else ("residual" if residual else "image")
                return ChangeGenerator(
                    dims, c["unet_channels"], role, position, c["unet_head_init_std"], c["unet_upsample"], c["unet_activation"]
                )
            return init_normal_weights(
                ResNetGenerator(dims, 1, 1, c["ngf"], c["n_downsampling"], c["n_blocks"], output_activation=activation)
            )

        nets = {self.normal_generator: generator(self.normal_generator_activation)}
        if training:
            # N2A is a helper of the cycle, never used for attribution: with U-Nets it starts at the identity
            nets["n2a"] = generator("tanh", residual=True)
            d_channels = 1 + (dims if self.discriminators_see_position else 0)
            nets["d_n"] = init_normal_weights(PatchGANDiscriminator(dims, d_channels, c["ndf"], c["n_layers_d"]))
            nets["d_a"] = init_normal_weights(PatchGANDiscriminator(dims, d_channels, c["ndf"], c["n_layers_d"]))
            self.pools = {"normal": ImagePool(c["pool_size"]), "abnormal": ImagePool(c["pool_size"])}
            self.adversarial = AdversarialLoss("least_squares")
        return nets

    @property
    def discriminators_see_position(self) -> bool:
        return bool(self.config["position_channels"] or self.config["discriminator_position_channels"])

    def to_normal(self, x: torch.Tensor, coordinates: torch.Tensor | None = None, generator: str = "") -> torch.Tensor:
        """The healthy counterpart of `x` (`coordinates`: a patch's position channels; None = x's whole grid;
        `generator`: which weights, the live generator by default)."""
        raise NotImplementedError

    def _generate(self, name: str, x: torch.Tensor, coordinates: torch.Tensor | None) -> torch.Tensor:
        net = self.networks[name]
        return net(x, coordinates) if isinstance(net, ChangeGenerator) else net(x)

    def _discriminate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`x` already carries its position channels when the method uses them (see training_step)."""
        return self.networks[name](x)

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
            "discriminators": (torch.optim.Adam(discs, lr=c["lr"] * c["lr_d_ratio"], betas=betas), schedule),
        }

    def training_step(self, batch, ctx: TrainingContext):
        x_a, x_n = batch["abnormal"], batch["normal"]
        nets, c = self.networks, self.config
        lam_cyc = c["lambda_cycle"]
        lam_id = c["identity_fraction"] * lam_cyc
        adv = self.adversarial

        # both patches of a pair come from one position: one set of coordinates serves every image here
        coords = batch.get("coords") if c["position_channels"] else None
        if self.discriminators_see_position:
            d_coords = batch.get("coords")
            def placed(x):  # what the discriminators see: the image and where it is
                return with_position(x, d_coords)
        else:
            def placed(x):
                return x

        # Generators: fool both discriminators, close both cycles, leave in-domain images unchanged.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(False)
        with ctx.autocast():
            fake_n = self.to_normal(x_a, coords)
            fake_a = self._generate("n2a", x_n, coords)
            rec_a = self._generate("n2a", fake_n, coords)
            rec_n = self.to_normal(fake_a, coords)
            loss_gan = adv.generator(nets["d_n"](placed(fake_n))) + adv.generator(nets["d_a"](placed(fake_a)))
            loss_cycle = (rec_a - x_a).abs().mean() + (rec_n - x_n).abs().mean()
            loss_identity = x_a.new_zeros(())
            if lam_id > 0:  # two generator passes saved when the identity term is off
                loss_identity = (self.to_normal(x_n, coords) - x_n).abs().mean() + (self._generate("n2a", x_a, coords) - x_a).abs().mean()
            # the change's own L1: once N2A learns to undo any change, the cycle term stops penalising changes
            # the discriminator did not ask for (the map then follows the anatomy everywhere)
            loss_change = (fake_n - x_a).abs().mean() if c["lambda_change"] > 0 else x_a.new_zeros(())
            loss_g = loss_gan + lam_cyc * loss_cycle + lam_id * loss_identity + c["lambda_change"] * loss_change
        ctx.optimize("generators", loss_g)

        # Discriminators: real vs pooled fakes, loss halved as in the CycleGAN reference.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(True)
        # the pools keep each fake with its position channels: an earlier fake is shown where it was made
        pooled_n = self.pools["normal"].query(placed(fake_n.detach()).float(), ctx.generator).to(x_a.dtype)
        pooled_a = self.pools["abnormal"].query(placed(fake_a.detach()).float(), ctx.generator).to(x_a.dtype)
        with ctx.autocast():
            loss_d_n = 0.5 * (adv.real(nets["d_n"](placed(x_n))) + adv.fake(nets["d_n"](pooled_n)))
            loss_d_a = 0.5 * (adv.real(nets["d_a"](placed(x_a))) + adv.fake(nets["d_a"](pooled_a)))
            loss_d = loss_d_n + loss_d_a
        ctx.optimize("discriminators", loss_d)
        return {
            "loss_g": loss_g.item(),
            "loss_gan": loss_gan.item(),
            "loss_cycle": loss_cycle.item(),
            "loss_identity": loss_identity.item(),
            "loss_change": loss_change.item(),
            "loss_d_n": loss_d_n.item(),
            "loss_d_a": loss_d_a.item(),
        }

    def training_state(self) -> dict:
        return {f"pool_{k}": v.state_dict()["images"] for k, v in self.pools.items()}

    def load_training_state(self, state: dict, device) -> None:
        for k, pool in self.pools.items():
            pool.load_state_dict({"images": state[f"pool_{k}"]}, device)
