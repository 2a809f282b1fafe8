"""The method-options form of the attribution panel, without Qt: which rows, their values, what is saved.

The widget makes one editor per :class:`~CounterfactualVALib.method_options.OptionSpec` of
:attr:`OptionForm.specs` and calls :meth:`OptionForm.set` when an editor changes; everything else (checking
and converting values, defaults, what the run gets, what the scene keeps) happens here and is tested here.

Specs come from the model file's metadata (:func:`option_specs_for_model_file`), read without torch. Values
are saved with the scene as one JSON text parameter, per method (``{"icam": {"samples": 40}}``): switching
to a model of another method and back restores what was chosen, and only values that differ from the
defaults are kept.
"""

from __future__ import annotations

import json

from ..method_options import OptionSpec, collect_options, option_specs_from_metadata
from .model_file import read_model_metadata


def option_specs_for_model_file(path) -> list[OptionSpec]:
    return option_specs_from_metadata(read_model_metadata(path))


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
