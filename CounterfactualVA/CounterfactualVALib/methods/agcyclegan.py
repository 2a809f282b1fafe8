"""Attention-guided CycleGAN (seed paper: ag-cyclegan.txt; attention GAN of Mejjati et al. 2018).

Networks, named by direction: generators ``a2n`` and ``n2a`` (CycleGAN ResNet generators); attention networks
``att_a2n`` (the paper's A_N: reads abnormal images, says where ``a2n`` may change them) and ``att_n2a`` (A_A);
PatchGAN discriminators ``d_n`` and ``d_a``. A translation keeps the input outside the attended region:

    x_hat = A(x) * G(x) + (1 - A(x)) * x,

so a voxel with zero attention is returned unchanged, exactly. The cycle recomputes attention on the fake:
``rec_a = att_n2a(fake_n) * n2a(fake_n) + (1 - att_n2a(fake_n)) * fake_n``.

Losses: adversarial hinge loss (the seed paper's SA-GAN loss; ``"gan_loss": "lsgan"`` gives the least-squares
loss of the attention-GAN reference code, with the CycleGAN halving of the discriminator loss), cycle L1 with
weight 10 per direction, no identity loss (the seed paper drops it). Adam with betas (0.5, 0.9), lr 1e-4 for
the generators and attention networks and 4e-4 for the discriminators (the seed paper's section 4.4; constant,
then linear decay to zero over the second half, as in the CycleGAN reference); image pools of 50 that keep each
fake together with its attention map (pooled as a two-channel image).

One stage by default, as the seed paper trains ("learning only the mask part was not performed"): every network
learns throughout. The attention-GAN reference code's two stages are an option: with ``attention_freeze_fraction``
below 1 (its 0.3: epoch 30 of 100) the attention networks are frozen after that fraction of the steps, and
both discriminators see only attended regions: a fake is multiplied by ``[A(source) >= 0.1]`` (its source's
thresholded attention, pooled with it), a real image by ``[A(real) >= 0.1]`` from the attention network that
reads its domain; only the generators (and the discriminators, as adversaries) still learn. The composition itself keeps the continuous attention.

``attention_warmup_steps`` (0: the papers) holds both attentions at 1 for the first steps: the translators
learn as a plain CycleGAN (and twice as fast, the attention networks are not run), then the attention starts
from its initialisation and learns where to let the learnt change through. Without it, light translators that
start at the identity lose their attention in 3D before they change anything (mean attention 0.54 -> 0.004
within 100 steps, docs/results.md): a closed attention passes neither the translator's change nor its gradient.

Inference (abnormal -> normal): counterfactual ``x_hat``, attribution ``x_hat - x`` (= ``A(x) * (G(x) - x)``,
the masked translation difference), extra ``attention`` = ``A(x)`` (kind "probability", in [0, 1]).
"""

from __future__ import annotations

import torch
from torch import nn

from ..method_options import OptionSpec
from ..networks import ImagePool, PatchGANDiscriminator, ResNetGenerator, init_normal_weights, linear_decay_schedule
from ..networks.attention import AttentionNetwork
from ..networks.change_generator import ChangeGenerator
from .base import AttributionResult, Method, TrainingContext
from .losses import AdversarialLoss
from .shared_specs import (adam_beta, cycle_weight, decay_start_fraction, image_pool, learning_rate, patchgan_specs, resnet_generator_specs,
                           unet_generator_specs, weight_average)


def compose(x: torch.Tensor, translated: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Attention-weighted blend: the translation where attended, the input elsewhere."""
    return attention * translated + (1.0 - attention) * x


class AttentionCycleGAN(Method):
    name = "agcyclegan"
    title = "Attention-guided CycleGAN"
    outputs = ("counterfactual", "attribution", "mask", "attention")
    inference_networks = ("a2n", "att_a2n")
    map_description = (
        "counterfactual minus input = A(x) * (G(x) - x): attention-masked abnormal-to-normal translation difference"
    )
    default_config = {
        "ngf": 64,
        "n_blocks": 9,
        "n_downsampling": 2,
        "ndf": 64,
        "n_layers_d": 3,
        "attention_channels": [32, 64],
        "gan_loss": "hinge",
        "lambda_cycle": 10.0,
        "lr": 1e-4,
        "lr_d": 4e-4,
        "beta1": 0.5,
        "beta2": 0.9,
        "decay_start_fraction": 0.5,
        "pool_size": 50,
        "attention_freeze_fraction": 1.0,
        "attention_threshold": 0.1,
        "attention_warmup_steps": 0,
        "generator": "resnet",
        "unet_channels": [8, 16, 32, 64],
        "unet_head_init_std": 1e-3,
        "unet_upsample": "transposed",
        "unet_activation": "relu",
        "ema_decay": 0.0,
    }
    config_specs = (
        *resnet_generator_specs(),
        *patchgan_specs(),
        OptionSpec(
            "attention_channels", "list", [32, 64],
            tooltip="the attention networks' two widths: their stride-2 down-sampling layers, mirrored by the up-sampling layers",
        ),
        OptionSpec("gan_loss", "choice", "hinge", tooltip="adversarial loss: hinge (SA-GAN) or lsgan (least squares)", choices=("hinge", "lsgan")),
        cycle_weight(),
        learning_rate("lr", 1e-4, "the generators and attention networks"),
        # the seed paper's setting; the reference code's (lr_d 1e-4, beta2 0.999, two stages) scored Dice 40.7
        # against 78.2 on the reduced synthetic data (docs/results.md, synthetic_agcyclegan_schedule.json)
        learning_rate("lr_d", 4e-4, "the discriminators"),
        adam_beta("beta1", 0.5, 1),
        adam_beta("beta2", 0.9, 2),
        decay_start_fraction(),
        image_pool(),
        OptionSpec(
            "attention_freeze_fraction", "float", 1.0, minimum=0.0, maximum=1.0,
            tooltip="fraction of the steps after which the attention networks are frozen and the discriminators see "
            "only attended regions (1: never, the seed paper's one stage; the reference code: 0.3)",
        ),
        OptionSpec(
            "attention_threshold", "float", 0.1, minimum=0.0, maximum=1.0,
            tooltip="attention at or above this marks the region the discriminators see in the second stage",
        ),
        OptionSpec(
            "attention_warmup_steps", "int", 0, minimum=0,
            tooltip="hold both attentions at 1 for this many first steps, so that the translators learn before the "
            "attention may close (0: the papers)",
        ),
        *unet_generator_specs(),
        weight_average(),
    )
    training_defaults = {"batch_size": 1}

    def __init__(self, spatial_dims: int, config: dict | None = None, training: bool = False):
        super().__init__(spatial_dims, config, training)
        self.adversarial = AdversarialLoss({"hinge": "hinge", "lsgan": "least_squares"}[self.config["gan_loss"]])

    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims

        def generator():
            if c["generator"] == "unet":
                # a translator that starts at the identity (input plus a change): the attention then decides
                # where the change is let through, and untouched voxels carry no reconstruction error
                return ChangeGenerator(
                    dims, c["unet_channels"], "residual", head_init_std=c["unet_head_init_std"], upsample=c["unet_upsample"],
                    activation=c["unet_activation"],
                )
            return init_normal_weights(ResNetGenerator(dims, 1, 1, c["ngf"], c["n_downsampling"], c["n_blocks"]))

        def attention():
            return init_normal_weights(AttentionNetwork(dims, 1, tuple(c["attention_channels"])))

        nets: dict[str, nn.Module] = {"a2n": generator(), "att_a2n": attention()}
        if training:
            nets["n2a"] = generator()
            nets["att_n2a"] = attention()
            nets["d_n"] = init_normal_weights(PatchGANDiscriminator(dims, 1, c["ndf"], c["n_layers_d"]))
            nets["d_a"] = init_normal_weights(PatchGANDiscriminator(dims, 1, c["ndf"], c["n_layers_d"]))
            self.pools = {"normal": ImagePool(c["pool_size"]), "abnormal": ImagePool(c["pool_size"])}
        return nets

    # --- model ----------------------------------------------------------------------------------
    def translate(self, x: torch.Tensor, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, attention) for direction "a2n" or "n2a"."""
        attention = self.networks[f"att_{direction}"](x)
        return compose(x, self.networks[direction](x), attention), attention

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        with torch.no_grad():
            x_hat, attention = self.translate(x, "a2n")
        return AttributionResult(
            attribution=x_hat - x,
            counterfactual=x_hat,
            extras={"attention": attention},
            extra_kinds={"attention": "probability"},
        )

    # --- training -------------------------------------------------------------------------------
    def attention_frozen(self, step: int, total_steps: int) -> bool:
        """True from the switch point on (second stage)."""
        return step >= int(self.config["attention_freeze_fraction"] * total_steps)

    def configure_optimizers(self, total_steps: int):
        c = self.config
        betas = (c["beta1"], c["beta2"])
        schedule = linear_decay_schedule(total_steps, c["decay_start_fraction"])
        gens = [p for n in ("a2n", "n2a", "att_a2n", "att_n2a") for p in self.networks[n].parameters()]
        discs = [p for n in ("d_n", "d_a") for p in self.networks[n].parameters()]
        return {
            "generators": (torch.optim.Adam(gens, lr=c["lr"], betas=betas), schedule),
            "discriminators": (torch.optim.Adam(discs, lr=c["lr_d"], betas=betas), schedule),
        }

    def _discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Hinge: the SA-GAN sum; least squares: halved as in the CycleGAN reference."""
        loss = self.adversarial.real(real_logits) + self.adversarial.fake(fake_logits)
        return 0.5 * loss if self.adversarial.criterion == "least_squares" else loss

    def _region(self, image: torch.Tensor, attention: torch.Tensor, frozen: bool) -> torch.Tensor:
        """What a discriminator sees: the whole image in the first stage, the attended region in the second."""
        if not frozen:
            return image
        return image * (attention >= self.config["attention_threshold"]).to(image.dtype)

    def training_step(self, batch, ctx: TrainingContext):
        x_a, x_n = batch["abnormal"], batch["normal"]
        nets, c = self.networks, self.config
        frozen = self.attention_frozen(ctx.step, ctx.total_steps)
        held_open = ctx.step < c["attention_warmup_steps"]
        for n in ("att_a2n", "att_n2a"):
            nets[n].requires_grad_(not frozen)
            nets[n].held_open.fill_(held_open)  # the weight average copies it with the other buffers

        # Generators (and attention networks in the first stage): fool the discriminators, close both cycles.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(False)
        with ctx.autocast():
            fake_n, att_a = self.translate(x_a, "a2n")
            fake_a, att_n = self.translate(x_n, "n2a")
            rec_a, _ = self.translate(fake_n, "n2a")
            rec_n, _ = self.translate(fake_a, "a2n")
            loss_gan = self.adversarial.generator(nets["d_n"](self._region(fake_n, att_a, frozen))) + self.adversarial.generator(
                nets["d_a"](self._region(fake_a, att_n, frozen))
            )
            loss_cycle = (rec_a - x_a).abs().float().mean() + (rec_n - x_n).abs().float().mean()
            loss_g = loss_gan + c["lambda_cycle"] * loss_cycle
        ctx.optimize("generators", loss_g)

        # Discriminators: reals against pooled fakes; each fake is pooled with its source's attention map.
        for d in ("d_n", "d_a"):
            nets[d].requires_grad_(True)
        dtype = x_a.dtype
        pooled_n = self.pools["normal"].query(torch.cat([fake_n, att_a], 1).detach().float(), ctx.generator).to(dtype)
        pooled_a = self.pools["abnormal"].query(torch.cat([fake_a, att_n], 1).detach().float(), ctx.generator).to(dtype)
        att_a, att_n = att_a.detach(), att_n.detach()
        with ctx.autocast():
            loss_d_n = self._discriminator_loss(
                nets["d_n"](self._region(x_n, att_n, frozen)),
                nets["d_n"](self._region(pooled_n[:, :1], pooled_n[:, 1:], frozen)),
            )
            loss_d_a = self._discriminator_loss(
                nets["d_a"](self._region(x_a, att_a, frozen)),
                nets["d_a"](self._region(pooled_a[:, :1], pooled_a[:, 1:], frozen)),
            )
            loss_d = loss_d_n + loss_d_a
        ctx.optimize("discriminators", loss_d)
        for n in ("att_a2n", "att_n2a"):
            nets[n].requires_grad_(True)
        return {
            "loss_g": loss_g.item(),
            "loss_gan": loss_gan.item(),
            "loss_cycle": loss_cycle.item(),
            "loss_d_n": loss_d_n.item(),
            "loss_d_a": loss_d_a.item(),
            "attention_mean": 0.5 * (att_a.float().mean().item() + att_n.float().mean().item()),
            "attention_frozen": float(frozen),
        }

    def training_state(self) -> dict:
        return {f"pool_{k}": v.state_dict()["images"] for k, v in self.pools.items()}

    def load_training_state(self, state: dict, device) -> None:
        for k, pool in self.pools.items():
            pool.load_state_dict({"images": state[f"pool_{k}"]}, device)
