"""The child process of a Slicer module: started, streamed, stopped and killed without blocking the GUI.

Both modules run the library's command line (``python -m <CLI_MODULE> attribute|train ... --progress``) in a
separate process, the way SlicerMONAIAuto3DSeg runs its inference: the GUI stays live, the GPU belongs to
the child and is released when it ends, and the command is the one tested from the shell.

:class:`ProcessRunner` is the one place that owns such a process:

- ``start()`` launches it in its own process group (POSIX session / Windows process group), so that stopping
  reaches the PythonSlicer launcher *and* the Python it starts;
- ``poll()`` never blocks: it hands every output line received so far to the callbacks (``PROGRESS <fraction>
  <text>`` lines of stdout to ``on_progress``, the rest to ``on_line``) and returns the exit code once the
  process has exited and its pipes are closed, else None;
- ``request_stop()`` (SIGTERM to the group: the training loop checkpoints and exits with code 3) and
  ``kill()`` (SIGKILL to the group) return at once; the next ``poll()`` sees the end;
- ``restart(command, env)`` runs a new command in the same runner (the CPU fallback of :func:`cpu_fallback`).

It needs no Qt: a module polls it from a ``QTimer``, the console API and the tests from a loop.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

# one definition with the worker, which classifies its own failures the same way
from ..worker import looks_like_gpu_problem  # noqa: F401  (re-exported for the modules and tests)

#: the module that `python -m` runs in the child (the library's command line)
CLI_MODULE = "CounterfactualVACLI"

_PROGRESS = re.compile(r"^PROGRESS\s+([0-9.eE+-]+)\s*(.*)$")


def parse_progress(line: str):
    """(fraction clipped to 0..1, the rest of the line) for a ``PROGRESS <fraction> <text>`` line, else None."""
    match = _PROGRESS.match(line.strip())
    if not match:
        return None
    try:
        fraction = float(match.group(1))
    except ValueError:
        return None
    if fraction != fraction:  # NaN
        return None
    return min(max(fraction, 0.0), 1.0), match.group(2).strip()


def python_executable(override: str | None = None, in_slicer: bool = False) -> str:
    """The Python that runs the command line: `override`, else Slicer's ``PythonSlicer`` launcher inside the
    application (it sets up Slicer's library paths), else this interpreter."""
    if override:
        return override
    if in_slicer:
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


def library_folders(packages) -> list[str]:
    """The folders that hold the named packages (what goes on the child's PYTHONPATH), found by the import
    system without importing them; a package not found adds nothing."""
    import importlib.util

    folders = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        for location in list(spec.submodule_search_locations or []) if spec is not None else []:
            folder = os.path.dirname(os.path.abspath(location))
            if folder not in folders:
                folders.append(folder)
    return folders


def child_environment(library_folders: list[str], device: str = "auto", base: dict | None = None) -> dict:
    """Environment of the child: `base` (Slicer's startup environment, so that the PythonSlicer launcher sets
    up its own paths; default: this process's), the library folders first on PYTHONPATH, unbuffered UTF-8
    output, and no CUDA device when the CPU is asked for (the child then never touches the GPU)."""
    env = dict(base if base is not None else os.environ)
    folders = [str(folder) for folder in library_folders]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in folders]
    env["PYTHONPATH"] = os.pathsep.join(folders + rest)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def cpu_fallback(command: list[str], env: dict) -> tuple[list[str], dict]:
    """The same command on the CPU: ``--device cpu`` (added when absent) and no visible CUDA device."""
    command = list(command)
    if "--device" in command:
        command[command.index("--device") + 1] = "cpu"
    else:
        command += ["--device", "cpu"]
    return command, dict(env, CUDA_VISIBLE_DEVICES="-1")


class ProcessRunner:
    """One child process; see the module docstring. Callbacks run in the thread that calls :meth:`poll`.

    on_progress(fraction, text): the PROGRESS lines of stdout. on_line(line, stream): every other line
    ("out" or "err"). pipe_grace_s: how long after the process exited a grandchild may keep its pipes open
    before the end is reported anyway (under the PythonSlicer launcher the launcher may exit first, while the
    Python it started still writes a checkpoint).
    """

    def __init__(
        self,
        command: list[str],
        env: dict | None = None,
        cwd: str | None = None,
        on_progress: Callable[[float, str], None] | None = None,
        on_line: Callable[[str, str], None] | None = None,
        pipe_grace_s: float = 10.0,
        stdin_pipe: bool = False,
    ):
        self.command = [str(part) for part in command]
        #: keep the child's stdin open for :meth:`send` (a long-lived worker reading requests); else /dev/null
        self.stdin_pipe = stdin_pipe
        self.env = env
        self.cwd = cwd
        self.on_progress = on_progress
        self.on_line = on_line
        self.pipe_grace_s = pipe_grace_s
        #: every non-progress line of stderr, in order (for error messages)
        self.stderr: list[str] = []
        self.returncode: int | None = None
        self.stop_requested = False
        self.killed = False
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._exit_time: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "ProcessRunner":
        if self.running:
            raise RuntimeError("The process is already running.")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: stop/kill reach the launcher and its children
        self.returncode, self._exit_time = None, None
        self.stop_requested = self.killed = False
        self._queue = queue.Queue()
        self._proc = subprocess.Popen(
            self.command, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if self.stdin_pipe else subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, "err"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def restart(self, command: list[str] | None = None, env: dict | None = None) -> "ProcessRunner":
        """Run `command` (default: the same) in this runner after the previous process has ended."""
        if self.running:
            raise RuntimeError("The previous process is still running.")
        if command is not None:
            self.command = [str(part) for part in command]
        if env is not None:
            self.env = env
        self.stderr = []
        return self.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """Started and not yet reported as ended by :meth:`poll`."""
        return self._proc is not None and self.returncode is None

    def poll(self) -> int | None:
        """Deliver the output received so far; the exit code once the process has ended (and its output is
        read), else None. Never blocks."""
        if self._proc is None:
            raise RuntimeError("The process was not started.")
        if self.returncode is not None:
            return self.returncode
        self._deliver()
        if self._proc.poll() is None:
            return None
        if self._exit_time is None:
            self._exit_time = time.monotonic()
        if any(reader.is_alive() for reader in self._readers) and time.monotonic() - self._exit_time < self.pipe_grace_s:
            return None
        self._deliver()
        self.returncode = self._proc.returncode
        self._close_pipes()
        return self.returncode

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int | None:
        """Poll until the end (for the console API and tests); None when `timeout` passed first."""
        start = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - start > timeout:
                return None
            time.sleep(interval)
        return self.returncode

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (``stdin_pipe=True``); OSError when the child has gone."""
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("The process was not started with stdin_pipe=True.")
        try:
            self._proc.stdin.write(line.rstrip("\n") + "\n")
            self._proc.stdin.flush()
        except ValueError:  # closed by kill()
            raise OSError("the process's input is closed") from None

    def request_stop(self) -> None:
        """Ask the process group to stop (SIGTERM; Windows has none: the group is ended). Returns at once."""
        if not self.running:
            return
        self.stop_requested = True
        self._signal(signal.SIGTERM if os.name != "nt" else None)

    def kill(self) -> None:
        """Kill the process group (SIGKILL; on Windows: taskkill /T). Returns at once; poll() then reports the
        end without waiting for pipes a dead grandchild might have held."""
        if self._proc is None or self.returncode is not None:
            return
        self.stop_requested = self.killed = True
        self.pipe_grace_s = 0.0
        self._signal(getattr(signal, "SIGKILL", None))

    # -- output -----------------------------------------------------------------------------------------------
    def error_message(self, what: str = "process", hint: str = "") -> str:
        """The command line's own message (its last ``ERROR:`` line on stderr), else a sentence about the exit
        code and the last stderr lines. `hint` is added for deaths by signal (often: out of memory)."""
        for line in reversed(self.stderr):
            if line.startswith("ERROR:"):
                return line[len("ERROR:"):].strip()
        code = self.returncode
        if code is not None and code < 0:
            return f"The {what} was killed by signal {-code} (often: out of memory). {hint}".strip()
        tail = " | ".join(line for line in self.stderr[-5:] if line.strip()) or "no error output"
        return f"The {what} failed with exit code {code}: {tail}"

    def _read(self, stream, tag):
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((tag, line.rstrip("\r\n")))
        except (ValueError, OSError):
            pass  # stream closed by kill()

    def _deliver(self):
        while True:
            try:
                tag, line = self._queue.get_nowait()
            except queue.Empty:
                return
            progress = parse_progress(line) if tag == "out" else None
            if progress is not None:
                if self.on_progress is not None:
                    self.on_progress(*progress)
                continue
            if tag == "err":
                self.stderr.append(line)
            if self.on_line is not None:
                self.on_line(line, tag)

    def _signal(self, sig):
        proc = self._proc
        try:
            if os.name == "nt":
                # no SIGTERM on Windows: /T reaches the launcher's children, /F ends them (the last periodic
                # checkpoint is what a resumed training finds)
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
            else:
                os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            try:
                proc.send_signal(sig) if sig is not None else proc.terminate()
            except OSError:
                pass

    def _close_pipes(self):
        if any(reader.is_alive() for reader in self._readers):
            return  # a grandchild still holds a pipe: closing it under a blocked reader would block this thread
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is None:
                continue
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a reader thread may be closing it too
                pass
