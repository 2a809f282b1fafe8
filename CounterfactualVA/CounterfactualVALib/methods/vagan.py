"""VA-GAN (Baumgartner et al., CVPR 2018: visual feature attribution using Wasserstein GANs).

A map generator M (U-Net, 16/32/64/128 channels, batch norm, ReLU) turns an abnormal image x into a healthy
looking counterfactual y; a critic (C3D-like, no normalisation, global average pool) is trained with WGAN-GP
to tell y from real normal images. The generator minimises ``-critic(y) + lambda * mean|y - x|``, so the change
stays small and local: the signed map ``y - x`` is the attribution.

The L1 weight follows the grid. The papers' weight, 100, multiplies a per-voxel *mean* at the public
configurations' grids (synthetic 112 x 112; ADNI 128 x 160 x 112), while the gradient-penalised critic is
1-Lipschitz in the image's L2 norm: removing an effect that covers n voxels gains the critic at most
``a * sqrt(n)`` and costs ``lambda * a * n / N``, so a voxel moves only where its critic gradient exceeds
``lambda / N``. With the effect a fixed fraction of the grid, that balance holds on any grid only if
``lambda = lambda_l1 * sqrt(N / N_paper)`` (``l1_reference_voxels`` = N_paper; 0 turns the scaling off). Left
at 100 on a 32 x 32 grid the generator removed 0.1 % of the planted effect (docs/results.md, VA-GAN ablation).

Counterfactual (config ``"counterfactual"``):

* ``"additive"`` (default): ``y = x + M(x)``, the design table's form; the attribution is exactly ``M(x)``.
* ``"tanh"``: ``y = tanh(x + M(x))``, the public code's form. With inputs min-max scaled to [-1, 1] it is a
  poor fit: ``tanh(x) != x``, so even "no change" needs ``M = artanh(x) - x``, which is unbounded at the +-1
  voxels every min-max image has; the L1 term then fights the background. Offered for comparison only.

Either way the attribution is ``y - x`` (counterfactual minus input) and the L1 penalty is on ``y - x``.

Healthy identity (config ``"healthy_identity"``, 0 by default: the paper trains M on abnormal images only):
adds ``healthy_identity * lambda * mean|y(x_normal) - x_normal|``, the same L1 on the change of a *normal* image,
whose counterfactual is itself. The L1 on abnormal images alone keeps the change small but not specific: a
change to anatomy that every subject has (a ventricle or a head shape the critic likes) costs the same as the
disease's removal. Asking normal subjects to stay unchanged makes such a change pay twice, so what M learns to
change is what abnormal subjects have and normal ones lack (VANT-GAN's identity loss plays this part).

Training (reference-notes "VA-GAN"): WGAN-GP with penalty weight 10 on random interpolates between real normal
images and y, the gradient norm taken over *all* non-batch axes (the public code sums one axis only); Adam with
betas (0.0, 0.9), lr 1e-3 for 3D and 1e-4 for 2D unless ``"lr"`` is set; 5 critic updates per generator update,
100 for the first 25 generator updates and for every 100th. Each critic update draws a fresh batch through
``ctx.sample_batch()``; the generator update uses the step's own batch. Abnormal images are the generator's
input; normal images are the critic's "real" class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..networks.vagan import C3DCritic, MapUNet
from ..method_options import OptionSpec
from .base import AttributionResult, Method, TrainingContext
from .shared_specs import adam_beta, learning_rate, unet_activation, unet_upsample, weight_average


def critic_gradient_norm(critic: nn.Module, points: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Per-sample L2 norm of d critic / d input over every non-batch axis (channels and all spatial axes).

    The critic's scores are summed over the batch before differentiating; since each score depends on its
    own sample only, the gradient's sample ``i`` is the gradient of score ``i``. A tiny constant under the
    square root keeps the penalty's own gradient finite where the gradient vanishes.
    """
    points = points.detach().requires_grad_(True)
    scores = critic(points)
    (grad,) = torch.autograd.grad(scores.sum(), points, create_graph=create_graph)
    return grad.flatten(1).pow(2).sum(dim=1).add(1e-12).sqrt()


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor, weight: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """WGAN-GP: ``weight * mean((||grad critic(alpha * real + (1 - alpha) * fake)|| - 1)^2)``.

    ``alpha`` has shape (batch, 1, ..., 1). Returns the penalty and the per-sample gradient norms.
    """
    points = alpha * real.detach() + (1.0 - alpha) * fake.detach()
    norms = critic_gradient_norm(critic, points)
    return weight * (norms - 1.0).pow(2).mean(), norms


# Grids of the public VA-GAN configurations, where its L1 weight of 100 was chosen (synthetic; ADNI at 1.3 mm)
PAPER_GRID_VOXELS = {2: 112 * 112, 3: 128 * 160 * 112}


class VAGAN(Method):
    name = "vagan"
    title = "VA-GAN"
    outputs = ("counterfactual", "attribution", "mask")
    inference_networks = ("generator",)
    map_description = "counterfactual minus input = y - x, y = x + M(x) (VA-GAN map generator M)"
    default_config = {
        "channels": [16, 32, 64, 128],
        "critic_channels": [16, 32, 64, 128, 256],
        "critic_convs_per_stage": [1, 1, 2, 2, 3],
        "critic_negative_slope": 0.0,
        "counterfactual": "additive",
        "lr": None,  # None: 1e-3 for 3D, 1e-4 for 2D (the public configurations)
        "beta1": 0.0,
        "beta2": 0.9,
        "lambda_gp": 10.0,
        "lambda_l1": 100.0,  # at the paper's grid: scaled by sqrt(grid voxels / l1_reference_voxels)
        "l1_reference_voxels": None,  # None: the paper's grid (2D 112 x 112, 3D 128 x 160 x 112); 0: no scaling
        "critic_iters": 5,
        "critic_iters_warmup": 100,
        "warmup_generator_steps": 25,
        "warmup_every": 100,
        "generator_norm": "batch",
        "unet_upsample": "transposed",
        "unet_activation": "relu",
        "healthy_identity": 0.0,
        "ema_decay": 0.0,
    }
    config_specs = (
        OptionSpec("channels", "list", [16, 32, 64, 128],
                   tooltip="the map generator U-Net's widths, one level per entry (at least 2), each level halves the grid"),
        OptionSpec("critic_channels", "list", [16, 32, 64, 128, 256],
                   tooltip="the critic's width per stage; every stage after the first starts with a 2x max-pool"),
        OptionSpec("critic_convs_per_stage", "list", [1, 1, 2, 2, 3],
                   tooltip="3x3 convolutions per critic stage, one entry per critic_channels entry"),
        OptionSpec("critic_negative_slope", "float", 0.0, minimum=0.0, maximum=1.0,
                   tooltip="negative slope of the critic's leaky ReLUs (0: plain ReLU, the public code)"),
        OptionSpec("counterfactual", "choice", "additive", choices=("additive", "tanh"),
                   tooltip="additive: y = x + M(x) (the map is M(x)); tanh: y = tanh(x + M(x)) (the public code; a poor fit to [-1, 1] inputs)"),
        learning_rate("lr", None, "the generator and the critic (none: 1e-3 in 3D, 1e-4 in 2D, the public configurations)", nullable=True),
        adam_beta("beta1", 0.0, 1),
        adam_beta("beta2", 0.9, 2),
        OptionSpec("lambda_gp", "float", 10.0, minimum=0.0, tooltip="weight of the WGAN-GP gradient penalty on the critic"),
        OptionSpec("lambda_l1", "float", 100.0, minimum=0.0,
                   tooltip="weight of the L1 penalty on the map at the paper's grid; scaled by sqrt(grid voxels / l1_reference_voxels)"),
        OptionSpec("l1_reference_voxels", "int", None, minimum=0, nullable=True,
                   tooltip="voxel count at which lambda_l1 applies unscaled (none: the paper's grid, 112^2 or 128x160x112; 0: no scaling)"),
        OptionSpec("critic_iters", "int", 5, minimum=0, maximum=1000, tooltip="critic updates before each generator update"),
        OptionSpec("critic_iters_warmup", "int", 100, minimum=0, maximum=10_000,
                   tooltip="critic updates before the first warmup_generator_steps generator updates and every warmup_every-th"),
        OptionSpec("warmup_generator_steps", "int", 25, minimum=0, tooltip="generator updates that get critic_iters_warmup critic updates first"),
        OptionSpec("warmup_every", "int", 100, minimum=0, tooltip="every this many generator updates the critic gets critic_iters_warmup updates again (0: never)"),
        OptionSpec("generator_norm", "choice", "batch", choices=("batch", "none"),
                   tooltip="the map generator's normalisation: batch (the paper's), or none; with the small batches of a CPU "
                   "budget, batch statistics differ between training and inference, so the map of an unchanged image is not zero"),
        unet_upsample("transposed", "the map generator's"),
        unet_activation("relu", "the map generator's"),
        OptionSpec("healthy_identity", "float", 0.0, minimum=0.0,
                   tooltip="weight, as a multiple of the L1 weight, of an L1 penalty on the change of normal images "
                   "(their counterfactual is themselves; 0: off, the paper's loss)"),
        weight_average(),
    )
    # The public 3D configuration: batch 2 with 6 accumulated gradients (effective 12); 2D synthetic used 32.
    training_defaults = {"batch_size": 12}

    def __init__(self, spatial_dims: int, config: dict | None = None, training: bool = False):
        super().__init__(spatial_dims, config, training)
        if self.config["lr"] is None:
            self.config["lr"] = 1e-3 if spatial_dims == 3 else 1e-4
        if self.config["counterfactual"] == "tanh":
            self.map_description = "counterfactual minus input = y - x, y = tanh(x + M(x)) (VA-GAN map generator M)"

    def build_networks(self, training: bool):
        c, dims = self.config, self.spatial_dims
        norm = "BATCH" if c["generator_norm"] == "batch" else None
        nets: dict[str, nn.Module] = {"generator": MapUNet(
            dims, 1, 1, tuple(c["channels"]), norm=norm, upsample=c["unet_upsample"], activation=c["unet_activation"]
        )}
        if training:
            nets["critic"] = C3DCritic(
                dims, 1, tuple(c["critic_channels"]), tuple(c["critic_convs_per_stage"]), c["critic_negative_slope"]
            )
        return nets

    # --- model ----------------------------------------------------------------------------------
    def counterfactual(self, x: torch.Tensor) -> torch.Tensor:
        y = x + self.networks["generator"](x)
        return torch.tanh(y) if self.config["counterfactual"] == "tanh" else y

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        with torch.no_grad():
            y = self.counterfactual(x)
        return AttributionResult(attribution=y - x, counterfactual=y)

    # --- training -------------------------------------------------------------------------------
    def l1_weight(self, grid_shape) -> float:
        """The L1 weight on a grid of `grid_shape` voxels: the paper's weight at the paper's grid (module docstring)."""
        reference = self.config["l1_reference_voxels"]
        if reference is None:
            reference = PAPER_GRID_VOXELS[self.spatial_dims]
        if not reference:
            return float(self.config["lambda_l1"])
        return float(self.config["lambda_l1"]) * math.sqrt(math.prod(int(s) for s in grid_shape) / float(reference))

    def critic_iterations(self, step: int) -> int:
        """Critic updates before generator update number `step` (0-based)."""
        c = self.config
        every = c["warmup_every"]
        if step < c["warmup_generator_steps"] or (every and step % every == 0):
            return int(c["critic_iters_warmup"])
        return int(c["critic_iters"])

    def configure_optimizers(self, total_steps: int):
        c = self.config
        betas = (c["beta1"], c["beta2"])
        return {
            "generator": (torch.optim.Adam(self.networks["generator"].parameters(), lr=c["lr"], betas=betas), None),
            "critic": (torch.optim.Adam(self.networks["critic"].parameters(), lr=c["lr"], betas=betas), None),
        }

    def _critic_update(self, batch: dict[str, torch.Tensor], ctx: TrainingContext) -> tuple[float, float, float]:
        critic = self.networks["critic"]
        real, x = batch["normal"], batch["abnormal"]
        with torch.no_grad(), ctx.autocast():
            fake = self.counterfactual(x)
        with ctx.autocast():
            wasserstein = critic(real).float().mean() - critic(fake).float().mean()
        # The penalty's double backward runs in float32 whatever the autocast setting.
        n = min(real.shape[0], fake.shape[0])
        alpha = ctx.rand(n, *([1] * (real.dim() - 1))).to(real.dtype)
        penalty, norms = gradient_penalty(critic, real[:n].float(), fake[:n].float(), alpha.float(), self.config["lambda_gp"])
        ctx.optimize("critic", -wasserstein + penalty)
        return wasserstein.item(), penalty.item(), norms.mean().item()

    def training_step(self, batch, ctx: TrainingContext):
        nets, c = self.networks, self.config
        critic = nets["critic"]

        # Critic: several updates, each on a fresh batch, against the current (fixed) generator.
        n_critic = self.critic_iterations(ctx.step)
        nets["generator"].requires_grad_(False)
        logs = []
        for _ in range(n_critic):
            critic_batch = ctx.sample_batch() if ctx.sample_batch is not None else batch
            logs.append(self._critic_update(critic_batch, ctx))
        nets["generator"].requires_grad_(True)

        # Generator: look normal to the critic while changing the input as little as possible.
        critic.requires_grad_(False)
        x = batch["abnormal"]
        with ctx.autocast():
            y = self.counterfactual(x)
            loss_adv = -critic(y).float().mean()
            loss_l1 = (y - x).abs().float().mean()
            lambda_l1 = self.l1_weight(x.shape[2:])
            loss_g = loss_adv + lambda_l1 * loss_l1
            loss_identity = x.new_zeros(())
            if c["healthy_identity"] > 0:  # one generator pass saved when off
                x_n = batch["normal"]
                loss_identity = (self.counterfactual(x_n) - x_n).abs().float().mean()
                loss_g = loss_g + c["healthy_identity"] * lambda_l1 * loss_identity
        ctx.optimize("generator", loss_g)
        critic.requires_grad_(True)

        wasserstein, penalty, grad_norm = logs[-1] if logs else (float("nan"),) * 3
        return {
            "loss_g": loss_g.item(),
            "loss_adv": loss_adv.item(),
            "loss_l1": loss_l1.item(),
            "loss_identity": loss_identity.item(),
            "lambda_l1": lambda_l1,
            "loss_critic": penalty - wasserstein,
            "wasserstein": wasserstein,
            "gradient_penalty": penalty,
            "critic_grad_norm": grad_norm,
            "critic_iters": float(n_critic),
        }
