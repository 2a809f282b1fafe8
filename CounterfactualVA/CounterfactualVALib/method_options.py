"""What a model's method accepts at attribution time, described for a user interface (no Qt, no weights).

A model file names its method (metadata read without loading tensors); the method class lists its
``attribute_options`` with defaults. :func:`option_specs` turns them into :class:`OptionSpec` objects: type,
default, choices or range, a label and a tooltip, and whether the option matters only for development
(``advanced``: seeds, optimiser details). The Slicer panel builds one form row per spec, and
:func:`collect_options` turns the values it reads back into the ``method_options`` of
``counterfactualva attribute --option key=value``.

Labels, ranges and choices are written here per method; defaults always come from the method class (the
tests check that every registered method's options are described and that the fallback defaults below,
used only when the method cannot be imported, e.g. before torch is installed in Slicer, agree with it).
Options a method adds later without an entry here still get a spec, inferred from the default's type.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

TYPES = ("int", "float", "bool", "choice", "str")

#: ICAM translation directions and classifier explainers / targets (mirrors of the method modules' tuples,
#: kept here so the panel needs no torch; Testing/test_method_options.py checks they agree)
ICAM_DIRECTIONS = ("to_normal", "to_abnormal", "auto")
CLASSIFIER_EXPLAINERS = ("cam", "gradcam", "integrated_gradients", "occlusion")
CLASSIFIER_TARGETS = ("abnormal", "normal")
OCCLUSION_MODES = ("mean_img", "mean_patch", "gaussian")

INT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class OptionSpec:
    """One attribution option as a form row: ``type`` is one of :data:`TYPES`; ``minimum``/``maximum`` bound
    int and float values, ``choices`` lists a choice's values; ``advanced`` options matter only for
    development or reproducibility and may be hidden."""

    name: str
    type: str
    default: Any
    label: str
    tooltip: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    decimals: int | None = None
    advanced: bool = False

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"option {self.name}: unknown type {self.type!r} (one of {', '.join(TYPES)})")
        if self.type == "choice" and self.default not in self.choices:
            raise ValueError(f"option {self.name}: default {self.default!r} is not among {self.choices}")

    @property
    def widget(self) -> str:
        """The Qt widget class that edits this option."""
        return {"int": "QSpinBox", "float": "QDoubleSpinBox", "bool": "QCheckBox", "choice": "QComboBox", "str": "QLineEdit"}[self.type]

    def coerce(self, value) -> Any:
        """`value` converted to this option's type and checked; ValueError says what is wrong."""
        what = f"{self.label} ({self.name})"
        if self.type == "bool":
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"{what} must be true or false, got {value!r}.")
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if self.type == "choice":
            text = str(value)
            if text not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value!r}.")
            return text
        if self.type == "str":
            return str(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a number, got {value!r}.") from None
        if not math.isfinite(number):
            raise ValueError(f"{what} must be a finite number, got {value!r}.")
        if self.type == "int":
            if number != int(number):
                raise ValueError(f"{what} must be a whole number, got {value!r}.")
            number = int(number)
        if self.minimum is not None and number < self.minimum or self.maximum is not None and number > self.maximum:
            raise ValueError(f"{what} must be between {self.minimum:g} and {self.maximum:g}, got {value!r}.")
        return number


def _describe(type: str, label: str, tooltip: str, fallback: Any, **limits) -> OptionSpec:
    """What this module writes about one option, as an unnamed spec: `fallback` is the default used only when
    the method cannot be imported; :func:`option_specs` fills in the name and the method's own default."""
    return OptionSpec(name="", type=type, default=fallback, label=label, tooltip=tooltip, **limits)


_SEED = _describe("int", "Random seed", "Seed of the random draws (same seed, same result).", 0, minimum=0, maximum=INT_LIMIT, advanced=True)

#: method name -> option name -> description; an empty dict: the method takes no options
DESCRIPTIONS: dict[str, dict[str, OptionSpec]] = {
    "vantgan": {},
    "antgan": {},
    "vagan": {},
    "agcyclegan": {},
    "icam": {
        "samples": _describe(
            "int", "Latent samples",
            "Attribute codes drawn from the target class; the map is the first translation, icam_mean / icam_std "
            "summarise all of them (more samples: steadier mean and std, longer run).", 20, minimum=1, maximum=1000,
        ),
        "direction": _describe(
            "choice", "Direction",
            "to_normal: translate the scan to the normal class (its healthy counterpart); to_abnormal: the other "
            "way; auto: towards the class the classifier does not predict.", "to_normal", choices=ICAM_DIRECTIONS,
        ),
        "p_accept": _describe(
            "float", "Acceptance probability",
            "A drawn code is kept when the latent classifier gives it at least this probability of the target "
            "class (rejection sampling); when too few pass, the most probable ones are used.", 0.9,
            minimum=0.0, maximum=1.0, step=0.05, decimals=3, advanced=True,
        ),
        "max_candidates": _describe(
            "int", "Maximum candidates", "At most this many codes are drawn while looking for accepted ones.", 20000,
            minimum=1, maximum=10_000_000, advanced=True,
        ),
        "seed": _SEED,
    },
    "medxgan": {
        "inversion_steps": _describe(
            "int", "Inversion steps",
            "Adam steps that fit the generator's latent codes to the scan (paper: 500); fewer: faster, "
            "coarser reconstruction (its MSE is reported as inversion_mse).", 500, minimum=1, maximum=100_000,
        ),
        "inversion_lr": _describe(
            "float", "Inversion learning rate", "Adam learning rate of the latent inversion.", 0.01,
            minimum=1e-6, maximum=10.0, step=0.001, decimals=6, advanced=True,
        ),
        "ig_steps": _describe(
            "int", "Integrated-gradient steps", "Steps of the latent integrated gradients (medxgan_lig).", 11,
            minimum=2, maximum=1000,
        ),
        "interpolation_frames": _describe(
            "int", "Interpolation frames", "Frames of the latent interpolation series from the negative to the scan.", 11,
            minimum=2, maximum=200,
        ),
        "seed": _SEED,
    },
    "classifier": {
        "explainer": _describe(
            "choice", "Explainer",
            "cam: class activation map; gradcam: Grad-CAM; integrated_gradients: from a constant baseline image; "
            "occlusion: change of the log-odds when a patch is occluded.", "gradcam", choices=CLASSIFIER_EXPLAINERS,
        ),
        "target": _describe(
            "choice", "Explained class", "abnormal: positive = evidence for abnormal; normal: the sign flipped.", "abnormal",
            choices=CLASSIFIER_TARGETS,
        ),
        "ig_steps": _describe(
            "int", "Integrated-gradient steps", "Interpolation steps from the baseline (integrated_gradients only).", 50,
            minimum=1, maximum=2000,
        ),
        "ig_baseline": _describe(
            "float", "IG baseline value", "Constant baseline image in model intensities, -1 = the background (integrated_gradients only).",
            -1.0, minimum=-10.0, maximum=10.0, step=0.1, decimals=3, advanced=True,
        ),
        "occlusion_mask_size": _describe(
            "int", "Occlusion patch size", "Side of the occluded patch in model voxels; 0: automatic (occlusion only).", 0,
            minimum=0, maximum=512,
        ),
        "occlusion_overlap": _describe(
            "float", "Occlusion overlap", "Overlap of neighbouring patches, 0 to below 1 (occlusion only).", 0.5,
            minimum=0.0, maximum=0.95, step=0.05, decimals=2, advanced=True,
        ),
        "occlusion_mode": _describe(
            "choice", "Occlusion fill", "What fills the occluded patch: the image mean, the patch mean, or a Gaussian blur (occlusion only).",
            "mean_img", choices=OCCLUSION_MODES, advanced=True,
        ),
    },
}


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _inferred(name: str, default) -> OptionSpec:
    """A description for an option this module does not know, from its default's type."""
    tooltip = f"Method option '{name}' (default {default!r})."
    if isinstance(default, bool):
        return _describe("bool", _label(name), tooltip, default)
    if isinstance(default, int):
        return _describe("int", _label(name), tooltip, default, minimum=-INT_LIMIT, maximum=INT_LIMIT, advanced=name == "seed")
    if isinstance(default, float):
        return _describe("float", _label(name), tooltip, default, minimum=-1e9, maximum=1e9, decimals=6)
    return _describe("str", _label(name), tooltip, "" if default is None else str(default))


def method_defaults(method: str) -> dict | None:
    """The method class's ``attribute_options`` (imports the method module, hence torch); None when it
    cannot be imported."""
    try:
        from .methods import get_method_class

        return dict(get_method_class(method).attribute_options)
    except ImportError:
        return None


def option_specs(method: str, defaults: dict | None = None) -> list[OptionSpec]:
    """Form rows for `method`'s attribution options, in the method's own order (then options only described
    here). `defaults` (name -> default) overrides the method class's ``attribute_options``; without them and
    when the method cannot be imported, the defaults written here are used."""
    if defaults is None:
        defaults = method_defaults(method)  # ValueError for a method the registry does not know
    described = DESCRIPTIONS.get(method)
    if defaults is None:
        if described is None:
            raise ValueError(f"Unknown method {method!r}: the model file was written for a method this version does not have.")
        defaults = {name: d.default for name, d in described.items()}
    described = described or {}
    specs = []
    for name, default in defaults.items():
        d = described.get(name) or _inferred(name, default)
        if d.type == "choice" and default not in d.choices:
            d = _describe("str", d.label, d.tooltip, default, advanced=d.advanced)
        if d.type == "int" and isinstance(default, float):
            d = _describe("float", d.label, d.tooltip, default, minimum=d.minimum, maximum=d.maximum, advanced=d.advanced)
        tooltip = f"{d.tooltip} Default: {default!r}."
        specs.append(replace(d, name=name, default="" if default is None and d.type == "str" else default, tooltip=tooltip))
    return specs


def option_specs_for_model(model) -> list[OptionSpec]:
    """Option specs for a model file path (metadata only, no weights) or a ``ModelMetadata``/dict with a
    ``method``."""
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import read_metadata

        method = read_metadata(model).method
    elif isinstance(model, dict):
        method = model["method"]
    else:
        method = model.method
    return option_specs(method)


def collect_options(specs: list[OptionSpec], values: dict, only_changed: bool = True) -> dict:
    """``method_options`` from form values (name -> value): each checked and converted by its spec; values
    equal to the default are left out unless `only_changed` is False (the method applies its defaults)."""
    by_name = {spec.name: spec for spec in specs}
    unknown = set(values) - set(by_name)
    if unknown:
        raise ValueError(f"Unknown method options {sorted(unknown)}; this model's method takes {sorted(by_name) or 'none'}.")
    options = {}
    for name, value in values.items():
        spec = by_name[name]
        value = spec.coerce(value)
        if only_changed and value == spec.default and type(value) is type(spec.default):
            continue
        options[name] = value
    return options


__all__ = [
    "CLASSIFIER_EXPLAINERS",
    "DESCRIPTIONS",
    "ICAM_DIRECTIONS",
    "OptionSpec",
    "collect_options",
    "method_defaults",
    "option_specs",
    "option_specs_for_model",
]
