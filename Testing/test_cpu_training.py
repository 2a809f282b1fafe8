"""3D training on a CPU budget: patches at matching positions, the change-predicting U-Net generators,
the time budget, and the varied phantom recipe."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from CounterfactualVALib.methods import TrainingContext, create_method
from CounterfactualVATrainingLib.data import CohortTensors, UnpairedSampler, step_generator
from CounterfactualVATrainingLib.loop import CHECKPOINT_NAME, MODEL_NAME, TrainingConfig, train

PRE_2D = {"spatial_dims": 2, "size": [32, 32], "spacing": [1.0, 1.0], "crop": "image", "intensity": "minmax"}
UNET = {"generator": "unet", "unet_channels": [4, 8], "ndf": 4, "n_layers_d": 2}


def _cohort(n=6, shape=(20, 24, 16)):
    images = torch.arange(n * int(np.prod(shape)), dtype=torch.float32).reshape(n, 1, *shape)
    labels = torch.tensor([0, 1] * (n // 2))
    return CohortTensors(images, labels, images.clone() + 0.5, torch.ones(n, dtype=torch.bool), [f"s{i}" for i in range(n)])


def test_patches_are_cropped_at_the_same_position_in_both_classes():
    cohort = _cohort()
    sampler = UnpairedSampler(cohort, batch_size=3, patch_size=(8, 8, 8))
    batch = sampler.batch(step_generator(0, 5), torch.device("cpu"))
    assert batch["normal"].shape == batch["abnormal"].shape == batch["abnormal_mask"].shape == (3, 1, 8, 8, 8)
    volume = int(np.prod(cohort.images.shape[2:]))
    for normal, abnormal, mask in zip(batch["normal"], batch["abnormal"], batch["abnormal_mask"]):
        # images hold arange values: the offset within its volume gives each patch's position
        assert torch.equal(normal % volume, abnormal % volume), "the two classes' patches come from different positions"
        assert torch.equal(mask, abnormal + 0.5), "the mask patch is not the abnormal image's"
    again = sampler.batch(step_generator(0, 5), torch.device("cpu"))
    assert torch.equal(again["normal"], batch["normal"]), "a step's patches must not depend on anything but (seed, step)"


def test_patch_larger_than_the_grid_is_refused():
    with pytest.raises(ValueError, match="does not fit the model grid"):
        UnpairedSampler(_cohort(), 1, patch_size=(8, 8, 32))


def test_unet_generators_start_at_the_identity_and_learn():
    method = create_method("vantgan", 3, UNET, training=True)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert method.networks["a2m"](x).abs().max() < 0.05, "the map must start near zero"
        assert (method.networks["n2a"](x) - x).abs().max() < 0.05, "N2A must start near the identity"
    optimizers = {k: v[0] for k, v in method.configure_optimizers(10).items()}
    ctx = TrainingContext(torch.device("cpu"), optimizers)
    before = {k: [p.detach().clone() for p in v.parameters()] for k, v in method.networks.items()}
    losses = method.training_step({"normal": x[:1], "abnormal": x[1:]}, ctx)
    assert all(np.isfinite(v) for v in losses.values())
    for name, net in method.networks.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), f"{name} did not change"
    assert method.supports_patches
    assert not create_method("vantgan", 3, {"ngf": 4, "n_blocks": 1}).supports_patches  # instance norm: no patches


def test_patch_training_is_refused_for_whole_image_networks(synthetic_2d, tmp_path):
    config = TrainingConfig(method="vantgan", data=str(synthetic_2d), out=str(tmp_path / "run"), preprocessing=PRE_2D,
                            method_config={"ngf": 4, "n_blocks": 1, "ndf": 4}, steps=2, patch_size=[16, 16], command="pytest")
    with pytest.raises(ValueError, match="cannot train on patches"):
        train(config)


def test_time_budget_stops_with_a_validated_model_and_logs_elapsed_time(synthetic_2d, tmp_path):
    out = tmp_path / "run"
    config = TrainingConfig(method="vantgan", data=str(synthetic_2d), out=str(out), preprocessing=PRE_2D, method_config=UNET,
                            steps=100_000, val_every=5, checkpoint_every=5, patch_size=[16, 16],
                            time_budget_minutes=0.05, command="pytest")
    assert train(config) == out / MODEL_NAME
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    steps = int(rows[-1]["step"])
    assert 1 <= steps < 100_000, "the budget did not stop the run"
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed) and 3.0 <= elapsed[-1] < 60.0, elapsed[-1]
    assert all(float(r["step_seconds"]) <= float(r["elapsed_seconds"]) for r in rows)
    state = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert int(state["step"]) == steps and float(state["elapsed_s"]) == pytest.approx(elapsed[-1], rel=0.05)
    from CounterfactualVALib.checkpoint import read_metadata

    training = read_metadata(out / MODEL_NAME).training
    assert training["time_budget_minutes"] == 0.05 and training["selected_step"] is not None


def test_varied_phantom_recipe_varies_sites_strengths_and_anatomy(tmp_path):
    from CounterfactualVAResearch.data.phantom import REGIONS, generate_phantom_cohort

    csv_path = generate_phantom_cohort(tmp_path / "varied", n_subjects=12, spacing_mm=8.0, seed=3, recipe="varied")
    parameters = json.loads((tmp_path / "varied" / "phantom_parameters.json").read_text())
    abnormal = [s for s in parameters["subjects"] if s["label"] == 1]
    site_sets = {tuple(sorted(s["effect_strength"])) for s in abnormal}
    assert len(site_sets) > 1, "every abnormal subject has the same atrophy sites"
    assert all(set(s["effect_strength"]) <= set(REGIONS) and s["effect_strength"] for s in abnormal)
    assert len({round(s["deformation_mm"], 3) for s in parameters["subjects"]}) == 12
    assert len({tuple(s["head_scale_xyz"]) for s in parameters["subjects"]}) == 12
    # the ground truth is still the subject minus its own healthy render, zero where no site was planted
    import SimpleITK as sitk

    subject = abnormal[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "varied" / subject["image"])))
    healthy = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "varied" / subject["counterpart"])))
    diff = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "varied" / subject["diff"])))
    assert np.allclose(image - healthy, diff, atol=1e-4) and diff.min() < -1.0 and diff.max() <= 1e-4
    assert csv_path.exists()


def test_fixed_recipe_is_unchanged_by_the_variation_streams(tmp_path):
    """Cohorts made before the varied recipe existed must come out bit-identical (shipped samples, old results)."""
    from CounterfactualVAResearch.data.phantom import generate_phantom_cohort

    generate_phantom_cohort(tmp_path / "a", n_subjects=2, spacing_mm=8.0, seed=9)
    parameters = json.loads((tmp_path / "a" / "phantom_parameters.json").read_text())
    assert all(s["deformation_mm"] == 2.0 and s["head_scale_xyz"] == [1.0, 1.0, 1.0] for s in parameters["subjects"])
    abnormal = [s for s in parameters["subjects"] if s["label"] == 1]
    assert all(set(s["effect_strength"]) == {"hippocampus_left", "hippocampus_right", "ventricles"} for s in abnormal)


def test_position_channels_give_a_patch_the_coordinates_it_has_in_the_whole_grid():
    from CounterfactualVALib.networks.position import grid_coordinates

    cohort = _cohort()
    sampler = UnpairedSampler(cohort, batch_size=2, patch_size=(8, 8, 8))
    batch = sampler.batch(step_generator(3, 1), torch.device("cpu"))
    whole = grid_coordinates(tuple(cohort.images.shape[2:]))
    volume = int(np.prod(cohort.images.shape[2:]))
    for abnormal, coords in zip(batch["abnormal"], batch["coords"]):
        z, y, x = np.unravel_index(int(abnormal[0, 0, 0, 0]) % volume, cohort.images.shape[2:])
        assert torch.equal(coords, whole[:, z : z + 8, y : y + 8, x : x + 8])
    assert whole[0, 0, 0, 0] == -1 and whole[0, -1, 0, 0] == 1 and whole[2, 0, 0, -1] == 1


def test_position_channels_make_the_map_depend_on_where_a_voxel_is():
    """Two identical patches at different places get different maps once the map generator has position
    channels (and the same map without them): the generator can learn what is normal at a place."""
    torch.manual_seed(0)
    with_position = create_method("vantgan", 3, {**UNET, "position_channels": True}, training=True)
    without = create_method("vantgan", 3, UNET, training=True)
    for method in (with_position, without):
        for p in method.networks["a2m"].parameters():  # a random map head, so the map is not ~0
            torch.nn.init.normal_(p, 0.0, 0.3)
    from CounterfactualVALib.networks.position import grid_coordinates

    x = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    whole = grid_coordinates((16, 16, 16))
    here, there = whole[None, :, :8, :8, :8], whole[None, :, 8:, 8:, 8:]
    with torch.no_grad():
        assert not torch.allclose(with_position._generate("a2m", x, here), with_position._generate("a2m", x, there))
        assert torch.equal(without._generate("a2m", x, here), without._generate("a2m", x, there))
    with pytest.raises(ValueError, match="position_channels needs generator=unet"):
        create_method("vantgan", 3, {"ngf": 4, "n_blocks": 1, "position_channels": True})


def test_antgan_unet_translator_is_plain_not_residual():
    """ANT-GAN is the baseline VANT-GAN improves on: with U-Nets its A2N still makes a whole image (starting
    grey), while VANT-GAN's map generator starts at the zero map; the cycle's N2A starts at the identity."""
    antgan = create_method("antgan", 3, UNET, training=True)
    vantgan = create_method("vantgan", 3, UNET, training=True)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert antgan.networks["a2n"](x).abs().max() < 0.05  # grey, far from x
        assert (x.abs().mean() > 0.3) and ((antgan.to_normal(x) - x).abs().mean() > 0.3)
        assert (vantgan.to_normal(x) - x).abs().max() < 0.05
        assert (antgan.networks["n2a"](x) - x).abs().max() < 0.05


def _steps(method, n=3, shape=(16, 16, 16)):
    torch.manual_seed(0)
    x = torch.rand(4, 1, *shape) * 2 - 1
    optimizers = {k: v[0] for k, v in method.configure_optimizers(10).items()}
    ctx = TrainingContext(torch.device("cpu"), optimizers)
    losses = []
    for _ in range(n):
        losses.append(method.training_step({"normal": x[:2], "abnormal": x[2:]}, ctx))
        method.update_averages()  # what the training loop does after every step
    return losses, optimizers


def test_weight_average_is_what_validation_and_the_model_file_use():
    method = create_method("vantgan", 3, {**UNET, "ema_decay": 0.5}, training=True)
    _steps(method)
    live, average = method.networks["a2m"], method.networks["a2m_ema"]
    assert not any(p.requires_grad for p in average.parameters()), "the average must never be optimised"
    exported = method.inference_state_dict()
    assert set(exported) == {f"a2m.{k}" for k in live.state_dict()}, "the model file keeps the generator's own names"
    for key, value in average.state_dict().items():
        assert torch.equal(exported[f"a2m.{key}"], value)
    assert any(not torch.equal(a, b) for a, b in zip(average.parameters(), live.parameters()))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad(), method.averaged_weights():
        assert torch.allclose(method.attribute(x).attribution, average(x)), "validation must score the average"
    with torch.no_grad():
        assert torch.allclose(method.attribute(x).attribution, live(x)), "training goes on with the live weights"
    # a model loaded for inference has no average: the exported weights are its generator
    inference = create_method("vantgan", 3, {**UNET, "ema_decay": 0.5})
    inference.load_inference_state_dict(exported)
    with torch.no_grad():
        assert torch.allclose(inference.attribute(x).attribution, average(x))
    assert "a2m_ema" not in create_method("vantgan", 3, UNET, training=True).networks


def test_discriminator_position_channels_reach_the_discriminators_only():
    method = create_method("vantgan", 3, {**UNET, "discriminator_position_channels": True}, training=True)
    first_conv = lambda net: next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))  # noqa: E731
    assert first_conv(method.networks["d_n"]).in_channels == 4 and first_conv(method.networks["d_a"]).in_channels == 4
    assert first_conv(method.networks["a2m"]).in_channels == 1 and first_conv(method.networks["n2a"]).in_channels == 1
    losses, _ = _steps(method, n=1)
    assert all(np.isfinite(v) for v in losses[0].values())


def test_change_penalty_and_discriminator_learning_rate_ratio():
    method = create_method("vantgan", 3, {**UNET, "lambda_change": 2.0, "lr_d_ratio": 4.0, "lr": 1e-4}, training=True)
    losses, optimizers = _steps(method, n=2)
    assert losses[-1]["loss_change"] > 0
    assert optimizers["discriminators"].param_groups[0]["lr"] == pytest.approx(4e-4)
    assert optimizers["generators"].param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_d_ratio"):
        create_method("vantgan", 3, {**UNET, "lr_d_ratio": 0.0})


@pytest.mark.parametrize("method_name, config", [
    ("vagan", {"channels": [4, 8], "critic_channels": [4, 8], "critic_convs_per_stage": [1, 1], "critic_iters": 1, "critic_iters_warmup": 1}),
    ("agcyclegan", {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2, "attention_channels": [4, 8], "pool_size": 2, "lr": 0.01}),
    ("icam", {"content_channels": [4, 8], "content_res_blocks": 1, "attribute_channels": [4, 8], "generator_code_channels": 4,
              "generator_res_blocks": 1, "dis_channels": 4, "dis_layers": 2, "dis_max_channels": 8, "content_dis_channels": 4,
              "content_dis_layers": 1, "lr": 0.01}),
])
def test_every_method_can_train_with_a_weight_average_that_the_loop_validates_and_exports(synthetic_2d, tmp_path, method_name, config):
    """ema_decay is one mechanism for all methods: the loop updates the average after every step, validates
    it and writes it to the model file, while the checkpoint keeps both (so resume stays exact). At decay 1e-4
    the average follows the live weights within 1e-4 of each step's change: it must have been updated at every step
    (an average left at the initial weights fails), and the model file must hold it."""
    from CounterfactualVALib.checkpoint import load_model_file
    from CounterfactualVATrainingLib.loop import TrainingConfig, train

    model = train(TrainingConfig(
        method=method_name, data=str(synthetic_2d), out=str(tmp_path / "run"),
        preprocessing={"spatial_dims": 2, "size": [16, 16], "spacing": [2.0, 2.0], "crop": "image", "intensity": "minmax"},
        method_config={**config, "ema_decay": 1e-4}, steps=3, batch_size=2, val_every=3, checkpoint_every=3, command="pytest ema",
    ))
    _, exported = load_model_file(model)
    networks = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["networks"]
    for name in create_method(method_name, 2, config).inference_networks:
        for key, value in networks[name + "_ema"].items():
            assert torch.equal(exported[f"{name}.{key}"].float(), value.float()), f"{name}.{key} is not the average"
            live = networks[name][key].float()
            assert torch.allclose(value.float(), live, atol=1e-5), f"{name}.{key} not updated"
