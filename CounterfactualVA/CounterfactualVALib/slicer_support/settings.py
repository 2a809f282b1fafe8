"""Application settings the two modules share, and the path history that ctkPathLineEdit shows.

Every key lives here, so that what one module writes is what the other reads. The functions take the
settings object as an argument: ``qt.QSettings()`` in the application, :class:`MemorySettings` in the tests
and on slicer-core (no Qt there). Both offer ``value(key, default)`` and ``setValue(key, value)``.

ctkPathLineEdit keeps its drop-down history under ``ctkPathLineEdit/<settingKey>`` (CTK's
``ctkPathLineEditPrivate::settingKey()``), newest first, and pre-selects the newest entry when its path is
empty (``retrieveHistory()``); it only adds a path when ``addCurrentPathToHistory()`` is called.
"""

from __future__ import annotations

import os

#: the settingKey of the attribution panel's model field (CounterfactualVA.ui, modelPathLineEdit)
MODEL_PATH_FIELD = "CounterfactualVA/ModelPathHistory"
#: the last model a run used or a training wrote (the panel's default model)
LAST_MODEL_PATH = "CounterfactualVA/lastModelPath"
#: the device answer of the child process, cached per Python executable (see DEVICE_INFO_VERSION)
DEVICE_INFO = "CounterfactualVA/deviceInfo"
#: how many entries a history keeps (ctkPathLineEdit shows at most 5; older ones are kept for the next ones)
HISTORY_LIMIT = 20


def path_history_key(setting_key: str) -> str:
    """The settings key under which ctkPathLineEdit with this ``settingKey`` keeps its history."""
    return "ctkPathLineEdit/" + setting_key


def _string_list(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):  # QSettings returns a one-entry list as a plain string
        return [value]
    return [str(item) for item in value]


def path_history(settings, setting_key: str) -> list[str]:
    """The paths of a ctkPathLineEdit's history, newest first."""
    return _string_list(settings.value(path_history_key(setting_key)))


def add_to_path_history(settings, setting_key: str, path) -> list[str]:
    """Put `path` first in the history (once), as ctkPathLineEdit.addCurrentPathToHistory does; returns it."""
    path = path_text(path)
    if not path:
        return path_history(settings, setting_key)
    history = [path] + [entry for entry in path_history(settings, setting_key) if entry != path]
    history = history[:HISTORY_LIMIT]
    settings.setValue(path_history_key(setting_key), history)
    return history


def remember_model(settings, model_path) -> None:
    """Make `model_path` the panel's default model and the newest entry of its model field's history."""
    path = path_text(model_path)
    if not path:
        return
    path = os.path.abspath(path)
    settings.setValue(LAST_MODEL_PATH, path)
    add_to_path_history(settings, MODEL_PATH_FIELD, path)


def default_model(settings, fallback: str | None = None) -> str:
    """The model the panel starts with: the last one used or trained, if it still exists, else `fallback`
    (the shipped sample model), else ""."""
    for candidate in [settings.value(LAST_MODEL_PATH, "")] + path_history(settings, MODEL_PATH_FIELD) + [fallback]:
        text = path_text(candidate)
        if text and os.path.isfile(text):
            return text
    return ""


def path_text(value) -> str:
    """A path field's text: "" for no path (never "." - what ``pathlib.Path("")`` prints)."""
    text = "" if value is None else str(value)
    return "" if text.strip() in ("", ".") else text


class MemorySettings:
    """A dict with QSettings' two methods (tests, slicer-core)."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):  # noqa: N802 - QSettings' name
        self.values[key] = value


def application_settings():
    """``qt.QSettings()`` in the application, else a process-wide MemorySettings."""
    try:
        import qt

        return qt.QSettings()
    except ImportError:
        return _MEMORY


_MEMORY = MemorySettings()
