"""CounterfactualVATraining: train a counterfactual attribution model from 3D Slicer or its Python console.

Training runs the library's own command line (``python -m CounterfactualVACLI train ... --progress``) in a
separate process, exactly as from the shell: the panel stays live, GPU memory is released when the run ends,
and the command is the one the test suite runs. The process prints ``PROGRESS <fraction> step N/T loss_...=``
lines, which are parsed into live values; the run's ``log.csv`` is mirrored into a table node
(``<run> training log``) with a plot chart of the loss columns (``<run> training losses``). Stop sends SIGTERM:
the training loop finishes its step, writes ``checkpoint.pt`` and exits with code 3; Resume continues from it.

Console use (Slicer's Python console, or any Python with the ``slicer-core`` wheel; no Qt needed)::

    from CounterfactualVATraining import CounterfactualVATrainingLogic
    logic = CounterfactualVATrainingLogic()                      # scene: slicer.mrmlScene in the application
    logic.datasetPreview(normalFolder="/data/ctrl", abnormalFolder="/data/ad", outputFolder="/runs/ad")
    model = logic.train("/runs/ad/cohort.csv", "/runs/ad", method="vantgan", steps=2000, device="auto")
    run = logic.train(csv, out, steps=20000, waitForCompletion=False)   # poll() from a timer, stop(), ...
    logic.resume(out)                                             # continue a stopped run

Where trained models are recorded (so that the CounterfactualVA module can offer them): a JSON file,
``~/.counterfactualva/trained_models.json`` (or ``$COUNTERFACTUALVA_TRAINED_MODELS``), newest last, read with
:func:`trainedModels`; in the Slicer application also the ``CounterfactualVA/lastModelPath`` setting and the
model-path history of the CounterfactualVA panel; and the ``CounterfactualVA.ModelPath`` attribute of the run's
table node in the scene.
"""

import importlib
import json
import os
import sys
import time
from typing import Annotated, Callable

import slicer
import vtk  # noqa: F401  (the self-test and console users get it from here)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _addLibraryPaths():
    """Make CounterfactualVALib and CounterfactualVATrainingLib importable: in an installed extension both live
    next to this file; in the source tree CounterfactualVALib is in the sibling CounterfactualVA folder."""
    for folder in (os.path.join(os.path.dirname(MODULE_DIR), "CounterfactualVA"), MODULE_DIR):
        if os.path.isdir(os.path.join(folder, "CounterfactualVALib")) or os.path.isdir(os.path.join(folder, "CounterfactualVATrainingLib")):
            if folder not in sys.path:
                sys.path.insert(0, folder)


_addLibraryPaths()

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
from CounterfactualVALib.slicer_support import process as processes  # noqa: E402
from CounterfactualVALib.slicer_support import settings  # noqa: E402
from CounterfactualVALib.slicer_support.requirements import DependencyHandler, check_installed, missing_requirements  # noqa: E402
from CounterfactualVATrainingLib.slicer_support import training_process  # noqa: E402
from CounterfactualVATrainingLib.slicer_support.training_data import (  # noqa: E402,F401  (re-exported: the module's constants)
    COHORT_CSV_NAME,
    IMAGE_EXTENSIONS,
    LOG_NAME,
    MODEL_PATH_ATTRIBUTE,
    RUN_FOLDER_ATTRIBUTE,
    SERIES_COLORS,
    DatasetPreviewMixin,
    TrainingLogMixin,
)
from CounterfactualVATrainingLib.slicer_support.training_process import CHECKPOINT_NAME, EXIT_STOPPED, MODEL_NAME  # noqa: E402,F401
from CounterfactualVATrainingLib.slicer_support import training_request  # noqa: E402
from CounterfactualVATrainingLib.slicer_support.testing import TINY_CONFIG, tiny_training_run  # noqa: E402
from CounterfactualVATrainingLib.slicer_support.training_request import (  # noqa: E402  (re-exported: the module's choices)
    CROPS,
    DEVICES,
    INTENSITIES,
    METHODS,
    REQUEST_NAME,
    SPATIAL_DIMS,
)

DATA_SOURCES = ("cohort CSV", "two folders")
CounterfactualVATrainingProcess = training_process.TrainingProcess
trainedModelsFile, trainedModels, recordTrainedModel = (
    training_process.trainedModelsFile, training_process.trainedModels, training_process.recordTrainedModel)


#
# CounterfactualVATraining
#


class CounterfactualVATraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Counterfactual VA Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CounterfactualVA contributors"]
        self.parent.helpText = _(
            """
Trains a counterfactual visual-attribution model (VANT-GAN, ANT-GAN, VA-GAN, ICAM, medXGAN, attention-guided
CycleGAN, or a classifier baseline) on normal and abnormal scans, for use in the <b>Counterfactual Visual
Attribution</b> module. Data: a cohort CSV (<code>path,label[,mask,subtype,split]</code>, label 0 = normal,
1 = abnormal) or two folders of images. Training runs in a separate process (GPU when available); the loss
curves are shown as a table and a plot that update live. <b>Stop</b> writes a checkpoint, <b>Resume</b>
continues from it. The result is <code>model.safetensors</code> in the output folder.
Console: <code>CounterfactualVATrainingLogic().train(csvPath, outputFolder, ...)</code>.
"""
        )
        self.parent.acknowledgementText = _(
            """
Built on MONAI and PyTorch; the subprocess design follows SlicerMONAIAuto3DSeg.
"""
        )


#
# Parameter node (Slicer application only)
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class CounterfactualVATrainingParameterNode:
        """The panel's settings, saved with the scene.

        size/spacing: the model grid as "x y [z]" (voxels, mm). batchSize 0: the method's default.
        timeBudgetMinutes 0: no limit (train --time-budget).
        hyperParameters: method settings as key=value (whitespace or new lines between pairs); a QPlainTextEdit,
        bound by slicer_support.framework's connector that writes only changed text (the cursor stays put).
        csvPath, normalFolder, abnormalFolder, outputFolder: text, "" when empty (never ".").
        """

        dataSource: Annotated[str, Choice(list(DATA_SOURCES))] = DATA_SOURCES[0]
        csvPath: str = ""
        normalFolder: str = ""
        abnormalFolder: str = ""
        method: Annotated[str, Choice(list(METHODS))] = "vantgan"
        spatialDims: Annotated[int, Choice(list(SPATIAL_DIMS))] = 3
        size: str = "64 64 64"
        spacing: str = "3 3 3"
        crop: Annotated[str, Choice(list(CROPS))] = "foreground"
        intensity: Annotated[str, Choice(list(INTENSITIES))] = "percentile"
        hyperParameters: str = ""
        steps: Annotated[int, WithinRange(1, 10_000_000)] = 1000
        batchSize: Annotated[int, WithinRange(0, 4096)] = 0
        timeBudgetMinutes: Annotated[float, WithinRange(0.0, 10000.0)] = 0.0
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        outputFolder: str = ""

else:
    CounterfactualVATrainingParameterNode = None


_pathText = settings.path_text


#
# CounterfactualVATrainingWidget
#


class CounterfactualVATrainingWidget(ParameterNodeWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: binds the .ui to the parameter node and drives CounterfactualVATrainingLogic."""

    POLL_INTERVAL_MS = 500

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._timer = None
        self._liveValues = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel("CounterfactualVATraining.ui", CounterfactualVATrainingLogic(), onPoll=self._onPoll, pollIntervalMs=self.POLL_INTERVAL_MS)

        self.ui.previewButton.connect("clicked(bool)", self.onPreviewButton)
        self.ui.methodDefaultsButton.connect("clicked(bool)", self.onMethodDefaultsButton)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.stopButton.connect("clicked(bool)", self.onStopButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def cleanup(self):
        """On application exit a running training is stopped with a checkpoint (resumable), with a dialog that
        shows it and lets the user kill it at once; the GUI stays responsive meanwhile."""
        if self._process is not None:
            self._stopWithFeedback(self._process)
            self._process = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    @staticmethod
    def _stopWithFeedback(process, timeout: float = 120.0):
        process.stop(wait=False)
        dialog = qt.QProgressDialog(_("Stopping the training: finishing the current step and writing its checkpoint..."), _("Kill now"), 0, 0)
        dialog.setWindowTitle(_("Counterfactual VA Training"))
        dialog.show()
        deadline = time.monotonic() + timeout
        while not process.poll():
            if dialog.wasCanceled or time.monotonic() > deadline:
                process.kill()
            slicer.app.processEvents()
            time.sleep(0.05)
        dialog.close()

    def onReload(self):
        """Developer 'Reload': the training process always starts with fresh library code; reload the
        panel's support modules this process imported."""
        for name in sorted(n for n in list(sys.modules) if n.startswith("CounterfactualVATrainingLib.slicer_support.")):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    # enter/exit/scene close/parameter node: ParameterNodeWidgetMixin; this is its hook
    def refreshFromParameterNode(self):
        self._updateButtons()

    # -- state ---------------------------------------------------------------------------------------------
    def _usesFolders(self):
        return self._parameterNode is not None and self._parameterNode.dataSource == DATA_SOURCES[1]

    def _updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        running = self._process is not None
        folders = self._usesFolders()
        for widget in (self.ui.csvPathLineEdit,):
            widget.enabled = not folders and not running
        for widget in (self.ui.normalFolderLineEdit, self.ui.abnormalFolderLineEdit):
            widget.enabled = folders and not running
        for widget in (
            self.ui.dataSourceComboBox, self.ui.methodComboBox, self.ui.spatialDimsComboBox, self.ui.sizeLineEdit,
            self.ui.spacingLineEdit, self.ui.cropComboBox, self.ui.intensityComboBox, self.ui.hyperParametersTextEdit,
            self.ui.methodDefaultsButton, self.ui.stepsSpinBox, self.ui.batchSizeSpinBox, self.ui.timeBudgetSpinBox, self.ui.deviceComboBox,
            self.ui.outputFolderLineEdit, self.ui.previewButton,
        ):
            widget.enabled = not running
        output = _pathText(p.outputFolder) if p else ""
        haveData = bool(p) and (bool(_pathText(p.normalFolder) and _pathText(p.abnormalFolder)) if folders else bool(_pathText(p.csvPath)))
        self.ui.startButton.enabled = not running and haveData and bool(output)
        self.ui.stopButton.enabled = running
        self.ui.resumeButton.enabled = not running and bool(output) and os.path.isfile(os.path.join(output, CHECKPOINT_NAME))
        self.ui.startButton.toolTip = _("Train a new model into the output folder") if self.ui.startButton.enabled else _(
            "Select the data (a cohort CSV or two folders) and an output folder"
        )

    def _addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)
        self.ui.logTextEdit.ensureCursorVisible()

    def _onProgress(self, fraction, step, total, values):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = _("step {step}/{total} (%p%)").format(step=step, total=total)
        self._liveValues.update(values)  # validation figures stay shown until the next validation
        self.ui.lossesLabel.text = training_process.live_values_text(self._liveValues)

    # -- actions ---------------------------------------------------------------------------------------------
    def _datasetArguments(self):
        p = self._parameterNode
        if self._usesFolders():
            return {"normalFolder": _pathText(p.normalFolder), "abnormalFolder": _pathText(p.abnormalFolder), "outputFolder": _pathText(p.outputFolder) or None}
        return {"csvPath": _pathText(p.csvPath)}

    def onPreviewButton(self):
        with slicer.util.tryWithErrorDisplay(_("The data could not be checked."), waitCursor=True):
            preview = self.logic.datasetPreview(**self._datasetArguments(), spatialDims=self._parameterNode.spatialDims)
            self.ui.datasetInfoLabel.text = self.logic.describePreview(preview)

    def onMethodDefaultsButton(self):
        with slicer.util.tryWithErrorDisplay(_("The method's settings could not be read."), waitCursor=True):
            defaults = self.logic.methodDefaults(self._parameterNode.method)
            current = self.logic.parseHyperParameters(self._parameterNode.hyperParameters)
            merged = {**defaults["config"], **current}
            self._parameterNode.hyperParameters = "\n".join(f"{k}={json.dumps(v)}" for k, v in merged.items())
            self._addLog(_("{title}: default settings filled in; edit them before Start.").format(title=defaults["title"]))

    def _start(self, resume):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            if not self.logic.setupPythonRequirements(askConfirmation=True):
                self._addLog(_("Python packages are missing; installation was declined."))
                return
            output = _pathText(p.outputFolder)
            for field in (self.ui.outputFolderLineEdit, *((self.ui.normalFolderLineEdit, self.ui.abnormalFolderLineEdit) if self._usesFolders() else (self.ui.csvPathLineEdit,))):
                field.addCurrentPathToHistory()  # ctkPathLineEdit's own history under its settingKey
            common = dict(waitForCompletion=False, progressCallback=self._onProgress, logCallback=self._addLog)
            if resume and os.path.isfile(os.path.join(output, REQUEST_NAME)):
                self._process = self.logic.resume(output, steps=p.steps, device=p.device, **common)
            else:
                csvPath = _pathText(p.csvPath)
                if self._usesFolders():
                    preview = self.logic.datasetPreview(**self._datasetArguments(), spatialDims=p.spatialDims)
                    self.ui.datasetInfoLabel.text = self.logic.describePreview(preview)
                    csvPath = preview["csv"]
                self._process = self.logic.train(
                    csvPath, output, **training_request.panel_train_arguments(p), resume=resume,
                    overwrite=not resume and self._confirmOverwrite(output), **common,
                )
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.lossesLabel.text = ""
            self._liveValues = {}
            self._showChart()
            self._timer.start()
        self._updateButtons()

    def _confirmOverwrite(self, output):
        if not any(os.path.isfile(os.path.join(output, name)) for name in (CHECKPOINT_NAME, MODEL_NAME)):
            return False
        if slicer.util.confirmOkCancelDisplay(
            _("{folder} already holds a training run. Start again and overwrite it? (Cancel, then Resume, to continue it.)").format(folder=output)
        ):
            return True
        raise ValueError(_("Cancelled: the existing run was kept. Use Resume to continue it."))

    def _showChart(self):
        chart = self._process.chartNode if self._process is not None else None
        plots = getattr(slicer.modules, "plots", None)
        if chart is not None and plots is not None:
            plots.logic().ShowChartInLayout(chart)

    def onStartButton(self):
        self.ui.logTextEdit.clear()
        self._start(resume=False)

    def onResumeButton(self):
        self._start(resume=True)

    def onStopButton(self):
        if self._process is not None:
            self._addLog(_("Stopping: the current step finishes and a checkpoint is written..."))
            self._process.stop(wait=False)

    def _onPoll(self):
        process = self._process
        if process is None:
            self._timer.stop()
            return
        try:
            done = process.poll()
        except Exception as exc:
            self._finish()
            self._addLog(f"ERROR: {exc}")
            slicer.util.errorDisplay(str(exc), windowTitle=_("Training failed"))
            return
        if not done:
            return
        self._finish()
        if process.modelPath:
            self._addLog(_("Model written to {path}. Open the Counterfactual Visual Attribution module to use it.").format(path=process.modelPath))
        elif process.resumable:
            self._addLog(_("Stopped at step {step}; Resume continues from the checkpoint.").format(step=process.step))
        else:
            self._addLog(_("Stopped before the first training step: nothing to resume; Start again."))

    def _finish(self):
        self._timer.stop()
        self._process = None
        self.ui.progressBar.hide()
        self._updateButtons()


#
# CounterfactualVATrainingLogic
#

_LogicBase = ScriptedLoadableModuleLogic if HAVE_SLICER_APP else object


class CounterfactualVATrainingLogic(DatasetPreviewMixin, TrainingLogMixin, _LogicBase):
    """The console API; no Qt needed. See the module docstring for an example.

    scene: where the log table and loss chart go (default: ``slicer.mrmlScene`` in the application; with
    slicer-core pass a ``slicer.vtkMRMLScene()``; with no scene at all no nodes are made)."""

    METHODS = METHODS
    DEVICES = DEVICES

    def __init__(self, scene=None):
        if _LogicBase is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        #: the Python that runs the command line; None: PythonSlicer in Slicer, else this interpreter
        self.pythonExecutable = None

    @property
    def scene(self):
        return self._scene if self._scene is not None else getattr(slicer, "mrmlScene", None)

    def getParameterNode(self):
        if CounterfactualVATrainingParameterNode is None:
            raise RuntimeError("Parameter nodes need the 3D Slicer application; call train() with arguments instead.")
        return CounterfactualVATrainingParameterNode(super().getParameterNode())

    # -- environment (slicer_support) ------------------------------------------------------------------------
    @staticmethod
    def libraryFolders() -> list:
        """The folders that hold CounterfactualVALib, CounterfactualVACLI and CounterfactualVATrainingLib."""
        return processes.library_folders(("CounterfactualVALib", "CounterfactualVACLI", "CounterfactualVATrainingLib"))

    def pythonCommand(self) -> str:
        return processes.python_executable(self.pythonExecutable, in_slicer=HAVE_SLICER_APP)

    def childEnvironment(self, device: str = "auto") -> dict:
        base = slicer.util.startupEnvironment() if HAVE_SLICER_APP and hasattr(slicer, "app") else None
        return processes.child_environment(self.libraryFolders(), device, base)

    @staticmethod
    def missingPythonPackages() -> list:
        """The requirements of Resources/requirements.txt not met here, with why (nothing is imported)."""
        return [f"{requirement} ({why})" for requirement, why in missing_requirements()]

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what training needs (the same file as attribution) into Slicer's Python; True when ready."""
        return DependencyHandler("CounterfactualVA Training", in_slicer=HAVE_SLICER_APP).ensure(askConfirmation)

    # -- the request (slicer_support.training_request: parsing, checks, command line) ---------------------------
    parseNumbers = staticmethod(training_request.parse_numbers)
    parseHyperParameters = staticmethod(training_request.parse_hyper_parameters)
    methodDefaults = staticmethod(training_request.method_defaults)

    def buildCommand(self, csvPath, outputFolder, **arguments) -> list:
        """The ``train`` command line (keywords as for train(), plus resume)."""
        return training_request.build_command(self.pythonCommand(), csvPath, outputFolder, **arguments)

    def validate(self, csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity, resume, overwrite, timeBudget=None):
        """Raise ValueError with what is wrong and what to do, before anything is launched (the arguments, then
        every file of the cohort). Returns the absolute output folder."""
        folder = training_request.check_arguments(
            csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity, resume, overwrite, timeBudget)
        preview = self.datasetPreview(csvPath=csvPath, spatialDims=int(spatialDims))
        if preview["problems"]:
            raise ValueError(" ".join(preview["problems"]))
        return folder

    def train(
        self,
        csvPath,
        outputFolder,
        method: str = "vantgan",
        steps: int = 1000,
        batchSize: int = None,
        spatialDims: int = 3,
        size=(64, 64, 64),
        spacing=(3.0, 3.0, 3.0),
        device: str = "auto",
        config: dict = None,
        resume: bool = False,
        waitForCompletion: bool = True,
        progressCallback: Callable = None,
        crop: str = "foreground",
        intensity: str = "percentile",
        orientation: str = "RAS",
        seed: int = 0,
        logEvery: int = None,
        valEvery: int = None,
        checkpointEvery: int = None,
        logCallback: Callable = None,
        overwrite: bool = False,
        recordModel: bool = True,
        timeout: float = None,
        timeBudget: float = None,
        cacheFolder: str = None,
    ):
        """Train ``method`` on the cohort CSV into ``outputFolder`` with ``counterfactualva train`` in a subprocess.

        size/spacing: the model grid (x y [z], voxels and mm); crop ("foreground" | "image") and intensity
        ("percentile" | "minmax" | "none"): the preprocessing, kept in the model file for inference. config: the
        method's hyper-parameters (see methodDefaults()). logEvery/valEvery/checkpointEvery: None = the command
        line's defaults (10/100/100 steps). timeBudget: minutes of training after which the run stops with its best
        validated model (None or 0: no limit; steps stays the upper bound and the learning-rate schedule). cacheFolder: keep
        the subjects' preprocessed arrays there, so that the next training on this cohort and grid skips preprocessing
        (None: preprocess in memory only). resume: continue the run in outputFolder from its checkpoint (same
        method, preprocessing and config; steps may grow).

        waitForCompletion=True: returns the model path (``<out>/model.safetensors``), or None when the run was
        stopped (resumable); raises RuntimeError on failure. False: returns the running
        CounterfactualVATrainingProcess; poll() it until True, stop() to stop with a checkpoint (exit code 3).
        progressCallback(fraction, step, totalSteps, values) gets every progress line. On success the model is
        recorded (see :func:`trainedModels`) unless recordModel=False. Bad input raises ValueError before
        anything is launched.
        """
        config = self.parseHyperParameters(config or {})
        size = self.parseNumbers(size, int, "size")
        spacing = self.parseNumbers(spacing, float, "spacing")
        folder = self.validate(csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity, resume, overwrite, timeBudget)
        check_installed("CounterfactualVATraining", "Start", "CounterfactualVATrainingLogic().setupPythonRequirements()")
        csvPath = os.path.abspath(str(csvPath))
        arguments = dict(
            csvPath=csvPath, outputFolder=folder, method=method, steps=int(steps), batchSize=batchSize, spatialDims=int(spatialDims),
            size=size, spacing=spacing, device=device, config=config, crop=crop, intensity=intensity, orientation=orientation,
            seed=int(seed), logEvery=logEvery, valEvery=valEvery, checkpointEvery=checkpointEvery, timeBudget=timeBudget or None,
            cacheFolder=os.path.abspath(str(cacheFolder)) if cacheFolder else None,
        )
        command = self.buildCommand(resume=resume, **arguments)
        training_request.write_request(folder, arguments, command)
        table, chart = self.prepareLog(folder, resume)

        def onSuccess(process):
            if table is not None:
                table.SetAttribute(MODEL_PATH_ATTRIBUTE, process.modelPath)
            if recordModel:
                self.recordModel(process.modelPath, method=method, run=folder, data=csvPath, steps=process.step or int(steps))

        process = CounterfactualVATrainingProcess(
            self, command, self.childEnvironment(device), folder, table, chart, progressCallback, logCallback, onSuccess,
        )
        process.start()
        if not waitForCompletion:
            return process
        return process.wait(timeout=timeout)

    def resume(self, outputFolder, steps: int = None, device: str = None, waitForCompletion: bool = True, **kwargs):
        """Continue the stopped run in ``outputFolder`` with the settings it was started with (saved in
        ``<out>/CounterfactualVATraining.json``); ``steps``/``device`` may change. Other keyword arguments as
        for train() (progressCallback, logCallback, recordModel, timeout)."""
        arguments = training_request.read_request(outputFolder)
        if steps:
            arguments["steps"] = int(steps)
        if device:
            arguments["device"] = device
        arguments.update(kwargs)
        return self.train(resume=True, waitForCompletion=waitForCompletion, **arguments)

    def recordModel(self, modelPath, **details) -> str:
        """Record a trained model where the CounterfactualVA module finds it: the JSON list of
        :func:`trainedModelsFile`, and in the application the CounterfactualVA panel's settings."""
        path = recordTrainedModel(modelPath, **details)
        # the attribution panel's default model and its model field's history (slicer_support.settings)
        settings.remember_model(settings.application_settings(), modelPath)
        return path

    @staticmethod
    def trainedModels(existingOnly: bool = True) -> list:
        return trainedModels(existingOnly)


#
# CounterfactualVATrainingTest
#


class CounterfactualVATrainingTest(ScriptedLoadableModuleTest):
    """Self-test: a tiny 2D VANT-GAN trained for a few steps on a synthetic cohort through the subprocess,
    polled like the panel's timer does. Runs in Slicer (Developer mode > Reload and Test) and under slicer-core
    (Testing/test_slicer_training_logic.py)."""

    TINY_CONFIG = TINY_CONFIG

    def setUp(self):
        if hasattr(slicer, "mrmlScene"):
            slicer.mrmlScene.Clear(0)
            self.scene = slicer.mrmlScene
        else:
            self.scene = slicer.vtkMRMLScene()

    def runTest(self):
        # "Reload and Test" calls runTest() inside tryWithErrorDisplay: SkipTest would show as an error.
        missing = CounterfactualVATrainingLogic.missingPythonPackages()
        if missing:
            self.delayDisplay(f"CounterfactualVATraining self-test not run: Python packages missing ({', '.join(missing)}). Click Start in the module to install them.")
            return
        self.setUp()
        self.test_CounterfactualVATraining_TinyRun()

    def test_CounterfactualVATraining_TinyRun(self):
        self.delayDisplay("Starting the CounterfactualVATraining test")
        logic = CounterfactualVATrainingLogic(scene=self.scene)
        if logic.missingPythonPackages():  # under pytest/unittest only; runTest() checks first
            self.skipTest(f"missing Python packages: {logic.missingPythonPackages()}")
        tiny_training_run(self, logic)
        self.delayDisplay("Test passed")
