"""The warm worker: one process that runs attribution requests one after another, keeping torch imported
and the last model loaded, so that a second request on the same model costs the in-process stages only.

    python -m CounterfactualVALib.worker [--idle-timeout SECONDS]

Protocol (one line per message, UTF-8): requests are JSON objects on stdin; the worker answers on stdout with

- ``PROGRESS <fraction> <stage>`` while a request runs (the command line's own progress lines, so a runner
  that reads the command line reads these too);
- one JSON object per event: ``{"event": "ready", "pid": ..., "protocol": 1}`` once, when torch is imported;
  per request ``{"event": "done", "id": ..., "out": FOLDER, "seconds": ..., "model_was_loaded": bool}`` (the
  folder holds ``summary.json``: :meth:`RunSummary.read`) or ``{"event": "error", "id": ..., "message": ...,
  "kind": "input" | "internal", "gpu": bool}`` (``gpu``: a CUDA failure a CPU run would not have; the client
  may send the request again with ``"device": "cpu"``); and ``{"event": "exit", "reason": ...}`` at the end.

Requests: ``{"id": ID, "command": "attribute", "model": PATH, "input": PATH, "out": FOLDER}`` plus any of
``device``, ``threshold_rule``, ``threshold_value``, ``method_options``, ``file_ext``, ``figure``, ``compress``
(the keywords of :func:`~CounterfactualVALib.inference.run_attribution`); ``{"command": "release"}`` drops the
loaded model (GPU memory back), ``{"command": "shutdown"}`` ends the worker. It also ends when stdin closes
(the client went away) and after ``--idle-timeout`` seconds without a request. Anything a library prints to
stdout goes to stderr instead, so the protocol stream stays clean.

:class:`WorkerClient` is the client for Python code (the console, batch scripts, the benchmark, the tests);
the Slicer module drives the same worker through its process runner.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

PROTOCOL_VERSION = 1
#: the keywords of run_attribution a request may carry besides model, input and out
REQUEST_OPTIONS = ("device", "threshold_rule", "threshold_value", "method_options", "file_ext", "figure", "compress")
DEFAULT_IDLE_TIMEOUT_S = 600.0


class WorkerError(RuntimeError):
    """A request the worker could not run (`message` is the worker's own), or a worker that died."""

    def __init__(self, message: str, kind: str = "internal", gpu: bool = False):
        super().__init__(message)
        self.kind, self.gpu = kind, gpu


def looks_like_gpu_problem(message: str) -> bool:
    """True for a failure a CPU run would not have (no CUDA device, out of GPU memory, driver mismatch)."""
    text = message.lower()
    return any(word in text for word in ("cuda", "gpu", "cudnn", "nvidia"))


def parse_event(line: str) -> dict | None:
    """The JSON event on a worker's stdout line, else None (progress lines and anything else)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# --- the worker process ------------------------------------------------------------------------------


class _ModelCache:
    """The last model loaded, kept while requests name the same file (same path, size and modification
    time: a file replaced on disk is loaded again) and the same device."""

    def __init__(self):
        self.key = None
        self.model = None

    def get(self, path: str, device: str):
        from .inference import load_model

        try:
            stat = os.stat(path)
            key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, device)
        except OSError:
            key = None  # load_model says what is wrong with the path
        if key is not None and key == self.key:
            return self.model, False
        self.release()
        self.model = load_model(path, device)
        self.key = key
        return self.model, True

    def release(self):
        was_cuda = self.model is not None and self.model.device.type == "cuda"
        self.key = self.model = None
        if was_cuda:
            import torch

            torch.cuda.empty_cache()


def serve(requests, emit: Callable[[str], None], idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> str:
    """Run requests (an iterator of lines, read in a thread) until shutdown, end of input or idle timeout;
    `emit` writes one line to the client. Returns why it ended."""
    from .imageio import InputError
    from .inference import run_attribution

    lines: queue.Queue = queue.Queue()

    def read():
        for line in requests:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    cache = _ModelCache()

    def send(**event):
        emit(json.dumps(event))

    send(event="ready", pid=os.getpid(), protocol=PROTOCOL_VERSION)
    while True:
        try:
            line = lines.get(timeout=idle_timeout)
        except queue.Empty:
            reason = "idle"
            break
        if line is None:
            reason = "end of input"
            break
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            send(event="error", id=None, message=f"Unreadable request ({exc}): send one JSON object per line.", kind="input", gpu=False)
            continue
        command, request_id = request.get("command"), request.get("id")
        if command == "shutdown":
            reason = "shutdown"
            break
        if command == "release":
            cache.release()
            send(event="released", id=request_id)
            continue
        if command != "attribute":
            send(event="error", id=request_id, message=f"Unknown command {command!r}: use attribute, release or shutdown.", kind="input", gpu=False)
            continue
        start = time.perf_counter()
        try:
            missing = [key for key in ("model", "input", "out") if not request.get(key)]
            unknown = sorted(set(request) - {"id", "command", "model", "input", "out", *REQUEST_OPTIONS})
            if missing or unknown:
                raise InputError(f"The request lacks {missing} or has unknown keys {unknown}; see python -m CounterfactualVALib.worker --help.")
            options = {key: request[key] for key in REQUEST_OPTIONS if key in request}
            model, loaded = cache.get(request["model"], options.pop("device", "auto"))
            run_attribution(
                model, request["input"], request["out"],
                progress=lambda fraction, stage: emit(f"PROGRESS {fraction:.3f} {stage}"), **options,
            )
        except (InputError, ValueError, FileNotFoundError) as exc:
            message = str(exc)
            gpu = looks_like_gpu_problem(message)
            if gpu:
                cache.release()
            send(event="error", id=request_id, message=message, kind="input", gpu=gpu)
        except Exception as exc:  # noqa: BLE001 - the worker outlives a failed request and says what happened
            traceback.print_exc(file=sys.stderr)
            message = f"{type(exc).__name__}: {exc}"
            cache.release()  # a half-run model (e.g. after a CUDA error) is not reused
            send(event="error", id=request_id, message=message, kind="internal", gpu=looks_like_gpu_problem(message))
        else:
            send(event="done", id=request_id, out=str(request["out"]), seconds=round(time.perf_counter() - start, 4), model_was_loaded=loaded)
    cache.release()
    send(event="exit", reason=reason)
    return reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m CounterfactualVALib.worker", description=__doc__.split("\n\n")[0],
        epilog="Protocol: see the module documentation (one JSON request per stdin line; PROGRESS lines and JSON events on stdout).",
    )
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S, help="exit after this many seconds without a request")
    args = parser.parse_args(argv)
    # The protocol owns the real stdout; everything else printed to it (warnings, library chatter) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    import torch  # noqa: F401  (imported before "ready": the first request does not wait for it)

    def emit(line: str) -> None:
        protocol.write(line + "\n")
        protocol.flush()

    serve(iter(sys.stdin.readline, ""), emit, args.idle_timeout)
    return 0


# --- the client ------------------------------------------------------------------------------------------


class WorkerClient:
    """Starts a worker on first use and sends it requests; :meth:`attribute` blocks until the run is done.

    The worker is started with `python` (default: this interpreter) and `env` (default: this process's, with
    this library first on PYTHONPATH). :meth:`cancel` kills it (a running request ends at once; the next
    request starts a fresh worker); :meth:`close` asks it to exit. With `cpu_fallback`, a request that fails
    on the GPU for a GPU reason is sent again with ``device="cpu"``.
    """

    def __init__(self, python: str | None = None, env: dict | None = None, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S, log: Callable[[str], None] | None = None):
        self.python = python or sys.executable
        if env is None:
            env = dict(os.environ)
            library_parent = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join([library_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.env = dict(env, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self.idle_timeout = idle_timeout
        self.log = log or (lambda line: None)
        self.stderr: collections.deque = collections.deque(maxlen=50)
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "WorkerClient":
        if self.running:
            return self
        kwargs = {"start_new_session": True} if os.name != "nt" else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        self._proc = subprocess.Popen(
            [self.python, "-m", "CounterfactualVALib.worker", "--idle-timeout", str(self.idle_timeout)],
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, args=(self._proc.stdout, self._lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self._proc.stderr, self._on_stderr), daemon=True).start()
        return self

    def attribute(
        self, model: str, input: str, out: str, progress: Callable[[float, str], None] | None = None,
        timeout: float | None = None, cpu_fallback: bool = True, **options,
    ):
        """Run one attribution in the worker; returns its :class:`~CounterfactualVALib.run_summary.RunSummary`.
        Raises WorkerError with the worker's message on failure (its `gpu` says whether a CPU run might not fail)."""
        from .run_summary import RunSummary

        unknown = sorted(set(options) - set(REQUEST_OPTIONS))
        if unknown:
            raise TypeError(f"unknown attribute options {unknown}; known: {', '.join(REQUEST_OPTIONS)}")
        request = {"command": "attribute", "model": str(model), "input": str(input), "out": str(out), **options}
        try:
            self._run(request, progress, timeout)
        except WorkerError as exc:
            if not (cpu_fallback and exc.gpu and options.get("device", "auto") != "cpu"):
                raise
            self.log(f"The GPU run failed ({exc}); running on the CPU instead.")
            self._run({**request, "device": "cpu"}, progress, timeout)
        return RunSummary.read(out)

    def release(self) -> None:
        """Drop the worker's loaded model (and its GPU memory); the worker stays."""
        if self.running:
            self._send({"command": "release"})

    def cancel(self) -> None:
        """Kill the worker and whatever it is running; the next request starts a fresh one."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            proc.kill()
        proc.wait(timeout=10)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit (killing it if it does not within `timeout`)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                self._send({"command": "shutdown"})
                proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.cancel()
        self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- internals ---------------------------------------------------------------------------------------
    def _run(self, request: dict, progress, timeout) -> dict:
        request_id = str(next(self._ids))
        self.start()
        self._send({**request, "id": request_id})
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.cancel()
                raise WorkerError(f"The attribution did not finish within {timeout:.0f} s and was cancelled.")
            try:
                line = self._lines.get(timeout=0.5 if remaining is None else min(0.5, remaining))
            except queue.Empty:
                if not self.running:
                    raise WorkerError(self._death_message()) from None
                continue
            if line is None:
                self._proc and self._proc.wait(timeout=10)
                raise WorkerError(self._death_message())
            event = parse_event(line)
            if event is None:
                if line.startswith("PROGRESS") and progress is not None:
                    fraction, _, stage = line[len("PROGRESS"):].strip().partition(" ")
                    progress(float(fraction), stage)
                continue
            if event.get("id") != request_id and event["event"] in ("done", "error"):
                continue  # an answer to an earlier request that was given up on
            if event["event"] == "done":
                return event
            if event["event"] == "error":
                raise WorkerError(event.get("message", "unknown error"), event.get("kind", "internal"), bool(event.get("gpu")))

    def _send(self, request: dict) -> None:
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except (OSError, ValueError):
            raise WorkerError(self._death_message()) from None

    def _death_message(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        tail = " | ".join(line for line in list(self.stderr)[-5:] if line.strip()) or "no error output"
        how = f"was killed by signal {-code} (often: out of memory)" if code is not None and code < 0 else f"exited with code {code}"
        return f"The attribution worker {how}: {tail}"

    def _on_stderr(self, line):
        if line is not None:
            self.stderr.append(line)
            self.log(line)

    @staticmethod
    def _pump(stream, put):
        try:
            for line in iter(stream.readline, ""):
                put(line.rstrip("\r\n"))
        except (ValueError, OSError):
            pass
        put(None)


if __name__ == "__main__":
    sys.exit(main())
