"""ANT-GAN (the VANT-GAN paper's baseline): plain A2N translation on the shared cycle-consistent core."""

from __future__ import annotations

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
