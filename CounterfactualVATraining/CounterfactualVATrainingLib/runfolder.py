"""Run folders are never lost: what `train --out FOLDER` may do to a folder, and the lock that says who is
training into it.

- A folder that holds a run (a checkpoint, a model or a log) is refused unless the run is resumed
  (``--resume``) or moved aside (``--overwrite``: its files go to ``replaced-<UTC time>/`` inside the
  folder; nothing is deleted).
- One trainer per folder: ``.run.lock`` is created exclusively and names the holder's process id; a second
  trainer is refused with that id, and a lock left by a process that no longer runs (kill -9, power loss)
  is taken over.
- Temporary files of interrupted atomic writes (``.tmp-*``) are removed at the start; the log is cut back
  to the checkpoint's step on resume, so the steps a killed run did after its last checkpoint (and repeats
  on resume) appear once.
- A start that fails (bad cohort, bad settings) leaves no folder behind that it created.

No torch here: the Slicer training module uses :func:`move_run_aside` and :func:`run_files` too.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time
from pathlib import Path

from CounterfactualVALib.imageio import InputError
from CounterfactualVALib.run_files import CHECKPOINT_NAME, LOG_NAME, MODEL_NAME, TENSORBOARD_FOLDER

LOCK_NAME = ".run.lock"
#: what a training run writes into its folder; moved aside together by --overwrite
RUN_FILES = (CHECKPOINT_NAME, MODEL_NAME, LOG_NAME, TENSORBOARD_FOLDER)
TEMPORARY_PREFIX = ".tmp-"  # CounterfactualVALib.atomic's temporary files


class RunFolderError(InputError):
    """A run folder that cannot be used as asked: the message says why and what to do."""


def run_files(folder: str | os.PathLike) -> list[str]:
    """Names of the run files present in `folder` (empty when it holds no run)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def move_run_aside(folder: str | os.PathLike) -> Path | None:
    """Move the run files of `folder` into a new ``replaced-<UTC time>`` subfolder; returns it (None when
    there was nothing to move). Other files in the folder stay where they are."""
    folder = Path(folder)
    present = run_files(folder)
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder / f"replaced-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / f"replaced-{stamp}-{suffix}"
    target.mkdir()
    for name in present:
        os.replace(folder / name, target / name)
    return target


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a process we may not signal counts as running)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held by an unknown, dead process


def log_rows_up_to(path: str | os.PathLike, step: int) -> list[dict]:
    """The rows of a run's log.csv whose step is at most `step` (the checkpoint's), each step once."""
    path = Path(path)
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                row_step = int(float(row.get("step") or "nan"))
            except ValueError:
                continue  # a damaged row (the file was cut mid-line): dropped
            if row_step <= step:
                rows[row_step] = row  # a step logged twice (older logs): the later row wins
    return [rows[s] for s in sorted(rows)]


class RunFolder:
    """The folder of one training run, opened by the one process (rank 0) that writes it.

    ``with RunFolder(out).open(resume=..., overwrite=...)`` checks and locks it; leaving the block
    releases the lock, and removes the folder again when this start created it and failed before the run
    wrote a checkpoint or a model.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_NAME
        self.created = False
        self.locked = False
        self.moved_to: Path | None = None

    def open(self, resume: bool = False, overwrite: bool = False) -> "RunFolder":
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other", "pass --resume to continue the run, or --overwrite to start afresh.")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"--out {self.path} is a file, not a folder", "choose a folder (new or holding a run) for --out.")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder {self.path} ({exc.strerror or exc})", "choose a folder you can write to for --out.") from None
        try:
            self._lock()
            self._remove_temporaries()
            present = run_files(self.path)
            if resume and not (self.path / CHECKPOINT_NAME).exists():
                raise RunFolderError(
                    f"--resume: no checkpoint at {self.path / CHECKPOINT_NAME}",
                    "start without --resume, or point --out at the folder of the run to continue.",
                )
            if present and not resume:
                if not overwrite:
                    raise RunFolderError(
                        f"{self.path} already holds a training run ({', '.join(present)})",
                        "add --resume to continue it, --overwrite to move it aside (into a replaced-<time> subfolder) and "
                        "start afresh, or choose another --out.",
                    )
                self.moved_to = move_run_aside(self.path)
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))
        return False

    # --- the lock ---------------------------------------------------------------------------------
    def _lock(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for _attempt in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_stale_lock()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.locked = True
            return
        raise RunFolderError(f"could not lock {self.path} (another trainer keeps taking it)", "make sure only one training runs into this folder.")

    def _take_over_stale_lock(self) -> None:
        holder = read_lock(self.lock_path)
        if holder is None:
            return  # released meanwhile: try again
        pid, host = holder.get("pid"), holder.get("host")
        same_host = host in (None, socket.gethostname())
        if isinstance(pid, int) and pid != os.getpid() and (not same_host or process_alive(pid)):
            where = "" if same_host else f" on {host}"
            raise RunFolderError(
                f"{self.path} is in use: another training (process {pid}{where}, started {holder.get('started', '?')}) is writing into it",
                f"wait for it to finish or stop it, or choose another --out (if no such training runs, delete {self.lock_path}).",
            )
        # the holder is dead: rename the stale lock away (only one contender can) and retry the exclusive create
        try:
            os.replace(self.lock_path, self.lock_path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
        except FileNotFoundError:
            return
        try:
            os.unlink(self.lock_path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
        except OSError:
            pass

    def close(self, failed: bool = False) -> None:
        if self.locked:
            try:
                if (read_lock(self.lock_path) or {}).get("pid") == os.getpid():
                    os.unlink(self.lock_path)
            except OSError:
                pass
            self.locked = False
        if failed and self.created and not any((self.path / name).exists() for name in (CHECKPOINT_NAME, MODEL_NAME)):
            shutil.rmtree(self.path, ignore_errors=True)  # this start made the folder and nothing worth keeping is in it

    def _remove_temporaries(self) -> None:
        """Left by a process killed mid-write; nobody else writes here while we hold the lock."""
        for leftover in self.path.glob(TEMPORARY_PREFIX + "*"):
            try:
                leftover.unlink()
            except OSError:
                pass
