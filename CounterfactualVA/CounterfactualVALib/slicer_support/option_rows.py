"""The method-options rows of the attribution panel: the Qt glue over :mod:`.option_form` (needs the
application's Qt; what the rows show and accept is decided and tested in option_form)."""

from __future__ import annotations

from . import option_form
from .framework import qt


class OptionRows:
    """One label + editor row per option of an :class:`~.option_form.OptionForm` in a QFormLayout. An accepted
    edit goes to the form and its scene text to ``on_saved(text)``; a refused value to ``on_error(message)``."""

    def __init__(self, layout, on_saved, on_error):
        self.layout, self.on_saved, self.on_error = layout, on_saved, on_error
        self.form = option_form.OptionForm(None, [])
        self.rows = []  # (spec, label, editor)

    def show(self, form: option_form.OptionForm) -> None:
        for _spec, label, editor in self.rows:
            self.layout.removeWidget(label)
            self.layout.removeWidget(editor)
            label.deleteLater()
            editor.deleteLater()
        self.form, self.rows = form, []
        for spec in form.specs:
            label = qt.QLabel(spec.label + ":")
            editor = self._editor(spec, form.values[spec.name])
            label.toolTip = editor.toolTip = spec.tooltip
            self.layout.addRow(label, editor)
            self.rows.append((spec, label, editor))

    def _editor(self, spec, value):
        """The Qt editor of one OptionSpec (as option_form.editor_for describes it), showing `value`."""
        plan = option_form.editor_for(spec)
        editor = getattr(qt, plan.qt_class)()
        if plan.items:
            editor.addItems(plan.items)
        for name, setting in plan.properties.items():
            setattr(editor, name, setting)
        setattr(editor, plan.value_property, option_form.editor_value(spec, value))
        editor.connect(plan.signal, lambda value, name=spec.name: self._edited(name, value))
        return editor

    def _edited(self, name, value):
        try:
            self.form.set(name, value)
        except ValueError as exc:
            self.on_error(str(exc))
            return
        self.on_saved(self.form.saved_text())

    def show_advanced(self, show: bool) -> None:
        for spec, label, editor in self.rows:
            label.visible = editor.visible = bool(show) or not spec.advanced

    def reset(self) -> None:
        self.form.reset()
        for spec, _label, editor in self.rows:
            setattr(editor, option_form.editor_for(spec).value_property, option_form.editor_value(spec, spec.default))
