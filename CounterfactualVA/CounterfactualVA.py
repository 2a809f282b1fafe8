"""CounterfactualVA: counterfactual visual attribution of brain MRI in 3D Slicer.

The module runs the library's own command line (``python -m CounterfactualVACLI attribute ...``) in a
separate process, the way SlicerMONAIAuto3DSeg runs its inference: the input volume is written as NRRD to a
temporary folder, the process reports ``PROGRESS <fraction> <stage>`` lines that a timer polls so the GUI
stays live, Cancel kills it, and on success the output files are loaded into NEW nodes on the input's exact
voxel grid. GPU memory is released when the process ends, and the command Slicer runs is the very command
that is tested from the shell.

Console use (works in Slicer's Python console and with the ``slicer-core`` wheel, no Qt needed)::

    from CounterfactualVA import CounterfactualVALogic
    result = CounterfactualVALogic().run(volumeNode, "/path/model.safetensors", device="auto")
    result.attribution, result.mask, result.counterfactual, result.summary["scalars"]

Only this file and ``CounterfactualVALib/slicer_nodes.py`` touch MRML; everything else in the library is
plain Python on torch/MONAI/SimpleITK.
"""

import importlib
import importlib.util
import json
import logging
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable

import slicer
import vtk

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # CounterfactualVALib lives next to this file
    sys.path.insert(0, MODULE_DIR)

from CounterfactualVALib import slicer_nodes  # noqa: E402

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

DEVICES = ("auto", "cpu", "cuda")
#: must match `counterfactualva attribute --threshold-rule` (checked by Testing/test_slicer_logic.py)
THRESHOLD_RULES = ("paper", "max-fraction", "percentile", "absolute")
#: colour maps of the signed attribution overlay (white at zero; the first is the default)
PALETTES = tuple(slicer_nodes.DIVERGING_PALETTES)
#: what the attribution process imports (checked before launching, installed on request in Slicer)
REQUIRED_PACKAGES = {
    "torch": None,  # from Slicer's PyTorch extension
    "monai": "monai>=1.6,<1.7",
    "safetensors": "safetensors>=0.4",
    "SimpleITK": "SimpleITK>=2.3",
    "numpy": "numpy>=1.24",
    "scipy": "scipy>=1.10",
    "matplotlib": "matplotlib>=3.7",
}
MINIMUM_TORCH_VERSION = "2.8"
#: the shipped demonstration sample (a phantom scan and a model trained on phantoms), see samples/README.md
SAMPLE_SCAN = "phantom_atrophy.nii.gz"
SAMPLE_MODEL = "vantgan_phantom3d.safetensors"
SAMPLE_CATEGORY = "CounterfactualVA"


def sampleDirectories(moduleDir: str | None = None) -> list:
    """Where the shipped sample files are looked for, in order: the installed module's Resources/Samples
    (CMake installs them there), then the source tree's samples/ folder (running from a checkout)."""
    moduleDir = moduleDir or MODULE_DIR
    return [os.path.join(moduleDir, "Resources", "Samples"), os.path.join(os.path.dirname(moduleDir), "samples")]


def sampleFilePath(fileName: str, moduleDir: str | None = None) -> str | None:
    """Absolute path of a shipped sample file (first folder of :func:`sampleDirectories` that has it), or None."""
    for folder in sampleDirectories(moduleDir):
        path = os.path.join(folder, fileName)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def registerSampleData() -> bool:
    """Add the shipped phantom to Slicer's Sample Data module (category 'CounterfactualVA'); True when done.

    Needs the Slicer application and its SampleData module; does nothing (False) elsewhere or when the
    sample files are not found. The model is not a scene node: the panel offers it as the default model."""
    scan = sampleFilePath(SAMPLE_SCAN)
    if scan is None:
        return False
    try:
        import SampleData
    except ImportError:
        return False
    icon = os.path.join(MODULE_DIR, "Resources", "Icons", "CounterfactualVA.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName="CounterfactualVAPhantomAtrophy",
        uris=pathlib.Path(scan).as_uri(),
        fileNames=SAMPLE_SCAN,
        nodeNames="phantom_atrophy",
        thumbnailFileName=icon if os.path.isfile(icon) else None,
        loadFileType="VolumeFile",
    )
    return True


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
and the signed map of where and how it differs from the scan (counterfactual minus input, unless the method
documents another convention). Outputs are new nodes: the counterfactual, the signed attribution map
(diverging colours centred on zero, shown over the scan), a thresholded mask (labelmap, optionally a
segmentation) and method-specific maps. Inference runs in a separate process (GPU when available) that
can be cancelled. Console: <code>CounterfactualVALogic().run(volumeNode, modelPath)</code>.
"""
        )
        self.parent.acknowledgementText = _(
            """
Methods: VANT-GAN, ANT-GAN, VA-GAN, ICAM, medXGAN, attention-guided CycleGAN and classifier baselines,
built on MONAI and PyTorch. The subprocess design follows SlicerMONAIAuto3DSeg.
"""
        )
        if HAVE_SLICER_APP and hasattr(slicer, "app"):
            # After startup, when the SampleData module is loaded (as extensions templates do).
            try:
                slicer.app.connect("startupCompleted()", _registerSampleDataSafely)
            except Exception as exc:  # never let sample registration break the module
                logging.warning("CounterfactualVA: could not schedule the sample data registration: %s", exc)


def _registerSampleDataSafely():
    try:
        registerSampleData()
    except Exception as exc:
        logging.warning("CounterfactualVA: could not register the sample data: %s", exc)


#
# Parameter node (Slicer application only)
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class CounterfactualVAParameterNode:
        """The panel's settings, saved with the scene.

        thresholdValue: 0 means the threshold rule's own default (e.g. half of the map's maximum for 'paper').
        """

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        modelPath: pathlib.Path = pathlib.Path("")
        device: Annotated[str, Choice(list(DEVICES))] = "auto"
        thresholdRule: Annotated[str, Choice(list(THRESHOLD_RULES))] = "paper"
        thresholdValue: Annotated[float, WithinRange(0.0, 1e6)] = 0.0
        opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
        createSegmentation: bool = False
        transparentBelowThreshold: bool = True
        colorMap: Annotated[str, Choice(list(PALETTES))] = slicer_nodes.DEFAULT_PALETTE

else:
    CounterfactualVAParameterNode = None


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
        self._lastStage = None
        self._optionRows = []  # (spec, label, editor) of the method options form

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel("CounterfactualVA.ui", CounterfactualVALogic(), onPoll=self._onPoll, pollIntervalMs=self.POLL_INTERVAL_MS)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self._updateModelInfo)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self._onOpacityChanged)
        self.ui.showAdvancedOptionsCheckBox.connect("toggled(bool)", self._showAdvancedOptions)
        self.ui.resetOptionsButton.connect("clicked(bool)", self._resetMethodOptions)
        self.ui.progressBar.hide()
        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()

        self.initializeParameterNode()
        self._updateModelInfo()

    def cleanup(self):
        self._cancelProcess()
        self.removeObservers()

    def onReload(self):
        """Developer 'Reload': also reload the library modules this process has imported (the attribution
        process always starts with fresh code)."""
        self._cancelProcess()
        for name in sorted(n for n in list(sys.modules) if n.startswith("CounterfactualVALib.")):
            if name in ("CounterfactualVALib.slicer_nodes", "CounterfactualVALib.checkpoint", "CounterfactualVALib.imageio"):
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
        if str(parameterNode.modelPath) in ("", "."):
            lastModel = qt.QSettings().value("CounterfactualVA/lastModelPath", "")
            if not (lastModel and os.path.isfile(lastModel)):
                lastModel = sampleFilePath(SAMPLE_MODEL)  # the shipped demonstration model (for the sample scan)
            if lastModel and os.path.isfile(lastModel):
                parameterNode.modelPath = pathlib.Path(lastModel)

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
        ready = bool(p and p.inputVolume and str(p.modelPath) not in ("", "."))
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Compute the counterfactual and attribution map") if ready else _("Select an input volume and a model file")

    def _updateModelInfo(self, path=None):
        path = self.ui.modelPathLineEdit.currentPath if path is None else path
        self.ui.modelInfoLabel.text = self.logic.modelInfo(path) if path else _("Select a model file (.safetensors).")
        self._rebuildMethodOptions(path)

    # -- method options: one form row per option of the model's method (CounterfactualVALib.method_options) --
    def _rebuildMethodOptions(self, path):
        layout = self.ui.methodOptionsFormWidget.layout()
        for _spec, label, editor in self._optionRows:
            layout.removeWidget(label)
            layout.removeWidget(editor)
            label.deleteLater()
            editor.deleteLater()
        self._optionRows = []
        try:
            haveModel = bool(path) and os.path.isfile(path)
            specs = self.logic.methodOptionSpecs(path) if haveModel else []
            message = _("This model's method has no options.") if haveModel else _("Select a model file to see its method's options.")
        except Exception as exc:  # noqa: BLE001  (unreadable model, packages not installed yet: say so, no rows)
            specs, message = [], _("Options not available: {error}").format(error=exc)
        self.ui.methodOptionsLabel.text = message
        self.ui.methodOptionsLabel.visible = not specs
        for spec in specs:
            label = qt.QLabel(spec.label + ":")
            editor = self._optionEditor(spec)
            label.toolTip = editor.toolTip = spec.tooltip
            layout.addRow(label, editor)
            self._optionRows.append((spec, label, editor))
        self.ui.showAdvancedOptionsCheckBox.visible = any(spec.advanced for spec in specs)
        self.ui.resetOptionsButton.visible = bool(specs)
        self._showAdvancedOptions(self.ui.showAdvancedOptionsCheckBox.checked)

    @staticmethod
    def _optionEditor(spec):
        if spec.type == "bool":
            return qt.QCheckBox()
        if spec.type == "choice":
            editor = qt.QComboBox()
            editor.addItems([str(choice) for choice in spec.choices])
        elif spec.type in ("int", "float"):
            editor = qt.QSpinBox() if spec.type == "int" else qt.QDoubleSpinBox()
            if spec.type == "float":
                editor.decimals = spec.decimals if spec.decimals is not None else 4
            if spec.step is not None:
                editor.singleStep = spec.step
            editor.minimum = spec.minimum if spec.minimum is not None else -(2**31 - 1)
            editor.maximum = spec.maximum if spec.maximum is not None else 2**31 - 1
        else:
            editor = qt.QLineEdit()
        CounterfactualVAWidget._setOptionValue(spec, editor, spec.default)
        return editor

    @staticmethod
    def _setOptionValue(spec, editor, value):
        if spec.type == "bool":
            editor.checked = bool(value)
        elif spec.type == "choice":
            editor.currentText = str(value)
        elif spec.type in ("int", "float"):
            editor.value = value
        else:
            editor.text = str(value)

    @staticmethod
    def _optionValue(spec, editor):
        if spec.type == "bool":
            return editor.checked
        if spec.type == "choice":
            return editor.currentText
        if spec.type in ("int", "float"):
            return editor.value
        return editor.text

    def _showAdvancedOptions(self, show):
        for spec, label, editor in self._optionRows:
            label.visible = editor.visible = bool(show) or not spec.advanced

    def _resetMethodOptions(self):
        for spec, _label, editor in self._optionRows:
            self._setOptionValue(spec, editor, spec.default)

    def methodOptions(self) -> dict:
        """The form's values that differ from the method's defaults (``--option key=value`` of the run)."""
        from CounterfactualVALib.method_options import collect_options

        specs = [spec for spec, _label, _editor in self._optionRows]
        return collect_options(specs, {spec.name: self._optionValue(spec, editor) for spec, _label, editor in self._optionRows})

    def _onOpacityChanged(self, value):
        if self._result is not None:
            self.logic.setOpacity(self._result, value)

    def _setControlsEnabled(self, enabled):
        for widget in (
            self.ui.inputSelector,
            self.ui.modelPathLineEdit,
            self.ui.deviceComboBox,
            self.ui.thresholdRuleComboBox,
            self.ui.thresholdValueSpinBox,
            self.ui.createSegmentationCheckBox,
            self.ui.transparentBelowThresholdCheckBox,
            self.ui.colorMapComboBox,
            self.ui.methodOptionsFormWidget,
            self.ui.showAdvancedOptionsCheckBox,
            self.ui.resetOptionsButton,
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
            qt.QSettings().setValue("CounterfactualVA/lastModelPath", str(p.modelPath))
            self.ui.logTextEdit.clear()
            self._lastStage = None
            self._process = self.logic.run(
                p.inputVolume,
                str(p.modelPath),
                device=p.device,
                thresholdRule=p.thresholdRule,
                thresholdValue=p.thresholdValue if p.thresholdValue > 0 else None,
                opacity=p.opacity,
                createSegmentation=p.createSegmentation,
                transparentBelowThreshold=p.transparentBelowThreshold,
                palette=p.colorMap,
                methodOptions=self.methodOptions(),
                waitForCompletion=False,
                progressCallback=self._onProgress,
                logCallback=self._addLog,
            )
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self._setControlsEnabled(False)
            self._checkCanApply()
            self._timer.start()

    def _onPoll(self):
        if self._process is None:
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
            summary = result.summary
            self._addLog(_("Done on {device} in {seconds:.1f} s.").format(device=summary.get("device", "?"), seconds=summary.get("timings_s", {}).get("total", 0.0)))
            for name, value in (summary.get("scalars") or {}).items():
                self._addLog(f"{name}: {value:.4g}")
            self._addLog(_("Created: ") + ", ".join(node.GetName() for node in result.nodes()))

    def _finishProcess(self):
        self._timer.stop()
        self._process = None
        self.ui.progressBar.hide()
        self._setControlsEnabled(True)
        self._checkCanApply()

    def _cancelProcess(self):
        if self._process is not None:
            self._process.cancel()
            self._finishProcess()


#
# Results and the attribution process
#


@dataclass
class CounterfactualVAResult:
    """The nodes one run created (all new; None where the method has no such output) and its summary."""

    counterfactual: object = None
    attribution: object = None
    mask: object = None
    segmentation: object = None
    extras: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)

    def __getitem__(self, key):  # result["attribution"] works too
        return getattr(self, key)

    def keys(self):
        return ["counterfactual", "attribution", "mask", "segmentation", "extras", "summary"]

    def nodes(self) -> list:
        return [n for n in (self.counterfactual, self.attribution, self.mask, self.segmentation, *self.extras.values()) if n is not None]


def _parseProgress(line: str):
    """(fraction, stage) for a `PROGRESS <fraction> <stage>` line, else None."""
    match = re.match(r"^PROGRESS\s+([0-9.eE+-]+)\s*(.*)$", line.strip())
    if not match:
        return None
    try:
        fraction = float(match.group(1))
    except ValueError:
        return None
    return min(max(fraction, 0.0), 1.0), match.group(2).strip()


class CounterfactualVAProcess:
    """A running attribution: poll() it (from a timer or a loop) until it returns True, or cancel() it.

    poll() forwards progress and log lines, and when the process has ended successfully it loads the outputs
    into new nodes (``self.result``) and returns True. On failure it raises RuntimeError with the command
    line's own message (its last ``ERROR:`` line) and creates nothing. cancel() kills the process tree,
    deletes the temporary folder and creates nothing.
    """

    def __init__(self, logic, inputNode, command, env, tempDir, outDir, device, loadOptions=None, progressCallback=None, logCallback=None, cpuFallback=True):
        self.logic = logic
        self.inputNode = inputNode
        self.command = list(command)
        self.env = env
        self.tempDir = tempDir
        self.outDir = outDir
        #: keyword arguments of CounterfactualVALogic.loadResults (opacity, createSegmentation, ...)
        self.loadOptions = dict(loadOptions or {})
        self.device = device
        self.progressCallback = progressCallback
        self.logCallback = logCallback or (lambda line: logging.info(line))
        self.cpuFallback = cpuFallback
        self.progress = 0.0
        self.stage = "Starting"
        self.log: list[str] = []
        self.stderr: list[str] = []
        self.result: CounterfactualVAResult | None = None
        self.error: str | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.done = False
        self._proc = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    # -- process control --------------------------------------------------------------------------------
    def start(self):
        self._report(0.0, "Starting the attribution process")
        self.logCallback("Running: " + " ".join(self.command))
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel() kills the launcher and its children
        self._proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            cwd=self.tempDir,
            **kwargs,
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
            pass  # stream closed by cancel()
        finally:
            self._queue.put((tag, None))

    def _report(self, fraction, stage):
        self.progress, self.stage = fraction, stage
        if self.progressCallback:
            self.progressCallback(fraction, stage)

    def _drain(self):
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                continue
            progress = _parseProgress(line) if tag == "out" else None
            if progress is not None:
                # Stop just short of 1: loading the results into the scene is the last step.
                self._report(min(progress[0], 0.99), progress[1])
                continue
            if tag == "err":
                self.stderr.append(line)
            self.log.append(line)
            self.logCallback(line)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> bool:
        """Forward output; True when finished (then ``result`` holds the nodes). Raises on failure."""
        if self.done:
            if self.error:
                raise RuntimeError(self.error)
            return True
        if self.cancelled:
            return True
        self._drain()
        if self._proc.poll() is None:
            return False
        for thread in self._threads:
            thread.join(timeout=5)
        self._drain()
        self.returncode = self._proc.returncode
        if self.returncode != 0:
            message = self._errorMessage()
            if self.cpuFallback and self.device != "cpu" and self._looksLikeGpuProblem(message):
                self.logCallback(f"The GPU run failed ({message}); running on the CPU instead.")
                self._restartOnCpu()
                return False
            return self._fail(message)
        try:
            self._report(0.99, "Loading results into the scene")
            self.result = self.logic.loadResults(self.inputNode, self.outDir, **self.loadOptions)
        except Exception as exc:
            return self._fail(str(exc))
        self._cleanup()
        self.done = True
        self._report(1.0, "Done")
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> CounterfactualVAResult:
        """Block until finished; returns the result (raises RuntimeError on failure or timeout)."""
        start = time.monotonic()
        while not self.poll():
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                raise RuntimeError(f"The attribution did not finish within {timeout:.0f} s and was cancelled.")
            time.sleep(interval)
        if self.cancelled:
            raise RuntimeError("The attribution was cancelled.")
        return self.result

    def cancel(self):
        """Kill the process (and its children), delete the temporary folder; no nodes are created."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self._kill()
        self._cleanup()
        self._report(self.progress, "Cancelled")

    def _kill(self):
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            pass
        try:
            proc.kill()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except Exception:
                pass

    def _cleanup(self):
        shutil.rmtree(self.tempDir, ignore_errors=True)

    def _fail(self, message):
        self.error = message
        self.done = True
        self._cleanup()
        self._report(self.progress, "Failed")
        raise RuntimeError(message)

    def _errorMessage(self) -> str:
        for line in reversed(self.stderr):
            if line.startswith("ERROR:"):
                return line[len("ERROR:"):].strip()
        if self.returncode is not None and self.returncode < 0:
            return (
                f"The attribution process was killed by signal {-self.returncode} (often: out of memory). "
                "Try the CPU device, close other programs, or use a smaller model."
            )
        tail = " | ".join(line for line in self.stderr[-5:] if line.strip()) or "no error output"
        return f"The attribution process failed with exit code {self.returncode}: {tail}"

    @staticmethod
    def _looksLikeGpuProblem(message: str) -> bool:
        text = message.lower()
        return any(word in text for word in ("cuda", "gpu", "cudnn", "nvidia"))

    def _restartOnCpu(self):
        self.device = "cpu"
        command = list(self.command)
        command[command.index("--device") + 1] = "cpu"
        self.command = command
        self.env = dict(self.env, CUDA_VISIBLE_DEVICES="-1")
        self.stderr, self._queue = [], queue.Queue()
        shutil.rmtree(self.outDir, ignore_errors=True)
        self.start()


#
# CounterfactualVALogic
#

_LogicBase = ScriptedLoadableModuleLogic if HAVE_SLICER_APP else object


class CounterfactualVALogic(_LogicBase):
    """The console API; no Qt needed. See the module docstring for an example."""

    DEVICES = DEVICES
    THRESHOLD_RULES = THRESHOLD_RULES

    def __init__(self):
        if _LogicBase is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        #: the Python that runs the command line; None: PythonSlicer in Slicer, else this interpreter
        self.pythonExecutable: str | None = None

    def getParameterNode(self):
        if CounterfactualVAParameterNode is None:
            raise RuntimeError("Parameter nodes need the 3D Slicer application; call run() with arguments instead.")
        return CounterfactualVAParameterNode(super().getParameterNode())

    # -- environment ---------------------------------------------------------------------------------------
    @staticmethod
    def moduleDirectory() -> str:
        return MODULE_DIR

    def pythonCommand(self) -> str:
        if self.pythonExecutable:
            return self.pythonExecutable
        if HAVE_SLICER_APP:
            found = shutil.which("PythonSlicer")
            if found:
                return found
        return sys.executable

    def childEnvironment(self, device: str = "auto") -> dict:
        """Environment of the attribution process: Slicer's startup environment (so that the PythonSlicer
        launcher sets up its own paths), this module's folder on PYTHONPATH, unbuffered output, and no CUDA
        device when the CPU is asked for."""
        env = None
        if HAVE_SLICER_APP and hasattr(slicer, "app"):
            try:
                env = slicer.util.startupEnvironment()
            except Exception:
                env = None
        env = dict(env if env is not None else os.environ)
        paths = [MODULE_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != MODULE_DIR]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def buildCommand(self, modelPath, inputPath, outDir, device="auto", thresholdRule="paper", thresholdValue=None, methodOptions=None) -> list:
        command = [
            self.pythonCommand(), "-m", "CounterfactualVACLI", "attribute",
            "--model", str(modelPath), "--input", str(inputPath), "--out", str(outDir),
            "--device", device, "--threshold-rule", thresholdRule,
        ]
        if thresholdValue is not None:
            command += ["--threshold-value", repr(float(thresholdValue))]
        for key, value in (methodOptions or {}).items():  # e.g. ICAM {"samples": 20}, medXGAN {"inversion_steps": 500}
            command += ["--option", f"{key}={self._optionText(value)}"]
        return command + ["--progress"]

    @staticmethod
    def _optionText(value) -> str:
        """How the command line's `--option key=value` gets `value` back: JSON, except plain strings that JSON
        would read as something else (the command line parses JSON first, then keeps the text)."""
        if not isinstance(value, str):
            return json.dumps(value)
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
        return json.dumps(value)

    def methodOptionSpecs(self, modelPath) -> list:
        """The attribution options of the model's method as form rows (``method_options.OptionSpec``: name,
        type, default, choices/range, label, tooltip, advanced), read from the model's metadata without
        loading weights; raises ValueError/ModelFileError when the file is not usable."""
        from CounterfactualVALib.method_options import option_specs_for_model

        return option_specs_for_model(str(modelPath))

    @staticmethod
    def missingPythonPackages() -> list:
        return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]

    @staticmethod
    def deviceDescription() -> str:
        """One line for the panel: the CUDA GPU (device 0) and its memory, or that the CPU is used, or that
        PyTorch is not installed yet. Never raises (a broken PyTorch install reads as not installed)."""
        try:
            import torch
        except (ImportError, OSError):  # not installed, or a broken install (missing shared libraries)
            return "PyTorch not installed yet (installed on first Apply)"
        try:
            if torch.cuda.is_available():
                properties = torch.cuda.get_device_properties(0)
                return f"GPU: {properties.name}, {properties.total_memory / 1024**3:.1f} GiB"
        except (RuntimeError, AssertionError) as error:  # e.g. a driver mismatch
            return f"No usable CUDA GPU ({error}): runs on the CPU"
        return "No CUDA GPU detected: runs on the CPU"

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what the attribution process needs into Slicer's Python (asks first); True when ready.

        PyTorch comes from the PyTorch extension (PyTorchUtils), the rest from PyPI."""
        missing = self.missingPythonPackages()
        if not missing:
            return True
        if not HAVE_SLICER_APP:
            raise RuntimeError(f"Python packages missing: {', '.join(missing)}. Install them with pip (pip install counterfactualva[torch]).")
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager and restart Slicer.") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}") is None:
                    return False
        requirements = [REQUIRED_PACKAGES[name] for name in self.missingPythonPackages() if REQUIRED_PACKAGES.get(name)]
        if requirements:
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(requirements, requester="CounterfactualVA")
            else:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "CounterfactualVA needs these Python packages: " + ", ".join(requirements) + ". Install them now?"
                ):
                    return False
                slicer.util.pip_install(requirements)
            importlib.invalidate_caches()
        return not self.missingPythonPackages()

    def modelInfo(self, modelPath) -> str:
        """One paragraph about a model file (method, classes, grid, training), read without loading weights."""
        path = str(modelPath or "")
        if path in ("", "."):
            return "No model selected."
        if not os.path.isfile(path):
            return f"Model file not found: {path}"
        missing = [name for name in ("safetensors", "torch") if importlib.util.find_spec(name) is None]
        if missing:
            return f"Model details need Python packages that are not installed yet ({', '.join(missing)}); Apply offers to install them."
        try:
            from CounterfactualVALib.checkpoint import read_metadata

            metadata = read_metadata(path)
        except ImportError as exc:
            return f"Model details need Python packages that are not installed yet ({exc.name}); Apply offers to install them."
        except Exception as exc:
            return f"Not usable: {exc}"
        pre = metadata.preprocessing
        training = metadata.training or {}
        normal = metadata.classes[metadata.normal_class] if metadata.classes else "?"
        outputs = f" Outputs: {', '.join(metadata.outputs)}." if metadata.outputs else ""
        return (
            f"{metadata.method} ({pre.get('spatial_dims')}D), model grid {pre.get('size')} at {pre.get('spacing')} mm; "
            f"classes {metadata.classes} (normal: {normal}); trained {training.get('steps', '?')} steps on "
            f"{training.get('data_summary', 'unknown data')}.{outputs}"
        )

    # -- running -------------------------------------------------------------------------------------------
    def validate(self, inputVolumeNode, modelPath, device="auto", thresholdRule="paper", thresholdValue=None) -> None:
        """Raise ValueError with what is wrong and what to do, before anything is launched."""
        slicer_nodes.validate_input_volume(inputVolumeNode)
        if inputVolumeNode.GetScene() is None:
            raise ValueError(f"'{inputVolumeNode.GetName()}' is not in a scene: add it to the scene first.")
        path = str(modelPath or "")
        if path in ("", "."):
            raise ValueError("No model file: select a CounterfactualVA model (.safetensors) trained for this kind of scan.")
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder; select the model file (.safetensors) inside it.")
        if not os.path.isfile(path):
            raise ValueError(f"Model file not found: {path}. Check the path or select another .safetensors model file.")
        if device not in DEVICES:
            raise ValueError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
        if thresholdRule not in THRESHOLD_RULES:
            raise ValueError(f"Unknown threshold rule {thresholdRule!r}: use one of {', '.join(THRESHOLD_RULES)}.")
        if thresholdValue is not None:
            try:
                value = float(thresholdValue)
            except (TypeError, ValueError):
                raise ValueError(f"Threshold value must be a number, got {thresholdValue!r}.") from None
            if value != value or value < 0:
                raise ValueError(f"Threshold value must be a non-negative number, got {thresholdValue!r}.")

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
        if palette not in PALETTES:
            raise ValueError(f"Unknown colour map {palette!r}: use one of {', '.join(PALETTES)}.")
        missing = self.missingPythonPackages()
        if missing:
            raise RuntimeError(
                f"Python packages missing: {', '.join(missing)}. In Slicer click Apply in the CounterfactualVA panel "
                "(it offers to install them) or call CounterfactualVALogic().setupPythonRequirements()."
            )
        baseTemp = None
        if HAVE_SLICER_APP and hasattr(slicer, "app"):
            baseTemp = slicer.app.temporaryPath
        tempDir = tempfile.mkdtemp(prefix="CounterfactualVA-", dir=baseTemp)
        try:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", inputVolumeNode.GetName()).strip("._") or "input"
            inputPath = slicer_nodes.write_volume(inputVolumeNode, os.path.join(tempDir, f"{stem}.nrrd"))
            outDir = os.path.join(tempDir, "output")
            command = self.buildCommand(os.path.abspath(str(modelPath)), inputPath, outDir, device, thresholdRule, thresholdValue, methodOptions)
            loadOptions = {
                "opacity": opacity, "createSegmentation": createSegmentation,
                "transparentBelowThreshold": transparentBelowThreshold, "palette": palette,
            }
            process = CounterfactualVAProcess(
                self, inputVolumeNode, command, self.childEnvironment(device), tempDir, outDir, device, loadOptions,
                progressCallback, logCallback, cpuFallback,
            )
            process.start()
        except BaseException:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        if not waitForCompletion:
            return process
        return process.wait(timeout=timeout)

    #: columns of the batch summary table made by runOnVolumes (all text; numbers written exactly, '' when absent)
    BATCH_TABLE_NAME = "CounterfactualVA summary"
    BATCH_COLUMNS = ("volume", "method", "class_probability", "mask_volume_ml", "mask_voxels", "outputs", "status")

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
        the class probability (``summary["scalars"]["class_probability"]``, empty when the method has none),
        the mask volume in ml, the mask voxel count, the names of the created nodes and a status ("ok" or
        "error: <message>"); `results` holds one CounterfactualVAResult per volume, None where it failed. A
        failing volume does not stop the batch.
        """
        if "waitForCompletion" in runOptions:
            raise TypeError("runOnVolumes always waits for each run; do not pass waitForCompletion.")
        volumes = [node for node in inputVolumeNodes if node is not None]
        if not volumes:
            raise ValueError("No input volumes: select at least one scalar volume.")
        scene = volumes[0].GetScene()
        if scene is None:
            raise ValueError(f"'{volumes[0].GetName()}' is not in a scene: add it to the scene first.")
        if tableNode is None:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", slicer_nodes.unique_name(scene, self.BATCH_TABLE_NAME))
        table = tableNode.GetTable()
        wasModifying = tableNode.StartModify()
        try:
            tableNode.RemoveAllColumns()
            for name in self.BATCH_COLUMNS:
                column = vtk.vtkStringArray()
                column.SetName(name)
                table.AddColumn(column)
            descriptions = {
                "volume": "Input volume",
                "method": "Attribution method of the model",
                "class_probability": "Classifier probability of the input (empty when the method has none)",
                "mask_volume_ml": "Volume of the attribution mask",
                "mask_voxels": "Voxels in the attribution mask",
                "outputs": "Nodes created for this volume",
                "status": "'ok', or the error that stopped this volume",
            }
            for name, description in descriptions.items():
                tableNode.SetColumnDescription(name, description)
            tableNode.SetColumnUnitLabel("mask_volume_ml", "ml")
        finally:
            tableNode.EndModify(wasModifying)

        def text(value):
            if value is None:
                return ""
            if isinstance(value, float):
                return repr(value)
            return str(value)

        results = []
        count = len(volumes)
        for index, volume in enumerate(volumes):
            name = volume.GetName() if volume.GetName() is not None else "(unnamed)"

            def forward(fraction, stage, _index=index, _name=name):
                if progressCallback:
                    progressCallback((_index + fraction) / count, f"[{_index + 1}/{count}] {_name}: {stage}")

            row = {"volume": name}
            try:
                result = self.run(volume, modelPath, waitForCompletion=True, progressCallback=forward, logCallback=logCallback, **runOptions)
            except Exception as exc:
                results.append(None)
                row["status"] = f"error: {exc}"
                if logCallback:
                    logCallback(f"{name}: ERROR: {exc}")
                else:
                    logging.warning("CounterfactualVA batch: %s failed: %s", name, exc)
            else:
                results.append(result)
                summary = result.summary or {}
                row.update(
                    method=summary.get("method"),
                    class_probability=(summary.get("scalars") or {}).get("class_probability"),
                    mask_volume_ml=summary.get("mask_volume_ml"),
                    mask_voxels=summary.get("mask_voxels"),
                    outputs="; ".join(node.GetName() for node in result.nodes()),
                    status="ok",
                )
            rowIndex = table.InsertNextBlankRow()
            for columnIndex, column in enumerate(self.BATCH_COLUMNS):
                table.GetColumn(columnIndex).SetValue(rowIndex, text(row.get(column)))
            table.Modified()
            tableNode.Modified()
        if progressCallback:
            progressCallback(1.0, "Done")
        return tableNode, results

    # -- results -------------------------------------------------------------------------------------------
    def loadResults(
        self, inputVolumeNode, outDir, opacity: float = 0.6, createSegmentation: bool = False, show: bool = True,
        transparentBelowThreshold: bool = True, palette: str = slicer_nodes.DEFAULT_PALETTE,
    ) -> CounterfactualVAResult:
        """Load a finished output folder (summary.json + images on the input's grid) into new nodes.

        All files are read and checked against the input's geometry before any node enters the scene, so a
        bad folder adds nothing. transparentBelowThreshold: the signed attribution's colour table is
        transparent for |value| below the mask threshold, so the overlay colours only the attribution that
        passed it and the scan shows unchanged elsewhere (False: the whole map is drawn, white at zero, tinting
        the view). Only the display changes: the attribution node holds the map's values either way.
        palette: the diverging colour map of the signed maps (one of :data:`PALETTES`; ValueError otherwise,
        before anything is read)."""
        if palette not in PALETTES:
            raise ValueError(f"Unknown colour map {palette!r}: use one of {', '.join(PALETTES)}.")
        summaryPath = os.path.join(outDir, "summary.json")
        if not os.path.isfile(summaryPath):
            raise RuntimeError(f"The attribution finished without a summary ({summaryPath} is missing): the output is incomplete.")
        with open(summaryPath, encoding="utf-8") as f:
            summary = json.load(f)
        outputs = summary.get("outputs") or {}
        if not outputs.get("attribution") or not outputs.get("mask"):
            raise RuntimeError(f"{summaryPath} names no attribution or mask file: the output is incomplete.")
        name = inputVolumeNode.GetName()
        kinds = outputs.get("extra_kinds") or {}
        # (role, node name, file, labelmap, display kind)
        plan = []
        if outputs.get("counterfactual"):
            plan.append(("counterfactual", f"{name} counterfactual", outputs["counterfactual"], False, "intensity"))
        plan.append(("attribution", f"{name} attribution", outputs["attribution"], False, "difference"))
        plan.append(("mask", f"{name} attribution mask", outputs["mask"], True, "mask"))
        for extra, fileName in (outputs.get("extras") or {}).items():
            plan.append((f"extra:{extra}", f"{name} {extra}", fileName, False, kinds.get(extra, "difference")))

        if outputs.get("series"):
            logging.info("CounterfactualVA: image series outputs (%s) are not loaded into the scene.", ", ".join(outputs["series"]))
        loaded = [(role, nodeName, slicer_nodes.read_output_like(os.path.join(outDir, fileName), inputVolumeNode, labelmap), kind)
                  for role, nodeName, fileName, labelmap, kind in plan]

        result = CounterfactualVAResult(summary=summary)
        added = []
        try:
            description = summary.get("description", "CounterfactualVA output")
            method = summary.get("method")
            scalars = json.dumps(summary.get("scalars") or {})
            for role, nodeName, node, kind in loaded:
                slicer_nodes.add_to_scene_like(node, inputVolumeNode, nodeName)
                added.append(node)
                if role == "attribution" and transparentBelowThreshold:
                    maskNode = next(loadedNode for loadedRole, _name, loadedNode, _kind in loaded if loadedRole == "mask")
                    cut = slicer_nodes.overlay_threshold(summary, node, maskNode)
                    slicer_nodes.show_signed_map(node, transparent_below=cut, palette=palette)
                elif kind == "difference":
                    slicer_nodes.show_signed_map(node, palette=palette)
                elif kind == "probability":
                    slicer_nodes.show_probability(node)
                elif kind == "mask":
                    slicer_nodes.show_mask(node)
                else:
                    slicer_nodes.show_like(node, inputVolumeNode)
                slicer_nodes.describe(
                    node, f"{self._roleText(role, summary, kind)} {description}", Role=role, Method=method,
                    InputNodeID=inputVolumeNode.GetID(), Scalars=scalars,
                )
                if role.startswith("extra:"):
                    result.extras[role[len("extra:"):]] = node
                else:
                    setattr(result, role, node)
            if createSegmentation:
                result.segmentation = slicer_nodes.segmentation_from_labelmap(result.mask, f"{name} attribution segmentation")
                added.append(result.segmentation)
                slicer_nodes.describe(
                    result.segmentation, f"Segmentation of the attribution mask. {description}", Role="segmentation",
                    Method=method, InputNodeID=inputVolumeNode.GetID(),
                )
            slicer_nodes.place_in_subject_hierarchy(added, inputVolumeNode)
        except BaseException:
            slicer_nodes.remove_nodes(added)
            raise
        if show:
            slicer_nodes.show_in_slice_views(
                inputVolumeNode.GetScene(), background=inputVolumeNode, foreground=result.attribution, label=result.mask,
                foreground_opacity=opacity,
            )
        return result

    @staticmethod
    def _roleText(role, summary, kind) -> str:
        thresholds = summary.get("thresholds") or {}
        if role == "counterfactual":
            return "Counterfactual (healthy-looking counterpart) of the input."
        if role == "attribution":
            sign = summary.get("map_sign", "counterfactual minus input")
            return (
                f"Signed attribution map: {sign}; displayed with a window centred on 0 (blue negative, red positive), "
                "transparent in slice views where |map| is below the mask threshold (the values are the method's)."
            )
        if role == "mask":
            rule, applied = thresholds.get("rule", "?"), thresholds.get("applied_to_abs_map")
            cut = f"{applied:.4g}" if isinstance(applied, (int, float)) else "?"
            return f"Attribution mask: 1 where |map| >= {cut} (threshold rule '{rule}')."
        return f"Method output '{role[len('extra:'):]}' ({kind})."

    @staticmethod
    def setOpacity(result: CounterfactualVAResult, opacity: float) -> int:
        """Foreground opacity of the slice views that show this result's attribution map."""
        node = result.attribution
        if node is None or node.GetScene() is None:
            return 0
        return slicer_nodes.set_foreground_opacity(node.GetScene(), node, opacity)


#
# CounterfactualVATest
#


class CounterfactualVATest(ScriptedLoadableModuleTest):
    """Self-test: a random-weight model on a synthetic oblique volume, end to end through the subprocess.

    Runs in Slicer (Developer mode > Reload and Test) and under slicer-core (Testing/test_slicer_logic.py)."""

    def setUp(self):
        if hasattr(slicer, "mrmlScene"):
            slicer.mrmlScene.Clear(0)
            self.scene = slicer.mrmlScene
        else:
            self.scene = makeScene()

    def runTest(self):
        self.setUp()
        self.test_CounterfactualVA_EndToEnd()

    @staticmethod
    def makeTinyModel(path, spatialDims: int = 3, size: int = 16, seed: int = 0) -> str:
        """A VANT-GAN model file with random weights (a valid file, not a good model); needs torch."""
        import torch
        from CounterfactualVALib.checkpoint import ModelMetadata, save_model
        from CounterfactualVALib.methods import create_method
        from CounterfactualVALib.preprocessing import PreprocessingConfig

        torch.manual_seed(seed)
        method = create_method("vantgan", spatialDims, {"ngf": 4, "n_blocks": 1, "ndf": 4}, training=False)
        preprocessing = PreprocessingConfig(spatial_dims=spatialDims, size=(size,) * spatialDims, spacing=(3.0,) * spatialDims).to_dict()
        metadata = ModelMetadata(
            method="vantgan", method_config=method.config, preprocessing=preprocessing, networks=list(method.inference_networks),
            outputs=list(method.outputs), training={"command": "self-test", "steps": 0, "data_summary": "no data (random weights)"},
        )
        return str(save_model(path, method.inference_state_dict(), metadata))

    @staticmethod
    def makeObliqueVolume(scene, name="SelfTestMRI", shape=(20, 24, 22)):
        """An anisotropic, oblique, off-origin scalar volume with a bright ellipsoid and an off-centre blob."""
        import numpy as np

        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        centre = [(n - 1) / 2 for n in shape]
        r2 = sum(((g - c) / (0.38 * n)) ** 2 for g, c, n in zip((k, j, i), centre, shape))
        array = np.where(r2 < 1, 100.0, 5.0).astype(np.float32)
        array[((k - centre[0]) ** 2 + (j - centre[1] - 3) ** 2 + (i - centre[2] + 3) ** 2) < 6] += 80
        array += np.random.default_rng(0).normal(0, 1, array.shape).astype(np.float32)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, array)
        transform = vtk.vtkTransform()
        transform.PostMultiply()
        transform.Scale(1.2, 0.9, 2.5)
        transform.RotateX(17)
        transform.RotateZ(-28)
        transform.Translate(-31.5, 14.25, 62.0)
        node.SetIJKToRASMatrix(transform.GetMatrix())
        node.CreateDefaultDisplayNodes()
        return node

    def test_CounterfactualVA_EndToEnd(self):
        """The panel's path: an oblique volume under a linear transform, in a subject-hierarchy folder, run
        without blocking and polled like the widget's timer does, with a segmentation."""
        import numpy as np

        self.delayDisplay("Starting the CounterfactualVA end-to-end test")
        if CounterfactualVALogic.missingPythonPackages():
            self.skipTest(f"missing Python packages: {CounterfactualVALogic.missingPythonPackages()}")
        folder = tempfile.mkdtemp(prefix="CounterfactualVATest-")
        try:
            model = self.makeTinyModel(os.path.join(folder, "tiny.safetensors"))
            inputNode = self.makeObliqueVolume(self.scene)
            transformNode = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "SelfTestRegistration")
            transform = vtk.vtkTransform()
            transform.RotateY(11)
            transform.Translate(4.5, -3.25, 9.0)
            transformNode.SetMatrixTransformToParent(transform.GetMatrix())
            inputNode.SetAndObserveTransformNodeID(transformNode.GetID())
            sh = self.scene.GetSubjectHierarchyNode()
            shFolder = sh.CreateFolderItem(sh.GetSceneItemID(), "SelfTestScans")
            if sh.GetItemByDataNode(inputNode):
                sh.SetItemParent(sh.GetItemByDataNode(inputNode), shFolder)
            else:
                sh.CreateItem(shFolder, inputNode)
            before = slicer_nodes.node_state(inputNode)
            self.progress, self.log = [], []

            process = CounterfactualVALogic().run(
                inputNode, model, device="cpu", thresholdRule="percentile", thresholdValue=95, opacity=0.5,
                createSegmentation=True, waitForCompletion=False,
                progressCallback=lambda f, stage: self.progress.append((f, stage)), logCallback=self.log.append,
            )
            deadline = time.monotonic() + 300
            while not process.poll():
                self.assertLess(time.monotonic(), deadline, "\n".join(self.log))
                if qt is not None and hasattr(slicer, "app"):
                    slicer.app.processEvents()
                time.sleep(0.05)
            result = process.result
            self.process, self.result, self.inputNode, self.shFolder = process, result, inputNode, shFolder

            self.assertEqual(
                [node.GetName() for node in result.nodes()],
                ["SelfTestMRI counterfactual", "SelfTestMRI attribution", "SelfTestMRI attribution mask", "SelfTestMRI attribution segmentation"],
            )
            for node in (result.counterfactual, result.attribution, result.mask):
                self.assertTrue(slicer_nodes.same_world_geometry(node, inputNode), node.GetName())
                self.assertTrue(slicer_nodes.matrices_equal(slicer_nodes.world_ijk_to_ras(node), slicer_nodes.world_ijk_to_ras(inputNode)))
                self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), shFolder)
                self.assertTrue(node.GetAttribute(slicer_nodes.DESCRIPTION_ATTRIBUTE))
            self.assertEqual(result.segmentation.GetTransformNodeID(), transformNode.GetID())
            self.assertEqual(result.segmentation.GetSegmentation().GetNumberOfSegments(), 1)
            mask = slicer.util.arrayFromVolume(result.mask)
            self.assertTrue(set(np.unique(mask)) <= {0, 1} and mask.any())
            display = result.attribution.GetDisplayNode()
            self.assertTrue(display.GetColorNode().GetName().startswith(slicer_nodes.DIVERGING_COLOR_NODE_NAME))
            self.assertEqual(display.GetLevel(), 0.0)
            fractions = [f for f, _ in self.progress]
            self.assertEqual(fractions, sorted(fractions))
            self.assertEqual(fractions[-1], 1.0)
            self.assertFalse(os.path.exists(process.tempDir))
            self.assertEqual(slicer_nodes.node_state(inputNode), before)  # the input is untouched
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")


def makeScene():
    """A scene set up the way the application sets one up, for slicer-core: default colour tables,
    subject hierarchy logic and the three slice views' composite nodes."""
    scene = slicer.vtkMRMLScene()
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    subjectHierarchyLogic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subjectHierarchyLogic.SetMRMLScene(scene)
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    sliceLogics = []
    for viewName in ("Red", "Yellow", "Green"):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.AddSliceNode(viewName)
        sliceLogics.append(sliceLogic)
    # Keep the logics alive as long as the scene object is used from Python.
    scene._counterfactualVALogics = (colorLogic, subjectHierarchyLogic, applicationLogic, sliceLogics)
    return scene
