"""ANT-GAN (the VANT-GAN paper's baseline, Sun et al.): plain abnormal-to-normal CycleGAN translation.

The counterfactual is A2N(x); the signed map is A2N(x) - x (counterfactual minus input).
"""

from __future__ import annotations

import torch

from .cyclegan import CycleTranslationMethod


class ANTGAN(CycleTranslationMethod):
    name = "antgan"
    title = "ANT-GAN"
    normal_generator = "a2n"
    normal_generator_activation = "tanh"
    inference_networks = ("a2n",)
    map_description = "counterfactual minus input = A2N(input) - input"

    def to_normal(self, x: torch.Tensor, coordinates: torch.Tensor | None = None, generator: str = "a2n") -> torch.Tensor:
        return self._generate(generator, x, coordinates)
