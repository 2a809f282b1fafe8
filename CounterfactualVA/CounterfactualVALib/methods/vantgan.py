"""VANT-GAN (vant-gan.txt, sections 3-4): a map generator A2M trained inside a cycle-consistent GAN.

The counterfactual is x_a + A2M(x_a) (the paper's equations 6-7), so the signed attribution map
(counterfactual minus input) is A2M's output itself. A2M ends in 2 * tanh so that the map can move any
voxel in [-1, 1] to any other. Only A2M is kept for inference.
"""

from __future__ import annotations

import torch

from .base import AttributionResult
from .cyclegan import CycleTranslationMethod


class VANTGAN(CycleTranslationMethod):
    name = "vantgan"
    title = "VANT-GAN"
    normal_generator = "a2m"
    normal_generator_activation = "tanh2"
    inference_networks = ("a2m",)
    map_description = "counterfactual minus input = A2M(input) (VANT-GAN map generator output)"

    def to_normal(self, x: torch.Tensor, coordinates: torch.Tensor | None = None, generator: str = "a2m") -> torch.Tensor:
        return x + self._generate(generator, x, coordinates)

    def attribute(self, x: torch.Tensor, **options) -> AttributionResult:
        with torch.no_grad():
            attribution = self._generate(self.normal_generator, x, None)
        return AttributionResult(attribution=attribution, counterfactual=x + attribution)
