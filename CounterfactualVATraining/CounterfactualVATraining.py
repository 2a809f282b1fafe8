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
import importlib.util
import json
import logging
import math
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Annotated, Callable

import slicer
import vtk

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

#: the method registry's names (CounterfactualVALib.methods; checked by Testing/test_slicer_training_logic.py),
#: listed here so that the panel can offer them without importing torch
METHODS = ("vantgan", "antgan", "vagan", "icam", "medxgan", "agcyclegan", "classifier")
#: choices of `counterfactualva train` (checked against the command line by the tests)
DEVICES = ("auto", "cpu", "cuda")
CROPS = ("foreground", "image")
INTENSITIES = ("percentile", "minmax", "none")
SPATIAL_DIMS = (3, 2)
DATA_SOURCES = ("cohort CSV", "two folders")
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
COHORT_CSV_NAME = "cohort.csv"
REQUEST_NAME = "CounterfactualVATraining.json"
CHECKPOINT_NAME = "checkpoint.pt"  # CounterfactualVATrainingLib.loop.CHECKPOINT_NAME (checked by the tests)
MODEL_NAME = "model.safetensors"  # CounterfactualVATrainingLib.loop.MODEL_NAME
LOG_NAME = "log.csv"
#: exit code of `counterfactualva train` when it was stopped with a checkpoint (resumable)
EXIT_STOPPED = 3
MODEL_PATH_ATTRIBUTE = "CounterfactualVA.ModelPath"
RUN_FOLDER_ATTRIBUTE = "CounterfactualVATraining.RunFolder"
#: what the training process imports (checked before launching)
REQUIRED_PACKAGES = {
    "torch": None,  # from Slicer's PyTorch extension
    "monai": "monai>=1.6,<1.7",
    "safetensors": "safetensors>=0.4",
    "SimpleITK": "SimpleITK>=2.3",
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "tqdm": "tqdm>=4.60",
}
#: plot colours of the loss series (slicer-core scenes have no colour tables for SetUniqueColor)
SERIES_COLORS = (
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)


#
# Where trained models are recorded
#


def trainedModelsFile() -> str:
    """The JSON file that lists models trained through this module (``$COUNTERFACTUALVA_TRAINED_MODELS`` or
    ``~/.counterfactualva/trained_models.json``)."""
    override = os.environ.get("COUNTERFACTUALVA_TRAINED_MODELS")
    if override:
        return os.path.abspath(os.path.expanduser(override))
    return os.path.join(os.path.expanduser("~"), ".counterfactualva", "trained_models.json")


def trainedModels(existingOnly: bool = True) -> list:
    """Models trained through this module, oldest first: dicts with path, method, run folder, data, time.

    The CounterfactualVA module (or anyone) can offer ``trainedModels()[-1]["path"]`` as the newest model."""
    path = trainedModelsFile()
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f).get("models", [])
    except (OSError, ValueError, AttributeError):
        return []
    entries = [e for e in entries if isinstance(e, dict) and e.get("path")]
    if existingOnly:
        entries = [e for e in entries if os.path.isfile(e["path"])]
    return entries


def recordTrainedModel(modelPath, **details) -> str:
    """Append a model to :func:`trainedModelsFile` (replacing an older entry of the same path; at most 100
    entries). Returns the JSON file's path."""
    path = trainedModelsFile()
    modelPath = os.path.abspath(str(modelPath))
    entries = [e for e in trainedModels(existingOnly=False) if os.path.abspath(e["path"]) != modelPath]
    entries.append({"path": modelPath, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S"), **details})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"models": entries[-100:]}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
        hyperParameters: method settings as key=value (whitespace or new lines between pairs).
        """

        dataSource: Annotated[str, Choice(list(DATA_SOURCES))] = DATA_SOURCES[0]
        csvPath: pathlib.Path = pathlib.Path("")
        normalFolder: pathlib.Path = pathlib.Path("")
        abnormalFolder: pathlib.Path = pathlib.Path("")
        method: Annotated[str, Choice(list(METHODS))] = "vantgan"
        spatialDims: Annotated[int, Choice(list(SPATIAL_DIMS))] = 3
        size: str = "64 64 64"
        spacing: str = "3 3 3"
        crop: Annotated[str, Choice(list(CROPS))] = "foreground"
        intensity: Annotated[str, Choice(list(INTENSITIES))] = "percentile"
        hyperParameters: str = ""
        steps: Annotated[int, WithinRange(1, 10_000_000)] = 1000
        batchSize: Annotated[int, WithinRange(0, 4096)] = 0
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        outputFolder: pathlib.Path = pathlib.Path("")

else:
    CounterfactualVATrainingParameterNode = None


def _pathText(value) -> str:
    text = str(value or "")
    return "" if text in ("", ".") else text


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
        if self._process is not None:
            self._process.stop(wait=True, timeout=60)  # leave a resumable checkpoint rather than an orphan process
            self._process = None
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def onReload(self):
        """Developer 'Reload': the training process always starts with fresh library code; reload the
        library modules this process imported for previews."""
        for name in sorted(n for n in list(sys.modules) if n.startswith("CounterfactualVAResearch.data")):
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
            self.ui.methodDefaultsButton, self.ui.stepsSpinBox, self.ui.batchSizeSpinBox, self.ui.deviceComboBox,
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
        shown = [f"{k} {v:.4g}" for k, v in self._liveValues.items() if k.startswith("loss")]
        shown += [f"{k} {v:.4g}" for k, v in self._liveValues.items() if k in ("val_ncc", "val_dice", "val_score")]
        self.ui.lossesLabel.text = "   ".join(shown)

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
                    csvPath, output, method=p.method, steps=p.steps, batchSize=p.batchSize or None, spatialDims=p.spatialDims,
                    size=self.logic.parseNumbers(p.size, int, "size"), spacing=self.logic.parseNumbers(p.spacing, float, "spacing"),
                    crop=p.crop, intensity=p.intensity, device=p.device, config=self.logic.parseHyperParameters(p.hyperParameters),
                    resume=resume, overwrite=not resume and self._confirmOverwrite(output), **common,
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
# The training process
#

_PROGRESS = re.compile(r"^PROGRESS\s+(\S+)\s+step\s+(\d+)/(\d+)\s*(.*)$")


def parseProgressLine(line: str):
    """``PROGRESS <fraction> step N/T key=value ...`` -> (fraction, step, total, values), else None."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    try:
        fraction = min(max(float(match.group(1)), 0.0), 1.0)
    except ValueError:
        return None
    values = {}
    for pair in match.group(4).split():
        key, sep, value = pair.partition("=")
        if sep:
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return fraction, int(match.group(2)), int(match.group(3)), values


class CounterfactualVATrainingProcess:
    """A running training: poll() it (from a QTimer or a loop) until it returns True, or stop() it.

    poll() forwards progress and log lines, mirrors ``log.csv`` into the table node, and returns True when the
    process has ended: then ``modelPath`` is set after success, or ``stopped``/``resumable`` after stop(). A
    failure raises RuntimeError with the command line's own message (its last ``ERROR:`` line).

    progressCallback(fraction, step, totalSteps, values) receives the parsed PROGRESS lines (values: the losses
    and, on validation steps, the val_* figures); logCallback(line) every other output line.
    """

    def __init__(self, logic, command, env, outputFolder, tableNode=None, chartNode=None, progressCallback=None,
                 logCallback=None, onSuccess=None):
        self.logic = logic
        self.command = list(command)
        self.env = env
        self.outputFolder = os.path.abspath(outputFolder)
        self.tableNode = tableNode
        self.chartNode = chartNode
        self.progressCallback = progressCallback
        self.logCallback = logCallback or (lambda line: logging.info(line))
        self.onSuccess = onSuccess
        self.fraction = 0.0
        self.step = 0
        self.totalSteps = None
        self.values: dict = {}
        self.log: list = []
        self.stderr: list = []
        self.returncode = None
        self.modelPath = None
        self.error = None
        self.done = False
        self.stopRequested = False
        self.stopped = False
        self.resumable = False
        self._stopTime = None
        self._exitTime = None
        self._logStat = None
        self._proc = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list = []

    @property
    def logPath(self) -> str:
        return os.path.join(self.outputFolder, LOG_NAME)

    @property
    def checkpointPath(self) -> str:
        return os.path.join(self.outputFolder, CHECKPOINT_NAME)

    # -- process control --------------------------------------------------------------------------------
    def start(self):
        self.logCallback("Running: " + shlex.join(self.command))
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        else:
            # Own process group: stop() signals the PythonSlicer launcher and the Python it starts alike.
            kwargs["start_new_session"] = True
        self._proc = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", bufsize=1, cwd=self.outputFolder, **kwargs,
        )
        self._threads = [
            threading.Thread(target=self._reader, args=(self._proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._reader, args=(self._proc.stderr, "err"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def _reader(self, stream, tag):
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((tag, line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass
        finally:
            self._queue.put((tag, None))

    def _drain(self):
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                continue
            progress = parseProgressLine(line) if tag == "out" else None
            if progress is not None:
                self.fraction, self.step, self.totalSteps, values = progress
                self.values = values
                if self.progressCallback:
                    self.progressCallback(self.fraction, self.step, self.totalSteps, values)
                continue
            if tag == "err":
                self.stderr.append(line)
            self.log.append(line)
            self.logCallback(line)

    @property
    def running(self) -> bool:
        return self._proc is not None and not self.done

    def _ended(self) -> bool:
        """The process has exited and its output is closed (under the PythonSlicer launcher the launcher may
        exit first; the Python it started holds the pipes until it has written its checkpoint)."""
        if self._proc.poll() is None:
            return False
        if self._exitTime is None:
            self._exitTime = time.monotonic()
        if any(thread.is_alive() for thread in self._threads):
            return time.monotonic() - self._exitTime > 600  # a stray grandchild keeps a pipe open: give up on it
        return True

    def poll(self) -> bool:
        """Forward output and refresh the log table; True when the process has ended. Raises on failure."""
        if self.done:
            if self.error:
                raise RuntimeError(self.error)
            return True
        self._drain()
        self.refreshTable()
        if not self._ended():
            return False
        self._drain()
        self.refreshTable(force=True)
        self.returncode = self._proc.returncode
        checkpointed = self.stopRequested and os.path.isfile(self.checkpointPath) and os.path.getmtime(self.checkpointPath) >= self._stopTime - 1
        if self.returncode == EXIT_STOPPED or (self.stopRequested and self.returncode != 0 and checkpointed):
            # (the second case: the PythonSlicer launcher died of the signal, the Python under it checkpointed)
            self.returncode = EXIT_STOPPED
            self.stopped = self.resumable = True
            self.done = True
            return True
        if self.stopRequested and self.returncode != 0:
            self.stopped = True
            self.resumable = os.path.isfile(self.checkpointPath)
            self.done = True
            self.logCallback(
                "Training was stopped before it wrote a checkpoint"
                + (" (an earlier checkpoint remains: Resume continues from it)." if self.resumable else "; start it again.")
            )
            return True
        if self.returncode != 0:
            return self._fail(self._errorMessage())
        model = os.path.join(self.outputFolder, MODEL_NAME)
        if not os.path.isfile(model):
            return self._fail(f"The training process ended without writing {model}.")
        self.modelPath = model
        self.done = True
        if self.onSuccess is not None:
            self.onSuccess(self)
        return True

    def refreshTable(self, force: bool = False) -> bool:
        """Mirror log.csv into the table node (and add plot series for new loss columns) when it changed."""
        if self.tableNode is None:
            return False
        try:
            stat = os.stat(self.logPath)
        except OSError:
            return False
        key = (stat.st_mtime_ns, stat.st_size)
        if key == self._logStat and not force:
            return False
        self._logStat = key
        self.logic.updateLogTable(self.tableNode, self.logPath)
        if self.chartNode is not None:
            self.logic.updateLossChart(self.chartNode, self.tableNode)
        return True

    def wait(self, timeout: float = None, interval: float = 0.1):
        """Block until the process ends: the model path after success, None after stop. Raises on failure."""
        start = time.monotonic()
        try:
            while not self.poll():
                if timeout is not None and time.monotonic() - start > timeout:
                    self.stop(wait=True)
                    raise RuntimeError(f"Training did not finish within {timeout:.0f} s; it was stopped (resume it with resume=True).")
                time.sleep(interval)
        except KeyboardInterrupt:
            self.stop(wait=True)
            return None
        return self.modelPath

    def stop(self, wait: bool = True, timeout: float = 300.0):
        """Ask the training to stop: SIGTERM, the loop finishes its step, writes checkpoint.pt and exits with
        code 3 (resumable). wait=True blocks until then (killing it after `timeout` seconds) and returns the
        exit code; wait=False returns None at once (keep polling). On Windows the process is terminated and the
        last periodic checkpoint is what Resume finds."""
        if self._proc is None or self.done:
            return self.returncode
        if not self.stopRequested:
            self.stopRequested = True
            self._stopTime = time.time()
            self._signal(signal.SIGTERM if os.name != "nt" else None)
        if not wait:
            return None
        start = time.monotonic()
        while not self.poll():
            if time.monotonic() - start > timeout:
                self.kill()
            time.sleep(0.1)
        return self.returncode

    def kill(self):
        """Kill at once (no new checkpoint)."""
        if self._proc is None or self._proc.poll() is not None and not any(t.is_alive() for t in self._threads):
            return
        self.stopRequested = True
        self._stopTime = self._stopTime or time.time()
        self._signal(getattr(signal, "SIGKILL", None))

    def _signal(self, sig):
        proc = self._proc
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.send_signal(sig) if sig is not None else proc.terminate()
            except OSError:
                pass

    def _fail(self, message):
        self.error = message
        self.done = True
        raise RuntimeError(message)

    def _errorMessage(self) -> str:
        for line in reversed(self.stderr):
            if line.startswith("ERROR:"):
                return line[len("ERROR:"):].strip()
        if self.returncode is not None and self.returncode < 0:
            return (
                f"The training process was killed by signal {-self.returncode} (often: out of memory). Try a smaller "
                "batch size or model grid, or the CPU device; Resume continues from the last checkpoint."
            )
        tail = " | ".join(line for line in self.stderr[-5:] if line.strip()) or "no error output"
        return f"The training process failed with exit code {self.returncode}: {tail}"


#
# CounterfactualVATrainingLogic
#

_LogicBase = ScriptedLoadableModuleLogic if HAVE_SLICER_APP else object


class CounterfactualVATrainingLogic(_LogicBase):
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

    # -- environment ---------------------------------------------------------------------------------------
    @staticmethod
    def libraryFolders() -> list:
        """The folders that hold CounterfactualVALib and CounterfactualVATrainingLib (for the child PYTHONPATH)."""
        folders = []
        for name in ("CounterfactualVALib", "CounterfactualVATrainingLib"):
            spec = importlib.util.find_spec(name)
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            for location in locations:
                folder = os.path.dirname(os.path.abspath(location))
                if folder not in folders:
                    folders.append(folder)
        return folders

    def pythonCommand(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        if HAVE_SLICER_APP:
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    def childEnvironment(self, device: str = "auto") -> dict:
        """Environment of the training process: Slicer's startup environment (so that the PythonSlicer launcher
        sets up its own paths), both libraries' folders on PYTHONPATH, unbuffered output, and no CUDA device
        when the CPU is asked for."""
        env = None
        if HAVE_SLICER_APP and hasattr(slicer, "app"):
            try:
                env = slicer.util.startupEnvironment()
            except Exception:
                env = None
        env = dict(env if env is not None else os.environ)
        folders = self.libraryFolders()
        env["PYTHONPATH"] = os.pathsep.join(folders + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in folders])
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    @staticmethod
    def missingPythonPackages() -> list:
        return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what training needs into Slicer's Python (asks first); True when ready. PyTorch and the
        attribution packages are installed the CounterfactualVA module's way (PyTorch extension + pip)."""
        if not self.missingPythonPackages():
            return True
        if not HAVE_SLICER_APP:
            raise RuntimeError(f"Python packages missing: {', '.join(self.missingPythonPackages())}. Install them with pip (pip install counterfactualva[torch]).")
        try:
            from CounterfactualVA import CounterfactualVALogic
        except ImportError:
            CounterfactualVALogic = None
        if CounterfactualVALogic is not None and not CounterfactualVALogic().setupPythonRequirements(askConfirmation=askConfirmation):
            return False
        if "torch" in self.missingPythonPackages():
            raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager and restart Slicer.")
        requirements = [REQUIRED_PACKAGES[name] for name in self.missingPythonPackages() if REQUIRED_PACKAGES.get(name)]
        if requirements:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                "CounterfactualVA training needs these Python packages: " + ", ".join(requirements) + ". Install them now?"
            ):
                return False
            slicer.util.pip_install(requirements)
            importlib.invalidate_caches()
        return not self.missingPythonPackages()

    # -- parsing helpers (for the panel's text fields) -------------------------------------------------------
    @staticmethod
    def parseNumbers(text, kind=float, name="value") -> list:
        """'64 64 64' or '64,64,64' -> [64, 64, 64]."""
        if isinstance(text, (list, tuple)):
            return [kind(v) for v in text]
        parts = [p for p in re.split(r"[\s,;x]+", str(text).strip()) if p]
        try:
            return [kind(float(p)) if kind is int else kind(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name}: expected numbers separated by spaces, got {text!r}.") from None

    @staticmethod
    def parseHyperParameters(text) -> dict:
        """Method settings as ``key=value`` pairs separated by whitespace or new lines (``#`` starts a comment;
        quote a value that contains spaces). Values are parsed as JSON when they parse (numbers, booleans,
        lists), else kept as text: the rule of ``counterfactualva train --config``."""
        if isinstance(text, dict):
            return dict(text)
        config = {}
        for token in shlex.split(str(text or ""), comments=True):
            key, sep, value = token.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"Method settings: expected key=value, got {token!r} (one pair per line, e.g. ngf=32).")
            try:
                config[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                config[key.strip()] = value
        return config

    @staticmethod
    def methodDefaults(method: str) -> dict:
        """{"title", "config" (the method's hyper-parameters and defaults), "training" (batch size, ...)}.
        Imports the method's code (torch)."""
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
        from CounterfactualVALib.methods import get_method_class

        cls = get_method_class(method)
        return {"title": cls.title or method, "config": dict(cls.default_config), "training": dict(cls.training_defaults)}

    # -- data ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _imageFiles(folder) -> list:
        files = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(root, name))
        return files

    @staticmethod
    def _readHeader(path):
        """(dimension, size, components) from the file header, or raise ValueError saying why it cannot be read."""
        import SimpleITK as sitk

        if not os.path.exists(path):
            raise ValueError("file not found")
        if os.path.isdir(path):
            raise ValueError("a folder, not an image file")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else "unknown reader error"
            raise ValueError(f"not an image SimpleITK can read ({reason})") from None
        return reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()

    @staticmethod
    def _listProblem(what, items, fix, limit=8) -> str:
        shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
        return f"{what}: {shown}. {fix}"

    def datasetPreview(self, csvPath=None, normalFolder=None, abnormalFolder=None, outputFolder=None, spatialDims=None, seed: int = 0) -> dict:
        """Check a cohort before training; nothing is trained and no node is made.

        Either ``csvPath`` (a cohort CSV: ``path,label[,mask,subtype,split]``, label 0 = normal, 1 = abnormal) or
        ``normalFolder`` + ``abnormalFolder`` (image files found recursively; a cohort CSV listing them is
        written as ``<outputFolder>/cohort.csv``, or into a new temporary folder when no output folder is
        given). Every image (and mask) header is read with SimpleITK; with ``spatialDims`` the dimensions are
        checked against the model too.

        Returns {"counts": {"normal", "abnormal"}, "splits": {split: {"normal", "abnormal"}} (the CSV's split
        column, or the split training will make), "splitSource": "csv" | "automatic", "problems": [messages
        that say what to do], "unreadable": [paths], "csv": the cohort CSV path or None}.
        """
        from CounterfactualVATrainingLib.cohort import read_cohort_csv, stratified_split, write_cohort_csv
        from CounterfactualVALib.imageio import InputError

        preview = {"counts": {"normal": 0, "abnormal": 0}, "splits": {}, "splitSource": None, "problems": [], "unreadable": [], "csv": None}
        problems = preview["problems"]
        folders = normalFolder is not None or abnormalFolder is not None
        if folders and csvPath:
            raise ValueError("Give either a cohort CSV or the two folders (normal and abnormal), not both.")
        if folders:
            rows = []
            for label, folder, kind in ((0, normalFolder, "normal"), (1, abnormalFolder, "abnormal")):
                folder = str(folder or "")
                if not folder:
                    problems.append(f"No {kind} folder was given. Select the folder that holds the {kind} scans.")
                    continue
                if not os.path.isdir(folder):
                    problems.append(f"The {kind} folder {folder} does not exist. Check the path.")
                    continue
                files = self._imageFiles(folder)
                if not files:
                    problems.append(
                        f"The {kind} folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). "
                        "Select the folder that holds the scans (subfolders are searched too)."
                    )
                rows += [{"path": os.path.abspath(f), "label": label} for f in files]
            if normalFolder and abnormalFolder and os.path.abspath(str(normalFolder)) == os.path.abspath(str(abnormalFolder)):
                problems.append("The normal and abnormal folders are the same folder. Put each class in its own folder.")
            if rows:
                target = outputFolder or tempfile.mkdtemp(prefix="CounterfactualVATraining-")
                preview["csv"] = str(write_cohort_csv(os.path.join(str(target), COHORT_CSV_NAME), rows))
            records = [{**r, "mask": None, "subtype": "", "split": ""} for r in rows]
        else:
            if not csvPath:
                raise ValueError("No data: give a cohort CSV (csvPath) or a normal and an abnormal folder.")
            preview["csv"] = str(csvPath)
            try:
                records = read_cohort_csv(csvPath, check_files=False, require_both_classes=False)
            except InputError as exc:
                problems.append(str(exc))
                return preview

        counts = preview["counts"]
        counts["normal"] = sum(1 for r in records if r["label"] == 0)
        counts["abnormal"] = sum(1 for r in records if r["label"] == 1)
        if records and not (counts["normal"] and counts["abnormal"]):
            have, lack = ("normal", "abnormal") if counts["normal"] else ("abnormal", "normal")
            where = f"put {lack} scans in the {lack} folder" if folders else f"add {lack} images (label {1 if lack == 'abnormal' else 0}) to the CSV, or check its label column"
            problems.append(
                f"Only {have} images were found ({counts['normal']} normal, {counts['abnormal']} abnormal). A counterfactual "
                f"model needs both classes: {where}."
            )

        # Every file's header.
        unreadable, wrongShape = [], []
        for record in records:
            for kind, path in (("image", record["path"]), ("mask", record.get("mask"))):
                if not path:
                    continue
                try:
                    dim, size, components = self._readHeader(path)
                except ValueError as exc:
                    unreadable.append((path, f"{os.path.basename(path)} ({kind}: {exc})"))
                    continue
                if kind == "image" and components != 1:
                    wrongShape.append(f"{os.path.basename(path)} ({components} components per voxel; models take one scalar channel)")
                elif kind == "image" and spatialDims is not None:
                    if spatialDims == 2 and dim == 3 and 1 not in size:
                        wrongShape.append(f"{os.path.basename(path)} (a 3D volume of size {list(size)} for a 2D model)")
                    elif spatialDims == 3 and dim != 3:
                        wrongShape.append(f"{os.path.basename(path)} ({dim}D, size {list(size)}, for a 3D model)")
        if unreadable:
            preview["unreadable"] = [p for p, _ in unreadable]
            fix = "Fix or remove these files (or their rows in the CSV), then check again."
            if not folders:
                fix += " Paths in the CSV are taken relative to the CSV's folder."
            problems.append(self._listProblem(f"{len(unreadable)} file(s) cannot be read", [text for _, text in unreadable], fix))
        if wrongShape:
            problems.append(self._listProblem(
                f"{len(wrongShape)} image(s) do not fit the model", wrongShape,
                "Choose the matching spatial dimensions (2 for 2D images, 3 for volumes), or convert the images.",
            ))

        # The split training will use (CounterfactualVATrainingLib.data.load_cohort: a CSV without a complete
        # split column is split here, stratified by label and subtype, 20% validation, no test).
        if records:
            splits = [r.get("split") or "" for r in records]
            preview["splitSource"] = "csv"
            if not all(splits):
                strata = [f"{r['label']}:{r.get('subtype') or ''}" for r in records]
                splits = stratified_split(strata, test_fraction=0.0, val_fraction=0.2, seed=seed)
                preview["splitSource"] = "automatic"
            for record, split in zip(records, splits):
                entry = preview["splits"].setdefault(split, {"normal": 0, "abnormal": 0})
                entry["normal" if record["label"] == 0 else "abnormal"] += 1
            train = preview["splits"].get("train", {"normal": 0, "abnormal": 0})
            if counts["normal"] and counts["abnormal"] and not (train["normal"] and train["abnormal"]):
                problems.append(
                    f"The training split has {train['normal']} normal and {train['abnormal']} abnormal images; both classes are "
                    "needed. Add images, or change the CSV's split column (train/val/test)."
                )
        elif not problems:
            problems.append("The data lists no images. Add images (one row per image in the CSV, or files in the folders).")
        return preview

    @staticmethod
    def describePreview(preview: dict) -> str:
        """A short human-readable summary of datasetPreview()'s result (for the panel)."""
        counts = preview["counts"]
        text = f"{counts['normal']} normal, {counts['abnormal']} abnormal images"
        if preview.get("splits"):
            parts = [f"{name} {c['normal']}+{c['abnormal']}" for name, c in sorted(preview["splits"].items())]
            text += f"; split ({preview.get('splitSource')}): " + ", ".join(parts)
        if preview.get("csv"):
            text += f"; cohort CSV: {preview['csv']}"
        if preview["problems"]:
            text += ".\nProblems:\n- " + "\n- ".join(preview["problems"])
        else:
            text += ". Ready to train."
        return text

    # -- log table and loss chart ---------------------------------------------------------------------------------
    def logNodes(self, outputFolder, create: bool = True):
        """(table node, plot chart node) of the run in ``outputFolder`` (found by the folder, so a resumed run
        keeps its nodes; new ones named ``<run> training log`` / ``<run> training losses``); (None, None) without
        a scene."""
        scene = self.scene
        if scene is None:
            return None, None
        folder = os.path.abspath(str(outputFolder))
        run = os.path.basename(folder.rstrip(os.sep)) or "training"
        table = None
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
            if node.GetAttribute(RUN_FOLDER_ATTRIBUTE) == folder:
                table = node
                break
        if table is None:
            if not create:
                return None, None
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{run} training log")
            table.SetAttribute(RUN_FOLDER_ATTRIBUTE, folder)
            table.SetDescription(f"Training log of {folder} ({LOG_NAME}: one row per logged step).")
        chartID = table.GetAttribute("CounterfactualVATraining.ChartNodeID")
        chart = scene.GetNodeByID(chartID) if chartID else None
        if chart is None and create:
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{run} training losses")
            chart.SetTitle(f"{run}: training losses")
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss")
            chart.SetAttribute(RUN_FOLDER_ATTRIBUTE, folder)
            table.SetAttribute("CounterfactualVATraining.ChartNodeID", chart.GetID())
        return table, chart

    @staticmethod
    def readLogCsv(logPath) -> tuple:
        """(column names, rows as lists of floats; NaN where a row has no value, e.g. val_* between validations)."""
        import csv

        with open(logPath, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows = []
            for raw in reader:
                if not raw:
                    continue
                row = []
                for i in range(len(header)):
                    text = raw[i].strip() if i < len(raw) else ""
                    try:
                        row.append(float(text) if text else math.nan)
                    except ValueError:
                        row.append(math.nan)
                rows.append(row)
        return header, rows

    def updateLogTable(self, tableNode, logPath) -> int:
        """Replace the table's contents with log.csv (step as integers, the rest as doubles). Returns the rows."""
        header, rows = self.readLogCsv(logPath)
        table = vtk.vtkTable()
        for i, name in enumerate(header):
            array = vtk.vtkIntArray() if name == "step" else vtk.vtkDoubleArray()
            array.SetName(name)
            array.SetNumberOfTuples(len(rows))
            for r, row in enumerate(rows):
                value = row[i]
                array.SetValue(r, int(value) if name == "step" and value == value else (0 if name == "step" else value))
            table.AddColumn(array)
        tableNode.SetAndObserveTable(table)
        tableNode.Modified()
        return len(rows)

    def updateLossChart(self, chartNode, tableNode) -> list:
        """One line series per ``loss*`` column of the table (x = step); new columns get new series."""
        scene = chartNode.GetScene()
        run = tableNode.GetAttribute(RUN_FOLDER_ATTRIBUTE) or ""
        runName = os.path.basename(run.rstrip(os.sep)) or tableNode.GetName()
        existing = {}
        for i in range(chartNode.GetNumberOfPlotSeriesNodes()):
            series = chartNode.GetNthPlotSeriesNode(i)
            if series is not None:
                existing[series.GetYColumnName()] = series
        columns = [tableNode.GetColumnName(i) for i in range(tableNode.GetNumberOfColumns())]
        for column in columns:
            if not column.startswith("loss") or column in existing:
                continue
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{runName} {column}")
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            series.SetColor(*SERIES_COLORS[len(existing) % len(SERIES_COLORS)])
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            existing[column] = series
        return [existing[c] for c in columns if c in existing]

    # -- training ---------------------------------------------------------------------------------------------
    @staticmethod
    def _checkWritable(outputFolder) -> str:
        folder = os.path.abspath(str(outputFolder or ""))
        if not str(outputFolder or "").strip() or str(outputFolder) == ".":
            raise ValueError("No output folder: choose a folder for the run (checkpoint, log and model are written there).")
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"The output folder {folder} is not writable ({exc.strerror or exc}). Choose another folder.") from None
        return folder

    def buildCommand(self, csvPath, outputFolder, method="vantgan", steps=1000, batchSize=None, spatialDims=3, size=(64, 64, 64),
                     spacing=(3.0, 3.0, 3.0), device="auto", config=None, resume=False, crop="foreground", intensity="percentile",
                     orientation="RAS", seed=0, logEvery=None, valEvery=None, checkpointEvery=None) -> list:
        command = [
            self.pythonCommand(), "-m", "CounterfactualVACLI", "train",
            "--method", method, "--data", str(csvPath), "--out", str(outputFolder), "--steps", str(int(steps)),
            "--spatial-dims", str(int(spatialDims)), "--size", *[str(int(s)) for s in size],
            "--spacing", *[repr(float(s)) for s in spacing], "--crop", crop, "--intensity", intensity,
            "--device", device, "--seed", str(int(seed)),
        ]
        if int(spatialDims) == 3:
            command += ["--orientation", orientation]
        if batchSize:
            command += ["--batch-size", str(int(batchSize))]
        for flag, value in (("--log-every", logEvery), ("--val-every", valEvery), ("--checkpoint-every", checkpointEvery)):
            if value:
                command += [flag, str(int(value))]
        for key, value in (config or {}).items():
            command += ["--config", f"{key}={json.dumps(value)}"]
        if resume:
            command.append("--resume")
        return command + ["--progress"]

    def validate(self, csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity, resume, overwrite):
        """Raise ValueError with what is wrong and what to do, before anything is launched. Returns the
        absolute output folder."""
        if method not in METHODS:
            raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
        if device not in DEVICES:
            raise ValueError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
        if crop not in CROPS:
            raise ValueError(f"Unknown crop {crop!r}: use one of {', '.join(CROPS)}.")
        if intensity not in INTENSITIES:
            raise ValueError(f"Unknown intensity normalisation {intensity!r}: use one of {', '.join(INTENSITIES)}.")
        if int(spatialDims) not in (2, 3):
            raise ValueError(f"spatialDims must be 2 or 3, got {spatialDims!r}.")
        if len(size) != int(spatialDims) or any(int(s) < 1 for s in size):
            raise ValueError(f"The model grid size must be {spatialDims} positive numbers of voxels (x y{' z' if int(spatialDims) == 3 else ''}), got {list(size)}.")
        if len(spacing) != int(spatialDims) or any(not float(s) > 0 for s in spacing):
            raise ValueError(f"The model grid spacing must be {spatialDims} positive numbers (mm), got {list(spacing)}.")
        if int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps}.")
        if batchSize is not None and int(batchSize) < 1:
            raise ValueError(f"batchSize must be at least 1 (or None for the method's default), got {batchSize}.")
        if not csvPath or not os.path.isfile(str(csvPath)):
            raise ValueError(
                f"Cohort CSV not found: {csvPath or '(none given)'}. Give a CSV with columns path,label (label 0 = normal, 1 = abnormal), "
                "or use datasetPreview(normalFolder=..., abnormalFolder=...) to write one from two folders."
            )
        folder = self._checkWritable(outputFolder)
        checkpoint = os.path.join(folder, CHECKPOINT_NAME)
        if resume and not os.path.isfile(checkpoint):
            raise ValueError(f"Nothing to resume: {checkpoint} does not exist. Start a new run (resume=False), or choose the folder of the stopped run.")
        existing = [name for name in (CHECKPOINT_NAME, MODEL_NAME) if os.path.isfile(os.path.join(folder, name))]
        if not resume and not overwrite and existing:
            raise ValueError(
                f"{folder} already holds a training run ({', '.join(existing)}). Resume it (resume=True), choose another output "
                "folder, or pass overwrite=True to start again."
            )
        if config:
            try:
                known = self.methodDefaults(method)["config"]
            except ImportError:
                known = None  # torch is not installed here; the training process will check
            if known is not None:
                unknown = sorted(set(config) - set(known))
                if unknown:
                    raise ValueError(f"{method}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(known)) or 'none'}.")
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
    ):
        """Train ``method`` on the cohort CSV into ``outputFolder`` with ``counterfactualva train`` in a subprocess.

        size/spacing: the model grid (x y [z], voxels and mm); crop ("foreground" | "image") and intensity
        ("percentile" | "minmax" | "none"): the preprocessing, kept in the model file for inference. config: the
        method's hyper-parameters (see methodDefaults()). logEvery/valEvery/checkpointEvery: None = the command
        line's defaults (10/100/100 steps). resume: continue the run in outputFolder from its checkpoint (same
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
        folder = self.validate(csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity, resume, overwrite)
        missing = self.missingPythonPackages()
        if missing:
            raise RuntimeError(
                f"Python packages missing: {', '.join(missing)}. In Slicer click Start in the CounterfactualVATraining panel "
                "(it offers to install them) or call CounterfactualVATrainingLogic().setupPythonRequirements()."
            )
        csvPath = os.path.abspath(str(csvPath))
        arguments = dict(
            csvPath=csvPath, outputFolder=folder, method=method, steps=int(steps), batchSize=batchSize, spatialDims=int(spatialDims),
            size=size, spacing=spacing, device=device, config=config, crop=crop, intensity=intensity, orientation=orientation,
            seed=int(seed), logEvery=logEvery, valEvery=valEvery, checkpointEvery=checkpointEvery,
        )
        command = self.buildCommand(resume=resume, **arguments)
        self._writeRequest(folder, arguments, command)
        if not resume:
            for stale in (LOG_NAME, MODEL_NAME):  # a new run's table must not show the old run's rows
                if os.path.isfile(os.path.join(folder, stale)):
                    os.remove(os.path.join(folder, stale))
        table, chart = self.logNodes(folder)
        if table is not None and not resume:
            self._clearLogNodes(table, chart)

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
        path = os.path.join(os.path.abspath(str(outputFolder)), REQUEST_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{outputFolder} holds no run started by this module ({REQUEST_NAME} is missing). Call train(..., resume=True) with the run's settings.")
        with open(path, encoding="utf-8") as f:
            arguments = json.load(f)["arguments"]
        if steps:
            arguments["steps"] = int(steps)
        if device:
            arguments["device"] = device
        arguments.update(kwargs)
        return self.train(resume=True, waitForCompletion=waitForCompletion, **arguments)

    @staticmethod
    def _writeRequest(folder, arguments, command):
        path = os.path.join(folder, REQUEST_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"arguments": arguments, "command": command}, f, indent=1)
        os.replace(tmp, path)

    @staticmethod
    def _clearLogNodes(table, chart):
        table.SetAndObserveTable(vtk.vtkTable())
        table.RemoveAttribute(MODEL_PATH_ATTRIBUTE)
        if chart is not None:
            scene = chart.GetScene()
            ids = [chart.GetNthPlotSeriesNodeID(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
            chart.RemoveAllPlotSeriesNodeIDs()
            for nodeID in ids:
                node = scene.GetNodeByID(nodeID) if nodeID else None
                if node is not None:
                    scene.RemoveNode(node)

    def recordModel(self, modelPath, **details) -> str:
        """Record a trained model where the CounterfactualVA module finds it: the JSON list of
        :func:`trainedModelsFile`, and in the application the CounterfactualVA panel's settings."""
        path = recordTrainedModel(modelPath, **details)
        if HAVE_SLICER_APP and qt is not None:
            settings = qt.QSettings()
            settings.setValue("CounterfactualVA/lastModelPath", str(modelPath))
            history = settings.value("CounterfactualVA/ModelPathHistory") or []
            history = [history] if isinstance(history, str) else list(history)
            history = [str(modelPath)] + [h for h in history if h != str(modelPath)]
            settings.setValue("CounterfactualVA/ModelPathHistory", history[:20])
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

    TINY_CONFIG = {"ngf": 8, "n_blocks": 2, "ndf": 8}

    def setUp(self):
        if hasattr(slicer, "mrmlScene"):
            slicer.mrmlScene.Clear(0)
            self.scene = slicer.mrmlScene
        else:
            self.scene = slicer.vtkMRMLScene()

    def runTest(self):
        self.setUp()
        self.test_CounterfactualVATraining_TinyRun()

    def test_CounterfactualVATraining_TinyRun(self):
        self.delayDisplay("Starting the CounterfactualVATraining test")
        logic = CounterfactualVATrainingLogic(scene=self.scene)
        if logic.missingPythonPackages():
            self.skipTest(f"missing Python packages: {logic.missingPythonPackages()}")
        from CounterfactualVAResearch.data.synthetic import generate_synthetic

        folder = tempfile.mkdtemp(prefix="CounterfactualVATrainingTest-")
        try:
            csvPath = generate_synthetic(os.path.join(folder, "data"), n=24, size=32, spatial_dims=2, seed=0)
            preview = logic.datasetPreview(csvPath=csvPath, spatialDims=2)
            self.assertEqual(preview["problems"], [])
            self.assertEqual(preview["counts"]["normal"] + preview["counts"]["abnormal"], 24)
            out = os.path.join(folder, "tinyrun")
            self.progress, self.log = [], []
            steps = 3
            process = logic.train(
                csvPath, out, method="vantgan", steps=steps, spatialDims=2, size=(32, 32), spacing=(1, 1), crop="image",
                intensity="minmax", device="cpu", config=self.TINY_CONFIG, logEvery=1, valEvery=steps, checkpointEvery=steps,
                waitForCompletion=False, recordModel=False,
                progressCallback=lambda *args: self.progress.append(args), logCallback=self.log.append,
            )
            deadline = time.monotonic() + 300
            while not process.poll():
                self.assertLess(time.monotonic(), deadline, "\n".join(self.log))
                if qt is not None and hasattr(slicer, "app"):
                    slicer.app.processEvents()
                time.sleep(0.05)
            self.process = process
            self.assertEqual(process.returncode, 0, "\n".join(self.log))
            self.assertTrue(os.path.isfile(process.modelPath))
            self.assertEqual([p[1] for p in self.progress], list(range(1, steps + 1)))
            self.assertEqual(process.tableNode.GetNumberOfRows(), steps)
            series = [process.chartNode.GetNthPlotSeriesNode(i) for i in range(process.chartNode.GetNumberOfPlotSeriesNodes())]
            self.assertIn("loss_g", [s.GetYColumnName() for s in series])
            self.assertEqual(process.tableNode.GetAttribute(MODEL_PATH_ATTRIBUTE), process.modelPath)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
