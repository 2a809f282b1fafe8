"""The Slicer panel's method options: specs generated from a model's metadata for every registered method,
and the values read back from a form reaching the command line's `--option key=value` unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualVA"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

pytest.importorskip("torch")
from CounterfactualVALib import method_options
from CounterfactualVALib.checkpoint import ModelMetadata, save_model
from CounterfactualVACLI.cli import _key_values
from CounterfactualVALib.method_options import (
    OptionSpec,
    collect_options,
    option_specs,
    option_specs_for_model,
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
def test_every_registered_method_gets_a_spec_per_option(method):
    cls = get_method_class(method)
    specs = option_specs_for_model(metadata_for(method))
    assert [s.name for s in specs] == list(cls.attribute_options)  # the method's own order, nothing missing
    assert method in method_options.DESCRIPTIONS, f"describe {method}'s options in method_options.DESCRIPTIONS"
    for spec in specs:
        assert spec.default == cls.attribute_options[spec.name] and spec.label and spec.tooltip
        assert spec.coerce(spec.default) == spec.default  # the default is a valid value of its own spec
        assert spec.widget in ("QSpinBox", "QDoubleSpinBox", "QCheckBox", "QComboBox", "QLineEdit")
        if spec.type in ("int", "float") and spec.minimum is not None:
            assert spec.minimum <= spec.default <= spec.maximum
    # what this module writes about the method agrees with the method (fallbacks are used without torch)
    for name, described in method_options.DESCRIPTIONS[method].items():
        assert name in cls.attribute_options, f"{method}: '{name}' is described but the method has no such option"
        assert described.default == cls.attribute_options[name]


def test_icam_samples_and_direction():
    specs = specs_by_name("icam")
    assert specs["samples"].type == "int" and specs["samples"].default == 20 and specs["samples"].minimum == 1
    assert specs["samples"].label == "Latent samples" and not specs["samples"].advanced
    assert specs["direction"].type == "choice" and specs["direction"].default == "to_normal"
    from CounterfactualVALib.methods.icam import _DIRECTIONS

    assert specs["direction"].choices == _DIRECTIONS == method_options.ICAM_DIRECTIONS
    assert specs["seed"].advanced and specs["max_candidates"].advanced
    with pytest.raises(ValueError, match="at least|between"):
        specs["samples"].coerce(0)
    with pytest.raises(ValueError, match="one of"):
        specs["direction"].coerce("sideways")


def test_medxgan_inversion_steps():
    specs = specs_by_name("medxgan")
    assert specs["inversion_steps"].type == "int" and specs["inversion_steps"].default == 500
    assert specs["inversion_steps"].widget == "QSpinBox" and not specs["inversion_steps"].advanced
    assert specs["inversion_lr"].type == "float" and specs["inversion_lr"].advanced
    assert specs["seed"].advanced


def test_classifier_explainer_is_a_choice():
    specs = specs_by_name("classifier")
    explainer = specs["explainer"]
    assert explainer.type == "choice" and explainer.widget == "QComboBox" and explainer.default == "gradcam"
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


def test_fallback_without_the_method_module_and_unknown_methods(monkeypatch):
    monkeypatch.setattr(method_options, "method_defaults", lambda method: None)  # as before torch is installed
    specs = {s.name: s for s in option_specs("icam")}
    assert specs["samples"].default == 20 and specs["direction"].choices == method_options.ICAM_DIRECTIONS
    with pytest.raises(ValueError, match="Unknown method"):
        option_specs("nosuchmethod")


def test_options_the_module_does_not_describe_are_inferred():
    specs = {s.name: s for s in option_specs("medxgan", defaults={"inversion_steps": 500, "z1_start": "zeros", "fast": False, "scale": 0.5, "seed": 3})}
    assert specs["z1_start"].type == "str" and specs["z1_start"].default == "zeros"
    assert specs["fast"].type == "bool" and specs["scale"].type == "float"
    assert specs["seed"].type == "int" and specs["seed"].advanced and specs["seed"].default == 3


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
    specs = option_specs("icam")
    assert collect_options(specs, {"samples": 5.0, "direction": "auto"}) == {"samples": 5, "direction": "auto"}
    with pytest.raises(ValueError, match="whole number"):
        collect_options(specs, {"samples": 2.5})
    with pytest.raises(ValueError, match="Unknown method options"):
        collect_options(specs, {"inversion_steps": 3})
    with pytest.raises(ValueError, match="not among"):
        OptionSpec("x", "choice", "c", "X", "tip", choices=("a", "b"))
    assert OptionSpec("flag", "bool", False, "Flag", "tip").coerce("yes") is True
