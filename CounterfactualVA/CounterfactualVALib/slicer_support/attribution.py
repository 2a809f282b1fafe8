"""The attribution run of the CounterfactualVA module, without Qt: input checks, the command, the child
process, and a batch over several volumes.

:class:`AttributionProcess` wraps a :class:`~.process.ProcessRunner` running ``CounterfactualVACLI attribute``
and turns its end into new nodes (through the module logic's ``loadResults``), an error, or a CPU rerun;
:func:`start_attribution` writes the input volume and starts one; :func:`run_batch` runs one per volume and
fills the summary table.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
import time

from .. import metrics, slicer_nodes
from ..devices import DEVICES
from . import results
from .option_form import option_text
from .process import CLI_MODULE, ProcessRunner, cpu_fallback, looks_like_gpu_problem
from .settings import path_text

THRESHOLD_RULES = tuple(metrics.THRESHOLD_RULES)


def validate(inputVolumeNode, modelPath, device="auto", thresholdRule="paper", thresholdValue=None) -> None:
    """Raise ValueError with what is wrong and what to do, before anything is launched."""
    slicer_nodes.validate_input_volume(inputVolumeNode)
    if inputVolumeNode.GetScene() is None:
        raise ValueError(f"'{inputVolumeNode.GetName()}' is not in a scene: add it to the scene first.")
    path = path_text(modelPath)
    if not path:
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


def build_command(python, modelPath, inputPath, outDir, device="auto", thresholdRule="paper", thresholdValue=None, methodOptions=None) -> list:
    """``python -m CounterfactualVACLI attribute ... --progress`` with the method options as ``--option key=value``."""
    command = [
        python, "-m", CLI_MODULE, "attribute", "--model", str(modelPath), "--input", str(inputPath), "--out", str(outDir),
        "--device", device, "--threshold-rule", thresholdRule,
    ]
    if thresholdValue is not None:
        command += ["--threshold-value", repr(float(thresholdValue))]
    for key, value in (methodOptions or {}).items():  # e.g. ICAM {"samples": 20}, medXGAN {"inversion_steps": 500}
        command += ["--option", f"{key}={option_text(value)}"]
    return command + ["--progress"]


def start_attribution(logic, inputVolumeNode, modelPath, device, thresholdRule, thresholdValue, methodOptions, loadOptions,
                      progressCallback=None, logCallback=None, cpuFallback=True, tempBase=None, worker=None):
    """Write the input volume (NRRD) into a new temporary folder under `tempBase` and start the attribution on it:
    a request to the warm `worker` (an attribution_worker.AttributionWorker) when one is given, else the command
    line in a new process. The folder is deleted when the run ends, fails or is cancelled (and here when
    starting fails). Returns the running AttributionProcess / WorkerAttributionProcess."""
    tempDir = tempfile.mkdtemp(prefix="CounterfactualVA-", dir=tempBase)
    try:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", inputVolumeNode.GetName()).strip("._") or "input"
        inputPath = slicer_nodes.write_volume(inputVolumeNode, os.path.join(tempDir, f"{stem}.nrrd"))
        outDir = os.path.join(tempDir, "output")
        modelPath = os.path.abspath(str(modelPath))
        if worker is not None:
            from .attribution_worker import WorkerAttributionProcess

            # Outputs read back at once: uncompressed NRRD (compression would cost more than the whole run).
            request = {
                "command": "attribute", "model": modelPath, "input": inputPath, "out": outDir, "device": device,
                "threshold_rule": thresholdRule, "threshold_value": None if thresholdValue is None else float(thresholdValue),
                "method_options": dict(methodOptions or {}), "compress": False,
            }
            process = WorkerAttributionProcess(
                logic, inputVolumeNode, worker, request, tempDir, outDir, device, loadOptions, progressCallback, logCallback, cpuFallback)
        else:
            command = logic.buildCommand(modelPath, inputPath, outDir, device, thresholdRule, thresholdValue, methodOptions)
            process = AttributionProcess(
                logic, inputVolumeNode, command, logic.childEnvironment(device), tempDir, outDir, device, loadOptions,
                progressCallback, logCallback, cpuFallback,
            )
        process.start()
        return process
    except BaseException:
        shutil.rmtree(tempDir, ignore_errors=True)
        raise


def run_batch(run, inputVolumeNodes, modelPath, progressCallback=None, logCallback=None, tableNode=None, **runOptions):
    """``run(volume, modelPath, ...)`` (the logic's blocking run) on each volume in turn, one row per volume in the
    summary table; a failing volume is a row with its error and does not stop the batch. Returns (table, results)."""
    if "waitForCompletion" in runOptions:
        raise TypeError("runOnVolumes always waits for each run; do not pass waitForCompletion.")
    volumes = [node for node in inputVolumeNodes if node is not None]
    if not volumes:
        raise ValueError("No input volumes: select at least one scalar volume.")
    scene = volumes[0].GetScene()
    if scene is None:
        raise ValueError(f"'{volumes[0].GetName()}' is not in a scene: add it to the scene first.")
    tableNode = results.start_batch_table(scene, tableNode)
    runs = []
    for index, volume in enumerate(volumes):
        name = volume.GetName() if volume.GetName() is not None else "(unnamed)"

        def forward(fraction, stage, _index=index, _name=name):
            if progressCallback:
                progressCallback((_index + fraction) / len(volumes), f"[{_index + 1}/{len(volumes)}] {_name}: {stage}")

        try:
            result = run(volume, modelPath, waitForCompletion=True, progressCallback=forward, logCallback=logCallback, **runOptions)
        except Exception as exc:
            runs.append(None)
            results.add_batch_row(tableNode, results.batch_row(name, error=exc))
            (logCallback or print)(f"{name}: ERROR: {exc}")
        else:
            runs.append(result)
            results.add_batch_row(tableNode, results.batch_row(name, result))
    if progressCallback:
        progressCallback(1.0, "Done")
    return tableNode, runs


class AttributionRun:
    """What every attribution run shares, whether a fresh process or a request to the warm worker runs it:
    state, progress and log forwarding, loading the outputs into new nodes, waiting, failing.

    poll() forwards progress and log lines, and when the run has ended successfully it loads the outputs into
    new nodes (``self.result``) and returns True. On failure it raises RuntimeError with the command line's own
    message (its last ``ERROR:`` line) and creates nothing. cancel() stops the run, deletes the temporary folder
    and creates nothing; it returns at once. A GPU failure (no CUDA device, out of GPU memory) is run again on
    the CPU when `cpuFallback` is set, and the log says so.
    """

    #: seconds between polls in wait()
    poll_interval = 0.05

    def __init__(self, logic, inputNode, tempDir, outDir, device, loadOptions=None, progressCallback=None, logCallback=None, cpuFallback=True):
        self.logic = logic
        self.inputNode = inputNode
        self.tempDir = tempDir
        self.outDir = outDir
        #: keyword arguments of CounterfactualVALogic.loadResults (opacity, createSegmentation, ...)
        self.loadOptions = dict(loadOptions or {})
        self.device = device
        self.progressCallback = progressCallback
        self.logCallback = logCallback or print
        self.cpuFallback = cpuFallback
        self.progress, self.stage = 0.0, "Starting"
        self.log: list[str] = []
        self.result = None
        self.error = None
        self.cancelled = self.done = False

    def _report(self, fraction, stage):
        self.progress, self.stage = fraction, stage
        if self.progressCallback:
            self.progressCallback(fraction, stage)

    def _onProgress(self, fraction, stage):
        self._report(min(fraction, 0.99), stage)  # loading the results into the scene is the last step

    def _onLine(self, line, stream):
        self.log.append(line)
        self.logCallback(line)

    def _settled(self) -> bool | None:
        """poll()'s answer when the run has already ended or was cancelled; None while it runs."""
        if self.done:
            if self.error:
                raise RuntimeError(self.error)
            return True
        return True if self.cancelled else None

    def _falls_back_to_cpu(self, message: str, gpu: bool = False) -> bool:
        """True (after saying so in the log) when a failed GPU run should run again on the CPU."""
        if not (self.cpuFallback and self.device != "cpu" and (gpu or looks_like_gpu_problem(message))):
            return False
        self.logCallback(f"The GPU run failed ({message}); running on the CPU instead.")
        self.device = "cpu"
        shutil.rmtree(self.outDir, ignore_errors=True)
        return True

    def _finish(self) -> bool:
        """The run has written its outputs: load them into new nodes and clean up."""
        try:
            self._report(0.99, "Loading results into the scene")
            self.result = self.logic.loadResults(self.inputNode, self.outDir, **self.loadOptions)
        except Exception as exc:
            return self._fail(str(exc))
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self.done = True
        self._report(1.0, "Done")
        return True

    def wait(self, timeout: float | None = None, interval: float | None = None):
        """Block until finished; returns the result (raises RuntimeError on failure or timeout)."""
        start = time.monotonic()
        while not self.poll():
            if timeout is not None and time.monotonic() - start > timeout:
                self.cancel()
                raise RuntimeError(f"The attribution did not finish within {timeout:.0f} s and was cancelled.")
            time.sleep(self.poll_interval if interval is None else interval)
        if self.cancelled:
            raise RuntimeError("The attribution was cancelled.")
        return self.result

    def _fail(self, message):
        self.error, self.done = message, True
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._report(self.progress, "Failed")
        raise RuntimeError(message)


class AttributionProcess(AttributionRun):
    """An attribution run in a fresh command-line process (see :class:`AttributionRun`); cancel() kills
    the process group."""

    def __init__(self, logic, inputNode, command, env, tempDir, outDir, device, loadOptions=None, progressCallback=None, logCallback=None, cpuFallback=True):
        super().__init__(logic, inputNode, tempDir, outDir, device, loadOptions, progressCallback, logCallback, cpuFallback)
        self.runner = ProcessRunner(command, env=env, cwd=tempDir, on_progress=self._onProgress, on_line=self._onLine, pipe_grace_s=5.0)

    command = property(lambda self: self.runner.command)
    env = property(lambda self: self.runner.env)
    returncode = property(lambda self: self.runner.returncode)
    running = property(lambda self: self.runner.running and not self.cancelled)

    def start(self):
        self._report(0.0, "Starting the attribution process")
        self.logCallback("Running: " + shlex.join(self.command))
        self.runner.start()
        return self

    def poll(self) -> bool:
        """Forward output; True when finished (then ``result`` holds the nodes). Raises on failure."""
        settled = self._settled()
        if settled is not None:
            return settled
        code = self.runner.poll()
        if code is None:
            return False
        if code != 0:
            message = self.runner.error_message("attribution process", "Try the CPU device, close other programs, or use a smaller model.")
            if self._falls_back_to_cpu(message):
                self.runner.restart(*cpu_fallback(self.command, self.env))
                return False
            return self._fail(message)
        return self._finish()

    def cancel(self):
        """Kill the process group and delete the temporary folder; no nodes are created. Returns at once."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.runner.kill()
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._report(self.progress, "Cancelled")