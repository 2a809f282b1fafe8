"""CounterfactualVA: counterfactual visual attribution of brain MRI in 3D Slicer.

The module runs the library's own command line (``python -m CounterfactualVACLI attribute ... --progress``)
in a child process, the way SlicerMONAIAuto3DSeg runs its inference: the input volume is written as NRRD to
a temporary folder, a timer polls the child's ``PROGRESS`` lines so the GUI stays live, Cancel kills its
process group, and on success the output files are loaded into NEW nodes on the input's exact voxel grid.
The child owns the GPU; the GUI process never imports torch. What both modules share (process runner,
requirements from ``Resources/requirements.txt``, settings, the options form) is ``CounterfactualVALib.slicer_support``.

Console use (works in Slicer's Python console and with the ``slicer-core`` wheel, no Qt needed)::

    from CounterfactualVA import CounterfactualVALogic
    result = CounterfactualVALogic().run(volumeNode, "/path/model.safetensors", device="auto")
    result.attribution, result.mask, result.counterfactual, result.summary.scalars   # summary: a RunSummary
"""

import importlib
import os
import sys
from typing import Annotated, Callable

import slicer

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # CounterfactualVALib and CounterfactualVACLI live next to this file
    sys.path.insert(0, MODULE_DIR)

from CounterfactualVALib import slicer_nodes  # noqa: E402
from CounterfactualVALib.slicer_support import process as processes  # noqa: E402
from CounterfactualVALib.slicer_support import attribution, option_form, results, sample_data, settings, testing  # noqa: E402
from CounterfactualVALib.slicer_support.attribution_worker import AttributionWorker  # noqa: E402
from CounterfactualVALib.slicer_support.device_probe import DeviceProbe  # noqa: E402
from CounterfactualVALib.slicer_support.framework import (  # noqa: E402  (stand-ins under slicer-core)
    HAVE_SLICER_APP,
    Choice,
    ParameterNodeWidgetMixin,
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    WithinRange,
    _,
    parameterNodeWrapper,
    qt,
    translate,
)
from CounterfactualVALib.slicer_support.model_file import model_info, read_model_metadata  # noqa: E402
from CounterfactualVALib.slicer_support.option_form import option_specs_for_model_file  # noqa: E402
from CounterfactualVALib.slicer_support.option_rows import OptionRows  # noqa: E402
from CounterfactualVALib.slicer_support.requirements import DependencyHandler, check_installed, missing_requirements  # noqa: E402
from CounterfactualVALib.slicer_support.results import CounterfactualVAResult  # noqa: E402,F401  (part of the console API)

DEVICES = attribution.DEVICES
THRESHOLD_RULES = attribution.THRESHOLD_RULES
#: colour maps of the signed attribution overlay (white at zero; the first is the default)
PALETTES = results.PALETTES
SAMPLE_SCAN, SAMPLE_MODEL = sample_data.SAMPLE_SCAN, sample_data.SAMPLE_MODEL
CounterfactualVAProcess = attribution.AttributionProcess
DOCUMENTATION_URL = "https://github.com/CounterfactualVA/SlicerCounterfactualVA#use-from-slicer"
makeScene = testing.make_scene  # a scene set up like the application's, for slicer-core


def sampleDirectories(moduleDir: str | None = None) -> list:
    return sample_data.sample_directories(moduleDir or MODULE_DIR)


def sampleFilePath(fileName: str, moduleDir: str | None = None) -> str | None:
    return sample_data.sample_file_path(fileName, moduleDir or MODULE_DIR)


def registerSampleData() -> bool:
    return sample_data.register_sample_data(MODULE_DIR)


#
# CounterfactualVA
#


class CounterfactualVA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Counterfactual Visual Attribution")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CounterfactualVA contributors"]
        self.parent.helpText = _(
            """
Explains a brain MRI by its <b>counterfactual</b>: the healthy-looking counterpart a trained model produces,
and the signed map of where and how it differs from the scan. Outputs are new nodes: the counterfactual, the
signed attribution map (shown over the scan), a thresholded mask and method-specific maps. Inference runs in
a separate process (GPU when available) that can be cancelled.
See more information in <a href="{url}">the module documentation</a>.
"""
        ).format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            """
Methods: VANT-GAN, ANT-GAN, VA-GAN, ICAM, medXGAN, attention-guided CycleGAN and classifier baselines,
built on MONAI and PyTorch. The subprocess design follows SlicerMONAIAuto3DSeg.
"""
        )
        if HAVE_SLICER_APP and hasattr(slicer, "app"):
            # After startup, when the SampleData module is loaded (as Slicer's module template does).
            slicer.app.connect("startupCompleted()", _registerSampleDataSafely)


def _registerSampleDataSafely():
    try:
        registerSampleData()
    except Exception as exc:  # never let sample registration break the module
        print(f"CounterfactualVA: could not register the sample data: {exc}")


#
# Parameter node (Slicer application only)
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class CounterfactualVAParameterNode:
        """The panel's settings, saved with the scene.

        modelPath: text, "" when none (bound through slicer_support.framework's path connector).
        thresholdValue: 0 means the threshold rule's own default (e.g. half of the map's maximum for 'paper').
        methodOptionValues: the options form's changed values per method, JSON (slicer_support.option_form).
        """

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        thresholdRule: Annotated[str, Choice(list(THRESHOLD_RULES))] = "paper"
        thresholdValue: Annotated[float, WithinRange(0.0, 1e6)] = 0.0
        opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
        createSegmentation: bool = False
        transparentBelowThreshold: bool = True
        colorMap: Annotated[str, Choice(list(PALETTES))] = slicer_nodes.DEFAULT_PALETTE
        methodOptionValues: str = ""

else:
    CounterfactualVAParameterNode = None
#: parameters the widget keeps itself (no .ui widget is bound to them)
UNBOUND_PARAMETERS = ("methodOptionValues",)


#
# CounterfactualVAWidget
#


class CounterfactualVAWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: binds the .ui to the parameter node and drives CounterfactualVALogic."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._result = None
        self._timer = None
        self._deviceProbe = None
        self._lastStage = None
        self._optionRows = None  # slicer_support.option_rows.OptionRows (made in setup)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel("CounterfactualVA.ui", CounterfactualVALogic(), onPoll=self._onPoll, pollIntervalMs=self.POLL_INTERVAL_MS)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self._updateModelInfo)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self._onOpacityChanged)
        self.ui.colorMapComboBox.connect("currentIndexChanged(int)", self._onPaletteChanged)
        self._optionRows = OptionRows(self.ui.methodOptionsFormWidget.layout(), self._saveMethodOptions, self._addLog)
        self.ui.showAdvancedOptionsCheckBox.connect("toggled(bool)", self._optionRows.show_advanced)
        self.ui.resetOptionsButton.connect("clicked(bool)", lambda checked=False: self._optionRows.reset())
        self.ui.progressBar.hide()
        # The device line is asked of the child's Python (torch is never imported here); the timer reads it.
        self._deviceProbe = self.logic.deviceProbe()
        self.ui.deviceInfoLabel.text = self._deviceProbe.poll() or _("Detecting the compute device...")
        self._timer.start()

        self.initializeParameterNode()
        self._updateModelInfo()

    def cleanup(self):
        self._cancelProcess()
        self.logic.releaseWorker()  # module exit: the warm worker's memory (and GPU memory) back
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
        self.removeObservers()

    def onReload(self):
        """Developer 'Reload': also reload the library modules this process has imported (the attribution
        process always starts with fresh code)."""
        self._cancelProcess()
        for name in sorted(n for n in list(sys.modules) if n.startswith("CounterfactualVALib.")):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    # enter/exit/scene close/parameter node: ParameterNodeWidgetMixin; these are its hooks
    def beforeSceneClose(self):
        self._cancelProcess()
        self._result = None

    def setDefaultParameters(self, parameterNode):
        if not parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                parameterNode.inputVolume = firstVolumeNode
        if not settings.path_text(parameterNode.modelPath):
            parameterNode.modelPath = settings.default_model(qt.QSettings(), fallback=sampleFilePath(SAMPLE_MODEL))

    def refreshFromParameterNode(self):
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        if self._process is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running attribution (nothing is created).")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        ready = bool(p and p.inputVolume and settings.path_text(p.modelPath))
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Compute the counterfactual and attribution map") if ready else _("Select an input volume and a model file")

    def _updateModelInfo(self, path=None):
        path = settings.path_text(self.ui.modelPathLineEdit.currentPath if path is None else path)
        self.ui.modelInfoLabel.text = self.logic.modelInfo(path) if path else _("Select a model file (.safetensors).")
        self._rebuildMethodOptions(path)

    # -- method options: one form row per option of the model's method (slicer_support.option_form/option_rows) --
    def _rebuildMethodOptions(self, path):
        saved = self._parameterNode.methodOptionValues if self._parameterNode else ""
        form, message = option_form.form_for_model_file(path, saved)
        self._optionRows.show(form)
        self.ui.methodOptionsLabel.text = message
        self.ui.methodOptionsLabel.visible = not form.specs
        self.ui.showAdvancedOptionsCheckBox.visible = bool(form.advanced_names)
        self.ui.resetOptionsButton.visible = bool(form.specs)
        self._optionRows.show_advanced(self.ui.showAdvancedOptionsCheckBox.checked)

    def _saveMethodOptions(self, text):
        if self._parameterNode:  # saved with the scene, per method
            self._parameterNode.methodOptionValues = text

    def _onOpacityChanged(self, value):
        if self._result is not None:
            self.logic.setOpacity(self._result, value)

    def _onPaletteChanged(self, index=None):
        if self._parameterNode:
            self.logic.recolorResults(slicer.mrmlScene, self._parameterNode.colorMap)

    def _setControlsEnabled(self, enabled):
        for widget in (
            self.ui.inputSelector, self.ui.modelPathLineEdit, self.ui.deviceComboBox, self.ui.thresholdRuleComboBox,
            self.ui.thresholdValueSpinBox, self.ui.createSegmentationCheckBox, self.ui.transparentBelowThresholdCheckBox,
            self.ui.colorMapComboBox, self.ui.methodOptionsFormWidget, self.ui.showAdvancedOptionsCheckBox, self.ui.resetOptionsButton,
        ):
            widget.enabled = enabled

    def _addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)
        self.ui.logTextEdit.ensureCursorVisible()

    def _onProgress(self, fraction, stage):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{stage} (%p%)"
        if stage != self._lastStage:
            self._lastStage = stage
            self._addLog(f"[{100 * fraction:3.0f}%] {stage}")

    def onApplyButton(self):
        if self._process is not None:
            self._cancelProcess()
            self._addLog(_("Cancelled: no nodes were created."))
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("CounterfactualVA could not start."), waitCursor=True):
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                self._addLog(_("Python packages are missing; installation was declined."))
                return
            self.ui.modelPathLineEdit.addCurrentPathToHistory()  # ctkPathLineEdit's own history (its settingKey)
            settings.remember_model(qt.QSettings(), p.modelPath)
            self.ui.logTextEdit.clear()
            self._lastStage = None
            self._process = self.logic.run(
                p.inputVolume, p.modelPath, device=p.device, thresholdRule=p.thresholdRule,
                thresholdValue=p.thresholdValue if p.thresholdValue > 0 else None, opacity=p.opacity,
                createSegmentation=p.createSegmentation, transparentBelowThreshold=p.transparentBelowThreshold,
                palette=p.colorMap, methodOptions=self._optionRows.form.options(), waitForCompletion=False,
                progressCallback=self._onProgress, logCallback=self._addLog,
            )
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self._setControlsEnabled(False)
            self._checkCanApply()
            self._timer.start()

    def _onPoll(self):
        if self._deviceProbe is not None:
            line = self._deviceProbe.poll()
            if line is not None:
                self.ui.deviceInfoLabel.text = line
                self._deviceProbe = None
        if self._process is None:
            if self._deviceProbe is None:
                self._timer.stop()
            return
        try:
            done = self._process.poll()
        except Exception as exc:
            self._finishProcess()
            self._addLog(f"ERROR: {exc}")
            slicer.util.errorDisplay(str(exc), windowTitle=_("CounterfactualVA failed"))
            return
        if done:
            result = self._process.result
            self._finishProcess()
            self._result = result
            for line in results.finished_lines(result):
                self._addLog(line)

    def _finishProcess(self):
        self._process = None
        self.ui.progressBar.hide()
        self._setControlsEnabled(True)
        self._checkCanApply()

    def _cancelProcess(self):
        if self._process is not None:
            self._process.cancel()  # kills the process group and returns at once
            self._finishProcess()


#
# CounterfactualVALogic
#

_LogicBase = ScriptedLoadableModuleLogic if HAVE_SLICER_APP else object


class CounterfactualVALogic(_LogicBase):
    """The console API; no Qt needed. See the module docstring for an example."""

    DEVICES = DEVICES
    THRESHOLD_RULES = THRESHOLD_RULES
    BATCH_TABLE_NAME = results.BATCH_TABLE_NAME
    BATCH_COLUMNS = tuple(results.BATCH_COLUMNS)

    def __init__(self):
        if _LogicBase is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        #: the Python that runs the command line; None: PythonSlicer in Slicer, else this interpreter
        self.pythonExecutable: str | None = None
        #: True: runs go to one warm worker process kept between runs (torch imported once, the model loaded
        #: once per model file; see slicer_support.attribution_worker); False: a fresh command-line process per run
        self.useWorker: bool = True
        #: seconds without a run after which the worker exits by itself (its memory, GPU memory included, returned)
        self.workerIdleTimeout: float = 600.0
        self._worker: AttributionWorker | None = None

    def getParameterNode(self):
        if CounterfactualVAParameterNode is None:
            raise RuntimeError("Parameter nodes need the 3D Slicer application; call run() with arguments instead.")
        return CounterfactualVAParameterNode(super().getParameterNode())

    # -- environment ---------------------------------------------------------------------------------------
    @staticmethod
    def moduleDirectory() -> str:
        return MODULE_DIR

    def pythonCommand(self) -> str:
        return processes.python_executable(self.pythonExecutable, in_slicer=HAVE_SLICER_APP)

    def childEnvironment(self, device: str = "auto") -> dict:
        """Slicer's startup environment (so that the PythonSlicer launcher sets up its own paths) with this
        module's folder first on PYTHONPATH; no CUDA device when the CPU is asked for."""
        base = slicer.util.startupEnvironment() if HAVE_SLICER_APP and hasattr(slicer, "app") else None
        return processes.child_environment([MODULE_DIR], device, base)

    def attributionWorker(self) -> AttributionWorker:
        """The worker this logic's runs share (started on the first run, restarted after a Cancel)."""
        if self._worker is None:
            self._worker = AttributionWorker(self.pythonCommand(), self.childEnvironment("auto"), self.workerIdleTimeout)
        return self._worker

    def releaseWorker(self) -> None:
        """End the warm worker (module exit, scene close): its memory and any GPU memory are returned."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def deviceProbe(self) -> DeviceProbe:
        """Asks the child's Python which device it will use (see slicer_support.device_probe)."""
        return DeviceProbe(self.pythonCommand(), self.childEnvironment())

    def deviceDescription(self, timeout: float = 60.0) -> str:
        """The panel's device line (GPU name and memory, or the CPU), asked of the child's Python; blocks."""
        return self.deviceProbe().wait(timeout)

    @staticmethod
    def missingPythonPackages() -> list:
        """The requirements of Resources/requirements.txt not met here, with why (nothing is imported)."""
        return [f"{requirement} ({why})" for requirement, why in missing_requirements()]

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what the attribution process needs into Slicer's Python (asks first); True when ready,
        False when declined. PyTorch comes from the PyTorch extension, the rest from pip."""
        return DependencyHandler("CounterfactualVA", in_slicer=HAVE_SLICER_APP).ensure(askConfirmation)

    def buildCommand(self, modelPath, inputPath, outDir, device="auto", thresholdRule="paper", thresholdValue=None, methodOptions=None) -> list:
        return attribution.build_command(self.pythonCommand(), modelPath, inputPath, outDir, device, thresholdRule, thresholdValue, methodOptions)

    @staticmethod
    def methodOptionSpecs(modelPath) -> list:
        """The attribution options of the model's method as form rows (``method_options.OptionSpec``), read from
        the model file's header without torch; ModelHeaderError (a ValueError) when the file is not usable."""
        return option_specs_for_model_file(str(modelPath))

    @staticmethod
    def modelInfo(modelPath) -> str:
        """One paragraph about a model file (method, classes, grid, training), read from its header only."""
        return model_info(modelPath)

    # -- running -------------------------------------------------------------------------------------------
    @staticmethod
    def validate(inputVolumeNode, modelPath, device="auto", thresholdRule="paper", thresholdValue=None) -> None:
        """Raise ValueError with what is wrong and what to do, before anything is launched."""
        attribution.validate(inputVolumeNode, modelPath, device, thresholdRule, thresholdValue)

    def run(
        self,
        inputVolumeNode,
        modelPath,
        device: str = "auto",
        thresholdRule: str = "paper",
        thresholdValue: float | None = None,
        opacity: float = 0.6,
        createSegmentation: bool = False,
        waitForCompletion: bool = True,
        progressCallback: Callable[[float, str], None] | None = None,
        logCallback: Callable[[str], None] | None = None,
        timeout: float | None = None,
        cpuFallback: bool = True,
        methodOptions: dict | None = None,
        transparentBelowThreshold: bool = True,
        palette: str = slicer_nodes.DEFAULT_PALETTE,
    ):
        """Explain `inputVolumeNode` with the model in `modelPath`.

        `methodOptions` go to the method's `attribute` (the model's method lists them, see
        :meth:`methodOptionSpecs`: e.g. ICAM {"samples": 20, "direction": "to_normal"}, medXGAN
        {"inversion_steps": 500}, classifier {"explainer": "gradcam"}). `opacity`, `createSegmentation`,
        `transparentBelowThreshold` and `palette` are how the results are shown (see :meth:`loadResults`).

        waitForCompletion=True: returns a CounterfactualVAResult (new nodes + summary), raises RuntimeError on
        failure. False: returns the running CounterfactualVAProcess; call poll() until it returns True (then
        ``.result``), or cancel(). Nothing is created on failure or cancel, and the input is never modified.
        cpuFallback: when a GPU run fails for a GPU reason (no CUDA device, out of GPU memory), run again on
        the CPU and say so in the log.
        """
        self.validate(inputVolumeNode, modelPath, device, thresholdRule, thresholdValue)
        results.check_palette(palette)
        check_installed("CounterfactualVA", "Apply", "CounterfactualVALogic().setupPythonRequirements()")
        loadOptions = {"opacity": opacity, "createSegmentation": createSegmentation, "transparentBelowThreshold": transparentBelowThreshold, "palette": palette}
        process = attribution.start_attribution(
            self, inputVolumeNode, modelPath, device, thresholdRule, thresholdValue, methodOptions, loadOptions, progressCallback,
            logCallback, cpuFallback, tempBase=slicer.app.temporaryPath if HAVE_SLICER_APP and hasattr(slicer, "app") else None,
            worker=self.attributionWorker() if self.useWorker else None,
        )
        if not waitForCompletion:
            return process
        return process.wait(timeout=timeout)

    def runOnVolumes(
        self,
        inputVolumeNodes,
        modelPath,
        progressCallback: Callable[[float, str], None] | None = None,
        logCallback: Callable[[str], None] | None = None,
        tableNode=None,
        **runOptions,
    ):
        """Run :meth:`run` (blocking) on each volume in turn and summarise the runs in a table node.

        `runOptions` are :meth:`run`'s keywords (device, thresholdRule, thresholdValue, opacity,
        createSegmentation, transparentBelowThreshold, palette, timeout, methodOptions, ...), the same for every volume.

        Returns ``(tableNode, results)``: the table ("CounterfactualVA summary", new unless `tableNode` is
        given, in which case its rows are replaced) has one row per volume with the volume's name, the method,
        the class probability (empty when the method has none), the mask volume in ml, the mask voxel count,
        the names of the created nodes and a status ("ok" or "error: <message>"); `results` holds one
        CounterfactualVAResult per volume, None where it failed. A failing volume does not stop the batch.
        """
        return attribution.run_batch(self.run, inputVolumeNodes, modelPath, progressCallback, logCallback, tableNode, **runOptions)

    # -- results -------------------------------------------------------------------------------------------
    @staticmethod
    def loadResults(inputVolumeNode, outDir, **options) -> CounterfactualVAResult:
        """Load a finished output folder into new nodes; see ``slicer_support.results.load_results``."""
        return results.load_results(inputVolumeNode, outDir, **options)

    @staticmethod
    def recolorResults(scene, palette: str) -> list:
        """Draw the signed maps already loaded into `scene` with another colour map; returns those nodes."""
        return results.recolor_results(scene, palette)

    @staticmethod
    def setOpacity(result: CounterfactualVAResult, opacity: float) -> int:
        """Foreground opacity of the slice views that show this result's attribution map."""
        return results.set_opacity(result, opacity)


#
# CounterfactualVATest
#


class CounterfactualVATest(ScriptedLoadableModuleTest):
    """Self-test: a random-weight model on a synthetic oblique volume, end to end through the subprocess.

    Runs in Slicer (Developer mode > Reload and Test) and under slicer-core (Testing/test_slicer_logic.py)."""

    makeTinyModel = staticmethod(testing.make_tiny_model)
    makeObliqueVolume = staticmethod(testing.make_oblique_volume)

    def setUp(self):
        if hasattr(slicer, "mrmlScene"):
            slicer.mrmlScene.Clear(0)
            self.scene = slicer.mrmlScene
        else:
            self.scene = makeScene()

    def runTest(self):
        # Slicer's "Reload and Test" calls runTest() directly inside tryWithErrorDisplay
        # (ScriptedLoadableModule.py, onReloadAndTest), so unittest's SkipTest would show as an error dialog:
        # say why nothing ran and return instead.
        missing = CounterfactualVALogic.missingPythonPackages()
        if missing:
            self.delayDisplay(f"CounterfactualVA self-test not run: Python packages missing ({', '.join(missing)}). Click Apply in the module to install them.")
            return
        self.setUp()
        self.test_CounterfactualVA_EndToEnd()

    def test_CounterfactualVA_EndToEnd(self):
        """The panel's path: an oblique volume under a linear transform, in a subject-hierarchy folder, run
        without blocking and polled like the widget's timer does, with a segmentation."""
        self.delayDisplay("Starting the CounterfactualVA end-to-end test")
        if CounterfactualVALogic.missingPythonPackages():  # under pytest/unittest only; runTest() checks first
            self.skipTest(f"missing Python packages: {CounterfactualVALogic.missingPythonPackages()}")
        testing.attribution_end_to_end(self, CounterfactualVALogic(), self.scene)
        self.delayDisplay("Test passed")
