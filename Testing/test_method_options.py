"""Method options: each method's declarations written into its model files, checked by the base class for
every method, read back from the metadata (without torch) for the Slicer panel, listed by the command line,
and the values read back from a form reaching the command line's `--option key=value` unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualVA"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("torch")
from CounterfactualVACLI.cli import _key_values
from CounterfactualVALib.checkpoint import ModelMetadata, read_metadata, save_model
from CounterfactualVALib.method_options import (
    FORM_TYPES,
    OptionSpec,
    collect_options,
    config_specs_from_metadata,
    option_specs_for_model,
    option_specs_from_metadata,
)
from CounterfactualVALib.methods import available_methods, get_method_class


def metadata_for(method: str) -> ModelMetadata:
    cls = get_method_class(method)
    return ModelMetadata(
        method=method, method_config={}, preprocessing={"spatial_dims": 3, "size": [16, 16, 16], "spacing": [3.0, 3.0, 3.0]},
        outputs=list(cls.outputs),
    )


def tiny_model_file(path: Path, method: str) -> str:
    """A model file with the method's metadata and a placeholder tensor: the specs read the metadata only."""
    import torch

    return str(save_model(path, {"placeholder": torch.zeros(1)}, metadata_for(method)))


def specs_by_name(method):
    return {spec.name: spec for spec in option_specs_for_model(metadata_for(method))}


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_writes_its_declarations_into_the_model_file(method, tmp_path):
    cls = get_method_class(method)
    path = tiny_model_file(tmp_path / f"{method}.safetensors", method)
    specs = option_specs_for_model(path)  # read back from the file's metadata
    assert specs == list(cls.options)
    assert [s.name for s in specs] == list(cls.attribute_options)
    assert config_specs_from_metadata(read_metadata(path)) == list(cls.config_schema)
    assert [s.name for s in cls.config_schema] == list(cls.default_config)
    for spec in specs + list(cls.config_schema):
        assert spec.coerce(spec.default) == spec.default  # the default is a valid value of its own spec
        if spec.type in ("int", "float") and spec.default is not None:  # open bounds are None
            assert (spec.minimum is None or spec.minimum <= spec.default) and (spec.maximum is None or spec.default <= spec.maximum)
    for spec in specs:
        assert spec.type in FORM_TYPES and spec.label and spec.tooltip  # what a form row needs


@pytest.mark.parametrize("method", available_methods())
def test_every_method_refuses_unknown_options_and_bad_values_before_computing(method):
    cls = get_method_class(method)

    class Refuses(cls):  # same declarations; any computation would fail loudly
        def attribute(self, x, **options):
            raise AssertionError("attribute ran although its options were refused")

    method_obj = Refuses.__new__(Refuses)  # no networks needed: the check comes first
    with pytest.raises(ValueError, match=rf"{method}: unknown options \['bogus'\]"):
        method_obj.attribute(None, bogus=1)
    for spec in cls.options:
        bad = {"int": 2.5, "float": "fast", "bool": "maybe", "choice": "nosuchchoice", "str": [1]}[spec.type]
        with pytest.raises(ValueError, match=rf"{method}: {spec.name} must be"):
            method_obj.attribute(None, **{spec.name: bad})


@pytest.mark.parametrize("method", available_methods())
def test_every_configuration_key_is_documented_and_refuses_values_that_break_training(method):
    cls = get_method_class(method)
    undocumented = [spec.name for spec in cls.config_schema if not spec.tooltip.strip()]
    assert undocumented == [], f"{method}: configuration keys without a tooltip (add an OptionSpec to config_specs): {undocumented}"
    schema = {spec.name: spec for spec in cls.config_schema}
    assert {name: spec.default for name, spec in schema.items()} == cls.default_config  # the specs change no default
    bad = {"lr": 0.0, "lr_d": -1e-4, "content_dis_lr": 0.0, "beta1": 1.0, "ngf": 0, "ndf": 0, "channels": 0,
           "decay_start_fraction": 1.5, "identity_fraction": -0.1, "attention_threshold": 2.0, "pool_size": -1, "norm": "group"}
    refused = [name for name in bad if name in schema]
    assert refused, f"{method} has none of the common keys whose bad values are checked here"
    for name in refused:
        with pytest.raises(ValueError, match=rf"{method}: {name} must be"):
            cls.check_config({name: bad[name]})


def test_a_spec_cannot_change_a_default():
    from CounterfactualVALib.method_options import config_schema

    with pytest.raises(ValueError, match=r"defaults differ from default_config for lr \(0.1 vs 0.0002\)"):
        config_schema({"lr": 2e-4}, (OptionSpec("lr", "float", 0.1, tooltip="learning rate"),))


def test_training_configuration_is_checked_with_the_key_named():
    with pytest.raises(ValueError, match=r"vantgan: unknown configuration keys \['ngff'\]"):
        get_method_class("vantgan").check_config({"ngff": 8})
    with pytest.raises(ValueError, match="vantgan: ngf must be a whole number"):
        get_method_class("vantgan").check_config({"ngf": 8.5})
    with pytest.raises(ValueError, match="agcyclegan: gan_loss must be one of hinge, lsgan"):
        get_method_class("agcyclegan").check_config({"gan_loss": "wasserstein"})
    config = get_method_class("icam").check_config({"grid_size": [16, 16], "lambda_kl": 1})
    assert config["grid_size"] == [16, 16] and config["lambda_kl"] == 1.0 and config["lr"] == 1e-4


def test_icam_samples_and_direction():
    specs = specs_by_name("icam")
    assert specs["samples"].type == "int" and specs["samples"].default == 20 and specs["samples"].minimum == 1
    assert specs["samples"].label == "Latent samples" and not specs["samples"].advanced
    assert specs["direction"].type == "choice" and specs["direction"].default == "to_normal"
    from CounterfactualVALib.methods.icam import _DIRECTIONS

    assert specs["direction"].choices == _DIRECTIONS
    assert specs["direction"].coerce("to-abnormal") == "to_abnormal"  # spellings the command line accepted before
    assert specs["seed"].advanced and specs["max_candidates"].advanced
    with pytest.raises(ValueError, match="at least|between"):
        specs["samples"].coerce(0)
    with pytest.raises(ValueError, match="one of"):
        specs["direction"].coerce("sideways")


def test_medxgan_inversion_steps():
    specs = specs_by_name("medxgan")
    assert specs["inversion_steps"].type == "int" and specs["inversion_steps"].default == 500
    assert specs["inversion_steps"].minimum == 1 and not specs["inversion_steps"].advanced
    assert specs["inversion_lr"].type == "float" and specs["inversion_lr"].advanced
    assert specs["seed"].advanced


def test_classifier_explainer_is_a_choice():
    specs = specs_by_name("classifier")
    explainer = specs["explainer"]
    assert explainer.type == "choice" and explainer.default == "gradcam"
    assert explainer.coerce("ig") == "integrated_gradients" and explainer.coerce("Grad-CAM") == "gradcam"
    assert {"gradcam", "integrated_gradients", "occlusion", "cam"} == set(explainer.choices)
    from CounterfactualVALib.methods.classifier import _TARGETS, EXPLAINERS

    assert explainer.choices == EXPLAINERS and specs["target"].choices == tuple(_TARGETS)
    assert specs["ig_baseline"].type == "float" and specs["ig_baseline"].default == -1.0


@pytest.mark.parametrize("method", ["vantgan", "antgan", "vagan", "agcyclegan"])
def test_methods_without_options_give_an_empty_form(method):
    assert option_specs_for_model(metadata_for(method)) == []


def test_specs_from_a_model_file_and_from_the_logic(tmp_path):
    path = tiny_model_file(tmp_path / "icam.safetensors", "icam")
    names = [s.name for s in option_specs_for_model(path)]
    assert names[:2] == ["samples", "direction"]
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    from CounterfactualVA import CounterfactualVALogic

    logic = CounterfactualVALogic()
    assert [s.name for s in logic.methodOptionSpecs(path)] == names
    assert "Outputs: counterfactual, attribution, mask, class_probability, icam_mean, icam_std." in logic.modelInfo(path)
    (tmp_path / "broken.safetensors").write_text("not a model")
    with pytest.raises(ValueError):
        logic.methodOptionSpecs(tmp_path / "broken.safetensors")


def test_model_files_without_declarations_fall_back_to_the_method_class():
    metadata = metadata_for("icam").to_dict()
    assert metadata["attribute_options"] is None  # as in files written before the declarations were stored
    assert option_specs_from_metadata(metadata) == list(get_method_class("icam").options)


def test_specs_are_read_from_metadata_without_torch_or_the_method():
    """The Slicer form reads a model's options before torch is installed, even for a method it does not know."""
    spec = OptionSpec("depth", "int", 3, "Depth", "How deep.", minimum=1, maximum=9)
    metadata = {"method": "not_in_this_version", "attribute_options": [spec.to_dict()]}
    code = (
        "import json, sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "from CounterfactualVALib.method_options import option_specs_from_metadata, collect_options\n"
        f"specs = option_specs_from_metadata(json.loads({json.dumps(json.dumps(metadata))}))\n"
        "print(json.dumps([specs[0].name, specs[0].maximum, collect_options(specs, {'depth': 5.0})]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=MODULE_DIR)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["depth", 9, {"depth": 5}]


def test_cli_lists_methods_and_their_declarations():
    from CounterfactualVACLI.cli import build_parser

    with pytest.raises(ValueError, match="invalid choice: 'nosuchmethod'"):  # a UsageError, for cli.main's boundary
        build_parser().parse_args(["train", "--method", "nosuchmethod", "--data", "d.csv", "--out", "o"])
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method")
    assert list(train.choices) == available_methods()
    result = subprocess.run([sys.executable, "-m", "CounterfactualVACLI", "methods", "icam"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "samples = 20  (int in [1, 1000])" in result.stdout
    assert "direction = 'to_normal'  (to_normal|to_abnormal|auto)" in result.stdout
    assert "lambda_kl = 0.01  (float in [0, ])  weight of KL(N(mu, sigma^2) || N(0, I)) on the attribute codes" in result.stdout
    assert "grid_size = None  (list, or none)  model grid" in result.stdout
    assert "lr = 0.0001  (float in [1e-08, 1])  Adam learning rate of" in result.stdout


@pytest.mark.parametrize("method", available_methods())
def test_values_collected_from_the_form_round_trip_into_the_command(method):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    from CounterfactualVA import CounterfactualVALogic

    specs = option_specs_for_model(metadata_for(method))
    # every value changed from its default, the way a form's widgets return them (spin boxes give floats for
    # a QDoubleSpinBox, ints for a QSpinBox, the combo box its text)
    values = {}
    for spec in specs:
        if spec.type == "int":
            values[spec.name] = min(spec.default + 1, spec.maximum)
        elif spec.type == "float":
            values[spec.name] = max(spec.minimum, min(spec.default / 2 if spec.default else 0.25, spec.maximum))
        elif spec.type == "bool":
            values[spec.name] = not spec.default
        elif spec.type == "choice":
            values[spec.name] = next(c for c in spec.choices if c != spec.default)
        else:
            values[spec.name] = "1"  # a string JSON would read as a number
    options = collect_options(specs, values)
    assert set(options) == {s.name for s in specs}
    command = CounterfactualVALogic().buildCommand("m.safetensors", "in.nrrd", "out", methodOptions=options)
    passed = [command[i + 1] for i, arg in enumerate(command) if arg == "--option"]
    assert _key_values(passed) == options  # what the command line hands to the method's attribute()
    assert set(_key_values(passed)) <= set(get_method_class(method).attribute_options)
    # unchanged values are left to the method's defaults; all of them on request
    assert collect_options(specs, {s.name: s.default for s in specs}) == {}
    assert collect_options(specs, {s.name: s.default for s in specs}, only_changed=False) == {s.name: s.default for s in specs}


def test_collect_options_checks_values():
    specs = list(get_method_class("icam").options)
    assert collect_options(specs, {"samples": 5.0, "direction": "auto"}) == {"samples": 5, "direction": "auto"}
    with pytest.raises(ValueError, match="whole number"):
        collect_options(specs, {"samples": 2.5})
    with pytest.raises(ValueError, match="Unknown method options"):
        collect_options(specs, {"inversion_steps": 3})
    with pytest.raises(ValueError, match="not among"):
        OptionSpec("x", "choice", "c", "X", "tip", choices=("a", "b"))
    assert OptionSpec("flag", "bool", False, "Flag", "tip").coerce("yes") is True
