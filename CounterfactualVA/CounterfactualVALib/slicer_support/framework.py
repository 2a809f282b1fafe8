"""What the scripted modules take from the Slicer application, with stand-ins where it is absent.

(Part of the shared Slicer support layer, see ``slicer_support/__init__.py``.)

PyPI's slicer-core has the MRML scene but no application: no ScriptedLoadableModule framework, no Qt, no
parameter-node wrapper. Both module files import these names from here, so that their logic classes (which
need none of it) import and run under slicer-core in the tests, and the panels run in the application.
The stand-ins exist only for the module, widget and test classes, never for the logic or MRML.
"""

import logging
import os
import sys
import types
import unittest

# --- what exists only in the Slicer application (Qt, scripted-module framework, parameter nodes) ----------

try:
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    HAVE_SLICER_APP = True
except ImportError:  # slicer-core: MRML without the application
    HAVE_SLICER_APP = False
    ScriptedLoadableModuleLogic = None

    class ScriptedLoadableModule:  # minimal stand-in so that this file imports; never used by the logic
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else types.SimpleNamespace()
            self.moduleName = type(self).__name__

    class ScriptedLoadableModuleWidget:  # the panel needs Qt: only a stand-in so that this file imports
        def __init__(self, parent=None):
            self.parent = parent
            self.moduleName = type(self).__name__[: -len("Widget")]

        def setup(self):
            raise RuntimeError(
                f"The {self.moduleName} panel needs the 3D Slicer application; use {self.moduleName}Logic from Python."
            )

        def resourcePath(self, filename):
            moduleDir = os.path.dirname(os.path.abspath(sys.modules[type(self).__module__].__file__))
            return os.path.join(moduleDir, "Resources", filename)

    class ScriptedLoadableModuleTest(unittest.TestCase):  # lets the self-test run outside the application
        def delayDisplay(self, message, msec=None):
            logging.info(message)


try:
    from slicer.util import VTKObservationMixin
except ImportError:  # pragma: no cover - every slicer build has it
    VTKObservationMixin = object

try:
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:
    Choice = WithinRange = parameterNodeWrapper = None

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:

    def _(text):
        return text

    def translate(context, text):
        return text


try:
    import qt
except ImportError:
    qt = None


# --- GUI connectors Slicer's parameterNodeWrapper lacks (application only) -----------------------------------
#
# Slicer's own connectors would bind our text fields badly (Base/Python/slicer/parameterNodeWrapper/
# guiConnectors.py, v5.10.0 and v5.12.0):
# - ctkPathLineEditToPathConnector binds only pathlib types and reads ``Path(currentPath)``: an empty field
#   becomes Path("") and is written back as "." (and ctkPathLineEdit's history pre-selection, which only
#   happens for an empty path, never happens);
# - QTextEditPlainTextToStrConnector.write calls setPlainText without comparing, and the wrapper writes every
#   connector back after each change it reads (wrapper.py _makeGuiToParamCallback -> NodeModify ->
#   _updateGUIFromParameterNode), so the cursor jumps to the start on every keystroke.
# So path parameters are ``str`` bound to ctkPathLineEdit, and multi-line text is ``str`` bound to a
# QPlainTextEdit, through these two connectors, which write only when the value differs (as Slicer's
# QLineEditToStrConnector does).

if parameterNodeWrapper is not None:
    from slicer.parameterNodeWrapper.guiConnectors import GuiConnector, parameterNodeGuiConnector
    from slicer.parameterNodeWrapper.util import unannotatedType

    import ctk

    @parameterNodeGuiConnector
    class PathLineEditToStrConnector(GuiConnector):
        """ctkPathLineEdit <-> str ("" when empty)."""

        @staticmethod
        def canRepresent(widget, datatype) -> bool:
            return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

        @staticmethod
        def create(widget, datatype):
            return PathLineEditToStrConnector(widget) if PathLineEditToStrConnector.canRepresent(widget, datatype) else None

        def __init__(self, widget):
            super().__init__()
            self._widget = widget

        def _connect(self):
            self._widget.currentPathChanged.connect(self.changed)

        def _disconnect(self):
            self._widget.currentPathChanged.disconnect(self.changed)

        def widget(self):
            return self._widget

        def read(self) -> str:
            return self._widget.currentPath

        def write(self, value: str) -> None:
            if value != self._widget.currentPath:
                self._widget.currentPath = value

    @parameterNodeGuiConnector
    class PlainTextEditToStrConnector(GuiConnector):
        """QPlainTextEdit <-> str, written only when it differs (the cursor stays where the user types)."""

        @staticmethod
        def canRepresent(widget, datatype) -> bool:
            return type(widget) == qt.QPlainTextEdit and unannotatedType(datatype) == str

        @staticmethod
        def create(widget, datatype):
            return PlainTextEditToStrConnector(widget) if PlainTextEditToStrConnector.canRepresent(widget, datatype) else None

        def __init__(self, widget):
            super().__init__()
            self._widget = widget

        def _connect(self):
            self._widget.textChanged.connect(self.changed)

        def _disconnect(self):
            self._widget.textChanged.disconnect(self.changed)

        def widget(self):
            return self._widget

        def read(self) -> str:
            return self._widget.toPlainText()

        def write(self, value: str) -> None:
            if value != self._widget.toPlainText():
                self._widget.setPlainText(value)


# --- the panels' parameter-node lifecycle (shared by CounterfactualVA and CounterfactualVATraining) ---------


class ParameterNodeWidgetMixin:
    """enter/exit, scene close and parameter-node wiring of a scripted module panel, as Slicer's module
    template writes them. The widget sets ``self.logic``, ``self.ui``, ``self._parameterNode = None`` and
    ``self._parameterNodeGuiTag = None``, observes the scene's StartClose/EndClose events with
    :meth:`onSceneStartClose`/:meth:`onSceneEndClose`, and implements :meth:`refreshFromParameterNode`
    (called when the parameter node changes); optional hooks: :meth:`beforeSceneClose` and
    :meth:`setDefaultParameters`. Needs VTKObservationMixin (addObserver/removeObserver)."""

    def setupPanel(self, uiFileName: str, logic, onPoll=None, pollIntervalMs: int = 200):
        """The part of ``setup()`` every panel shares: load ``Resources/UI/<uiFileName>``, bind it to the scene,
        set the logic, a poll timer calling `onPoll` (for a running subprocess) and the scene-close observers."""
        import slicer

        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{uiFileName}"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        if onPoll is not None:
            self._timer = qt.QTimer()
            self._timer.setInterval(pollIntervalMs)
            self._timer.timeout.connect(onPoll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self._observeParameterNode(False)

    def onSceneStartClose(self, caller, event):
        self.beforeSceneClose()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode:
            self.setDefaultParameters(self._parameterNode)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._observeParameterNode(False)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._observeParameterNode(True)
            self.refreshFromParameterNode()

    def _observeParameterNode(self, observe: bool):
        import vtk

        if observe:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        else:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def _onParameterNodeModified(self, caller=None, event=None):
        self.refreshFromParameterNode()

    # hooks
    def refreshFromParameterNode(self):
        """Update what the parameter node does not bind itself (buttons, enabled states)."""

    def beforeSceneClose(self):
        """Called before the scene closes (e.g. cancel a running process)."""

    def setDefaultParameters(self, parameterNode):
        """Fill empty parameters with defaults after the node is connected (e.g. the first volume)."""
