"""The method-options form of the attribution panel, without Qt: which rows, their values, what is saved.

The widget makes one editor per :class:`~CounterfactualVALib.method_options.OptionSpec` of
:attr:`OptionForm.specs` as :func:`editor_for` describes it and calls :meth:`OptionForm.set` when an editor
changes; everything else (which Qt editor with which range, checking and converting values, defaults, what
the run gets, what the scene keeps, the ``--option`` text) happens here and is tested here.

Specs come from the model file's metadata (:func:`option_specs_for_model_file`), read without torch. Values
are saved with the scene as one JSON text parameter, per method (``{"icam": {"samples": 40}}``): switching
to a model of another method and back restores what was chosen, and only values that differ from the
defaults are kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import method_options
from ..method_options import OptionSpec, collect_options
from .model_file import read_model_metadata


def option_specs_from_metadata(metadata: dict) -> list[OptionSpec]:
    """The form rows of a model's attribution options, from its metadata without torch: models written before
    the options were stored get none (the method's defaults apply)."""
    return method_options.option_specs_from_metadata(metadata, fall_back_to_method=False)


def option_specs_for_model_file(path) -> list[OptionSpec]:
    """The options the model file lists in its header; none for a file written before options were listed
    there (method_options would then import the method's code, i.e. torch, into the GUI process)."""
    metadata = read_model_metadata(path)
    if metadata.get("attribute_options") is None:
        return []
    return option_specs_from_metadata(metadata)


#: the Qt editor class of each OptionSpec type
EDITOR_CLASSES = {"int": "QSpinBox", "float": "QDoubleSpinBox", "bool": "QCheckBox", "choice": "QComboBox", "str": "QLineEdit"}
#: the property that holds an editor's value, and the signal that reports an edit (with the new value)
_VALUE_PROPERTY = {"int": "value", "float": "value", "bool": "checked", "choice": "currentText", "str": "text"}
_SIGNAL = {"int": "valueChanged(int)", "float": "valueChanged(double)", "bool": "toggled(bool)", "choice": "currentTextChanged(QString)", "str": "textChanged(QString)"}
#: the widest range of QSpinBox (a C int); Qt's own default range 0..99 would clip an option without bounds
_INT_LIMIT = 2**31 - 1


@dataclass
class EditorPlan:
    """How the widget builds one option's editor: ``qt_class`` instance, ``items`` added (choices), then the
    ``properties`` set in order (decimals before the range, the range before the value), the value written to
    ``value_property``, edits connected through ``signal``."""

    qt_class: str
    signal: str
    value_property: str
    items: list = field(default_factory=list)
    properties: dict = field(default_factory=dict)


def editor_for(spec: OptionSpec) -> EditorPlan:
    plan = EditorPlan(EDITOR_CLASSES[spec.type], _SIGNAL[spec.type], _VALUE_PROPERTY[spec.type])
    if spec.type == "choice":
        plan.items = [str(choice) for choice in spec.choices]
    elif spec.type in ("int", "float"):
        if spec.type == "float":
            plan.properties["decimals"] = spec.decimals if spec.decimals is not None else 4
        if spec.step is not None:
            plan.properties["singleStep"] = spec.step
        plan.properties["minimum"] = spec.minimum if spec.minimum is not None else -_INT_LIMIT
        plan.properties["maximum"] = spec.maximum if spec.maximum is not None else _INT_LIMIT
    return plan


def editor_value(spec: OptionSpec, value):
    """`value` as the editor's value property takes it (see :func:`editor_for`)."""
    if spec.type == "bool":
        return bool(value)
    if spec.type in ("choice", "str"):
        return str(value)
    return value


def option_text(value) -> str:
    """How the command line's ``--option key=value`` gets `value` back: JSON, except plain strings that JSON
    would read as something else (the command line parses JSON first, then keeps the text)."""
    if not isinstance(value, str):
        return json.dumps(value)
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return value
    return json.dumps(value)


class OptionForm:
    """Values of one method's options. ``saved``: the scene's JSON text (all methods), see :meth:`saved_text`."""

    def __init__(self, method: str | None, specs: list[OptionSpec], saved: str = ""):
        self.method = method
        self.specs = list(specs)
        self._by_name = {spec.name: spec for spec in self.specs}
        self.values = {spec.name: spec.default for spec in self.specs}
        self._saved = self._parse_saved(saved)
        for name, value in (self._saved.get(method) or {}).items():
            if name in self._by_name:
                try:
                    self.values[name] = self._by_name[name].coerce(value)
                except ValueError:
                    pass  # a value this version no longer accepts: the default stands

    @staticmethod
    def _parse_saved(text: str) -> dict:
        try:
            saved = json.loads(text) if text else {}
        except ValueError:
            return {}
        return {str(k): dict(v) for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}

    @property
    def advanced_names(self) -> list[str]:
        return [spec.name for spec in self.specs if spec.advanced]

    def set(self, name: str, value):
        """Check, convert and keep one editor's value; returns the kept value (ValueError says what is wrong)."""
        if name not in self._by_name:
            raise ValueError(f"Unknown method option {name!r}; this model's method takes {sorted(self._by_name) or 'none'}.")
        self.values[name] = self._by_name[name].coerce(value)
        return self.values[name]

    def reset(self) -> None:
        self.values = {spec.name: spec.default for spec in self.specs}

    def options(self) -> dict:
        """What the run gets (``--option key=value``): the values that differ from the defaults."""
        return collect_options(self.specs, self.values)

    def saved_text(self) -> str:
        """The scene's JSON text with this method's changed values (other methods' kept as they were)."""
        saved = dict(self._saved)
        if self.method:
            changed = self.options()
            if changed:
                saved[self.method] = changed
            else:
                saved.pop(self.method, None)
        return json.dumps(saved, sort_keys=True) if saved else ""


def form_for_model_file(path, saved: str = "") -> tuple[OptionForm, str]:
    """The form of the model file's method (empty without a file) and the line the panel shows when there are
    no rows: no model, no options, or why the file's options cannot be read (an unusable file gets no rows)."""
    if not path:
        return OptionForm(None, [], saved), "Select a model file to see its method's options."
    try:
        metadata = read_model_metadata(path)
        if metadata.get("attribute_options") is None:
            return OptionForm(None, [], saved), "This model file does not list its method's options (written before they were stored); the defaults are used."
        return OptionForm(metadata["method"], option_specs_from_metadata(metadata), saved), "This model's method has no options."
    except Exception as exc:  # noqa: BLE001  (any unreadable file: say so, no rows)
        return OptionForm(None, [], saved), f"Options not available: {exc}"
