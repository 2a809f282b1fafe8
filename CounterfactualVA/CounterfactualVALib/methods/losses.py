"""Loss terms the methods share: the adversarial criteria and the small image and latent terms.

Adversarial terms take raw discriminator outputs (logits, no activation) and are computed in float32:

* ``least_squares`` (LSGAN: CycleGAN, ANT-GAN, VANT-GAN, the attention CycleGAN's ``lsgan``): MONAI's
  ``PatchAdversarialLoss`` with ``no_activation_leastsq=True`` ((D - 1)^2 for real, D^2 for fake; without that
  flag MONAI passes D through a LeakyReLU(0.05) first, which is not the LSGAN objective).
* ``bce`` (ICAM, medXGAN): binary cross-entropy on the logits. Not MONAI's ``bce`` criterion: that applies a
  sigmoid and then ``BCELoss``, which saturates (the loss stops at 100 and the gradient vanishes once a logit
  passes about 17 in float32) and raises under CUDA autocast; here the log-sum-exp form keeps both.
* ``hinge`` (the attention CycleGAN, after SA-GAN): relu(1 - D) for real, relu(1 + D) for fake, -D for the
  generator. Not MONAI's ``hinge`` criterion: that passes D through tanh and uses the discriminator's form for the
  generator. Testing/test_losses.py shows both differences numerically.

Every term is a mean over its elements (the discriminator's patch outputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CRITERIA = ("least_squares", "bce", "hinge")


def bce_with_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logits) against a constant target probability (1 real, 0 fake, 0.5 undecided)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class AdversarialLoss:
    """One adversarial criterion: :meth:`real` and :meth:`fake` are the discriminator's terms (the method
    decides how to weight their sum), :meth:`generator` the generator's term for its fakes."""

    def __init__(self, criterion: str):
        if criterion not in CRITERIA:
            raise ValueError(f"adversarial criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
        self.criterion = criterion
        if criterion == "least_squares":
            # imported here, not with the module: methods build their losses only for training, and importing
            # MONAI loads its whole package (seconds a `counterfactualva attribute` run should not wait for)
            from monai.losses import PatchAdversarialLoss

            self._patch_loss = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)

    def real(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.criterion == "least_squares":
            return self._patch_loss(logits, target_is_real=True, for_discriminator=True)
        if self.criterion == "bce":
            return bce_with_logits(logits, 1.0)
        return torch.relu(1.0 - logits).mean()

    def fake(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.criterion == "least_squares":
            return self._patch_loss(logits, target_is_real=False, for_discriminator=True)
        if self.criterion == "bce":
            return bce_with_logits(logits, 0.0)
        return torch.relu(1.0 + logits).mean()

    def generator(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.criterion == "least_squares":
            return self._patch_loss(logits, target_is_real=True, for_discriminator=False)
        if self.criterion == "bce":
            return bce_with_logits(logits, 1.0)
        return -logits.mean()


def pair_l1(outputs: tuple[torch.Tensor, torch.Tensor], targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean absolute difference of each output from its target, averaged over the pair (each image's mean
    counts equally, whatever the batch sizes)."""
    return 0.5 * sum((o.float() - t.float()).abs().mean() for o, t in zip(outputs, targets))


def pair_l2(outputs: tuple[torch.Tensor, torch.Tensor], targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of each output from its target, averaged over the pair."""
    return 0.5 * sum((o.float() - t.float()).pow(2).mean() for o, t in zip(outputs, targets))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, per: int) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over every element, divided by `per` (e.g. the number of pairs)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum() / per


__all__ = ["CRITERIA", "AdversarialLoss", "bce_with_logits", "gaussian_kl", "pair_l1", "pair_l2"]
