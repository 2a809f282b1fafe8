"""Atomic file writes: write to a temporary file beside the target, then rename over it.

A reader (Slicer polling an output folder, a resumed training run, a crash mid-write) never sees a
half-written file under the final name. Used for images, model files, checkpoints, logs and CSVs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in the target's folder; on success it replaces `path`, on error it is removed.

    `suffix` keeps writers that choose the format by extension (SimpleITK) working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
