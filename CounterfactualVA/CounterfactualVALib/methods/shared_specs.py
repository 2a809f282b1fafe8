"""Configuration specs of the networks and optimiser settings that several methods share (the CycleGAN ResNet
generator, the PatchGAN discriminator, Adam), so that each key is described once. A method lists them in its
``config_specs`` next to its own; a spec's default must equal the method's ``default_config`` value (checked
by :func:`~CounterfactualVALib.method_options.config_schema`)."""

from __future__ import annotations

from ..method_options import OptionSpec
from ..networks.vagan import MapUNet

#: smallest learning rate accepted: a rate of 0 (or below) would leave the networks untrained without a word
MIN_LR = 1e-8
#: Adam's betas must lie in [0, 1)
MAX_BETA = 0.9999


def learning_rate(name: str, default, what: str, nullable: bool = False) -> OptionSpec:
    return OptionSpec(name, "float", default, tooltip=f"Adam learning rate of {what}", minimum=MIN_LR, maximum=1.0, nullable=nullable)


def adam_beta(name: str, default: float, which: int) -> OptionSpec:
    role = "first-moment (momentum)" if which == 1 else "second-moment"
    return OptionSpec(name, "float", default, tooltip=f"Adam beta{which}, the {role} decay rate", minimum=0.0, maximum=MAX_BETA)


def decay_start_fraction(default: float = 0.5) -> OptionSpec:
    return OptionSpec(
        "decay_start_fraction", "float", default, minimum=0.0, maximum=1.0,
        tooltip="fraction of the steps at constant learning rate; it then falls linearly to zero (1: constant throughout)",
    )


def image_pool(default: int = 50) -> OptionSpec:
    return OptionSpec(
        "pool_size", "int", default, minimum=0, maximum=10_000,
        tooltip="earlier fakes kept per domain; the discriminators see one of them half of the time (0: no pool)",
    )


def resnet_generator_specs() -> tuple[OptionSpec, ...]:
    """The CycleGAN ResNet generator (``networks.ResNetGenerator``)."""
    return (
        OptionSpec("ngf", "int", 64, minimum=1, tooltip="width of the ResNet generators' first layer, doubled at each down-sampling"),
        OptionSpec("n_blocks", "int", 9, minimum=0, maximum=100, tooltip="residual blocks at the ResNet generators' bottleneck (paper: 9)"),
        OptionSpec(
            "n_downsampling", "int", 2, minimum=0, maximum=8,
            tooltip="stride-2 down-samplings (and as many up-samplings) of the ResNet generators; grid sides must divide by 2**n",
        ),
    )


def patchgan_specs() -> tuple[OptionSpec, ...]:
    """The PatchGAN discriminators (``networks.PatchGANDiscriminator``)."""
    return (
        OptionSpec("ndf", "int", 64, minimum=1, tooltip="width of the PatchGAN discriminators' first layer, doubled per layer"),
        OptionSpec(
            "n_layers_d", "int", 3, minimum=1, maximum=8,
            tooltip="stride-2 layers of the PatchGAN discriminators (3: 70-voxel patches); each halves the grid, keep it above 1 voxel",
        ),
    )


def cycle_weight(default: float = 10.0) -> OptionSpec:
    return OptionSpec("lambda_cycle", "float", default, minimum=0.0, tooltip="weight of the cycle-consistency L1 loss, per direction")


def unet_upsample(default: str = "transposed", which: str = "U-Net generators'") -> OptionSpec:
    """How a ``networks.MapUNet`` decoder goes up a level."""
    return OptionSpec(
        "unet_upsample", "choice", default, choices=MapUNet.UPSAMPLING,
        tooltip=f"{which} decoder upsampling: transposed (stride-2 transposed convolutions; prints a 2x2 "
        "checkerboard into short-trained maps) or linear (1x1 convolution at the coarse level, then interpolation; cheaper)",
    )


def unet_activation(default: str = "relu", which: str = "U-Net generators'") -> OptionSpec:
    """The activation of a ``networks.MapUNet``."""
    return OptionSpec(
        "unet_activation", "choice", default, choices=tuple(MapUNet.ACTIVATIONS),
        tooltip=f"{which} activation: relu, or leaky_relu (slope 0.2), which keeps a narrow U-Net "
        "from losing a level to units that output zero everywhere (a 3D CPU training collapsed to a constant map: docs/design.md)",
    )


def unet_generator_specs(channels_default=(8, 16, 32, 64)) -> tuple[OptionSpec, ...]:
    """The choice between the papers' ResNet generators and light U-Nets (``networks.ChangeGenerator``)."""
    return (
        OptionSpec("generator", "choice", "resnet", choices=("resnet", "unet"),
                   tooltip="resnet: the papers' generators; unet: light change-predicting U-Nets (CPU budgets, patch training)"),
        OptionSpec("unet_channels", "list", list(channels_default),
                   tooltip="U-Net generators' widths, one level per entry (at least 2), each level halves the grid (generator=unet only)"),
        OptionSpec("unet_head_init_std", "float", 1e-3, minimum=0.0, maximum=1.0,
                   tooltip="std of the U-Net generators' last layer at initialisation: near 0 starts training at the identity"),
        unet_upsample(),
        unet_activation(),
    )


def weight_average(default: float = 0.0) -> OptionSpec:
    """``ema_decay``: the base class keeps the averages, the training loop updates them (``Method.update_averages``)."""
    return OptionSpec(
        "ema_decay", "float", default, minimum=0.0, maximum=0.9999,
        tooltip="keep an exponential moving average of the inference networks' weights with this decay and "
        "validate/export it (0: off, the papers; 0.995 in the 3D CPU configurations, where it narrowed VANT-GAN's seeds' spread: docs/design.md)",
    )
