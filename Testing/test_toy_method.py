"""A method is one file: a toy method defined here alone (registered in this process, no other file touched)
trains with the shared loop, attributes through the inference pipeline with its declared option, and gets
its Slicer options form from the model file's metadata."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "CounterfactualVA") not in sys.path:
    sys.path.insert(0, str(REPO / "CounterfactualVA"))

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from CounterfactualVALib.method_options import OptionSpec, collect_options  # noqa: E402
from CounterfactualVALib.methods import AttributionResult, Method, register_method, unregister_method  # noqa: E402


class ToyShift(Method):
    """counterfactual = x - gain * tanh(conv(x)): one convolution trained to move abnormal images towards normal
    ones in mean intensity."""

    name = "toyshift"
    title = "Toy shift"
    inference_networks = ("shift",)
    options = (OptionSpec("gain", "float", 1.0, "Gain", "Scales the learned shift.", minimum=0.0, maximum=4.0),)
    default_config = {"kernel": 3, "lr": 1e-2}
    config_specs = (OptionSpec("kernel", "int", 3, tooltip="odd convolution size", minimum=1, maximum=7),)

    def build_networks(self, training):
        conv = (nn.Conv2d if self.spatial_dims == 2 else nn.Conv3d)(1, 1, self.config["kernel"], padding="same")
        return {"shift": conv}

    def attribute(self, x, **options):
        with torch.no_grad():
            counterfactual = x - options["gain"] * torch.tanh(self.networks["shift"](x))
        return AttributionResult(attribution=counterfactual - x, counterfactual=counterfactual)

    def configure_optimizers(self, total_steps):
        return {"shift": (torch.optim.SGD(self.networks.parameters(), lr=self.config["lr"]), None)}

    def training_step(self, batch, ctx):
        with ctx.autocast():
            moved = batch["abnormal"] - torch.tanh(self.networks["shift"](batch["abnormal"]))
            loss = (moved.mean() - batch["normal"].mean()) ** 2
        ctx.optimize("shift", loss)
        return {"loss": loss.item()}


@pytest.fixture
def toy_registered():
    register_method(ToyShift)
    yield ToyShift
    unregister_method(ToyShift.name)


def test_toy_method_trains_attributes_and_fills_the_option_form(toy_registered, synthetic_2d, tmp_path):
    from CounterfactualVALib.checkpoint import read_metadata
    from CounterfactualVALib.inference import run_attribution
    from CounterfactualVALib.method_options import option_specs_for_model
    from CounterfactualVALib.cohort import read_cohort_csv
    from CounterfactualVATrainingLib.loop import TrainingConfig, train

    model = train(TrainingConfig(
        method="toyshift", data=str(synthetic_2d), out=str(tmp_path / "run"),
        preprocessing={"spatial_dims": 2, "size": [32, 32], "spacing": [1.0, 1.0], "crop": "image", "intensity": "minmax"},
        method_config={"kernel": 5}, steps=3, val_every=3, checkpoint_every=3, batch_size=4, command="pytest toy",
    ))
    metadata = read_metadata(model)
    assert metadata.method == "toyshift" and metadata.method_config == {"kernel": 5, "lr": 1e-2}
    assert metadata.attribute_options == [ToyShift.options[0].to_dict()]
    assert [d["name"] for d in metadata.config_schema] == ["kernel", "lr"]

    scan = next(r["path"] for r in read_cohort_csv(synthetic_2d) if r["label"] == 1)
    maps = {}
    for gain in (1.0, 2.0):
        summary = run_attribution(model, scan, tmp_path / f"gain{gain}", method_options={"gain": gain}, figure=False)
        maps[gain] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"gain{gain}" / summary.outputs.attribution)))
    assert np.abs(maps[1.0]).max() > 0
    np.testing.assert_allclose(maps[2.0], 2 * maps[1.0], rtol=1e-4, atol=1e-6)  # the option reached the method
    with pytest.raises(ValueError, match=r"toyshift: gain must be between 0 and 4"):
        run_attribution(model, scan, tmp_path / "bad", method_options={"gain": 9}, figure=False)
    with pytest.raises(ValueError, match=r"toyshift: unknown options \['gian'\]"):
        run_attribution(model, scan, tmp_path / "bad", method_options={"gian": 1}, figure=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

    # the Slicer options form: rows from the model file, values back to the command line
    specs = option_specs_for_model(model)
    assert [(s.name, s.type, s.default, s.maximum) for s in specs] == [("gain", "float", 1.0, 4.0)]
    assert collect_options(specs, {"gain": 2.5}) == {"gain": 2.5}
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    from CounterfactualVA import CounterfactualVALogic

    logic = CounterfactualVALogic()
    assert logic.methodOptionSpecs(model) == specs
    command = logic.buildCommand(str(model), scan, str(tmp_path / "out"), methodOptions=collect_options(specs, {"gain": 2.5}))
    assert command[command.index("--option") + 1] == "gain=2.5"
