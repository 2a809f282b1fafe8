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
    """(metadata, method) from a model file: metadata and weights checked, inference networks on `device`, eval mode."""
    from ..checkpoint import load_model_file
    from ..imageio import InputError

    metadata, tensors = load_model_file(model_path, expected_method)
    method = create_method(metadata.method, metadata.spatial_dims, metadata.method_config, training=False)
    try:
        method.load_inference_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(
            f"{model_path}: its weights do not fit the {metadata.method} networks described in its metadata ({str(exc)[:200]}). "
            "The file was edited or written by an incompatible version."
        ) from None
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
