"""Option declarations: what a method accepts at attribution time and in its training configuration.

Each method class declares its attribution options as :class:`OptionSpec` objects (``Method.options``) and
may refine the spec of a configuration key (``Method.config_specs``; keys it leaves out get a spec inferred
from ``default_config``). The base class checks every call against them, the model file's metadata carries
them (``attribute_options``, ``config_schema``: lists of :meth:`OptionSpec.to_dict`), and user interfaces
read them back from there with :func:`option_specs_from_metadata`, so the Slicer panel needs neither torch
nor the method's code to build its form. This module imports no torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

#: form types ("int", "float", "bool", "choice", "str") and the configuration-only "list" and "any"
FORM_TYPES = ("int", "float", "bool", "choice", "str")
TYPES = FORM_TYPES + ("list", "any")

INT_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class OptionSpec:
    """One option: ``type`` is one of :data:`TYPES`; ``minimum``/``maximum`` bound int and float values,
    ``choices`` lists a choice's values (``aliases``: other spellings accepted for them, as pairs);
    ``tooltip`` is the help text; ``advanced`` options matter only for development or reproducibility and
    may be hidden; ``nullable`` accepts None (a configuration key filled in later, e.g. from the data)."""

    name: str
    type: str
    default: Any
    label: str = ""
    tooltip: str = ""
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    decimals: int | None = None
    advanced: bool = False
    aliases: tuple = ()
    nullable: bool = False

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"option {self.name}: unknown type {self.type!r} (one of {', '.join(TYPES)})")
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " ").capitalize())
        object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "aliases", tuple(tuple(pair) for pair in self.aliases))
        if self.type == "choice" and self.default not in self.choices:
            raise ValueError(f"option {self.name}: default {self.default!r} is not among {self.choices}")

    def to_dict(self) -> dict:
        """JSON-ready (written into the model file's metadata)."""
        data = asdict(self)
        data["choices"] = list(self.choices)
        data["aliases"] = [list(pair) for pair in self.aliases]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "OptionSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        """One line for the command line's listing: type, default, range or choices, help."""
        kind = self.type
        if self.type == "choice":
            kind = "|".join(map(str, self.choices))
        elif self.type in ("int", "float") and (self.minimum is not None or self.maximum is not None):
            low = "" if self.minimum is None else _number(self.minimum)
            high = "" if self.maximum is None else _number(self.maximum)
            kind = f"{self.type} in [{low}, {high}]"
        text = f"{self.name} = {self.default!r}  ({kind}{', or none' if self.nullable else ''})"
        return f"{text}  {self.tooltip}".rstrip()

    def coerce(self, value) -> Any:
        """`value` converted to this option's type and checked; ValueError names the option and what is wrong."""
        what = self.name
        if value is None and (self.nullable or self.type == "any"):
            return None
        if self.type == "any":
            return value
        if self.type == "bool":
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"{what} must be true or false, got {value!r}.")
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if self.type == "choice":
            text = str(value)
            if text not in self.choices:
                text = text.lower().replace("-", "_")
                text = dict(self.aliases).get(text, text)
            if text not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(map(str, self.choices))}, got {value!r}.")
            return text
        if self.type == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"{what} must be text, got {value!r}.")
            return str(value)
        if self.type == "list":
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{what} must be a list, e.g. {list(self.default or [1, 2])}, got {value!r}.")
            return list(value)
        if isinstance(value, bool):
            raise ValueError(f"{what} must be a number, got {value!r}.")
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
            low = "-inf" if self.minimum is None else _number(self.minimum)
            high = "inf" if self.maximum is None else _number(self.maximum)
            raise ValueError(f"{what} must be between {low} and {high}, got {value!r}.")
        return number


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def inferred_spec(name: str, default: Any) -> OptionSpec:
    """The spec of a configuration key a method does not describe, from its default's type."""
    if isinstance(default, bool):
        return OptionSpec(name, "bool", default)
    if isinstance(default, int):
        return OptionSpec(name, "int", default)
    if isinstance(default, float):
        return OptionSpec(name, "float", default)
    if isinstance(default, str):
        return OptionSpec(name, "str", default)
    if isinstance(default, (list, tuple)):
        return OptionSpec(name, "list", list(default))
    return OptionSpec(name, "any", default)


def config_schema(default_config: dict, described: tuple = ()) -> tuple[OptionSpec, ...]:
    """One spec per key of `default_config`, in its order: the method's own description when it has one."""
    by_name = {spec.name: spec for spec in described}
    extra = set(by_name) - set(default_config)
    if extra:
        raise ValueError(f"config_specs describe keys that default_config lacks: {sorted(extra)}")
    # one default per key: a spec's default is what check_config fills in, so it must be default_config's
    differ = sorted(name for name, spec in by_name.items() if spec.default != default_config[name])
    if differ:
        raise ValueError(
            "config_specs defaults differ from default_config for "
            + ", ".join(f"{name} ({by_name[name].default!r} vs {default_config[name]!r})" for name in differ)
        )
    return tuple(by_name.get(name) or inferred_spec(name, default) for name, default in default_config.items())


def check_values(owner: str, kind: str, specs, values: dict) -> dict:
    """`values` checked against `specs` (unknown names and bad values refused, the name in the message)
    and completed with the defaults."""
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ValueError(f"{owner}: unknown {kind} {unknown}; known: {sorted(by_name) or 'none'}")
    checked = {name: spec.default for name, spec in by_name.items()}
    for name, value in values.items():
        try:
            checked[name] = by_name[name].coerce(value)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None
    return checked


def option_specs_from_metadata(metadata, fall_back_to_method: bool = True) -> list[OptionSpec]:
    """The attribution options of a model, from its metadata (a ``ModelMetadata`` or its dict) alone.

    Model files written before options were part of the metadata fall back to the registered method class
    when `fall_back_to_method` (that imports torch); without it, or for a method this version does not have,
    they get no options (the method's defaults apply). The Slicer panel passes False: no torch in the GUI."""
    data = metadata if isinstance(metadata, dict) else metadata.to_dict()
    if data.get("attribute_options") is not None:
        return [OptionSpec.from_dict(d) for d in data["attribute_options"]]
    if not fall_back_to_method:
        return []
    try:
        from .methods import get_method_class

        return list(get_method_class(data["method"]).options)
    except (ImportError, ValueError):
        return []


def config_specs_from_metadata(metadata) -> list[OptionSpec]:
    """The training configuration keys of a model's method, from its metadata (same fallback as above)."""
    data = metadata if isinstance(metadata, dict) else metadata.to_dict()
    if data.get("config_schema") is not None:
        return [OptionSpec.from_dict(d) for d in data["config_schema"]]
    try:
        from .methods import get_method_class

        return list(get_method_class(data["method"]).config_schema)
    except ImportError:
        return []


def option_specs_for_model(model) -> list[OptionSpec]:
    """Option specs for a model file path (metadata only, no weights) or a ``ModelMetadata``/dict."""
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import read_metadata

        model = read_metadata(model)
    return option_specs_from_metadata(model)


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
    "FORM_TYPES",
    "OptionSpec",
    "check_values",
    "collect_options",
    "config_schema",
    "config_specs_from_metadata",
    "inferred_spec",
    "option_specs_for_model",
    "option_specs_from_metadata",
]
