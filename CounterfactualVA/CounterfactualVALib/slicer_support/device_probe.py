"""Which device the child process will compute on, asked once per Python in a short child process.

Importing torch (and initialising CUDA) in the Slicer GUI process costs seconds and holds GPU memory that the
attribution process then lacks, so the panel never does it: :class:`DeviceProbe` runs ``python -m
CounterfactualVALib.slicer_support.device_probe`` with the runner the modules use, and the answer is kept
for the session (per Python executable and installed torch version).
"""

from __future__ import annotations

import json
import sys
import time

from .process import ProcessRunner
from .requirements import installed_version

_CACHE: dict = {}


def probe() -> dict:
    """Run in the child: {"torch": version or None, "cuda": bool, "name", "memory_gib", "error"}."""
    answer = {"torch": None, "cuda": False, "name": None, "memory_gib": None, "error": None}
    try:
        import torch
    except (ImportError, OSError) as exc:  # not installed, or a broken install (missing shared libraries)
        answer["error"] = f"{type(exc).__name__}: {exc}"
        return answer
    answer["torch"] = torch.__version__
    try:
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            answer.update(cuda=True, name=properties.name, memory_gib=round(properties.total_memory / 1024**3, 1))
    except (RuntimeError, AssertionError) as exc:  # e.g. a driver mismatch
        answer["error"] = str(exc)
    return answer


def describe(answer: dict | None) -> str:
    """The panel's device line for a probe answer (None: not known yet)."""
    if answer is None:
        return "Detecting the compute device..."
    if not answer.get("torch"):
        return "PyTorch not installed yet (installed on first Apply)"
    if answer.get("cuda"):
        return f"GPU: {answer['name']}, {answer['memory_gib']:.1f} GiB"
    if answer.get("error"):
        return f"No usable CUDA GPU ({answer['error']}): runs on the CPU"
    return "No CUDA GPU detected: runs on the CPU"


class DeviceProbe:
    """Ask the child's Python once; ``poll()`` returns the panel line when the answer is there, else None."""

    def __init__(self, python: str, env: dict):
        self.key = (python, installed_version("torch"))
        self.answer = _CACHE.get(self.key)
        self._lines: list[str] = []
        self._runner = None
        if self.answer is None:
            command = [python, "-m", "CounterfactualVALib.slicer_support.device_probe"]
            self._runner = ProcessRunner(command, env=env, on_line=lambda line, stream: self._lines.append(line) if stream == "out" else None)
            self._runner.start()

    def poll(self) -> str | None:
        if self.answer is None:
            if self._runner.poll() is None:
                return None
            try:
                self.answer = json.loads(self._lines[-1]) if self._lines else None
            except ValueError:
                self.answer = None
            if self.answer is None:
                self.answer = {"torch": None, "error": self._runner.error_message("device check")}
            elif self.answer.get("torch"):
                _CACHE[self.key] = self.answer
        return describe(self.answer)

    def wait(self, timeout: float = 60.0) -> str:
        """Block until the answer is there (console use); after `timeout` seconds stop asking and say so."""
        deadline = time.monotonic() + timeout
        while (line := self.poll()) is None:
            if time.monotonic() > deadline:
                self.cancel()
                return "The compute device could not be detected (no answer)."
            time.sleep(0.05)
        return line

    def cancel(self) -> None:
        if self._runner is not None:
            self._runner.kill()


if __name__ == "__main__":
    print(json.dumps(probe()), flush=True)
    sys.exit(0)
