"""ANT-GAN (the VANT-GAN paper's baseline): plain A2N translation on the shared cycle-consistent core."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_method_config

from CounterfactualVALib.methods import TrainingContext, create_method


def test_antgan_step_trains_all_four_networks_and_map_is_translation_minus_input():
    torch.manual_seed(0)
    method = create_method("antgan", 2, tiny_method_config(), training=True)
    assert set(method.networks) == {"a2n", "n2a", "d_n", "d_a"} and method.inference_networks == ("a2n",)
    before = {k: [p.detach().clone() for p in v.parameters()] for k, v in method.networks.items()}
    ctx = TrainingContext(torch.device("cpu"), {k: v[0] for k, v in method.configure_optimizers(10).items()})
    g = torch.Generator().manual_seed(1)
    losses = method.training_step({"normal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1, "abnormal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1}, ctx)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for name, net in method.networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), name
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    result = method.eval().attribute(x)
    assert torch.allclose(result.counterfactual, method.networks["a2n"](x), atol=1e-6)
    assert torch.allclose(result.attribution, result.counterfactual - x, atol=1e-6)
    assert result.counterfactual.abs().max() <= 1.0  # A2N ends in tanh: a valid image


def test_antgan_3d_counterfactual_is_the_translation_and_the_map_its_difference():
    torch.manual_seed(0)
    method = create_method("antgan", 3, tiny_method_config()).eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    result = method.attribute(x)
    assert result.attribution.shape == result.counterfactual.shape == (1, 1, 16, 16, 16)
    with torch.no_grad():
        translated = method.networks["a2n"](x)
    torch.testing.assert_close(result.counterfactual, translated, rtol=0, atol=0)  # ANT-GAN: the A2N output itself
    torch.testing.assert_close(result.attribution, result.counterfactual - x)  # the map: counterfactual minus input
    assert result.counterfactual.abs().max() <= 1.0 and result.attribution.abs().max() > 0  # tanh range; not a zero map
    assert result.attribution.abs().max() <= 2.0


@pytest.mark.parametrize("activation, recovers", [("relu", False), ("leaky_relu", True)])
def test_map_generator_whose_last_level_went_negative_can_only_recover_with_leaky_units(activation, recovers):
    """The collapse seen in a 3D CPU training (the map became one constant value inside the head): once every
    unit of the U-Net's last level is negative everywhere, ReLUs make the map the head's bias alone and pass no
    gradient back, so training can never leave that state; leaky units keep the map tied to the image."""
    torch.manual_seed(0)
    method = create_method(
        "vantgan", 3, {"generator": "unet", "unet_channels": [8, 16], "unet_upsample": "linear", "unet_activation": activation},
        training=True,
    )
    unet = method.networks["a2m"].unet
    last_conv = unet.decoders[-1][-1].conv
    with torch.no_grad():
        last_conv.bias.fill_(-5.0)  # every unit of the last level below zero on every voxel
        unet.head.conv.weight.normal_(0.0, 0.05)
    x = torch.rand(2, 1, 12, 12, 12) * 2 - 1
    amap = method.networks["a2m"](x)
    amap.pow(2).mean().backward()
    first = unet.encoders[0][0].conv.weight.grad
    varies = float(amap.std())
    if recovers:
        assert varies > 1e-5 and float(first.abs().max()) > 1e-6
    else:
        assert varies < 1e-9 and float(first.abs().max()) == 0


def test_relu_stays_the_default_for_model_files_written_before_the_option():
    from CounterfactualVALib.methods.cyclegan import CycleTranslationMethod

    assert CycleTranslationMethod.default_config["unet_activation"] == "relu"
