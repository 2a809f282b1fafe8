"""The method registry: name -> class. Adding a method is adding its module and one entry here (or calling
:func:`register_method` with a class defined elsewhere, e.g. in a test).

Entries are import paths, so listing the methods (the command line's ``--method`` choices, checking a model
file's metadata) imports neither torch nor network code.
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, str | type] = {
    "vantgan": "CounterfactualVALib.methods.vantgan:VANTGAN",
    "antgan": "CounterfactualVALib.methods.antgan:ANTGAN",
    "vagan": "CounterfactualVALib.methods.vagan:VAGAN",
    "icam": "CounterfactualVALib.methods.icam:ICAM",
    "medxgan": "CounterfactualVALib.methods.medxgan:MedXGAN",
    "agcyclegan": "CounterfactualVALib.methods.agcyclegan:AttentionCycleGAN",
    "classifier": "CounterfactualVALib.methods.classifier:ClassifierBaseline",
}


def available_methods() -> list[str]:
    return list(_REGISTRY)


def register_method(cls) -> type:
    """Add a Method subclass under its ``name`` (usable as a class decorator); returns the class."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} has no `name`: set the class attribute the registry and the model files use.")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_method_class(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(_REGISTRY)}.")
    entry = _REGISTRY[name]
    if isinstance(entry, type):
        return entry
    module_name, class_name = entry.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_method(name: str, spatial_dims: int, config: dict | None = None, training: bool = False):
    return get_method_class(name)(spatial_dims, config, training=training)


def load_method(model_path, device, expected_method: str | None = None):
    """(metadata, method) from a model file: metadata and weights checked, inference networks on `device`, eval mode.

    The stored method configuration is checked against the method's schema: unknown keys and bad values are
    refused by name. Keys it lacks get this version's defaults (a key added after the file was written defaults
    to what earlier versions did), and the weights must then fit the networks exactly (every tensor's name and
    shape): a missing key the networks' shapes depend on (a width, a depth) is refused by name unless the
    default is the value the file was trained with."""
    from .. import __version__
    from ..checkpoint import ModelFileError, load_model_file

    metadata, tensors = load_model_file(model_path, expected_method)
    stored = metadata.method_config
    missing = [key for key in get_method_class(metadata.method).default_config if key not in stored]
    fix = (
        f"use the model file exactly as `counterfactualva train` wrote it, or retrain (or re-export) the model with "
        f"counterfactualva {__version__}."
    )
    lacks = f"its method configuration lacks {missing} (this version's defaults do not fit the stored weights)" if missing else ""
    try:
        method = create_method(metadata.method, metadata.spatial_dims, stored, training=False)
    except (ValueError, TypeError) as exc:  # the schema's checks, or a network refusing a value
        what = lacks or f"its method configuration is not valid for this version's {metadata.method}"
        raise ModelFileError(f"{model_path}: {what} ({' '.join(str(exc).split())[:300]})", fix) from None
    try:
        method.load_inference_state_dict(tensors)
    except RuntimeError as exc:
        what = lacks or (
            f"its weights do not fit the {metadata.method} networks described in its metadata ({' '.join(str(exc).split())[:200]})"
        )
        raise ModelFileError(f"{model_path}: {what}", fix) from None
    return metadata, method.to(device).eval()


def __getattr__(name: str):
    # the base classes import torch: loaded on first use, so that the registry itself stays torch-free
    if name in ("AttributionResult", "Method", "TrainingContext"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AttributionResult",
    "Method",
    "TrainingContext",
    "available_methods",
    "create_method",
    "get_method_class",
    "load_method",
    "register_method",
    "unregister_method",
]
