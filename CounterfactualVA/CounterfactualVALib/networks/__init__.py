"""Dimension-agnostic networks (`spatial_dims` 2 or 3) shared by the methods."""

from .gan import ImagePool, PatchGANDiscriminator, init_normal_weights, linear_decay_schedule
from .resnet_generator import ResNetGenerator

__all__ = ["ImagePool", "PatchGANDiscriminator", "ResNetGenerator", "init_normal_weights", "linear_decay_schedule"]
