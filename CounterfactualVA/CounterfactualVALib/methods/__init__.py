"""The method registry: name -> class. Adding a method is adding its module and one entry here.

Entries are import paths, so listing the methods (e.g. to check a model file's metadata) imports
no network code.
"""

from __future__ import annotations

import importlib

from .base import AttributionResult, Method, TrainingContext

_REGISTRY: dict[str, str] = {
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


def get_method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(_REGISTRY)}.")
    module_name, class_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_method(name: str, spatial_dims: int, config: dict | None = None, training: bool = False) -> Method:
    return get_method_class(name)(spatial_dims, config, training=training)


__all__ = ["AttributionResult", "Method", "TrainingContext", "available_methods", "create_method", "get_method_class"]
