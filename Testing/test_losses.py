"""The shared loss terms: each equals the formula the methods wrote by hand before (same values), and the
MONAI criteria that are NOT used differ where the docstring of methods/losses.py says they do."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from monai.losses import PatchAdversarialLoss  # noqa: E402

from CounterfactualVALib.methods.losses import AdversarialLoss, bce_with_logits, gaussian_kl, pair_l1, pair_l2  # noqa: E402


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 1, 6, 6, generator=g) * 3, torch.randn(2, 1, 6, 6, generator=g) * 3


def test_least_squares_is_the_lsgan_objective(logits):
    real, fake = logits
    adv = AdversarialLoss("least_squares")
    assert torch.equal(adv.real(real), (real - 1).pow(2).mean())
    assert torch.equal(adv.fake(fake), fake.pow(2).mean())
    assert torch.equal(adv.generator(fake), (fake - 1).pow(2).mean())
    # the attention CycleGAN's former hand-written discriminator loss, halved
    assert torch.equal(0.5 * (adv.real(real) + adv.fake(fake)), 0.5 * ((real - 1.0).pow(2).mean() + fake.pow(2).mean()))
    # MONAI's default passes negative logits through LeakyReLU(0.05) first: not LSGAN
    monai_default = PatchAdversarialLoss(criterion="least_squares")
    assert not torch.allclose(monai_default(fake, target_is_real=False, for_discriminator=True), adv.fake(fake))


def test_bce_is_the_logit_form_and_monai_bce_saturates(logits):
    real, fake = logits
    adv = AdversarialLoss("bce")
    assert torch.equal(adv.real(real), F.binary_cross_entropy_with_logits(real, torch.ones_like(real)))
    assert torch.equal(adv.fake(fake), F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    assert torch.equal(adv.generator(fake), adv.real(fake))
    assert adv.real(torch.tensor([[2.0]])).item() == pytest.approx(-torch.log(torch.sigmoid(torch.tensor(2.0))).item(), abs=1e-7)
    monai = PatchAdversarialLoss(criterion="bce")
    assert monai(real, target_is_real=True, for_discriminator=True).item() == pytest.approx(adv.real(real).item(), rel=1e-5)
    # a fake the discriminator confidently calls real: the logit form keeps the loss (= the logit) and its
    # gradient; MONAI's sigmoid rounds to 1 in float32, its loss stops at 100 and the gradient vanishes
    wrong = torch.tensor([[40.0]], requires_grad=True)
    ours = adv.fake(wrong)
    ours.backward()
    assert ours.item() == pytest.approx(40.0) and wrong.grad.item() == pytest.approx(1.0)
    wrong.grad = None
    theirs = monai(wrong, target_is_real=False, for_discriminator=True)
    theirs.backward()
    assert theirs.item() == pytest.approx(100.0) and wrong.grad.item() == 0.0
    assert bce_with_logits(torch.zeros(3), 0.5).item() == pytest.approx(0.6931472, abs=1e-6)  # log 2 at the undecided target


def test_hinge_is_the_sagan_objective_not_monais(logits):
    real, fake = logits
    adv = AdversarialLoss("hinge")
    assert torch.equal(adv.real(real) + adv.fake(fake), torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())
    assert torch.equal(adv.generator(fake), -fake.mean())
    monai = PatchAdversarialLoss(criterion="hinge")  # tanh first, and the discriminator form for the generator
    assert monai(fake, target_is_real=True, for_discriminator=False).item() != pytest.approx(adv.generator(fake).item(), abs=1e-3)
    assert monai(real, target_is_real=True, for_discriminator=True).item() == pytest.approx(torch.relu(1 - torch.tanh(real)).mean().item())


def test_unknown_criterion_is_refused():
    with pytest.raises(ValueError, match="least_squares, bce, hinge"):
        AdversarialLoss("wasserstein")


def test_pair_terms_weigh_each_image_of_the_pair_equally():
    a, b = torch.zeros(1, 1, 2, 2), torch.zeros(3, 1, 2, 2)  # different batch sizes: each mean counts once
    ta, tb = torch.full_like(a, 2.0), torch.full_like(b, -4.0)
    assert pair_l1((a, b), (ta, tb)).item() == pytest.approx(0.5 * (2 + 4))
    assert pair_l2((a, b), (ta, tb)).item() == pytest.approx(0.5 * (4 + 16))


def test_gaussian_kl():
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3), per=2).item() == 0.0  # the prior itself
    # mu = 1, var = 1: 0.5 per element; var = e: 0.5 * (e - 2) per element; summed, divided by `per`
    assert gaussian_kl(torch.ones(2, 3), torch.zeros(2, 3), per=2).item() == pytest.approx(6 * 0.5 / 2)
    assert gaussian_kl(torch.zeros(1, 4), torch.ones(1, 4), per=1).item() == pytest.approx(4 * 0.5 * (torch.e - 2))
