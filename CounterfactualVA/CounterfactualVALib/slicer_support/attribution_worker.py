"""The module's warm attribution worker: one child process kept between Apply clicks, without Qt.

:class:`AttributionWorker` runs ``python -m CounterfactualVALib.worker`` (protocol in
:mod:`CounterfactualVALib.worker`) in a :class:`~.process.ProcessRunner` with its stdin open, so torch is
imported once and the model is loaded once per model file; a second Apply on the same model costs the
in-process stages only. The module logic owns one worker (the panel, the console API and batch runs share it)
and releases it on module exit (:meth:`close`); the worker also exits by itself after an idle time and when
Slicer goes away (its stdin closes).

:class:`WorkerAttributionProcess` is one run in that worker, with the interface of
:class:`~.attribution.AttributionProcess` (poll/wait/cancel, ``result``, ``device``, ``tempDir``): Cancel kills
the worker (the next run starts a fresh one), and a GPU failure is sent again with ``device="cpu"`` to the same
worker when `cpuFallback` is set.
"""

from __future__ import annotations

import itertools
import json
import shutil
import weakref

from .attribution import AttributionRun
from ..worker import DEFAULT_IDLE_TIMEOUT_S, parse_event
from .process import ProcessRunner

WORKER_MODULE = "CounterfactualVALib.worker"


class AttributionWorker:
    """A long-lived worker process; :meth:`submit` sends a request, :meth:`poll` returns the JSON events
    received since (progress lines go to the current `on_progress`, other output to `on_line`)."""

    def __init__(self, python: str, env: dict, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S):
        self.command = [python, "-m", WORKER_MODULE, "--idle-timeout", str(idle_timeout_s)]
        self.env = env
        self.on_progress = None
        self.on_line = None
        self._events: list[dict] = []
        self._ids = itertools.count(1)
        self.runner: ProcessRunner | None = None

    @property
    def running(self) -> bool:
        return self.runner is not None and self.runner.running

    @property
    def pid(self) -> int | None:
        return self.runner.pid if self.running else None

    def submit(self, request: dict) -> str:
        """Send `request` (an attribute request without its id), starting the worker if it is not running;
        returns the request's id."""
        if not self.running or self.runner.poll() is not None:
            self.runner = ProcessRunner(
                self.command, env=self.env, on_progress=self._progress, on_line=self._line, pipe_grace_s=2.0, stdin_pipe=True,
            ).start()
            self._events = []
            # When this object goes away (its logic was dropped) the worker's stdin closes and it exits at once,
            # instead of waiting out its idle time.
            weakref.finalize(self, _close_quietly, self.runner._proc.stdin)
        request_id = str(next(self._ids))
        self.runner.send(json.dumps({**request, "id": request_id}))
        return request_id

    def poll(self) -> list[dict]:
        """Deliver output; the JSON events received since the last call. Never blocks."""
        if self.runner is not None:
            self.runner.poll()
        events, self._events = self._events, []
        return events

    def error_message(self) -> str:
        if self.runner is None:
            return "The attribution worker is not running."
        return self.runner.error_message("attribution worker", "Try the CPU device, close other programs, or use a smaller model.")

    def kill(self) -> None:
        """End the worker at once (and whatever it runs); the next request starts a fresh one."""
        if self.runner is not None:
            self.runner.kill()
            self.runner.wait(timeout=5, interval=0.01)  # SIGKILL ends it at once: reap it, leave no zombie

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (GPU memory and the model are released); killed if it does not in time."""
        if not self.running:
            return
        try:
            self.runner.send(json.dumps({"command": "shutdown"}))
        except OSError:
            pass
        if self.runner.wait(timeout=timeout) is None:
            self.kill()

    def _progress(self, fraction, stage):
        if self.on_progress is not None:
            self.on_progress(fraction, stage)

    def _line(self, line, stream):
        event = parse_event(line) if stream == "out" else None
        if event is not None:
            self._events.append(event)
        elif self.on_line is not None:
            self.on_line(line, stream)


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - already closed, or the process is gone
        pass


class WorkerAttributionProcess(AttributionRun):
    """One attribution run in the logic's :class:`AttributionWorker` (see :class:`AttributionRun` and the
    module docstring); cancel() kills the worker, the next run starts a fresh one."""

    poll_interval = 0.02

    def __init__(self, logic, inputNode, worker: AttributionWorker, request: dict, tempDir, outDir, device, loadOptions=None, progressCallback=None, logCallback=None, cpuFallback=True):
        super().__init__(logic, inputNode, tempDir, outDir, device, loadOptions, progressCallback, logCallback, cpuFallback)
        self.worker = worker
        self.request = dict(request)
        self.requestId = None
        #: the worker's own seconds for the request (its "done" event), to tell Slicer's share of an Apply
        self.workerSeconds = None
        self.modelWasLoaded = None

    @property
    def running(self) -> bool:
        return self.requestId is not None and not (self.done or self.cancelled) and self.worker.running

    def start(self):
        self._report(0.0, "Starting the attribution" if self.worker.running else "Starting the attribution worker")
        self.worker.on_progress, self.worker.on_line = self._onProgress, self._onLine
        self.requestId = self.worker.submit(self.request)
        return self

    def poll(self) -> bool:
        """Forward output; True when finished (then ``result`` holds the nodes). Raises on failure."""
        settled = self._settled()
        if settled is not None:
            return settled
        for event in self.worker.poll():
            if event.get("id") != self.requestId:
                continue
            if event["event"] == "error":
                message = event.get("message", "unknown error")
                if self._falls_back_to_cpu(message, gpu=bool(event.get("gpu"))):
                    self.request["device"] = "cpu"
                    self.requestId = self.worker.submit(self.request)
                    return False
                return self._fail(message)
            if event["event"] == "done":
                self.workerSeconds, self.modelWasLoaded = event.get("seconds"), event.get("model_was_loaded")
                return self._finish()
        if not self.worker.running:
            return self._fail(self.worker.error_message())
        return False

    def cancel(self):
        """Kill the worker (the run ends at once; the next run starts a fresh worker), delete the temporary
        folder; no nodes are created."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.worker.kill()
        shutil.rmtree(self.tempDir, ignore_errors=True)
        self._report(self.progress, "Cancelled")