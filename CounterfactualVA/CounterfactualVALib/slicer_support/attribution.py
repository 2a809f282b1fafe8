"""The attribution run of the CounterfactualVA module, without Qt: input checks and the child process.

:class:`AttributionProcess` wraps a :class:`~.process.ProcessRunner` running ``CounterfactualVACLI attribute``
and turns its end into new nodes (through the module logic's ``loadResults``), an error, or a CPU rerun.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time

from .. import metrics, slicer_nodes
from ..devices import DEVICES
from .process import ProcessRunner, cpu_fallback, looks_like_gpu_problem
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



class AttributionProcess:
    """A running attribution: poll() it (from a timer or a loop) until it returns True, or cancel() it.

    poll() forwards progress and log lines, and when the process has ended successfully it loads the outputs
    into new nodes (``self.result``) and returns True. On failure it raises RuntimeError with the command
    line's own message (its last ``ERROR:`` line) and creates nothing. cancel() kills the process group,
    deletes the temporary folder and creates nothing; it returns at once. A GPU failure (no CUDA device, out
    of GPU memory) is run again on the CPU when `cpuFallback` is set, and the log says so.
    """

    def __init__(self, logic, inputNode, command, env, tempDir, outDir, device, loadOptions=None, progressCallback=None, logCallback=None, cpuFallback=True):
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

    def _report(self, fraction, stage):
        self.progress, self.stage = fraction, stage
        if self.progressCallback:
            self.progressCallback(fraction, stage)

    def _onProgress(self, fraction, stage):
        self._report(min(fraction, 0.99), stage)  # loading the results into the scene is the last step

    def _onLine(self, line, stream):
        self.log.append(line)
        self.logCallback(line)

    def poll(self) -> bool:
        """Forward output; True when finished (then ``result`` holds the nodes). Raises on failure."""
        if self.done:
            if self.error:
                raise RuntimeError(self.error)
            return True
        if self.cancelled:
            return True
        code = self.runner.poll()
        if code is None:
            return False
        if code != 0:
            message = self.runner.error_message("attribution process", "Try the CPU device, close other programs, or use a smaller model.")
            if self.cpuFallback and self.device != "cpu" and looks_like_gpu_problem(message):
                self.logCallback(f"The GPU run failed ({message}); running on the CPU instead.")
                self.device = "cpu"
                shutil.rmtree(self.outDir, ignore_errors=True)
                self.runner.restart(*cpu_fallback(self.command, self.env))
                return False
            return self._fail(message)
        try:
            self._report(0.99, "Loading results into the scene")
            self.result = self.logic.loadResults(self.inputNode, self.outDir, **self.loadOptions)
        except Exception as exc:
            return self._fail(str(exc))
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self.done = True
        self._report(1.0, "Done")
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.05):
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
        """Kill the process group and delete the temporary folder; no nodes are created. Returns at once."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.runner.kill()
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._report(self.progress, "Cancelled")

    def _fail(self, message):
        self.error, self.done = message, True
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._report(self.progress, "Failed")
        raise RuntimeError(message)
