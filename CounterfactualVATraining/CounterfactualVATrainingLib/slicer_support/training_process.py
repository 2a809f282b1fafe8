"""The training module's child process and the record of trained models, without Qt.

:class:`TrainingProcess` runs ``CounterfactualVACLI train ... --progress`` on a
:class:`~CounterfactualVALib.slicer_support.process.ProcessRunner`: it parses the ``PROGRESS <fraction> step N/T key=value ...`` lines into live
values, mirrors ``log.csv`` into the run's table node, and tells a finished model from a stop with a
checkpoint (exit code 3; SIGTERM to the process group makes the training loop finish its step, write
``checkpoint.pt`` and exit) and from a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time

from CounterfactualVALib.run_files import CHECKPOINT_NAME, LOG_NAME, MODEL_NAME
from CounterfactualVALib.slicer_support.process import ProcessRunner

#: exit code of `counterfactualva train` when it was stopped with a checkpoint (resumable)
EXIT_STOPPED = 3
_PROGRESS_TEXT = re.compile(r"^step\s+(\d+)/(\d+)\s*(.*)$")


def live_values_text(values: dict) -> str:
    """The panel's line of live values: the losses, then the validation figures (kept until the next validation)."""
    shown = [f"{k} {v:.4g}" for k, v in values.items() if k.startswith("loss")]
    shown += [f"{k} {v:.4g}" for k, v in values.items() if k in ("val_ncc", "val_dice", "val_score")]
    return "   ".join(shown)


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


def parse_step(text: str):
    """The text of a training PROGRESS line (``step N/T key=value ...``) -> (step, total, values), else None."""
    match = _PROGRESS_TEXT.match(text.strip())
    if not match:
        return None
    values = {}
    for pair in match.group(3).split():
        key, sep, value = pair.partition("=")
        if sep:
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return int(match.group(1)), int(match.group(2)), values


class TrainingProcess:
    """A running training: poll() it (from a QTimer or a loop) until it returns True, or stop() it.

    poll() forwards progress and log lines, mirrors ``log.csv`` into the table node, and returns True when the
    process has ended: then ``modelPath`` is set after success, or ``stopped``/``resumable`` after stop(). A
    failure raises RuntimeError with the command line's own message (its last ``ERROR:`` line).

    progressCallback(fraction, step, totalSteps, values) receives the parsed PROGRESS lines (values: the losses
    and, on validation steps, the val_* figures); logCallback(line) every other output line.
    """

    #: under the PythonSlicer launcher the launcher may exit first; the Python it started keeps the pipes until
    #: it has written its checkpoint: wait that long for them (poll() never blocks meanwhile)
    PIPE_GRACE_S = 600.0

    def __init__(self, logic, command, env, outputFolder, tableNode=None, chartNode=None, progressCallback=None,
                 logCallback=None, onSuccess=None):
        self.logic = logic
        self.outputFolder = os.path.abspath(outputFolder)
        self.tableNode = tableNode
        self.chartNode = chartNode
        self.progressCallback = progressCallback
        self.logCallback = logCallback or print
        self.onSuccess = onSuccess
        self.fraction, self.step, self.totalSteps, self.values = 0.0, 0, None, {}
        self.log: list = []
        self.modelPath = None
        self.error = None
        self.done = self.stopped = self.resumable = False
        self._stopTime = None
        self._logStat = None
        self.runner = ProcessRunner(command, env=env, cwd=self.outputFolder, on_progress=self._onProgress, on_line=self._onLine,
                                    pipe_grace_s=self.PIPE_GRACE_S)

    command = property(lambda self: self.runner.command)
    env = property(lambda self: self.runner.env)
    returncode = property(lambda self: self.runner.returncode)
    stopRequested = property(lambda self: self.runner.stop_requested)
    running = property(lambda self: self.runner.pid is not None and not self.done)
    logPath = property(lambda self: os.path.join(self.outputFolder, LOG_NAME))
    checkpointPath = property(lambda self: os.path.join(self.outputFolder, CHECKPOINT_NAME))

    def start(self):
        self.logCallback("Running: " + shlex.join(self.command))
        self.runner.start()
        return self

    def _onProgress(self, fraction, text):
        parsed = parse_step(text)
        if parsed is None:
            return
        self.fraction = fraction
        self.step, self.totalSteps, self.values = parsed
        if self.progressCallback:
            self.progressCallback(self.fraction, self.step, self.totalSteps, self.values)

    def _onLine(self, line, stream):
        self.log.append(line)
        self.logCallback(line)

    def poll(self) -> bool:
        """Forward output and refresh the log table; True when the process has ended. Raises on failure."""
        if self.done:
            if self.error:
                raise RuntimeError(self.error)
            return True
        code = self.runner.poll()
        self.refreshTable(force=code is not None)
        if code is None:
            return False
        checkpointed = self.stopRequested and os.path.isfile(self.checkpointPath) and os.path.getmtime(self.checkpointPath) >= self._stopTime - 1
        if code == EXIT_STOPPED or (self.stopRequested and code != 0 and checkpointed):
            # (the second case: the PythonSlicer launcher died of the signal, the Python under it checkpointed)
            self.runner.returncode = EXIT_STOPPED
            self.stopped = self.resumable = self.done = True
            return True
        if self.stopRequested and code != 0:
            self.stopped, self.done = True, True
            self.resumable = os.path.isfile(self.checkpointPath)
            self.logCallback(
                "Training was stopped before it wrote a checkpoint"
                + (" (an earlier checkpoint remains: Resume continues from it)." if self.resumable else "; start it again.")
            )
            return True
        if code != 0:
            return self._fail(self.runner.error_message(
                "training process", "Try a smaller batch size or model grid, or the CPU device; Resume continues from the last checkpoint."))
        model = os.path.join(self.outputFolder, MODEL_NAME)
        if not os.path.isfile(model):
            return self._fail(f"The training process ended without writing {model}.")
        self.modelPath, self.done = model, True
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
        """Ask the training to stop: SIGTERM to the process group, the loop finishes its step, writes
        checkpoint.pt and exits with code 3 (resumable). wait=False returns None at once (keep polling; what the
        panel does); wait=True blocks until then (killing it after `timeout` seconds) and returns the exit code.
        On Windows the process is ended and the last periodic checkpoint is what Resume finds."""
        if self.runner.pid is None or self.done:
            return self.returncode
        if not self.stopRequested:
            self._stopTime = time.time()
            self.runner.request_stop()
        if not wait:
            return None
        start = time.monotonic()
        while not self.poll():
            if time.monotonic() - start > timeout:
                self.kill()
            time.sleep(0.1)
        return self.returncode

    def kill(self):
        """Kill at once (no new checkpoint); returns at once."""
        self._stopTime = self._stopTime or time.time()
        self.runner.kill()

    def _fail(self, message):
        self.error, self.done = message, True
        raise RuntimeError(message)
